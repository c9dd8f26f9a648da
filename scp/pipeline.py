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
from dataclasses import dataclass

import pydicom

from scp import rules
from scp.config import Config, DicomDestination, DirectoryDestination
from scp.forward import Delivery, Forwarder, make_forwarder
from scp.spool import Job, Spool
from scp.status import Outcome, is_warning
from scp.workers import Encoder

LOGGER = logging.getLogger(__name__)


class Processor:
    """Applies the rules to a received instance, encodes it, and commits one job per destination."""

    def __init__(self, config: Config, spool: Spool, encoder: Encoder) -> None:
        self.config = config
        self.spool = spool
        self.encoder = encoder

    def process(self, spool_id: str) -> list[Job]:
        """Turn one received instance into jobs; safe to run again after a crash at any point."""
        config = self.config  # one consistent snapshot, even if a reload swaps it meanwhile
        source = self.spool.received_path(spool_id)
        received = self.spool.received_info(spool_id)
        header = pydicom.dcmread(source, stop_before_pixels=True)
        facts = rules.Facts(
            calling_ae=received.calling_ae,
            called_ae=received.called_ae,
            peer_address=received.peer_address,
            transfer_syntax=received.transfer_syntax,
            sop_class_uid=received.sop_class_uid,
            dataset=header,
        )
        decision = rules.decide(config.rules, facts)
        encoded = self.spool.new_tmp_path(".dcm")
        result = self.encoder.transcode(source, encoded, decision.compress)
        instance = encoded if result.compressed else source
        if result.compressed:
            LOGGER.info(
                "compressed %s by rule %s to %s: ratio %.2f in %.3f s",
                received.sop_instance_uid,
                decision.rule,
                result.transfer_syntax,
                result.ratio,
                result.seconds,
            )
        else:
            LOGGER.info(
                "passing %s through unchanged (rule %s): %s",
                received.sop_instance_uid,
                decision.rule,
                result.reason,
            )
        info: dict[str, object] = {
            "sop_instance_uid": received.sop_instance_uid,
            "sop_class_uid": received.sop_class_uid,
            "transfer_syntax": result.transfer_syntax if result.compressed else received.transfer_syntax,
            "original_transfer_syntax": received.transfer_syntax,
            "calling_ae": received.calling_ae,
            "received_at": received.received_at,
            "rule": decision.rule,
            "compression": result.reason,
        }
        try:
            jobs = [self.spool.commit_job(spool_id, name, instance, source, info) for name in decision.destinations]
        finally:
            encoded.unlink(missing_ok=True)  # jobs hold their own links; a failed commit (full disk) must not leak it
        self.spool.finish_received(spool_id)
        return jobs


@dataclass
class _Retry:
    attempts: int
    not_before: float


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
    ) -> None:
        self.name = name
        self.destination = destination
        self.spool = spool
        self.forwarder: Forwarder = make_forwarder(destination, calling_ae, spool.tmp)
        self.stopping = stopping or threading.Event()
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._retries: dict[str, _Retry] = {}
        self._outages = 0
        self._paused_until = 0.0

    def run_once(self) -> int:
        """Deliver one batch of ready jobs; return how many jobs were settled.

        Stops between two instances when the node is stopping: the rest of the batch stays in the spool.
        """
        batch = self._claim()
        if not batch:
            return 0
        settled = 0
        deliveries = self.forwarder.deliver(batch)
        try:
            for delivery in deliveries:
                self._settle(delivery)
                settled += 1
                if self.stopping.is_set():
                    break
        finally:
            close = getattr(deliveries, "close", None)
            if close is not None:
                close()  # releases the association when the loop stopped early
            with self._lock:
                self._in_flight.difference_update(job.id for job in batch)
        return settled

    def _claim(self) -> list[Job]:
        now = time.monotonic()
        with self._lock:
            if self._paused_until > now:
                return []
            batch = []
            for job in self.spool.jobs(self.name):
                retry = self._retries.get(job.id)
                if job.id in self._in_flight or (retry and retry.not_before > now):
                    continue
                batch.append(job)
                if len(batch) >= self.destination.batch_size:
                    break
            self._in_flight.update(job.id for job in batch)
            return batch

    def _settle(self, delivery: Delivery) -> None:
        job, outcome, detail = delivery.job, delivery.outcome, delivery.detail
        uid = job.info().get("sop_instance_uid")
        if delivery.reached:
            with self._lock:
                self._outages = 0
        if outcome is Outcome.DELIVERED:
            self.spool.delivered(job)
            self._forget(job)
            if delivery.status is not None and is_warning(delivery.status):
                LOGGER.warning("forwarded %s to %s with a warning: %s", uid, self.name, detail)
            else:
                LOGGER.info("forwarded %s to %s: %s", uid, self.name, detail)
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
        self._forget(job)
        where = self.spool.quarantine(job, f"destination: {self.name}\nsop_instance_uid: {uid}\nreason: {detail}")
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
        ceiling = min(policy.max_delay, policy.initial_delay * 2 ** min(attempts - 1, 32))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def next_wake(self) -> float:
        """Seconds until the earliest waiting retry (or the end of a pause) becomes due (at most 1 s)."""
        now = time.monotonic()
        with self._lock:
            due = [r.not_before for r in self._retries.values()]
            if self._paused_until > now:
                due = [self._paused_until]
        return max(0.05, min([1.0, *(d - now for d in due)]))
