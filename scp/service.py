"""One lifecycle for production and tests: `Service.start()` returns once the node listens (STYLE rule 13).

It owns the SCP, the processor threads (which hand pixel work to the encoder processes) and one set of
delivery threads per destination. Signal handling lives in cli.py and only sets flags.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, _config

from scp import limits, metrics, notify, receive, security
from scp.config import Config
from scp.pipeline import Deliverer, Encoder, Processor
from scp.spool import Spool

LOGGER = logging.getLogger(__name__)

_STOP = ""


@dataclass
class _Destination:
    deliverer: Deliverer
    wake: threading.Event = field(default_factory=threading.Event)


class Service:
    """The running node."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.spool.path)
        self._stopping = threading.Event()
        self._work: queue.Queue[str] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._destinations: dict[str, _Destination] = {}
        self._encoder: Encoder | None = None
        self._processor: Processor | None = None
        self.server: limits.HardenedServer | None = None
        self.metrics: metrics.Endpoint | None = None
        self._busy: dict[str, float] = {}
        self._busy_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port the node listens on (useful when the configuration said 0)."""
        assert self.server is not None, "the service is not started"
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Sweep the spool, start workers and deliverers, and listen; return once listening."""
        self.spool.sweep()
        _use_spool_for_received_files(self.spool)
        self._encoder = Encoder(self.config.workers.processes)
        self._processor = Processor(self.config, self.spool, self._encoder)
        for spool_id in self.spool.incoming():
            self._work.put(spool_id)
        for index in range(self.config.workers.processes):
            self._spawn(f"processor-{index}", self._process_loop)
        for name, destination in self.config.destinations.items():
            self._add_destination(name, destination)
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        receive.add_supported_contexts(ae)
        handlers: list[Any] = [
            *security.access_handlers(node.allowed_calling_aets),
            *receive.handlers(self.spool, self._received, node),
        ]
        server = ae.make_server(
            (node.host, node.port),
            ssl_context=security.server_context(node.tls) if node.tls else None,
            evt_handlers=handlers,
            server_class=limits.HardenedServer,
            pdu_limits=limits.PduLimits.for_max_pdu(node.max_pdu_size, node.max_instance_bytes),
            handshake_timeout=node.tls_handshake_timeout,
        )
        assert isinstance(server, limits.HardenedServer)
        self.server = server
        self._spawn("accept", server.serve_forever)
        if self.config.metrics is not None:
            self.metrics = metrics.Endpoint(
                self.config.metrics.host, self.config.metrics.port, self._state_collector(), self.health
            )
            self.metrics.start()
        interval = notify.watchdog_interval()
        if interval is not None:
            threading.Thread(target=self._watchdog_loop, args=(interval,), name="watchdog", daemon=True).start()
        LOGGER.info("listening as %s on %s:%d%s", node.ae_title, node.host, self.port, " (TLS)" if node.tls else "")

    def stop(self) -> None:
        """Stop accepting, end the threads after their current item, and stop the encoder processes."""
        if self.server is not None:
            self.server.shutdown()
        self._stopping.set()
        for _ in range(self.config.workers.processes):
            self._work.put(_STOP)
        for destination in self._destinations.values():
            destination.wake.set()
        for thread in self._threads:
            thread.join()
        if self._encoder is not None:
            self._encoder.close()
        if self.metrics is not None:
            self.metrics.stop()
        LOGGER.info("stopped")

    def health(self) -> list[str]:
        """What is wrong with the node, or an empty list: every thread alive, none stuck on one item."""
        problems = [f"thread {t.name} has stopped" for t in self._threads if not t.is_alive()]
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

    def _watchdog_loop(self, interval: float) -> None:
        """Ping systemd's watchdog while healthy; withhold the ping otherwise, so that systemd restarts us."""
        while not self._stopping.wait(interval):
            problems = self.health()
            if problems:
                LOGGER.error("unhealthy, withholding the watchdog ping: %s", "; ".join(problems))
            else:
                notify.watchdog()

    def _state_collector(self) -> metrics.StateCollector:
        def queues() -> list[tuple[str, int, float | None]]:
            rows = []
            for name in self.config.destinations:
                jobs = self.spool.jobs(name)
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
            return len(self.server.active_associations) if self.server is not None else 0

        return metrics.StateCollector(queues, quarantined, associations)

    def _received(self, spool_id: str) -> None:
        self._work.put(spool_id)

    def _spawn(self, name: str, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _add_destination(self, name: str, destination: object) -> None:
        deliverer = Deliverer(name, destination, self.spool, self.config.node.ae_title)  # type: ignore[arg-type]
        state = _Destination(deliverer)
        self._destinations[name] = state
        for index in range(deliverer.destination.associations):
            self._spawn(f"deliver-{name}-{index}", self._deliver_loop, state)

    def _process_loop(self) -> None:
        assert self._processor is not None
        while True:
            spool_id = self._work.get()
            if spool_id == _STOP:
                return
            try:
                with self._working():
                    jobs = self._processor.process(spool_id)
            except Exception:
                LOGGER.exception("processing %s failed; it stays in the spool and is tried again", spool_id)
                if not self._stopping.wait(5.0):
                    self._work.put(spool_id)
                continue
            for job in jobs:
                state = self._destinations.get(job.destination)
                if state is not None:
                    state.wake.set()

    def _deliver_loop(self, state: _Destination) -> None:
        while not self._stopping.is_set():
            try:
                with self._working():
                    tried = state.deliverer.run_once()
            except Exception:
                LOGGER.exception("delivery to %s failed unexpectedly; trying again", state.deliverer.name)
                tried = 0
            if not tried:
                state.wake.wait(state.deliverer.next_wake())
                state.wake.clear()


def _use_spool_for_received_files(spool: Spool) -> None:
    """Stream received datasets to files in the spool's tmp/ (flat memory; committing is a rename)."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.tmp)
