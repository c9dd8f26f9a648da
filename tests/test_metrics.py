"""`/metrics` counts what was sent; `/health` answers a load balancer's check."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scp import config
from tests import hostile
from tests.peers import TEST_FILES, free_port, node_config, running_node, storescu, wait_for

pytestmark = pytest.mark.peers

SENT = ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "test-SR.dcm")
RULES = [
    {"name": "ct-mr", "match": {"modality": ["CT", "MR"]}, "compress": "JPEGLSLossless", "forward": ["folder"]},
    {"name": "everything-else", "compress": "keep", "forward": ["folder"]},
]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all((k, v) in sample_labels for k, v in labels.items())
    )


def _health(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_counters_match_what_was_sent(tmp_path: Path) -> None:
    metrics_port = free_port()
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(tmp_path, destinations, RULES, metrics={"port": metrics_port, "host": "127.0.0.1"})
    with running_node(data) as node:
        before = _scrape(metrics_port)
        assert _health(metrics_port) == (200, "ok\n")
        storescu(node.port, [TEST_FILES / name for name in SENT])
        wait_for(lambda: len(list((tmp_path / "folder").glob("*.dcm"))) == len(SENT), 60, "all instances delivered")
        wait_for(
            lambda: (
                _total(_scrape(metrics_port), "scp_instances_forwarded_total")
                - _total(before, "scp_instances_forwarded_total")
                == len(SENT)
            ),
            10,
            "the forwarded counter",
        )
        after = _scrape(metrics_port)
        held = hostile.open_association(node.port)
        try:
            wait_for(lambda: _total(_scrape(metrics_port), "scp_associations") == 1, 10, "scp_associations 1")
        finally:
            held.release()

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert delta("scp_instances_received_total", calling_ae="STORESCU") == len(SENT)
    assert delta("scp_instances_processed_total", rule="ct-mr", outcome="compressed") == 2
    assert delta("scp_instances_processed_total", rule="everything-else", outcome="unchanged") == 2
    assert delta("scp_instances_forwarded_total", destination="folder", rule="ct-mr") == 2
    assert delta("scp_instances_forwarded_total", destination="folder", rule="everything-else") == 2
    assert delta("scp_compression_ratio_count", rule="ct-mr") == 2
    assert delta("scp_encode_seconds_count", rule="ct-mr") == 2
    assert delta("scp_compression_ratio_sum", rule="ct-mr") > 2  # CT and MR both shrink under JPEG-LS
    delivered = sum(p.stat().st_size for p in (tmp_path / "folder").glob("*.dcm"))
    assert delta("scp_forwarded_bytes_total", destination="folder") == delivered
    received = delta("scp_received_bytes_total", calling_ae="STORESCU")
    assert received > delivered  # two of the four were compressed on the way
    assert _total(after, "scp_queue_depth", destination="folder") == 0
    assert _total(after, "scp_quarantine_size", destination="folder") == 0
    assert ("scp_associations", ()) in after


def test_health_reports_a_stuck_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/health answers 503 naming the thread while one instance keeps a worker busy past node.stall_timeout."""
    metrics_port = free_port()
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(
        tmp_path, destinations, RULES, node={"stall_timeout": 0.5}, metrics={"port": metrics_port, "host": "127.0.0.1"}
    )
    release = threading.Event()
    with running_node(data) as node:
        processor = node._processor
        assert processor is not None
        real_process = processor.process

        def hang(spool_id: str) -> object:
            release.wait(30)
            return real_process(spool_id)

        monkeypatch.setattr(processor, "process", hang)
        storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        time.sleep(1.0)
        code, body = _health(metrics_port)
        release.set()
        wait_for(lambda: _health(metrics_port)[0] == 200, 10, "/health to recover")
    assert code == 503 and "processor-0" in body, body


