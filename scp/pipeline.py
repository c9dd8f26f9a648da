"""The only place that joins the stages: spool → rules → compress → spool jobs → forward.

`Processor` turns received instances into per-destination jobs; `Deliverer` sends one destination's jobs with
retries. Both are driven by threads owned by service.py; pixel work runs in the `Encoder`'s worker processes,
where a crashing native codec cannot take the node down (workers.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from pydicom.uid import UID

from scp import compress, metrics, rules
from scp.config import (
    QUARANTINE_BY_RULE,
    QUARANTINE_UNPROCESSABLE,
    CompressSpec,
    Config,
    DicomDestination,
    DirectoryDestination,
)
from scp.errors import SpoolError
from scp.forward import Delivery, Forwarder, make_forwarder
from scp.spool import INSTANCE, JOB_INFO, Job, Received, Spool, arrival
from scp.status import Outcome, is_warning
from scp.workers import Encoder

LOGGER = logging.getLogger(__name__)


DEFER_SIZE = 4096
"""Values larger than this are read from the file only if a rule looks at them (never the pixel data)."""
UNKNOWN = "unknown"
"""What job.json says of what neither an instance's sidecar nor its header tells."""

Encode = Callable[[Path, Path, CompressSpec], compress.Result]


@dataclass(frozen=True)
class Output:
    """What one destination of a decision gets: a file in a transfer syntax, and how it came to be."""

    destination: str
    path: Path
    transfer_syntax: str
    compressed: bool
    """True when re-encoded from the source; False when the source is sent as it is."""
    detail: str
    sop_instance_uid: str = ""
    """The output's SOP Instance UID when it differs from the source's (lossy output gets a new one)."""


def produce(
    source: Path,
    source_syntax: str,
    decision: rules.Decision,
    destinations: Mapping[str, DicomDestination | DirectoryDestination],
    encode: Encode,
    scratch: Callable[[], Path],
) -> tuple[list[Output], list[tuple[compress.Result, Path]]]:
    """Make each destination's file: the rule's target, or the first syntax of its `accept` list we can make.

    Each distinct target is encoded once, whatever the number of destinations wanting it. Returns the outputs
    and each encode with its scratch file (to delete once the outputs are linked into jobs).
    """
    made: dict[str, tuple[compress.Result, Path]] = {}
    outputs = []
    for delivery in decision.deliveries:
        accept = destinations[delivery.destination].accept
        tried: list[str] = []
        output = None
        for spec in rules.candidates(delivery.compress, source_syntax, accept):
            if spec.syntax is None:
                kept = "the rule keeps the original encoding" if delivery.compress.syntax is None else ""
                detail = "; ".join([*tried, kept] if kept else [*tried, f"{UID(source_syntax).name} is accepted"])
                output = Output(delivery.destination, source, source_syntax, False, detail)
                break
            key = spec.model_dump_json()
            if key not in made:
                path = scratch()
                try:
                    made[key] = (encode(source, path, spec), path)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
            result, path = made[key]
            target = UID(spec.syntax)
            if not result.compressed and accept is not None and not target.is_compressed and target != source_syntax:
                result = _rewrite(source, path, target, result)
                made[key] = (result, path)
            if result.compressed:
                name = UID(result.transfer_syntax).name
                sizes = f"{result.bytes_in} -> {result.bytes_out} bytes"
                made_as = f"re-encoded as {name}: {sizes} (ratio {result.ratio:.2f}) in {result.seconds:.3f} s"
                detail = "; ".join([*tried, made_as])  # why any syntax before this one was not made
                output = Output(
                    delivery.destination, path, result.transfer_syntax, True, detail, result.sop_instance_uid
                )
                break
            own = spec == delivery.compress
            tried.append(result.reason if own else f"not as {target.name}: {result.reason}")
        if output is None:
            if accept is not None and not tried:
                tried.append(f"none of its accepted syntaxes can be made from {UID(source_syntax).name}")
            output = Output(delivery.destination, source, source_syntax, False, "; ".join(tried))
        outputs.append(output)
    return outputs, list(made.values())


def _rewrite(source: Path, path: Path, syntax: UID, refused: compress.Result) -> compress.Result:
    """Write the source in an uncompressed syntax the destination requires, when the encoder declined to.

    The encoder declines what it should not *compress* (no pixel data, lossy source, float pixels); a destination
    that takes only uncompressed data must still get those in its syntax.
    """
    try:
        compress.decompress_file(source, path, syntax)
    except Exception as exc:
        path.unlink(missing_ok=True)
        return replace(refused, reason=f"{refused.reason}; cannot be written as {syntax.name}: {exc}")
    return replace(refused, compressed=True, transfer_syntax=str(syntax), bytes_out=path.stat().st_size)


