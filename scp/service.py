"""One lifecycle for production and tests: `Service.start()` returns once the node listens (STYLE rule 13).

It owns the receiving process (inbound.py: the SCP), the processor threads (which hand pixel work to the encoder
processes) and one set of delivery threads per destination. Signal handling lives in cli.py and only sets flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from scp import metrics, notify
from scp.config import Config, DicomDestination, DirectoryDestination
from scp.forward import Forwarder, make_forwarder
from scp.inbound import Inbound
from scp.pipeline import Deliverer, Encoder, Processor
from scp.spool import Job, Spool

LOGGER = logging.getLogger(__name__)

_STOP = ""
PROCESSING_THREADS_PER_PROCESS = 2
"""Processing threads per encoder process. A thread spends part of each instance outside the encoder (reading
the header when a rule looks at an element, committing the jobs: three fsyncs, four with an encoded output);
with one thread per process an encoder process would wait meanwhile. Measured side by side, JPEG-LS, 300 CT
slices, 3 runs each: end-to-end 31 -> 36 MB/s (medians); the modality side unchanged."""
HEALTH_INTERVAL = 5.0
"""Seconds between two health checks when systemd's watchdog does not set the pace."""
PROCESSING_ATTEMPTS = 5
"""Failed processing attempts of one instance before it is quarantined as unprocessable."""


@dataclass
class _Destination:
    deliverer: Deliverer
    wake: threading.Event = field(default_factory=threading.Event)
    threads: set[int] = field(default_factory=set)
    """Indexes of the delivery threads running for it."""
    retired: bool = False
    """Removed from the configuration by a reload: its threads drain its queue, then stop."""


