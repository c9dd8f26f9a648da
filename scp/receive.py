"""The C-STORE handler: it only writes to the spool.

The handler does no pixel work (STYLE rule 5): the acceptor has already streamed the data set to a file in the
spool's tmp/ (a PartialReceive, within its budget); the handler reads it defensively (limits.check_instance:
deflate bombs, deep nesting, undecodable values, truncated Pixel Data) while the spool fsyncs it, then commits the
file with a rename and answers.
Any failure to keep the instance answers a failure status, never Success. What it kept or refused goes to a
Reporter (the SCP runs in a process of its own: see inbound.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from scp import limits, sop_classes, status
from scp.config import NodeConfig
from scp.errors import SpoolError
from scp.spool import PartialReceive, Received, Spool

LOGGER = logging.getLogger(__name__)


class Reporter(Protocol):
    """Told of every instance the handler kept (after it is durable, before Success is sent) or refused, and of
    every association refused for its calling AE."""

    def received(self, spool_id: str, calling_ae: str, size: int) -> None: ...

    def refused(self, status: int) -> None: ...

    def rejected(self, reason: str) -> None: ...


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ as received: who sent it, on which presentation context, naming what."""

    calling_ae: str
    called_ae: str
    peer_address: str
    context_class: str
    """The presentation context's abstract syntax."""
    transfer_syntax: str
    """The presentation context's transfer syntax: the data set's."""
    sop_class_uid: str
    """Affected SOP Class UID."""
    sop_instance_uid: str
    """Affected SOP Instance UID."""


@dataclass(frozen=True)
class Handler:
    """The C-STORE handler with what it needs bound in (STYLE rule 4)."""

    spool: Spool
    reporter: Reporter
    node: NodeConfig
    min_free: int = 0

    def store(self, request: StoreRequest, data_set: PartialReceive | None) -> int:
        """Commit the received instance (streamed into `data_set`, None when the request carries none) to the
        spool; answer Success only once it is durable.

        Below `min_free` bytes free on the spool's filesystem the instance is refused with 0xA700 (PS3.4 B.2.3):
        the modality keeps it and tries again, instead of trusting a node that may not be able to keep it.
        Whatever happens, the received file does not stay in tmp/ unless it was committed.
        """
        if data_set is None:  # the request's command said it carries none (PS3.7 9.3.1.1)
            what = f"{_refusing(request)}: the C-STORE request carries no data set"
            return self._refused(what, status.CANNOT_UNDERSTAND, logging.WARNING)
        path = Path(data_set.name)
        try:
            return self._store(request, data_set, path)
        finally:
            path.unlink(missing_ok=True)  # committed, it has another name by now

    def _store(self, request: StoreRequest, data_set: PartialReceive, path: Path) -> int:
        if request.sop_class_uid != request.context_class or not sop_classes.accepts(request.sop_class_uid):
            why = f"it names {request.sop_class_uid} on the presentation context of {request.context_class}"
            return self._refused(f"{_refusing(request)}: {why}", status.SOP_CLASS_NOT_SUPPORTED, logging.WARNING)
        if data_set.refused:
            return self._refused(f"{_refusing(request)} while it streamed in: {data_set.refused}")
        if why := self.spool.short_of_space(self.min_free):
            return self._refused(f"{_refusing(request)}: {why}")
        try:
            size = path.stat().st_size
        except OSError as exc:
            return self._refused(f"{_refusing(request)}: its file is gone: {exc}")
        received = Received(
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            peer_address=request.peer_address,
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
            transfer_syntax=request.transfer_syntax,
            received_at=time.time(),
            size=size,
        )
        try:
            spool_id = self.spool.commit_received(
                path,
                received,
                check=lambda: limits.check_instance(
                    path,
                    size,
                    request.transfer_syntax,
                    self.node.max_inflated_bytes,
                    request.sop_class_uid,
                    request.sop_instance_uid,
                ),
            )
        except limits.Refused as exc:
            return self._refused(f"{_refusing(request)}: {exc.reason}", exc.status, logging.WARNING)
        except (OSError, SpoolError) as exc:
            what = f"could not spool instance {request.sop_instance_uid} from {request.calling_ae}: {exc}"
            return self._refused(what)
        LOGGER.info(
            "received %s from %s (%s, %s) as %s",
            request.sop_instance_uid,
            request.calling_ae,
            request.sop_class_uid,
            request.transfer_syntax,
            spool_id,
        )
        self.reporter.received(spool_id, request.calling_ae, size)
        return status.SUCCESS

    def _refused(self, what: str, code: int = status.OUT_OF_RESOURCES, level: int = logging.ERROR) -> int:
        """Log `what` with the status answered, tell the reporter, and return the status."""
        LOGGER.log(level, "%s; answered 0x%04X", what, code)
        self.reporter.refused(code)
        return code


def _refusing(request: StoreRequest) -> str:
    return f"refused instance {request.sop_instance_uid} from {request.calling_ae}"
