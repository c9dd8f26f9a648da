"""Prometheus metrics and the load balancer's health check, served together on `metrics.port`.

Counters and histograms are module-level objects (one node per process) that the stages update at their event
points; what is best read from disk or the server at scrape time (queue depths, quarantine, associations) comes
from the running service's `StateCollector`. `GET /metrics` is the Prometheus text format; `GET /health`
answers 200 "ok" while the node is healthy and 503 with the reasons otherwise.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

LOGGER = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()

REJECTED = Counter(
    "scp_associations_rejected", "Associations rejected by access control", ["reason"], registry=REGISTRY
)
CALLING_AE_LABELS = 100
"""Calling AE titles counted under a label of their own; later ones are counted together under OTHER_CALLING_AE.
A label's series lives as long as the node, and without `allowed_calling_aets` any title may call."""
OTHER_CALLING_AE = "(other)"


class BoundedLabels:
    """The first `limit` values seen keep their own label; the rest share `other`."""

    def __init__(self, limit: int, other: str) -> None:
        self.limit = limit
        self.other = other
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        with self._lock:
            if value not in self._seen and len(self._seen) >= self.limit:
                return self.other
            self._seen.add(value)
            return value


calling_ae_label = BoundedLabels(CALLING_AE_LABELS, OTHER_CALLING_AE)

RECEIVED = Counter(
    "scp_instances_received", "Instances received and committed to the spool", ["calling_ae"], registry=REGISTRY
)
RECEIVED_BYTES = Counter(
    "scp_received_bytes", "Bytes of instances received and committed to the spool", ["calling_ae"], registry=REGISTRY
)
REFUSED = Counter("scp_instances_refused", "Instances answered with a failure status", ["status"], registry=REGISTRY)
PROCESSED = Counter(
    "scp_instances_processed", "Instances the rules were applied to", ["rule", "outcome"], registry=REGISTRY
)
FORWARDED = Counter(
    "scp_instances_forwarded", "Instances a destination confirmed", ["destination", "rule"], registry=REGISTRY
)
FORWARDED_BYTES = Counter(
    "scp_forwarded_bytes", "Bytes of instances a destination confirmed", ["destination", "rule"], registry=REGISTRY
)
RETRIES = Counter("scp_delivery_retries", "Failed deliveries that will be retried", ["destination"], registry=REGISTRY)
CERTIFICATE_EXPIRY = Gauge(
    "scp_tls_certificate_expiry_timestamp_seconds",
    "When each certificate of the configuration's TLS settings expires (Unix time)",
    ["where", "subject"],
    registry=REGISTRY,
)
QUARANTINED = Counter("scp_instances_quarantined", "Jobs moved to quarantine", ["destination"], registry=REGISTRY)
VERIFY_FAILED = Counter(
    "scp_lossless_verification_failures",
    "Lossless encodes that decoded differently from the source (the original was forwarded instead)",
    ["rule"],
    registry=REGISTRY,
)
COMPRESSION_RATIO = Histogram(
    "scp_compression_ratio",
    "Size as received divided by size as re-encoded",
    ["rule", "syntax"],
    buckets=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 50.0),
    registry=REGISTRY,
)
ENCODE_SECONDS = Histogram(
    "scp_encode_seconds",
    "Seconds spent re-encoding one instance",
    ["rule", "syntax"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)


class StateCollector(Collector):
    """Gauges read from the running service when Prometheus scrapes."""

    def __init__(
        self,
        queues: Callable[[], Iterable[tuple[str, int, float | None]]],
        quarantined: Callable[[], Iterable[tuple[str, int]]],
        associations: Callable[[], int],
    ) -> None:
        self._queues = queues
        self._quarantined = quarantined
        self._associations = associations

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("scp_queue_depth", "Jobs waiting for a destination", labels=["destination"])
        oldest = GaugeMetricFamily(
            "scp_queue_oldest_age_seconds",
            "Seconds since the oldest waiting job's instance was received",
            labels=["destination"],
        )
        for destination, count, age in self._queues():
            depth.add_metric([destination], count)
            oldest.add_metric([destination], age or 0.0)
        quarantine = GaugeMetricFamily(
            "scp_quarantine_size", "Jobs in quarantine waiting for an operator", labels=["destination"]
        )
        for destination, count in self._quarantined():
            quarantine.add_metric([destination], count)
        associations = GaugeMetricFamily("scp_associations", "Associations currently open with the node")
        associations.add_metric([], self._associations())
        yield from (depth, oldest, quarantine, associations)


class _Union(Collector):
    def __init__(self, *registries: CollectorRegistry) -> None:
        self._registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self._registries:
            yield from registry.collect()


MAX_CLIENTS = 16
"""HTTP connections served at once (Prometheus and a load balancer need a few)."""
CLIENT_TIMEOUT = 10.0
"""Seconds a client may stay silent before its connection is closed."""


class _QuietHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not events worth a log line."""


class _BoundedServer(ThreadingWSGIServer):
    """A thread per connection, as prometheus_client's server, for at most MAX_CLIENTS at once: a connection past
    them is closed unanswered. Each thread and socket is the service process's, which processes and delivers:
    idle clients must not use up its threads or file descriptors."""

    def __init__(self, server_address: tuple[str, int], *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.address_family = _family(*server_address)  # http.server assumes IPv4: "::1" would not bind
        super().__init__(server_address, *args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family to listen on `host` with."""
    return socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]


class Endpoint:
    """The HTTP server of `/metrics` and `/health`, in a daemon thread."""

    def __init__(self, host: str, port: int, state: StateCollector, health: Callable[[], list[str]]) -> None:
        registry = CollectorRegistry()
        registry.register(_Union(REGISTRY))
        registry.register(state)
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._server = make_server(host, port, self._app, _BoundedServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def start(self) -> None:
        self._thread.start()
        LOGGER.info("metrics on http://%s:%d/metrics, health check on /health", *self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/health":
            problems = self._health()
            body = ("ok\n" if not problems else "".join(f"{p}\n" for p in problems)).encode()
            code = "200 OK" if not problems else "503 Service Unavailable"
            start_response(code, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
