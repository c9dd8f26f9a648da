"""The SCP: presentation contexts we accept, and the C-STORE handler that only writes to the spool.

The handler does no pixel work (STYLE rule 5): pynetdicom has already streamed the dataset to a file in the
spool's tmp/ (chunked receive, see inbound.py); the handler reads it defensively (limits.check_instance: size,
deflate bombs, deep nesting, undecodable values, truncated Pixel Data) while the spool fsyncs it, then commits the
file with a rename and answers.
Any failure to keep the instance answers a failure status, never Success. What it kept or refused goes to a
Reporter (the SCP runs in a process of its own: see inbound.py).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # its SOP class names are made at import

from scp import limits, sop_classes, status, syntaxes
from scp.config import NodeConfig
from scp.errors import SpoolError
from scp.pdu import ack_at_once
from scp.security import called_ae_title
from scp.spool import PartialReceive, Received, Spool

LOGGER = logging.getLogger(__name__)


class Reporter(Protocol):
    """Told of every instance the handler kept (after it is durable, before Success is sent) or refused, and of
    every association refused for its calling AE."""

    def received(self, spool_id: str, calling_ae: str, size: int) -> None: ...

    def refused(self, status: int) -> None: ...

    def rejected(self, reason: str) -> None: ...


def add_supported_contexts(ae: AE) -> None:
    """Accept Verification and every storage SOP class pynetdicom lists in every transfer syntax pydicom knows
    (the others a peer proposes are added per association: sop_classes.py)."""
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        # every context of pynetdicom's storage list names its SOP class; the attribute is typed Optional
        ae.add_supported_context(cast(UID, context.abstract_syntax), list(syntaxes.ACCEPTED))


def handle_store(event: Event, spool: Spool, reporter: Reporter, node: NodeConfig, min_free: int = 0) -> int:
    """Commit the received instance to the spool; answer Success only once it is durable.

    Below `min_free` bytes free on the spool's filesystem the instance is refused with 0xA700 (PS3.4 B.2.3):
    the modality keeps it and tries again, instead of trusting a node that may not be able to keep it.
    Whatever happens, the received file does not stay in tmp/ unless it was committed.
    """
    path: Path | None = event.dataset_path
    if path is None:  # the request's command said it carries none (PS3.7 9.3.1.1)
        return _refused(
            reporter,
            f"{_refusing(event)}: the C-STORE request carries no data set",
            status.CANNOT_UNDERSTAND,
            logging.WARNING,
        )
    try:
        return _store(event, path, spool, reporter, node, min_free)
    finally:
        path.unlink(missing_ok=True)  # pynetdicom leaves it behind when a handler raises


def _refusing(event: Event) -> str:
    request = cast(C_STORE, event.request)
    return f"refused instance {request.AffectedSOPInstanceUID} from {event.assoc.requestor.ae_title}"


def _store(event: Event, path: Path, spool: Spool, reporter: Reporter, node: NodeConfig, min_free: int) -> int:
    request = cast(C_STORE, event.request)  # the handler is bound to EVT_C_STORE only
    assoc = event.assoc
    calling = assoc.requestor.ae_title
    sop_instance_uid = str(request.AffectedSOPInstanceUID)
    if request.AffectedSOPClassUID != event.context.abstract_syntax:
        why = f"it names {request.AffectedSOPClassUID} on the presentation context of {event.context.abstract_syntax}"
        return _refused(reporter, f"{_refusing(event)}: {why}", status.SOP_CLASS_NOT_SUPPORTED, logging.WARNING)
    partial = getattr(request, "_dataset_file", None)  # pynetdicom's handle on the file it streamed into
    if isinstance(partial, PartialReceive) and partial.refused:
        return _refused(reporter, f"{_refusing(event)} while it streamed in: {partial.refused}")
    if why := spool.short_of_space(min_free):
        return _refused(reporter, f"{_refusing(event)}: {why}")
    size = path.stat().st_size
    syntax = str(event.context.transfer_syntax)
    received = Received(
        calling_ae=calling,
        called_ae=called_ae_title(assoc),
        peer_address=str(assoc.requestor.address),
        sop_class_uid=str(request.AffectedSOPClassUID),
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=syntax,
        received_at=time.time(),
        size=size,
    )
    try:
        spool_id = spool.commit_received(
            path,
            received,
            check=lambda: limits.check_instance(
                path, size, syntax, node.max_inflated_bytes, received.sop_class_uid, sop_instance_uid
            ),
        )
    except limits.Refused as exc:
        what = f"{_refusing(event)}: {exc.reason}"
        return _refused(reporter, what, exc.status, logging.WARNING)
    except (OSError, SpoolError) as exc:
        return _refused(reporter, f"could not spool instance {sop_instance_uid} from {calling}: {exc}")
    LOGGER.info(
        "received %s from %s (%s, %s) as %s",
        sop_instance_uid,
        calling,
        received.sop_class_uid,
        received.transfer_syntax,
        spool_id,
    )
    reporter.received(spool_id, calling, size)
    return status.SUCCESS


def _refused(reporter: Reporter, what: str, code: int = status.OUT_OF_RESOURCES, level: int = logging.ERROR) -> int:
    """Log `what` with the status answered, tell `reporter`, and return the status for pynetdicom to answer."""
    LOGGER.log(level, "%s; answered 0x%04X", what, code)
    reporter.refused(code)
    return code


def handle_connection_open(event: Event) -> None:
    """Turn off Nagle's algorithm on every accepted connection."""
    set_nodelay(event.assoc)


def handlers(spool: Spool, reporter: Reporter, node: NodeConfig, min_free: int = 0) -> list[tuple[object, ...]]:
    """The event handlers of the SCP, with their dependencies bound in (STYLE rule 4)."""
    return [
        (evt.EVT_REQUESTED, sop_classes.handle_requested),
        (evt.EVT_C_STORE, handle_store, [spool, reporter, node, min_free]),
        (evt.EVT_CONN_OPEN, handle_connection_open),
    ]


def set_nodelay(assoc: Association) -> None:
    """Turn off Nagle's algorithm and delayed ACKs on an association's socket.

    pynetdicom does neither. Without TCP_NODELAY our own small PDUs wait for the peer's ACK; and a peer that keeps
    Nagle on (Debian's DCMTK unless TCP_NODELAY=1 is in its environment) waits for ours, which Linux delays by
    ~40 ms: 40 ms per instance either way. Linux clears TCP_QUICKACK by itself, so it is set again before every
    read (measured against such a storescp: 49 ms per instance without, 4 ms with).
    """
    transport = getattr(assoc.dul, "socket", None)
    sock = getattr(transport, "socket", None)
    if transport is None or sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv: Callable[[int], bytearray] = transport.recv  # pynetdicom's AssociationSocket.recv

    def recv_acking_at_once(nr_bytes: int) -> bytearray:
        ack_at_once(sock)
        return recv(nr_bytes)

    transport.recv = recv_acking_at_once
