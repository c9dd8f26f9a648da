"""Delivery to destinations: a C-STORE SCU with real fallbacks, and a directory writer.

A forwarder takes a batch of jobs and yields one Delivery per job as soon as it is known; it never raises for a
peer's failure. The caller may stop iterating at any point (shutdown): the jobs not yet yielded were not sent,
or their outcome is unknown, and stay in the spool. Deciding what to do with a failed job (retry, quarantine)
is the pipeline's business.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA

from scp import compress, reactors, tls
from scp.config import DicomDestination, DirectoryDestination
from scp.reactors import WakingQueue
from scp.spool import Job, fsync_dir, fsync_file
from scp.status import Outcome, classify_store_status, describe

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context ids are odd numbers 1..255
ASSOCIATION_LINGER = 2.0
"""Seconds an idle association to a destination stays open for the next batch before it is released."""


@dataclass(frozen=True)
class Delivery:
    """The outcome of sending one job."""

    job: Job
    outcome: Outcome
    detail: str
    status: int | None = None
    reached: bool = True
    """False when the destination itself could not be reached (no association): a reason to pause it."""
    sent: bool = True
    """False when the job never went out: the association ended over an earlier job of its batch."""


class Forwarder(Protocol):
    def deliver(self, jobs: Sequence[Job]) -> Iterator[Delivery]: ...


def safe_file_name(sop_instance_uid: str) -> str:
    """A file name from a UID taken off the wire: the UID itself when it is digits and dots (PS3.5 9.1), else
    the SHA-256 of the whole value, so that two different UIDs never share a file and no name is a path."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", sop_instance_uid) and len(sop_instance_uid) <= 64:
        return f"{sop_instance_uid}.dcm"
    digest = hashlib.sha256(sop_instance_uid.encode("utf-8", "surrogateescape")).hexdigest()
    return f"invalid-uid-{digest}.dcm"


class DirectoryForwarder:
    """Writes each instance as <SOP Instance UID>.dcm, atomically, into a folder."""

    def __init__(self, destination: DirectoryDestination) -> None:
        self.path = Path(destination.path)
        self.accept = destination.accept

    def deliver(self, jobs: Sequence[Job]) -> Iterator[Delivery]:
        for job in jobs:
            yield self._deliver_one(job)

    def _deliver_one(self, job: Job) -> Delivery:
        info = job.info()
        name = safe_file_name(str(info.get("sop_instance_uid", "")))
        if self.accept is not None and info["transfer_syntax"] not in self.accept:
            syntax = UID(str(info["transfer_syntax"])).name
            return Delivery(job, Outcome.PERMANENT, f"{syntax} is not in the destination's accept list")
        partial = self.path / f".{name}.{job.id}.partial"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(job.instance, partial)
            fsync_file(partial)
            os.replace(partial, self.path / name)
            fsync_dir(self.path)
        except OSError as exc:
            # what a failed write left would hold its space (a full disk stays full for every later job)
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            return Delivery(job, Outcome.TRANSIENT, f"cannot write to {self.path}: {exc.strerror}")
        return Delivery(job, Outcome.DELIVERED, f"written as {name}")


@dataclass
class _Open:
    """An association a delivery thread keeps for its next batches, and what it proposed."""

    assoc: Association
    proposed: frozenset[tuple[str, str]]
    last_used: float


