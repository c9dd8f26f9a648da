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
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp import compress, scu, tls
from scp.config import DicomDestination, DirectoryDestination
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

    assoc: scu.StoreAssociation
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
        self.tls_context = tls.client_context(destination.tls) if destination.tls else None
        self.linger = linger
        self._local = threading.local()

    def idle(self) -> None:
        """Release this thread's association if it has not been used for `linger` seconds."""
        kept: _Open | None = getattr(self._local, "open", None)
        if kept is not None and time.monotonic() - kept.last_used >= self.linger:
            self.close()

    def close(self) -> None:
        """Release this thread's association, if it keeps one."""
        kept: _Open | None = getattr(self._local, "open", None)
        self._local.open = None
        if kept is not None:
            kept.assoc.release()

    def _reusable(self, contexts: set[tuple[str, str]]) -> scu.StoreAssociation | None:
        kept: _Open | None = getattr(self._local, "open", None)
        if kept is None:
            return None
        if kept.assoc.is_open() and contexts <= kept.proposed:
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
        destination = self.destination
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        assoc = self._reusable(set(contexts))
        if assoc is None:
            try:
                assoc = scu.request(
                    destination.host,
                    destination.port,
                    self.calling_ae,
                    destination.ae_title,
                    contexts,
                    destination.timeout,
                    self.tls_context,
                )
            except scu.AssociationFailed as exc:
                # Only the first job counts an attempt: the others were never sent (as behind an association
                # that ended early), and the destination pauses as a whole.
                for index, job in enumerate(jobs):
                    failed = f"association to {where}: {exc}"
                    yield Delivery(job, Outcome.TRANSIENT, failed, reached=False, sent=index == 0)
                return
            if not assoc.accepted_contexts:
                assoc.release()
                for job in jobs:
                    yield _no_context(job, wanted[job.id], where)
                return
            self._local.open = _Open(assoc, frozenset(contexts), time.monotonic())
        finished, tried, usable = False, False, True
        try:
            accepted = assoc.accepted_contexts
            for job in jobs:
                delivery = None
                if usable:
                    delivery, usable = self._send_one(assoc, job, wanted[job.id], accepted)
                if delivery is None:
                    # Jobs behind the one the association ended (or went unanswered) on were never sent: no attempt
                    # is counted. One that finds it ended before anything was sent counts (a peer dropping every
                    # association backs off).
                    usable = False
                    yield Delivery(job, Outcome.TRANSIENT, f"association to {where} ended early", sent=not tried)
                    tried = True
                    continue
                yield delivery
                tried = True
            finished = True
        finally:
            kept: _Open | None = getattr(self._local, "open", None)
            if finished and usable and kept is not None and assoc.is_open():
                kept.last_used = time.monotonic()  # kept for the next batch
            else:
                self.close()  # stopped early (shutdown) or the association ended

    def _send_one(
        self,
        assoc: scu.StoreAssociation,
        job: Job,
        wanted: tuple[str, list[str]],
        accepted: set[tuple[str, str]],
    ) -> tuple[Delivery | None, bool]:
        """Send in the best accepted syntax; in the next one when the file as written cannot be sent.

        Returns the job's delivery (None when the association had ended and nothing went out) and whether the
        association can carry another message (not after a send failed or went unanswered).
        """
        sop_class, preferred = wanted
        choices = [UID(ts) for ts in preferred if (sop_class, ts) in accepted]
        if not choices:
            return _no_context(job, wanted, assoc.called_ae), True
        refused = []
        for choice in choices:
            try:
                path, scratch = _file_in_syntax(job, choice, self.scratch)
            except Exception as exc:
                return Delivery(job, _conversion_outcome(exc), f"cannot convert to {choice.name}: {exc}"), True
            try:
                response = assoc.store(path)
            except scu.AssociationEnded as exc:
                if not exc.sent:
                    return None, False  # it ended (the peer aborted or closed) before this job
                return Delivery(job, Outcome.TRANSIENT, str(exc)), False
            except OSError as exc:  # the file cannot be read; nothing was sent
                return Delivery(job, Outcome.TRANSIENT, f"cannot read the file to send: {exc}"), True
            except (ValueError, InvalidDicomError) as exc:
                # Refused before sending anything: not a Part 10 file, or its file meta names another SOP class
                # than the job (a job made before receiving refused such data sets with 0xA900)
                refused.append(f"as {choice.name}: {exc}")
                continue
            finally:
                if scratch:
                    path.unlink(missing_ok=True)
            detail = f"{assoc.called_ae} answered status {describe(response.status)} to {choice.name}"
            if response.error_comment:
                detail += f" ({response.error_comment})"
            if refused:
                LOGGER.warning(
                    "sent %s as %s: cannot send it %s",
                    job.info().get("sop_instance_uid"),
                    choice.name,
                    "; ".join(refused),
                )
            return Delivery(job, classify_store_status(response.status), detail, response.status), True
        return Delivery(job, Outcome.PERMANENT, f"cannot send the file {'; '.join(refused)}"), True


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


def make_forwarder(destination: DicomDestination | DirectoryDestination, calling_ae: str, scratch: Path) -> Forwarder:
    if isinstance(destination, DicomDestination):
        return DicomForwarder(destination, calling_ae, scratch)
    return DirectoryForwarder(destination)
