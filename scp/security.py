"""Who may talk to the node: called- and calling-AE access control (TLS contexts: tls.py)."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE

from scp.config import AllowedCaller, NodeConfig

LOGGER = logging.getLogger(__name__)

# PS3.8 9.3.4: A-ASSOCIATE-RJ result 1 (permanent), source 1 (service user), reason 3 (calling AE title not
# recognised) or 7 (called AE title not recognised)
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


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


def called_ae_title(assoc: Association) -> str:
    """The AE title the peer called: the node's own or an alias (pynetdicom's `acceptor.ae_title` is always the
    node's own)."""
    request = assoc.requestor.primitive
    assert isinstance(request, A_ASSOCIATE), "an established association has its A-ASSOCIATE request"
    return request.called_ae_title.strip()


def handle_requested(
    event: Event, node: NodeConfig, callers: CallerPolicy | None, on_reject: Callable[[str], None]
) -> None:
    """EVT_REQUESTED: reject a call to an AE title the `node` does not answer to, and an unknown calling AE (or
    a known one from the wrong address; None: any), before negotiation, so nothing they send is ever read as a
    dataset; `on_reject` is told why."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    if not isinstance(request, A_ASSOCIATE):  # an A-P-ABORT of a connection stopped before it sent a request
        return
    called = request.called_ae_title.strip()
    calling = request.calling_ae_title.strip()  # requestor.ae_title is set only once accepted
    address = str(assoc.requestor.address)
    refusal = refused(node, callers, called, calling, address)
    if refusal is None:
        return
    why, reason = refusal
    LOGGER.warning("rejected association from %s at %s to %s: %s", calling, address, called, why)
    on_reject(why)
    assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, reason)
    # As pynetdicom's own ACSE rejection does: let the DUL deliver the A-ASSOCIATE-RJ before the socket closes.
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


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


def access_handlers(node: NodeConfig, on_reject: Callable[[str], None]) -> list[tuple[object, ...]]:
    """The EVT_REQUESTED handler enforcing the node's called AE titles (`ae_title` and `aliases`, unless
    `accept_any_called_ae`) and `allowed_calling_aets`; none when neither is checked."""
    callers = caller_policy(node)
    if node.accept_any_called_ae and callers is None:
        return []
    return [(evt.EVT_REQUESTED, handle_requested, [node, callers, on_reject])]
