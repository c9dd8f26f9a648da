"""Delivery to destinations: a C-STORE SCU with real fallbacks, and a directory writer.

A forwarder takes a batch of jobs and returns one Delivery per job; it never raises for a peer's failure.
Deciding what to do with a failed job (retry, quarantine) is the pipeline's business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from scp import compress, security
from scp.config import DicomDestination, DirectoryDestination
from scp.spool import Job, fsync_dir, fsync_file
from scp.status import Outcome, classify_store_status

LOGGER = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context ids are odd numbers 1..255


@dataclass(frozen=True)
class Delivery:
    """The outcome of sending one job."""

    job: Job
    outcome: Outcome
    detail: str
    status: int | None = None


class Forwarder(Protocol):
    def deliver(self, jobs: Sequence[Job]) -> list[Delivery]: ...


def safe_file_name(sop_instance_uid: str) -> str:
    """A file name from a UID taken off the wire: digits and dots only, never a path."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", sop_instance_uid) and len(sop_instance_uid) <= 64:
        return f"{sop_instance_uid}.dcm"
    digest = sop_instance_uid.encode("utf-8", "replace").hex()[:64] or "empty"
    return f"invalid-uid-{digest}.dcm"


class DirectoryForwarder:
    """Writes each instance as <SOP Instance UID>.dcm, atomically, into a folder."""

    def __init__(self, destination: DirectoryDestination) -> None:
        self.path = Path(destination.path)

    def deliver(self, jobs: Sequence[Job]) -> list[Delivery]:
        return [self._deliver_one(job) for job in jobs]

    def _deliver_one(self, job: Job) -> Delivery:
        name = safe_file_name(str(job.info().get("sop_instance_uid", "")))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            partial = self.path / f".{name}.{job.id}.partial"
            shutil.copyfile(job.instance, partial)
            fsync_file(partial)
            os.replace(partial, self.path / name)
            fsync_dir(self.path)
        except OSError as exc:
            return Delivery(job, Outcome.TRANSIENT, f"cannot write to {self.path}: {exc.strerror}")
        return Delivery(job, Outcome.DELIVERED, f"written as {name}")


class DicomForwarder:
    """Sends a batch over one association, proposing for each SOP class the compressed syntax, then the
    original syntax, then the uncompressed ones, each in its own presentation context."""

    def __init__(self, destination: DicomDestination, calling_ae: str, scratch: Path) -> None:
        self.destination = destination
        self.calling_ae = destination.calling_ae_title or calling_ae
        self.scratch = scratch
        self.tls_args = (security.client_context(destination.tls), None) if destination.tls else None

    def deliver(self, jobs: Sequence[Job]) -> list[Delivery]:
        wanted = {job.id: _preferred_syntaxes(job) for job in jobs}
        contexts = sorted({(sop_class, ts) for sop_class, tss in wanted.values() for ts in tss})
        if len(contexts) > MAX_CONTEXTS:
            half = len(jobs) // 2
            return self.deliver(jobs[:half]) + self.deliver(jobs[half:])
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.destination.timeout
        ae.connection_timeout = self.destination.timeout
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, ts)
        where = f"{self.destination.ae_title}@{self.destination.host}:{self.destination.port}"
        try:
            assoc = ae.associate(
                self.destination.host, self.destination.port, ae_title=self.destination.ae_title, tls_args=self.tls_args
            )
        except (OSError, RuntimeError) as exc:
            return [Delivery(job, Outcome.TRANSIENT, f"cannot reach {where}: {exc}") for job in jobs]
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted or refused"
            return [Delivery(job, Outcome.TRANSIENT, f"association to {where} {why}") for job in jobs]
        set_nodelay(assoc)
        try:
            accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
            results = []
            for job in jobs:
                if not assoc.is_established:
                    results.append(Delivery(job, Outcome.TRANSIENT, f"association to {where} ended early"))
                    continue
                results.append(self._send_one(assoc, job, wanted[job.id], accepted))
            return results
        finally:
            if assoc.is_established:
                assoc.release()

    def _send_one(
        self,
        assoc: Association,
        job: Job,
        wanted: tuple[str, list[str]],
        accepted: set[tuple[str, str]],
    ) -> Delivery:
        sop_class, preferred = wanted
        choice = next((ts for ts in preferred if (sop_class, ts) in accepted), None)
        if choice is None:
            offered = ", ".join(UID(ts).name for ts in preferred)
            return Delivery(
                job, Outcome.PERMANENT, f"no presentation context accepted for {sop_class} (offered {offered})"
            )
        path, scratch = _file_in_syntax(job, UID(choice), self.scratch)
        try:
            response = assoc.send_c_store(path)
        except (OSError, RuntimeError, ValueError) as exc:
            return Delivery(job, Outcome.TRANSIENT, f"sending failed: {exc}")
        finally:
            if scratch:
                path.unlink(missing_ok=True)
        if "Status" not in response:
            return Delivery(job, Outcome.TRANSIENT, "no response (timeout or association aborted)")
        status = int(response.Status)
        return Delivery(job, classify_store_status(status), f"status 0x{status:04X} as {UID(choice).name}", status)


def _preferred_syntaxes(job: Job) -> tuple[str, list[str]]:
    """The SOP class and the syntaxes to propose for it, best first."""
    info = job.info()
    candidates = [
        str(info["transfer_syntax"]),
        str(info["original_transfer_syntax"]),
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    return str(info["sop_class_uid"]), list(dict.fromkeys(candidates))


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


def set_nodelay(assoc: Association) -> None:
    """Turn off Nagle's algorithm: pynetdicom never does, and it costs ~40 ms per instance."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_forwarder(destination: DicomDestination | DirectoryDestination, calling_ae: str, scratch: Path) -> Forwarder:
    if isinstance(destination, DicomDestination):
        return DicomForwarder(destination, calling_ae, scratch)
    return DirectoryForwarder(destination)