class Service:
    """The running node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool.path)
        self._stopping = threading.Event()
        self._draining = threading.Event()
        """Set as stop() begins: receiving stops, health says so."""
        self._work: queue.Queue[str] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._destinations: dict[str, _Destination] = {}
        self._reload_lock = threading.RLock()
        self._encoder: Encoder | None = None
        self._processor: Processor | None = None
        self._inbound: Inbound | None = None
        self.metrics: metrics.Endpoint | None = None
        self._busy: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        """Processing attempts that raised, by spool id (only processor threads touch it, one id at a time)."""
        self.processing_retry_delay = 5.0
        self._busy_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port the node listens on (useful when the configuration said 0)."""
        assert self._inbound is not None, "the service is not started"
        return self._inbound.port

    def start(self) -> None:
        """Sweep the spool, start workers and deliverers, and listen; return once listening."""
        self.spool.sweep()
        self._encoder = Encoder(self.config.workers.processes)
        self._processor = Processor(self.config, self.spool, self._encoder)
        for spool_id in self.spool.incoming():
            self._work.put(spool_id)
        for index in range(self._processing_threads()):
            self._spawn(f"processor-{index}", self._process_loop)
        for name, destination in self.config.destinations.items():
            self._add_destination(name, destination)
        waiting = Counter(job.destination for job in self.spool.jobs())
        for name in sorted(set(waiting) - set(self.config.destinations)):
            LOGGER.warning(
                "%d job(s) wait in the spool for destination %s, which is not configured; they are kept "
                "and delivered once it is configured again",
                waiting[name],
                name,
            )
        self._spawn("spool-janitor", self._janitor_loop)
        node = self.config.node
        self._inbound = Inbound(self.config, self._received)
        self._inbound.start()
        if self.config.metrics is not None:
            self.metrics = metrics.Endpoint(
                self.config.metrics.host, self.config.metrics.port, self._state_collector(), self._health_check
            )
            self.metrics.start()
        watchdog = notify.watchdog_interval()
        threading.Thread(target=self._health_loop, args=(watchdog,), name="health", daemon=True).start()
        LOGGER.info("listening as %s on %s:%d%s", node.ae_title, node.host, self.port, " (TLS)" if node.tls else "")

    def stop(self, timeout: float | None = None) -> bool:
        """Stop within `timeout` seconds (default `node.shutdown_timeout`); True if all work in hand finished.

        Stops accepting; lets inbound associations end by themselves for up to half the time, then aborts them
        (an instance not yet answered is sent again by its modality); processors finish their current instance
        and deliverers their current C-STORE. Whatever is left is in the spool and resumes at the next start.
        """
        budget = self.config.node.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        self._draining.set()
        if self._inbound is not None:
            self._inbound.stop(time.monotonic() + budget / 2)
        self._stopping.set()
        for _ in range(self._processing_threads()):
            self._work.put(_STOP)
        for destination in self._destinations.values():
            destination.wake.set()
        threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = [thread.name for thread in threads if thread.is_alive()]
        if busy:
            LOGGER.warning(
                "stopping after %g s with work in hand (%s); it stays in the spool for the next start",
                budget,
                ", ".join(busy),
            )
            return False
        if self._encoder is not None:
            self._encoder.close()
        if self.metrics is not None:
            self.metrics.stop()
        LOGGER.info("stopped")
        return True

    def reload(self, new: Config) -> None:
        """Apply a validated configuration to instances processed from now on; open associations stay.

        Rules, default, destinations and logging take effect; node, spool, workers and metrics need a restart and
        keep their running values. A changed destination's deliverers use the new settings from their next batch; a
        new one gets deliverers; a removed one delivers what is already queued for it, then its threads stop.
        A destination with `tls` always counts as changed: its certificate may have been renewed at the same path.
        All or nothing: every new or changed destination's forwarder is made first, so one that cannot be (a TLS
        certificate that will not load: ConfigError) refuses the reload with nothing changed.
        """
        with self._reload_lock:
            old = self.config
            restart = ("node", "spool", "workers", "metrics")
            fixed = {key: getattr(old, key) for key in restart if getattr(new, key) != getattr(old, key)}
            added: dict[str, Deliverer] = {}
            changed: dict[str, tuple[Forwarder, DicomDestination | DirectoryDestination]] = {}
            for name, destination in new.destinations.items():
                state = self._destinations.get(name)
                if state is None:
                    added[name] = self._deliverer(name, destination)
                elif state.deliverer.destination != destination or getattr(destination, "tls", None) is not None:
                    # TLS: its files may have been renewed in place (same paths), and are read again
                    forwarder = make_forwarder(destination, old.node.ae_title, self.spool.tmp)
                    changed[name] = (forwarder, destination)
            # Nothing raised: apply it all.
            if fixed:
                LOGGER.warning("reload: %s changed; that needs a restart, keeping the running values", ", ".join(fixed))
                new = new.model_copy(update=fixed)
            for name, (forwarder, destination) in changed.items():
                deliverer = self._destinations[name].deliverer
                deliverer.forwarder, deliverer.destination = forwarder, destination
            for name in new.destinations:
                if name in added:
                    self._destinations[name] = _Destination(added[name])
                state = self._destinations[name]
                state.retired = False
                self._spawn_deliverers(state)
            for name in set(self._destinations) - set(new.destinations):
                self._destinations[name].retired = True
                self._destinations[name].wake.set()
            self.config = new
            if self._processor is not None:
                self._processor.config = new
            if self._inbound is not None:
                self._inbound.set_log_level(new.logging.level)
        LOGGER.info("reloaded the configuration: %d rules, %d destinations", len(new.rules), len(new.destinations))

    def _health_check(self) -> list[str]:
        """/health: `health`, and a spool too full to take instances (every C-STORE answered 0xA700: too little space
        or too few inodes), which a load balancer must route around but which is no reason for the watchdog to
        restart the node (deliveries free the space)."""
        problems = self.health()
        spool = self.config.spool
        full = self.spool.short_of_space(int(spool.min_free_mb * 2**20), spool.min_free_inodes)
        if full and not self._draining.is_set():
            problems.append(f"spool full: {full}: C-STORE is answered 0xA700")
        return problems

    def stopped_parts(self) -> list[str]:
        """Parts of the node that have stopped for good (a thread, the receiving process): only a restart helps."""
        problems = [f"thread {t.name} has stopped" for t in list(self._threads) if not t.is_alive()]
        receiving = self._inbound.problem() if self._inbound is not None else None
        return problems + ([receiving] if receiving is not None else [])

    def health(self) -> list[str]:
        """What is wrong with the node, or an empty list: every part running, no thread stuck on one item."""
        if self._draining.is_set():  # a load balancer must send no more associations: the port is closing
            return ["stopping"]
        problems = self.stopped_parts()
        stalled = self._inbound.stalled() if self._inbound is not None else None
        problems += [stalled] if stalled is not None else []
        limit = self.config.node.stall_timeout
        now = time.monotonic()
        with self._busy_lock:
            busy = dict(self._busy)
        problems += [
            f"thread {name} busy with one item for {now - since:.0f} s (node.stall_timeout {limit:g} s)"
            for name, since in sorted(busy.items())
            if now - since > limit
        ]
        return problems

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """Mark the calling thread busy with one item, for `health`."""
        name = threading.current_thread().name
        with self._busy_lock:
            self._busy[name] = time.monotonic()
        try:
            yield
        finally:
            with self._busy_lock:
                del self._busy[name]

    def _next_item(self) -> None:
        """The calling thread finished one item of several (a delivery batch): restart its clock for `health`."""
        name = threading.current_thread().name
        with self._busy_lock:
            if name in self._busy:
                self._busy[name] = time.monotonic()

    def _health_loop(self, watchdog: float | None) -> None:
        """Check health every `watchdog` seconds, pinging systemd's watchdog while healthy and withholding the
        ping otherwise (systemd then restarts us); without a watchdog, every HEALTH_INTERVAL seconds. Problems are
        logged at each check under a watchdog, otherwise when they change (a stall's growing seconds aside)."""
        told: list[str] = []
        while not self._stopping.wait(watchdog or HEALTH_INTERVAL):
            if self._draining.is_set():  # stopping as asked: nothing to report, and systemd waits for the end
                if watchdog:
                    notify.watchdog()
                continue
            problems = self.health()
            if problems and (watchdog or _kinds(problems) != _kinds(told)):
                withheld = ", withholding the watchdog ping" if watchdog else ""
                LOGGER.error("unhealthy%s: %s", withheld, "; ".join(problems))
            elif not problems and told:
                LOGGER.info("healthy again")
            if watchdog and not problems:
                notify.watchdog()
            told = problems

    def _processing_threads(self) -> int:
        return PROCESSING_THREADS_PER_PROCESS * self.config.workers.processes

    def _state_collector(self) -> metrics.StateCollector:
        def queues() -> list[tuple[str, int, float | None]]:
            """Every configured destination, and any other with jobs left (removed by a reload and draining, or
            removed before a restart)."""
            waiting: dict[str, list[Job]] = {name: [] for name in self.config.destinations}
            for job in self.spool.jobs():
                waiting.setdefault(job.destination, []).append(job)
            rows = []
            for name, jobs in sorted(waiting.items()):
                age = None
                with contextlib.suppress(OSError, ValueError, KeyError):
                    age = time.time() - float(str(jobs[0].info()["received_at"])) if jobs else None
                rows.append((name, len(jobs), age))
            return rows

        def quarantined() -> list[tuple[str, int]]:
            counts = dict.fromkeys(self.config.destinations, 0)
            for job in self.spool.quarantined():
                counts[job.destination] = counts.get(job.destination, 0) + 1
            return sorted(counts.items())

        def associations() -> int:
            return self._inbound.associations if self._inbound is not None else 0

        return metrics.StateCollector(queues, quarantined, associations)

    def _received(self, spool_id: str) -> None:
        self._work.put(spool_id)

    def _spawn(self, name: str, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _add_destination(self, name: str, destination: DicomDestination | DirectoryDestination) -> None:
        state = _Destination(self._deliverer(name, destination))
        self._destinations[name] = state
        self._spawn_deliverers(state)

    def _deliverer(self, name: str, destination: DicomDestination | DirectoryDestination) -> Deliverer:
        """A destination's deliverer, its forwarder made (ConfigError when it cannot be), no thread started."""
        return Deliverer(name, destination, self.spool, self.config.node.ae_title, self._stopping, self._next_item)

    def _spawn_deliverers(self, state: _Destination) -> None:
        """Start the delivery threads the destination's `associations` asks for and that are not running."""
        name = state.deliverer.name
        with self._reload_lock:
            missing = set(range(state.deliverer.destination.associations)) - state.threads
            state.threads.update(missing)
        for index in sorted(missing):
            self._spawn(f"deliver-{name}-{index}", self._deliver_loop, state, index)

    def _process_loop(self) -> None:
        assert self._processor is not None
        _yield_to_receiving()
        while True:
            spool_id = self._work.get()
            if spool_id == _STOP or self._stopping.is_set():
                return  # what is still queued stays in incoming/ for the next start
            try:
                with self._working():
                    jobs = self._processor.process(spool_id)
            except Exception as exc:
                self._processing_failed(spool_id, exc)
                continue
            self._failures.pop(spool_id, None)
            for job in jobs:
                state = self._destinations.get(job.destination)
                if state is not None:
                    if state.retired:  # processed under the rules before a reload: its threads may have stopped
                        self._spawn_deliverers(state)
                    state.wake.set()

    def _processing_failed(self, spool_id: str, exc: Exception) -> None:
        """Try a failed instance again later (a full disk passes), up to PROCESSING_ATTEMPTS times, then keep it in
        quarantine/unprocessable/ for an operator. It never leaves the spool unhandled."""
        attempts = self._failures[spool_id] = self._failures.get(spool_id, 0) + 1
        why = f"{type(exc).__name__}: {exc}"
        if attempts >= PROCESSING_ATTEMPTS:
            assert self._processor is not None
            try:
                where = self._processor.give_up(spool_id, f"processing failed {attempts} times; last: {why}")
            except Exception:
                LOGGER.exception("cannot quarantine %s either; it stays in incoming/ and is tried again", spool_id)
            else:
                self._failures.pop(spool_id, None)
                LOGGER.error("quarantined %s: processing failed %d times: %s (%s)", spool_id, attempts, why, where)
                return
        LOGGER.warning(
            "processing %s failed (attempt %d): %s; it stays in the spool and is tried again in %g s",
            spool_id,
            attempts,
            why,
            self.processing_retry_delay,
            exc_info=attempts == 1,
        )
        retry = threading.Timer(self.processing_retry_delay, self._work.put, [spool_id])
        retry.daemon = True
        retry.start()

    def _deliver_loop(self, state: _Destination, index: int) -> None:
        _yield_to_receiving()  # the associations this thread opens run at its priority too
        try:
            self._deliver_until_done(state, index)
        finally:
            state.deliverer.close()  # releases the association this thread kept open
        if not self._stopping.is_set():  # retired by a reload: for `health` an ended thread, not a dead one
            with self._reload_lock:
                self._threads.remove(threading.current_thread())

    def _deliver_until_done(self, state: _Destination, index: int) -> None:
        while not self._stopping.is_set():
            try:
                with self._working():
                    tried = state.deliverer.run_once()
            except Exception:
                LOGGER.exception("delivery to %s failed unexpectedly; trying again", state.deliverer.name)
                tried = 0
            if not tried:
                with self._reload_lock:
                    retire = state.retired and not self.spool.jobs(state.deliverer.name)
                    if retire or index >= state.deliverer.destination.associations:
                        state.threads.discard(index)
                        if retire:
                            LOGGER.info("destination %s: no longer configured, queue empty", state.deliverer.name)
                        return
                state.wake.wait(state.deliverer.next_wake())
                state.wake.clear()

    def _janitor_loop(self) -> None:
        """Remove partial files of aborted transfers while running (the start-up sweep catches the rest)."""
        max_age = self.config.spool.partial_max_age
        while not self._stopping.wait(min(60.0, max_age / 2)):
            try:
                self.spool.sweep_abandoned_receives(max_age)
            except OSError as exc:
                LOGGER.error("spool janitor: %s", exc)


BACKGROUND_NICENESS = 5
"""Processing and delivery threads yield the CPU to receiving threads (Linux sets niceness per thread; threads
they start inherit it). Measured, JPEG-LS, 150 CT slices, 3 runs each: modality side 44 -> 52 MB/s (medians)."""


def _kinds(problems: list[str]) -> list[str]:
    """Health problems without the seconds a stall has lasted, which change at every check."""
    return [re.sub(r"for \d+ s ", "for some time ", problem) for problem in problems]


def _yield_to_receiving() -> None:
    """Lower the calling thread's priority: a modality waiting for its C-STORE response comes first."""
    if sys.platform.startswith("linux"):  # elsewhere this would lower the whole process
        with contextlib.suppress(OSError):
            thread = threading.get_native_id()
            # never raise a priority: a node started at a niceness above this keeps it (root could lower it)
            os.setpriority(os.PRIO_PROCESS, thread, max(BACKGROUND_NICENESS, os.getpriority(os.PRIO_PROCESS, thread)))