def _observe(rule: str, result: compress.Result) -> None:
    """Metrics of one encode: ratio and time when it compressed, a count when lossless verification failed."""
    if result.compressed:
        syntax = UID(result.transfer_syntax).keyword or result.transfer_syntax
        metrics.COMPRESSION_RATIO.labels(rule, syntax).observe(result.ratio)
        metrics.ENCODE_SECONDS.labels(rule, syntax).observe(result.seconds)
    if result.verify_failed:
        metrics.VERIFY_FAILED.labels(rule).inc()


def read_header(path: Path) -> pydicom.Dataset:
    """The header rules look at: every element, values larger than DEFER_SIZE read only when a rule asks."""
    return pydicom.dcmread(path, defer_size=DEFER_SIZE)


def read_facts(path: Path, calling_ae: str, called_ae: str, peer_address: str) -> rules.Facts:
    """The facts rules see about a Part 10 file (`explain`): its syntax from the file meta, its SOP class from the
    data set, as a C-STORE request must give it (the receiving process refuses a data set naming another)."""
    header = read_header(path)
    meta = header.file_meta
    return rules.Facts(
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer_address=peer_address,
        transfer_syntax=str(meta.TransferSyntaxUID),
        sop_class_uid=str(header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID", "")),
        read_header=lambda: header,
    )


def received_from_header(path: Path, spool_id: str) -> Received:
    """What an instance's own header tells of it, for one whose sidecar is lost: its UIDs and transfer syntax
    (UNKNOWN where it tells nothing), the arrival time its spool id holds; who sent it is UNKNOWN."""
    try:
        header = read_header(path)
        meta = header.file_meta
        found = [
            header.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID"),
            header.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID"),
            meta.get("TransferSyntaxUID"),
        ]
    except Exception:  # whatever is wrong with the file, it is kept for an operator
        found = [None, None, None]
    sop_class, sop_instance, syntax = (str(value) if value else UNKNOWN for value in found)
    received_at = arrival(spool_id) or path.stat().st_mtime
    return Received(UNKNOWN, UNKNOWN, UNKNOWN, sop_class, sop_instance, syntax, received_at)


def _damage(source: Path, received: Received) -> str | None:
    """Why an incoming instance file is not the one receiving committed, if it is not: a filesystem check after a
    crash or a disk fault can leave a file empty or cut short. It is then kept for an operator, never forwarded."""
    size = source.stat().st_size
    if size == 0:
        return "the instance file is empty: damaged on disk after it was received"
    if received.size is not None and size != received.size:
        return f"the instance file holds {size} bytes, not the {received.size} received: damaged on disk since"
    return None


def _job_info(received: Received, rule: str) -> dict[str, object]:
    """job.json of a job made from `received` by `rule` (before what making its output adds)."""
    return {
        "sop_instance_uid": received.sop_instance_uid,
        "sop_class_uid": received.sop_class_uid,
        "transfer_syntax": received.transfer_syntax,
        "original_transfer_syntax": received.transfer_syntax,
        "calling_ae": received.calling_ae,
        "received_at": received.received_at,
        "rule": rule,
    }


class Processor:
    """Applies the rules to a received instance, encodes it, and commits one job per destination."""

    def __init__(self, config: Config, spool: Spool, encoder: Encoder) -> None:
        self.config = config
        self.spool = spool
        self.encoder = encoder
        self.counts: Counter[str] = Counter()
        """Instances by what the rules did with them: forwarded, dropped, quarantined."""
        self._counts_lock = threading.Lock()

    def process(self, spool_id: str) -> list[Job]:
        """Turn one received instance into jobs; safe to run again after a crash at any point."""
        config = self.config  # one consistent snapshot, even if a reload swaps it meanwhile
        source = self.spool.received_path(spool_id)
        received = self.spool.received_info(spool_id)
        if damage := _damage(source, received):
            where = self.give_up(spool_id, damage)
            LOGGER.error("quarantined %s: %s (%s)", received.sop_instance_uid, damage, where)
            return []
        # The syntax and SOP class it came in with over the network decide, not the file's meta header; the
        # header is read only if a rule looks at one of its elements.
        facts = rules.Facts(
            calling_ae=received.calling_ae,
            called_ae=received.called_ae,
            peer_address=received.peer_address,
            transfer_syntax=received.transfer_syntax,
            sop_class_uid=received.sop_class_uid,
            read_header=lambda: read_header(source),
        )
        decision = rules.decide(config.rules, config.default_rule, facts)
        uid = received.sop_instance_uid
        info = _job_info(received, decision.rule)
        jobs = []
        outcome = {"drop": "dropped", "quarantine": "quarantined"}.get(decision.action, "unchanged")
        if decision.action == "drop":
            # never decision.reason in a log line: it quotes the values the rule matched, a patient's name perhaps
            LOGGER.warning("dropped %s by rule %s", uid, decision.rule)
        elif decision.action == "quarantine":
            where = self._quarantine(spool_id, source, info, decision)
            LOGGER.warning("quarantined %s by rule %s (why: its reason.txt): %s", uid, decision.rule, where)
        else:
            outputs, made = produce(
                source,
                received.transfer_syntax,
                decision,
                config.destinations,
                self.encoder.transcode,
                lambda: self.spool.new_tmp_file(".dcm"),
            )
            if any(output.compressed for output in outputs):
                outcome = "compressed"
            try:
                for output in outputs:
                    event = "compressed %s for %s" if output.compressed else "passing %s through unchanged for %s"
                    LOGGER.info(event + " (rule %s): %s", uid, output.destination, decision.rule, output.detail)
                    job_info = {**info, "transfer_syntax": output.transfer_syntax, "compression": output.detail}
                    if output.sop_instance_uid and output.sop_instance_uid != uid:
                        job_info |= {"sop_instance_uid": output.sop_instance_uid, "source_sop_instance_uid": uid}
                    jobs.append(self.spool.commit_job(spool_id, output.destination, output.path, source, job_info))
            finally:
                for result, path in made:  # jobs hold their own links; a failed commit (full disk) must not leak
                    _observe(decision.rule, result)
                    path.unlink(missing_ok=True)
        self.spool.finish_received(spool_id)
        metrics.PROCESSED.labels(decision.rule, outcome).inc()
        with self._counts_lock:  # counted once done: a count of n means n instances left incoming/
            self.counts[{"drop": "dropped", "quarantine": "quarantined"}.get(decision.action, "forwarded")] += 1
        return jobs

    def give_up(self, spool_id: str, reason: str) -> Path:
        """Keep an instance that processing keeps failing on for an operator, in quarantine/unprocessable/<id>/.

        An instance whose sidecar cannot be read is kept all the same, described by its own header.
        """
        source = self.spool.received_path(spool_id)
        target = self.spool.quarantine_dir / QUARANTINE_UNPROCESSABLE / spool_id
        if not target.exists():
            try:
                received, note = self.spool.received_info(spool_id), ""
            except SpoolError as exc:
                received = received_from_header(source, spool_id)
                note = f"\nsidecar: {exc}; job.json holds what the instance's header tells ({UNKNOWN} if nothing)"
            info = _job_info(received, rule="")
            job = self.spool.commit_job(spool_id, QUARANTINE_UNPROCESSABLE, source, source, info)
            target = self.spool.quarantine(job, f"reason: {reason}{note}").path
        self.spool.finish_received(spool_id)
        metrics.PROCESSED.labels("", "unprocessable").inc()
        return target

    def _quarantine(self, spool_id: str, source: Path, info: dict[str, object], decision: rules.Decision) -> Path:
        """Keep the instance for an operator in quarantine/by-rule/<id>/ (idempotent after a crash)."""
        target = self.spool.quarantine_dir / QUARANTINE_BY_RULE / spool_id
        if not target.exists():
            job = self.spool.commit_job(spool_id, QUARANTINE_BY_RULE, source, source, info)
            reason = f"rule: {decision.rule}\nreason: quarantined by rule ({decision.reason})"
            target = self.spool.quarantine(job, reason).path
        return target


@dataclass
class _Retry:
    attempts: int
    not_before: float
    verdict: str = ""
    """Why a job judged failed for good whose move to quarantine failed: it is not sent again."""
    moves: int = 0
    """Failed moves to quarantine, for the backoff before the next."""


class Deliverer:
    """Sends one destination's jobs: batches over one association, retries with backoff and jitter,
    quarantines what retrying will not fix. Several threads may run `run_once` for one destination.

    Retry state lives in memory: after a restart every waiting job is tried again at once and its attempts
    count from zero; `max_age` counts from reception (or the operator's `queue retry`), kept in the spool.
    When the destination cannot be reached at all, the whole destination pauses with the same backoff
    instead of failing its queue job by job.
    """

    def __init__(
        self,
        name: str,
        destination: DicomDestination | DirectoryDestination,
        spool: Spool,
        calling_ae: str,
        stopping: threading.Event | None = None,
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.destination = destination
        self.spool = spool
        self.forwarder: Forwarder = make_forwarder(destination, calling_ae, spool.tmp)
        self.stopping = stopping or threading.Event()
        self.progress = progress
        """Called as each job is settled: the thread is not stuck, however long its batch (service health)."""
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._retries: dict[str, _Retry] = {}
        self._outages = 0
        self._paused_until = 0.0
        self._local = threading.local()

    def run_once(self) -> int:
        """Deliver one batch of ready jobs; return how many jobs were settled.

        Stops between two instances when the node is stopping: the rest of the batch stays in the spool.
        """
        forwarder = self._forwarder_for_this_thread()
        batch, judged = self._claim()
        try:
            for job, verdict in judged:
                self._quarantine(job, verdict)
                self.progress()
            if not batch:
                idle = getattr(forwarder, "idle", None)
                if idle is not None:
                    idle()  # an association kept open since the last batch is released after a while
                return len(judged)
            return len(judged) + self._send(forwarder, batch)
        finally:
            with self._lock:
                self._in_flight.difference_update(job.id for job in [*batch, *(job for job, _ in judged)])

    def _send(self, forwarder: Forwarder, batch: list[Job]) -> int:
        settled = 0
        deliveries = forwarder.deliver(batch)
        try:
            for delivery in deliveries:
                self._settle(delivery)
                self.progress()
                settled += 1
                if self.stopping.is_set():
                    break
        finally:
            close = getattr(deliveries, "close", None)
            if close is not None:
                close()  # releases the association when the loop stopped early
        return settled

    def _forwarder_for_this_thread(self) -> Forwarder:
        """The current forwarder; releases what this thread kept open with one a reload replaced."""
        forwarder = self.forwarder
        previous = getattr(self._local, "forwarder", None)
        if previous is not None and previous is not forwarder:
            _close(previous)
        self._local.forwarder = forwarder
        return forwarder

    def close(self) -> None:
        """Release what this thread keeps open (call from each delivery thread as it ends)."""
        _close(getattr(self._local, "forwarder", None) or self.forwarder)
        self._local.forwarder = None

    def _claim(self) -> tuple[list[Job], list[tuple[Job, str]]]:
        """Ready jobs: a batch to send, and those to quarantine: judged failed for good, or whose files the
        forwarder cannot read (one such job made every batch of its destination fail)."""
        batch, judged = self._ready()
        sendable = []
        for job in batch:
            try:
                why = _unreadable(job)
            except OSError as exc:  # the system failed us (too many open files, I/O), not the job: later
                LOGGER.warning("cannot read job %s of %s now: %s; it is tried again", job.id, self.name, exc)
                with self._lock:
                    self._in_flight.discard(job.id)
                continue
            if why:
                judged.append((job, f"{why}; it cannot be sent"))
            else:
                sendable.append(job)
        return sendable, judged

    def _ready(self) -> tuple[list[Job], list[tuple[Job, str]]]:
        """Ready jobs, now marked in flight: a batch to send, and those judged failed for good."""
        now = time.monotonic()
        with self._lock:
            batch: list[Job] = []
            judged: list[tuple[Job, str]] = []
            if self._paused_until > now and not any(retry.verdict for retry in self._retries.values()):
                return batch, judged  # nothing to send, nothing to quarantine: no need to list a long queue
            for job in self.spool.jobs(self.name):
                retry = self._retries.get(job.id)
                if job.id in self._in_flight or (retry and retry.not_before > now):
                    continue
                if retry and retry.verdict:
                    judged.append((job, retry.verdict))
                elif self._paused_until <= now:
                    batch.append(job)
                if len(batch) + len(judged) >= self.destination.batch_size:
                    break
            self._in_flight.update(job.id for job in [*batch, *(job for job, _ in judged)])
            return batch, judged

    def _settle(self, delivery: Delivery) -> None:
        job, outcome, detail = delivery.job, delivery.outcome, delivery.detail
        info = job.info_if_readable()
        uid = info.get("sop_instance_uid")
        if delivery.reached:
            with self._lock:
                self._outages = 0
        if outcome is Outcome.DELIVERED:
            rule, size = str(info.get("rule", "")), job.instance.stat().st_size
            self.spool.delivered(job)
            self._forget(job)
            metrics.FORWARDED.labels(self.name, rule).inc()
            metrics.FORWARDED_BYTES.labels(self.name, rule).inc(size)
            if delivery.status is not None and is_warning(delivery.status):
                LOGGER.warning("forwarded %s to %s with a warning: %s", uid, self.name, detail)
            else:
                LOGGER.info("forwarded %s to %s: %s", uid, self.name, detail)
            return
        if outcome is Outcome.TRANSIENT and not delivery.sent:
            LOGGER.debug("%s not sent to %s: %s; back in the queue", uid, self.name, detail)
            return
        if outcome is Outcome.TRANSIENT:
            with self._lock:
                retry = self._retries.setdefault(job.id, _Retry(0, 0.0))
                retry.attempts += 1
                attempts = retry.attempts
            give_up = self._gives_up(job, attempts)
            if give_up is None:
                delay = self._backoff(attempts)
                with self._lock:
                    retry.not_before = time.monotonic() + delay
                    if not delivery.reached:
                        self._pause(detail)
                metrics.RETRIES.labels(self.name).inc()
                LOGGER.log(
                    logging.WARNING if delivery.reached else logging.DEBUG,  # an outage is logged once, by _pause
                    "delivery of %s to %s failed (attempt %d): %s; retrying in %.1f s",
                    uid,
                    self.name,
                    attempts,
                    detail,
                    delay,
                )
                return
            detail = f"{detail}; {give_up}"
        self._quarantine(job, detail)

    def _quarantine(self, job: Job, detail: str) -> None:
        """Move a job failed for good to quarantine; if that fails (a full disk), keep it from being sent again
        and try the move again after a backoff delay."""
        uid = job.info_if_readable().get("sop_instance_uid", UNKNOWN)
        try:
            where = self.spool.quarantine(job, f"destination: {self.name}\nsop_instance_uid: {uid}\nreason: {detail}")
        except OSError as exc:
            if not job.path.exists():  # moved, but a flush after the move failed: it is in quarantine
                self._forget(job)
                metrics.QUARANTINED.labels(self.name).inc()
                LOGGER.error("quarantined %s for %s: %s (flushing the move failed: %s)", uid, self.name, detail, exc)
                return
            with self._lock:
                retry = self._retries.setdefault(job.id, _Retry(0, 0.0))
                retry.verdict, retry.moves = detail, retry.moves + 1
                delay = self._backoff(retry.moves)
                retry.not_before = time.monotonic() + delay
            LOGGER.error(
                "cannot quarantine %s for %s: %s; it is not sent again, moving it is tried again in %.1f s (%s)",
                uid,
                self.name,
                exc,
                delay,
                detail,
            )
            return
        self._forget(job)
        metrics.QUARANTINED.labels(self.name).inc()
        LOGGER.error("quarantined %s for %s: %s (%s)", uid, self.name, detail, where.path)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._retries.pop(job.id, None)

    def _pause(self, detail: str) -> None:
        """The destination is unreachable: try none of its jobs before a backoff delay (caller holds the lock)."""
        now = time.monotonic()
        if self._paused_until <= now:  # once per failed association, not once per job of its batch
            self._outages += 1
            delay = self._backoff(self._outages)
            self._paused_until = now + delay
            LOGGER.warning("%s unreachable (%d in a row): %s; pausing %.1f s", self.name, self._outages, detail, delay)

    def _gives_up(self, job: Job, attempts: int) -> str | None:
        policy = self.destination.retry
        if policy.max_attempts is not None and attempts >= policy.max_attempts:
            return f"gave up after {attempts} attempts"
        if policy.max_age is not None and time.time() - job.queued_at() > policy.max_age:
            return f"gave up: older than max_age {policy.max_age:g} s"
        return None

    def _backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter in its upper half."""
        policy = self.destination.retry
        ceiling: float = min(policy.max_delay, policy.initial_delay * 2 ** min(attempts - 1, 32))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def next_wake(self) -> float:
        """Seconds until the earliest waiting retry (or the end of a pause) becomes due (at most 1 s)."""
        now = time.monotonic()
        with self._lock:
            due = [r.not_before for r in self._retries.values()]
            if self._paused_until > now:
                due = [self._paused_until]
        return max(0.05, min([1.0, *(d - now for d in due)]))


SENDING_NEEDS = ("sop_class_uid", "transfer_syntax", "original_transfer_syntax")
"""What the forwarders read of every job's job.json."""


def _unreadable(job: Job) -> str:
    """Why the forwarder could never read what it needs of a job; empty if it can. Other OSErrors (too many open
    files, an I/O error) propagate: they may pass."""
    try:
        info = job.info()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError, TypeError) as exc:
        return f"its {JOB_INFO} cannot be read: {exc}"  # missing, not a file, not JSON, or not a mapping
    missing = [key for key in SENDING_NEEDS if key not in info]
    if missing:
        return f"its {JOB_INFO} lacks {', '.join(missing)}"
    if not job.instance.is_file():
        return f"its {INSTANCE} is missing"
    return ""


def _close(forwarder: object) -> None:
    close = getattr(forwarder, "close", None)
    if close is not None:
        close()
