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

from scp import metrics, rules
from scp.config import Config, DicomDestination, DirectoryDestination
from scp.forward import Forwarder, make_forwarder
from scp.spool import Job, Spool
from scp.status import Outcome
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
        metrics.PROCESSED.labels(decision.rule, "compressed" if result.compressed else "unchanged").inc()
        if result.compressed:
            metrics.COMPRESSION_RATIO.labels(decision.rule, result.transfer_syntax).observe(result.ratio)
            metrics.ENCODE_SECONDS.labels(decision.rule, result.transfer_syntax).observe(result.seconds)
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
        jobs = [self.spool.commit_job(spool_id, name, instance, source, info) for name in decision.destinations]
        encoded.unlink(missing_ok=True)
        self.spool.finish_received(spool_id)
        return jobs


@dataclass
class _Retry:
    attempts: int
    not_before: float


class Deliverer:
    """Sends one destination's jobs: batches over one association, retries with backoff and jitter,
    quarantines what retrying will not fix. Several threads may run `run_once` for one destination."""

    def __init__(
        self, name: str, destination: DicomDestination | DirectoryDestination, spool: Spool, calling_ae: str
    ) -> None:
        self.name = name
        self.destination = destination
        self.spool = spool
        self.forwarder: Forwarder = make_forwarder(destination, calling_ae, spool.tmp)
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._retries: dict[str, _Retry] = {}

    def run_once(self) -> int:
        """Deliver one batch of ready jobs; return how many jobs were tried."""
        batch = self._claim()
        if not batch:
            return 0
        try:
            for delivery in self.forwarder.deliver(batch):
                self._settle(delivery.job, delivery.outcome, delivery.detail)
        finally:
            with self._lock:
                self._in_flight.difference_update(job.id for job in batch)
        return len(batch)

    def _claim(self) -> list[Job]:
        now = time.monotonic()
        with self._lock:
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

    def _settle(self, job: Job, outcome: Outcome, detail: str) -> None:
        uid = job.info().get("sop_instance_uid")
        if outcome is Outcome.DELIVERED:
            rule, size = str(job.info().get("rule", "")), job.instance.stat().st_size
            self.spool.delivered(job)
            metrics.FORWARDED.labels(self.name, rule).inc()
            metrics.FORWARDED_BYTES.labels(self.name, rule).inc(size)
            self._retries.pop(job.id, None)
            LOGGER.info("forwarded %s to %s: %s", uid, self.name, detail)
            return
        if outcome is Outcome.TRANSIENT:
            retry = self._retries.setdefault(job.id, _Retry(0, 0.0))
            retry.attempts += 1
            give_up = self._gives_up(job, retry.attempts)
            if give_up is None:
                delay = self._backoff(retry.attempts)
                retry.not_before = time.monotonic() + delay
                metrics.RETRIES.labels(self.name).inc()
                LOGGER.warning(
                    "delivery of %s to %s failed (attempt %d): %s; retrying in %.1f s",
                    uid,
                    self.name,
                    retry.attempts,
                    detail,
                    delay,
                )
                return
            detail = f"{detail}; {give_up}"
        self._retries.pop(job.id, None)
        where = self.spool.quarantine(job, f"destination: {self.name}\nreason: {detail}")
        metrics.QUARANTINED.labels(self.name).inc()
        LOGGER.error("quarantined %s for %s: %s (%s)", uid, self.name, detail, where)

    def _gives_up(self, job: Job, attempts: int) -> str | None:
        policy = self.destination.retry
        if policy.max_attempts is not None and attempts >= policy.max_attempts:
            return f"gave up after {attempts} attempts"
        received_at = float(str(job.info().get("received_at", time.time())))
        if policy.max_age is not None and time.time() - received_at > policy.max_age:
            return f"gave up: older than max_age {policy.max_age:g} s"
        return None

    def _backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter in its upper half."""
        policy = self.destination.retry
        ceiling = min(policy.max_delay, policy.initial_delay * 2 ** (attempts - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def next_wake(self) -> float:
        """Seconds until the earliest waiting retry becomes due (at most 1 s)."""
        with self._lock:
            due = [r.not_before for r in self._retries.values()]
        return max(0.05, min([1.0, *(d - time.monotonic() for d in due)]))