class DicomForwarder:
    """Sends a batch over one association, proposing for each SOP class the compressed syntax, then the
    original syntax, then the uncompressed ones, each in its own presentation context.

    Each delivery thread keeps its association open after a batch and reuses it for the next one when that
    proposes no context it did not (the outcome of negotiation would be the same); `idle` releases it once
    unused for `linger` seconds, `close` at once. Associations are never shared between threads.
    """

    def __init__(
        self, destination: DicomDestination, calling_ae: str, scratch: Path, linger: float = ASSOCIATION_LINGER
    ) -> None:
        self.destination = destination
        self.calling_ae = destination.calling_ae_title or calling_ae
        self.scratch = scratch
        self.tls_args = (tls.client_context(destination.tls), None) if destination.tls else None
        self.linger = linger
        self._local = threading.local()
        # send_c_store(path) then reads the file in PDU-sized pieces instead of decoding and re-encoding it whole
        # (a pynetdicom setting for the whole process)
        _config.STORE_SEND_CHUNKED_DATASET = True

    def idle(self) -> None:
        """Release this thread's association if it has not been used for `linger` seconds."""
        kept: _Open | None = getattr(self._local, "open", None)
        if kept is not None and time.monotonic() - kept.last_used >= self.linger:
            self.close()

    def close(self) -> None:
        """Release this thread's association, if it keeps one."""
        kept: _Open | None = getattr(self._local, "open", None)
        self._local.open = None
        if kept is not None and kept.assoc.is_established:
            kept.assoc.release()

    def _reusable(self, contexts: set[tuple[str, str]]) -> Association | None:
        kept: _Open | None = getattr(self._local, "open", None)
        if kept is None:
            return None
        if kept.assoc.is_established and contexts <= kept.proposed:
            return kept.assoc
        self.close()
        return None

    def deliver(self, jobs: Sequence[Job]) -> Iterator[Delivery]:
        wanted = {job.id: _preferred_syntaxes(job, self.destination.accept) for job in jobs}
        for job in jobs:
            if not wanted[job.id][1]:
                refused = "it cannot be sent in any syntax of the destination's accept list"
                yield Delivery(job, Outcome.PERMANENT, refused)
        jobs = [job for job in jobs if wanted[job.id][1]]
        if not jobs:
            return
        contexts = sorted({(sop_class, ts) for sop_class, tss in wanted.values() for ts in tss})
        if len(contexts) > MAX_CONTEXTS:
            half = len(jobs) // 2
            yield from self.deliver(jobs[:half])
            yield from self.deliver(jobs[half:])
            return
        where = f"{self.destination.ae_title}@{self.destination.host}:{self.destination.port}"
        assoc = self._reusable(set(contexts))
        if assoc is None:
            try:
                assoc = associate(self.destination, self.calling_ae, contexts, self.tls_args)
            except OSError as exc:  # the host name does not resolve (pynetdicom resolves it in this thread)
                failed = f"association to {where}: cannot connect: {exc}"
                for job in jobs:
                    yield Delivery(job, Outcome.TRANSIENT, failed, reached=False)
                return
            if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
                # pynetdicom aborts an association in which the peer accepted no context at all
                for job in jobs:
                    yield _no_context(job, wanted[job.id], where)
                return
            if not assoc.is_established:
                why = _not_established(assoc, self.destination.timeout)
                for job in jobs:
                    yield Delivery(job, Outcome.TRANSIENT, f"association to {where}: {why}", reached=False)
                return
            set_nodelay(assoc)
            bound_sending(assoc, self.destination.timeout)
            self._local.open = _Open(assoc, frozenset(contexts), time.monotonic())
        finished, tried, usable = False, False, True
        try:
            # an accepted context always has the abstract syntax we proposed; pynetdicom types it Optional
            accepted: set[tuple[str, str]] = {
                (cast(UID, cx.abstract_syntax), cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            }
            for job in jobs:
                delivery = None
                if usable and assoc.is_established:
                    delivery, usable = self._send_one(assoc, job, wanted[job.id], accepted)
                if delivery is None:
                    # Jobs behind the one the association ended (or went unanswered) on were never sent: no attempt
                    # is counted. One that finds it ended before anything was sent counts (a peer dropping every
                    # association backs off).
                    usable = False
                    yield Delivery(job, Outcome.TRANSIENT, f"association to {where} ended early", sent=not tried)
                    continue
                yield delivery
                tried = True
            finished = True
        finally:
            kept: _Open | None = getattr(self._local, "open", None)
            if finished and usable and kept is not None and assoc.is_established:
                kept.last_used = time.monotonic()  # kept for the next batch
            else:
                self.close()  # stopped early (shutdown) or the association ended

    def _send_one(
        self,
        assoc: Association,
        job: Job,
        wanted: tuple[str, list[str]],
        accepted: set[tuple[str, str]],
    ) -> tuple[Delivery | None, bool]:
        """Send in the best accepted syntax; in the next one when pynetdicom refuses the file as written.

        Returns the job's delivery (None when the association had ended and nothing went out) and whether the
        association can carry another message (not after a send failed or went unanswered).
        """
        sop_class, preferred = wanted
        choices = [UID(ts) for ts in preferred if (sop_class, ts) in accepted]
        if not choices:
            return _no_context(job, wanted, f"{assoc.acceptor.ae_title}"), True
        refused = []
        for choice in choices:
            try:
                path, scratch = _file_in_syntax(job, choice, self.scratch)
            except Exception as exc:
                return Delivery(job, _conversion_outcome(exc), f"cannot convert to {choice.name}: {exc}"), True
            try:
                response = assoc.send_c_store(path)
            except SendStalled as exc:
                assoc.abort()  # half a message was sent: the association cannot carry another one
                return Delivery(job, Outcome.TRANSIENT, f"sending failed: {exc}; association aborted"), False
            except RuntimeError as exc:
                if _NOT_ESTABLISHED in str(exc):
                    return None, False  # it ended (the peer aborted) after the caller looked
                return Delivery(job, Outcome.TRANSIENT, f"sending failed: {exc}"), False
            except OSError as exc:
                return Delivery(job, Outcome.TRANSIENT, f"sending failed: {exc}"), False
            except ValueError as exc:
                # pynetdicom refuses the file before sending anything: unreadable, or its file meta names another
                # SOP class than the job (a job made before receiving refused such data sets with 0xA900)
                refused.append(f"as {choice.name}: {exc}")
                continue
            finally:
                if scratch:
                    path.unlink(missing_ok=True)
            if "Status" not in response:
                # pynetdicom aborted on a timeout, or the peer aborted (which pynetdicom's association thread
                # notices a moment later: is_established may still be True)
                return Delivery(job, Outcome.TRANSIENT, "no response (timeout or association aborted)"), False
            status = int(response.Status)
            detail = f"{assoc.acceptor.ae_title} answered status {describe(status)} to {choice.name}"
            if refused:
                LOGGER.warning(
                    "sent %s as %s: cannot send it %s",
                    job.info().get("sop_instance_uid"),
                    choice.name,
                    "; ".join(refused),
                )
            return Delivery(job, classify_store_status(status), detail, status), True
        return Delivery(job, Outcome.PERMANENT, f"cannot send the file {'; '.join(refused)}"), True


_NOT_ESTABLISHED = "must be established before sending"
"""pynetdicom 3.0's send_c_store refusing, before anything is sent, on an association that is no longer established."""


def _conversion_outcome(exc: BaseException) -> Outcome:
    """Transient when the system failed us (a full disk, no memory), which may pass; permanent when the decoder
    failed on this image, which retrying will not change. An OSError without an errno comes from a codec (Pillow's
    "cannot identify image file"), not from the system."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None):
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def _no_context(job: Job, wanted: tuple[str, list[str]], where: str) -> Delivery:
    sop_class, preferred = wanted
    offered = ", ".join(UID(ts).name for ts in preferred)
    return Delivery(
        job,
        Outcome.PERMANENT,
        f"{where} accepted no presentation context for {UID(sop_class).name} ({sop_class}); offered {offered}",
    )


def _preferred_syntaxes(job: Job, accept: Sequence[str] | None = None) -> tuple[str, list[str]]:
    """The SOP class and the syntaxes to propose for it, best first; only those in `accept` when given."""
    info = job.info()
    syntaxes = sendable_syntaxes(str(info["transfer_syntax"]), str(info["original_transfer_syntax"]), accept)
    return str(info["sop_class_uid"]), syntaxes


def sendable_syntaxes(syntax: str, original_syntax: str, accept: Sequence[str] | None = None) -> list[str]:
    """The syntaxes a job made in `syntax` from an instance received in `original_syntax` can be sent in, best
    first: its own, the original's, then the uncompressed ones the original is converted to; only those in
    `accept` when given."""
    candidates = [syntax, original_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return [ts for ts in dict.fromkeys(candidates) if accept is None or ts in accept]


def _file_in_syntax(job: Job, syntax: UID, scratch: Path) -> tuple[Path, bool]:
    """The file to send in `syntax`, and whether it is a scratch file to delete after sending."""
    info = job.info()
    if syntax == info["transfer_syntax"]:
        return job.instance, False
    if syntax == info["original_transfer_syntax"]:
        return job.original, False
    path = scratch / f"{job.id}.{job.destination}.{syntax.name.replace(' ', '')}.dcm"
    compress.decompress_file(job.original, path, syntax)
    return path, True


def associate(
    destination: DicomDestination,
    calling_ae: str,
    contexts: Sequence[tuple[str, str]],
    tls_args: tuple[ssl.SSLContext, str | None] | None = None,
) -> Association:
    """Request an association proposing one presentation context per (SOP class, transfer syntax), over TLS
    when `tls_args` (pynetdicom's (context, server hostname)) are given."""
    reactors.install()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout
    ae.connection_timeout = destination.timeout
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    # pynetdicom types the hostname str, but passes it on to SSLContext.wrap_socket, which takes None (no SNI)
    return ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,  # type: ignore[arg-type]
    )


def _not_established(assoc: Association, timeout: float) -> str:
    """Why an association request failed, in the words an operator needs: the socket or TLS error of a failed
    connection, or the result, source and reason of an A-ASSOCIATE-RJ."""
    failed = getattr(assoc.dul, CONNECT_ERROR, None)
    if failed is not None:
        return f"cannot connect: {failed}"
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and isinstance(answer, A_ASSOCIATE):
        return f"rejected ({answer.result_str}, {answer.source_str}: {answer.reason_str})"
    return f"aborted by the peer, or no answer within {timeout:g} s"


CONNECT_ERROR = "scp_connect_error"
"""Attribute of an association's DUL thread holding pynetdicom's reason for a connection that failed."""


def _keep_connect_error(record: logging.LogRecord) -> bool:
    """pynetdicom logs why a connection failed ("TCP Initialisation Error: ...") from the association's DUL thread
    and keeps it nowhere: keep it on that thread for `_not_established`. Its traceback of a TLS failure, the same
    error again, is dropped."""
    message = record.getMessage()
    if message.startswith(_CONNECT_FAILED):
        setattr(threading.current_thread(), CONNECT_ERROR, message.removeprefix(_CONNECT_FAILED))
    return not (record.exc_info and isinstance(record.exc_info[1], ssl.SSLError))


_CONNECT_FAILED = "TCP Initialisation Error: "
logging.getLogger("pynetdicom.transport").addFilter(_keep_connect_error)


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
    quickack = getattr(socket, "TCP_QUICKACK", None)  # Linux only
    if quickack is None:
        return
    recv: Callable[[int], bytearray] = transport.recv  # pynetdicom's AssociationSocket.recv

    def recv_acking_at_once(nr_bytes: int) -> bytearray:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        return recv(nr_bytes)

    transport.recv = recv_acking_at_once


class SendWindow(WakingQueue):
    """pynetdicom's queue of PDUs to send, with back-pressure on P-DATA.

    pynetdicom reads a file being sent in PDU-sized pieces but queues them all at once (an unbounded queue its
    reactor drains): a 1 GiB instance would sit in memory whole. Here the sending thread waits while `limit` PDUs
    are queued. If nothing is drained for `patience` seconds (a peer that stopped reading, or a dead reactor),
    `put` raises SendStalled in the sending thread, which aborts the association. Other primitives (release,
    abort) never wait. Every put rings `wake` (the event-driven DUL reactor sleeps until then).
    """

    def __init__(self, limit: int, patience: float, wake: Callable[[], None] = lambda: None) -> None:
        super().__init__(wake)
        self.limit = limit
        self.patience = patience

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        if isinstance(item, P_DATA):
            deadline = time.monotonic() + self.patience
            with self.not_full:  # notified by every get()
                while self._qsize() >= self.limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise SendStalled(f"the peer took nothing for {self.patience:g} s")
                    self.not_full.wait(remaining)
        super().put(item, block, timeout)


class SendStalled(RuntimeError):
    """The peer stopped taking PDUs in the middle of a message: the association is no use any more."""


SEND_WINDOW_PDUS = 16
"""P-DATA PDUs an association queues for sending before the sender waits (16 x max PDU: 2 MiB at 128 KiB)."""


def bound_sending(assoc: Association, timeout: float) -> None:
    """Bound what sending can cost an association we requested; call before its first DIMSE message.

    Memory: pynetdicom's PDU queue becomes a SendWindow (swapped only while empty: just after establishment the
    reactor holds nothing in it). Time: pynetdicom connects with a timeout and then clears it, so a peer that
    stops reading would block the reactor's send (and the association) for ever; the socket gets `timeout` back.
    """
    queued = assoc.dul.to_provider_queue
    if queued.empty():
        wake = queued.wake if isinstance(queued, WakingQueue) else lambda: None
        assoc.dul.to_provider_queue = SendWindow(SEND_WINDOW_PDUS, timeout, wake)
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


def make_forwarder(destination: DicomDestination | DirectoryDestination, calling_ae: str, scratch: Path) -> Forwarder:
    if isinstance(destination, DicomDestination):
        return DicomForwarder(destination, calling_ae, scratch)
    return DirectoryForwarder(destination)