def test_calling_ae_labels_are_bounded(tmp_path: Path) -> None:
    """Without allowed_calling_aets any title may call, and a label series is never freed: past
    CALLING_AE_LABELS titles, new ones are counted together under `(other)`."""
    from scp import metrics
    from scp.inbound import Inbound

    def series() -> dict[str, float]:
        return {
            s.labels["calling_ae"]: s.value
            for family in metrics.RECEIVED.collect()
            for s in family.samples
            if s.name.endswith("_total")
        }

    data = node_config(tmp_path, {"a": {"type": "directory", "path": "a"}}, [{"name": "r", "forward": ["a"]}])
    inbound = Inbound(config.parse(data), lambda spool_id: None)
    other_before = series().get(metrics.OTHER_CALLING_AE, 0.0)
    titles = [f"FLOOD{n:04d}" for n in range(metrics.CALLING_AE_LABELS + 50)]
    for title in titles:
        inbound._apply(("received", "id", title, 10))
    after = series()
    assert len(after) <= metrics.CALLING_AE_LABELS + 1
    counted = sum(after.get(title, 0.0) for title in titles) + after[metrics.OTHER_CALLING_AE] - other_before
    assert counted == len(titles), "every instance is still counted"


def _folder_node(tmp_path: Path, metrics_port: int, host: str = "127.0.0.1") -> dict[str, object]:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    return node_config(tmp_path, destinations, RULES, metrics={"port": metrics_port, "host": host})


def test_idle_http_clients_are_bounded_and_let_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each HTTP connection is a thread and a file of the service process, which processes and delivers:
    connections that send nothing are served MAX_CLIENTS at a time and closed after CLIENT_TIMEOUT."""
    import socket

    from scp import metrics

    monkeypatch.setattr(metrics._QuietHandler, "timeout", 1.0)
    metrics_port = free_port()
    with running_node(_folder_node(tmp_path, metrics_port)):
        before = threading.active_count()
        idle = [
            socket.create_connection(("127.0.0.1", metrics_port), timeout=5) for _ in range(metrics.MAX_CLIENTS + 30)
        ]
        try:
            time.sleep(0.3)
            assert threading.active_count() - before <= metrics.MAX_CLIENTS
            wait_for(lambda: _health(metrics_port)[0] == 200, 10, "/health once the idle clients timed out")
            assert all(sock.recv(1) == b"" for sock in idle), "an idle connection was kept open"
        finally:
            for sock in idle:
                sock.close()


def test_health_says_stopping_as_soon_as_receiving_stops(tmp_path: Path) -> None:
    """A load balancer must stop sending associations to a node whose port is closing (SIGTERM's drain)."""
    metrics_port = free_port()
    with running_node(_folder_node(tmp_path, metrics_port)) as node:
        assoc = hostile.open_association(node.port)  # keeps the drain going for half of shutdown_timeout
        stopping = threading.Thread(target=node.stop, kwargs={"timeout": 4})
        stopping.start()
        try:
            wait_for(lambda: _health(metrics_port) == (503, "stopping\n"), 3, "/health to say stopping")
        finally:
            assoc.release()
            stopping.join(10)


def test_metrics_listen_on_ipv6(tmp_path: Path) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    metrics_port = free_port()
    url = f"http://[::1]:{metrics_port}/health"
    with running_node(_folder_node(tmp_path, metrics_port, host="::1")), urllib.request.urlopen(url, timeout=10) as got:
        assert got.status == 200


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [("min_free_mb", 2**40, "below spool.min_free_mb"), ("min_free_inodes", 2**62, "spool.min_free_inodes")],
)
def test_health_says_a_full_spool_but_the_watchdog_does_not(tmp_path: Path, key: str, value: int, said: str) -> None:
    """Every C-STORE is answered 0xA700 below spool.min_free_mb or spool.min_free_inodes: a load balancer must
    route around the node, but a restart would not help (deliveries free the space), so health() for the
    watchdog stays clear."""
    if key == "min_free_inodes" and not os.statvfs(tmp_path).f_files:
        pytest.skip("this filesystem counts no inodes")
    metrics_port = free_port()
    data = _folder_node(tmp_path, metrics_port)
    data["spool"][key] = value
    with running_node(data) as node:
        code, body = _health(metrics_port)
        assert node.health() == []
    assert code == 503 and body.startswith("spool full: ") and said in body, body
