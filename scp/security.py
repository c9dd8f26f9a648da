"""Who may talk to the node: called- and calling-AE access control (TLS contexts: tls.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from scp.acse import CALLED_AE_NOT_RECOGNISED, CALLING_AE_NOT_RECOGNISED
from scp.config import AllowedCaller, NodeConfig


@dataclass(frozen=True)
class CallerPolicy:
    """The calling AE titles allowed to associate, each with the networks it may call from (empty: any)."""

    allowed: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]]

    @classmethod
    def from_config(cls, entries: Sequence[str | AllowedCaller]) -> CallerPolicy:
        """Entries naming the same title add up: their networks are merged, and one without hosts allows any."""
        allowed: dict[str, tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]] = {}
        for entry in entries:
            title, hosts = (entry, ()) if isinstance(entry, str) else (entry.ae_title, tuple(entry.hosts))
            if title in allowed and not allowed[title]:
                continue  # already allowed from any address
            allowed[title] = allowed.get(title, ()) + hosts if hosts else ()
        return cls(allowed)

    def permits(self, calling_ae: str, address: str) -> bool:
        """Whether `calling_ae` may associate from `address`."""
        if calling_ae not in self.allowed:
            return False
        networks = self.allowed[calling_ae]
        if not networks:
            return True
        try:
            peer = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped
        return any(peer in network for network in networks)


def refused(
    node: NodeConfig, callers: CallerPolicy | None, called: str, calling: str, address: str
) -> tuple[str, int] | None:
    """Why the node rejects an association (the log's words and the A-ASSOCIATE-RJ reason), or None."""
    if not node.answers_to(called):
        return "called AE not recognised", CALLED_AE_NOT_RECOGNISED
    if callers is not None and not callers.permits(calling, address):
        return "calling AE not recognised", CALLING_AE_NOT_RECOGNISED
    return None


def caller_policy(node: NodeConfig) -> CallerPolicy | None:
    """The node's `allowed_calling_aets`; None when any calling AE may associate."""
    return None if node.allowed_calling_aets is None else CallerPolicy.from_config(node.allowed_calling_aets)
