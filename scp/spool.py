"""The durable queue on disk, in the manner of Maildir (STYLE rule 12).

Layout under the spool root::

    tmp/                         partial writes and pynetdicom's chunked-receive files; swept at start
    incoming/<id>.json, <id>.dcm received and acknowledged, waiting for rules and compression
    outgoing/<dest>/<id>/        one job per destination: instance.dcm (what to send),
                                 original.dcm (as received, for fallbacks), job.json
    quarantine/<dest>/<id>/      a job an operator must look at, with reason.txt

Every file is written in tmp/, fsynced, and renamed into place; the directory is fsynced after the rename.
A committed file is never modified. `<id>.dcm` in incoming/ is the commit point of a received instance: its
sidecar is renamed first, so an orphan sidecar (crash in between) is swept. An incoming instance is removed only
after every destination's job is committed, and a job only after its destination confirmed it, so a crash at any
point leaves either the instance or its jobs, never neither. Fan-out costs no copies: jobs are hard links.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from scp.errors import SpoolError

LOGGER = logging.getLogger(__name__)

INSTANCE = "instance.dcm"
ORIGINAL = "original.dcm"
JOB_INFO = "job.json"
REASON = "reason.txt"


@dataclass(frozen=True)
class Received:
    """What the node knows about an instance from its association, kept beside the file."""

    calling_ae: str
    called_ae: str
    peer_address: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    received_at: float


@dataclass(frozen=True)
class Job:
    """One instance waiting for one destination."""

    destination: str
    id: str
    path: Path

    @property
    def instance(self) -> Path:
        return self.path / INSTANCE

    @property
    def original(self) -> Path:
        """The instance as received; the same file as `instance` when it was not re-encoded."""
        original = self.path / ORIGINAL
        return original if original.exists() else self.instance

    def info(self) -> dict[str, object]:
        return dict(json.loads((self.path / JOB_INFO).read_text(encoding="utf-8")))


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_id() -> str:
    """A spool id: sorts by arrival, unique without trusting anything from the wire."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}"


class Spool:
    """The spool directory; safe for concurrent use by the threads of one process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.tmp = self.root / "tmp"
        self.incoming_dir = self.root / "incoming"
        self.outgoing_dir = self.root / "outgoing"
        self.quarantine_dir = self.root / "quarantine"
        try:
            for folder in (self.tmp, self.incoming_dir, self.outgoing_dir, self.quarantine_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool at {self.root}: {exc.strerror}") from exc

    # -- start-up -------------------------------------------------------------------------------------
    def sweep(self) -> int:
        """Remove partial files left by a crash or an aborted transfer; return how many were removed."""
        removed = 0
        for entry in self.tmp.iterdir():
            _remove(entry)
            removed += 1
        for sidecar in self.incoming_dir.glob("*.json"):
            if not sidecar.with_suffix(".dcm").exists():
                sidecar.unlink()
                removed += 1
        if removed:
            LOGGER.warning("spool: swept %d partial file(s) left by an earlier run", removed)
        return removed

    # -- receiving ------------------------------------------------------------------------------------
    def commit_received(self, written: Path, received: Received) -> str:
        """Make a fully written file in tmp/ durable in incoming/; return its spool id.

        `written` must be on the spool's filesystem (pynetdicom's chunked files are, see service.py).
        """
        spool_id = new_id()
        fsync_file(written)
        sidecar = self.tmp / f"{spool_id}.json"
        _write_durably(sidecar, json.dumps(asdict(received)).encode())
        os.replace(sidecar, self.incoming_dir / f"{spool_id}.json")
        os.replace(written, self.incoming_dir / f"{spool_id}.dcm")
        fsync_dir(self.incoming_dir)
        return spool_id

    def incoming(self) -> list[str]:
        """Ids of received instances not yet turned into jobs, oldest first."""
        return sorted(p.stem for p in self.incoming_dir.glob("*.dcm"))

    def received_path(self, spool_id: str) -> Path:
        return self.incoming_dir / f"{spool_id}.dcm"

    def received_info(self, spool_id: str) -> Received:
        data = json.loads((self.incoming_dir / f"{spool_id}.json").read_text(encoding="utf-8"))
        return Received(**data)

    def finish_received(self, spool_id: str) -> None:
        """Drop an incoming instance once all of its jobs are committed (or it was dropped by a rule)."""
        self.received_path(spool_id).unlink(missing_ok=True)
        (self.incoming_dir / f"{spool_id}.json").unlink(missing_ok=True)
        fsync_dir(self.incoming_dir)

    # -- jobs -----------------------------------------------------------------------------------------
    def new_tmp_path(self, suffix: str) -> Path:
        return self.tmp / f"{new_id()}{suffix}"

    def commit_job(
        self, spool_id: str, destination: str, instance: Path, original: Path, info: dict[str, object]
    ) -> Job:
        """Commit a job for `destination`; idempotent, so a job committed before a crash is kept as is."""
        folder = self.outgoing_dir / destination
        target = folder / spool_id
        if target.exists():
            return Job(destination, spool_id, target)
        folder.mkdir(exist_ok=True)
        staging = self.tmp / f"{spool_id}.{destination}.job"
        _remove(staging)
        staging.mkdir()
        _link_or_copy(instance, staging / INSTANCE)
        if not original.samefile(instance):
            _link_or_copy(original, staging / ORIGINAL)
        _write_durably(staging / JOB_INFO, json.dumps(info).encode())
        fsync_dir(staging)
        os.replace(staging, target)
        fsync_dir(folder)
        return Job(destination, spool_id, target)

    def jobs(self, destination: str) -> list[Job]:
        """Jobs waiting for `destination`, oldest first."""
        folder = self.outgoing_dir / destination
        if not folder.is_dir():
            return []
        return [Job(destination, p.name, p) for p in sorted(folder.iterdir()) if p.is_dir()]

    def destinations_with_jobs(self) -> list[str]:
        return sorted(p.name for p in self.outgoing_dir.iterdir() if p.is_dir())

    def delivered(self, job: Job) -> None:
        """Remove a job its destination confirmed."""
        trash = self.tmp / f"{job.id}.{job.destination}.delivered"
        os.replace(job.path, trash)
        fsync_dir(job.path.parent)
        _remove(trash)

    def quarantine(self, job: Job, reason: str) -> Path:
        """Move a job an operator must look at to quarantine/<dest>/<id>/ with its reason."""
        folder = self.quarantine_dir / job.destination
        folder.mkdir(exist_ok=True)
        target = folder / job.id
        os.replace(job.path, target)
        fsync_dir(job.path.parent)
        fsync_dir(folder)
        _write_durably(target / REASON, (reason.rstrip() + "\n").encode())
        return target

    def quarantined(self) -> Iterator[Job]:
        for folder in sorted(p for p in self.quarantine_dir.iterdir() if p.is_dir()):
            for path in sorted(p for p in folder.iterdir() if p.is_dir()):
                yield Job(folder.name, path.name, path)


def _write_durably(path: Path, data: bytes) -> None:
    """Write a new file and fsync it (the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        fsync_file(dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
