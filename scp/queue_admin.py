"""Operator commands on the spool: `compressing-scp queue status|list|retry|purge`.

They work on the files alone, so they are safe while the node runs: every change is one rename of a job
directory (quarantine → outgoing, or → tmp/ for deletion), which the node's deliverers pick up within a second.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from scp.config import RESERVED_DESTINATIONS, check_destination_name
from scp.errors import ScpError, SpoolError
from scp.spool import Job, Spool, arrival

STATES = ("incoming", "outgoing", "quarantine")


def _age(since: float | None, now: float) -> str:
    """A short human age: 42s, 7m, 3h, 2d ("-" when unknown)."""
    if since is None:
        return "-"
    seconds = now - since
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def status(spool: Spool) -> list[str]:
    """Counts per state and destination, and the age of the oldest item of each."""
    now = time.time()
    rows = [(c.state, c.destination or "-", str(c.count), _age(c.oldest, now)) for c in spool.census()]
    return _table(("STATE", "DESTINATION", "COUNT", "OLDEST"), rows)


def _folder(destination: str | None) -> str | None:
    """`destination` (None: every one) when it is a destination's name, never a path to another spool folder."""
    if destination is None:
        return None
    try:
        return check_destination_name(destination)
    except ValueError as exc:
        raise ScpError(f"--destination: {exc}") from exc


def listing(spool: Spool, state: str | None = None, destination: str | None = None) -> list[str]:
    """One line per item: state, destination, spool id, SOP Instance UID, age, and the quarantine reason."""
    destination = _folder(destination)
    now = time.time()
    rows: list[tuple[str, ...]] = []
    if state in (None, "incoming") and destination is None:
        for spool_id in spool.incoming():
            try:
                uid = spool.received_info(spool_id).sop_instance_uid
            except SpoolError:
                if not spool.received_path(spool_id).exists():
                    continue  # processed meanwhile
                uid = "?"  # its sidecar is missing or broken: processing quarantines it
            rows.append(("incoming", "-", spool_id, uid, _age(arrival(spool_id), now), ""))
    for name, jobs in (("outgoing", spool.jobs), ("quarantine", spool.quarantined)):
        if state in (None, name):
            rows.extend(_job_row(name, job, now) for job in jobs(destination))
    return _table(("STATE", "DESTINATION", "ID", "SOP INSTANCE UID", "AGE", "REASON"), rows)


def _job_row(state: str, job: Job, now: float) -> tuple[str, ...]:
    if job.path.exists():
        uid, reason = str(job.info_if_readable().get("sop_instance_uid", "?")), _reason_line(job.reason())
    else:
        uid, reason = "?", "(delivered or moved meanwhile)"
    return (state, job.destination, job.id, uid, _age(arrival(job.id), now), reason)


def _reason_line(reason: str) -> str:
    """The `reason:` line of a reason.txt (the whole first line if there is none)."""
    for line in reason.splitlines():
        if line.startswith("reason:"):
            return line.removeprefix("reason:").strip()
    return reason.splitlines()[0] if reason else ""


def _select(jobs: Iterable[Job], destination: str | None, uids: Sequence[str]) -> tuple[list[Job], list[str]]:
    """The jobs whose SOP Instance UID is in `uids` (all of them when `uids` is empty), and a problem naming the
    UIDs no job has (a typo must not pass for "nothing to do")."""
    wanted, found, chosen = set(uids), set(), []
    for job in jobs:
        uid = str(job.info_if_readable().get("sop_instance_uid", "?"))  # '?': a broken job.json, still handled
        if not wanted or uid in wanted:
            chosen.append(job)
            found.add(uid)
    missing = [uid for uid in dict.fromkeys(uids) if uid not in found]
    if not missing:
        return chosen, []
    of = f" of {destination!r}" if destination is not None else ""
    return chosen, [f"no quarantined job{of} has the SOP Instance UID {', '.join(missing)}"]


def retry(spool: Spool, destination: str | None, uids: Sequence[str]) -> tuple[list[Job], list[str]]:
    """Send quarantined jobs (all, or those with these UIDs) back to the queue; return (those moved, problems)."""
    chosen, problems = _select(spool.quarantined(_folder(destination)), destination, uids)
    moved = []
    for job in chosen:
        if job.destination in RESERVED_DESTINATIONS:
            problems.append(
                f"{job.id} was quarantined by a rule or because processing failed, not by a destination: there is "
                f"no queue to send it back to; fix the cause and send {job.instance} again (e.g. with storescu), "
                "or purge it"
            )
            continue
        try:
            moved.append(spool.requeue(job))
        except SpoolError as exc:
            problems.append(str(exc))
    return moved, problems


def unconfigured(destinations: Iterable[str], configured: Collection[str], source: Path) -> list[str]:
    """A warning for each destination jobs were sent back to that the configuration `source` does not have:
    nobody delivers its queue."""
    return [
        f"warning: {name!r} is not a destination of {source}: its jobs wait in outgoing/{name}/, delivered by "
        "nobody, until it is configured again"
        for name in sorted(set(destinations) - set(configured) - set(RESERVED_DESTINATIONS))
    ]


def purge(spool: Spool, destination: str | None, uids: Sequence[str]) -> tuple[int, list[str]]:
    """Delete quarantined jobs for good (all of `destination`, or those with these UIDs); return (how many,
    problems)."""
    jobs, problems = _select(spool.quarantined(_folder(destination)), destination, uids)
    for job in jobs:
        spool.purge(job)
    return len(jobs), problems
