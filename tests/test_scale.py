"""Scale: 20 modalities at once x 50 instances each, and two nodes behind haproxy (TCP mode) on loopback."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests import hostile
from tests.peers import PROJECT, _process, free_port, listening, node_config, node_process, running_node, tool, wait_for

pytestmark = pytest.mark.peers

RULES = [{"name": "ct", "compress": "JPEGLSLossless", "forward": ["folder"]}]


def _images(folder: Path, count: int) -> list[tuple[Path, str]]:
    """`count` small CT images with fresh SOP Instance UIDs (and pixels that differ, so each compresses)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for index in range(count):
        uid = generate_uid()
        pixels = bytes((index + i) % 251 for i in range(32 * 32))
        made.append(
            (hostile.part10(folder / f"{index}.dcm", uid, hostile.header(uid) + hostile.image(32, 32, pixels)), uid)
        )
    return made


def _send(port: int, files: list[Path], calling: str) -> str:
    args = [tool("storescu"), "-aet", calling, "-aec", "COMPRESS_SCP", "-v", "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=240, check=False)
    return done.stdout + done.stderr


def _delivered(folder: Path) -> set[str]:
    return {p.name.removesuffix(".dcm") for p in folder.glob("*.dcm")} if folder.exists() else set()


@pytest.mark.slow
def test_twenty_concurrent_associations_of_fifty_instances(tmp_path: Path) -> None:
    """20 storescu processes at once (above pynetdicom's default of 10 associations), 50 instances each: every
    one is acknowledged and delivered, none lost."""
    images = _images(tmp_path / "sent", 20 * 50)
    batches = [[path for path, _ in images[i * 50 : (i + 1) * 50]] for i in range(20)]
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(tmp_path, destinations, RULES, workers={"processes": 2})
    with running_node(data) as node:
        started = time.monotonic()
        with ThreadPoolExecutor(20) as pool:
            outputs = list(pool.map(lambda i: _send(node.port, batches[i], f"MODALITY{i:02d}"), range(20)))
        received = time.monotonic() - started
        wait_for(lambda: len(_delivered(tmp_path / "folder")) == len(images), 180, "1000 instances delivered")
        delivered = time.monotonic() - started
    for output in outputs:
        assert output.count("Received Store Response (Success)") == 50, output[-2000:]
    assert _delivered(tmp_path / "folder") == {uid for _, uid in images}
    print(f"\n20 x 50 instances: all acknowledged in {received:.1f} s, all delivered in {delivered:.1f} s")


def _haproxy_config(path: Path, port: int, nodes: list[tuple[int, int]]) -> Path:
    """The shape of config/haproxy.cfg on loopback: TCP mode, /health checks, redispatch."""
    servers = "\n".join(
        f"    server node{i} 127.0.0.1:{dicom} check port {health} inter 300ms fall 1 rise 1"
        for i, (dicom, health) in enumerate(nodes)
    )
    path.write_text(
        f"""global
    maxconn 256
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
frontend dicom
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
{servers}
"""
    )
    return path


def test_shipped_haproxy_config_is_valid() -> None:
    done = subprocess.run(
        [tool("haproxy"), "-c", "-f", str(PROJECT / "config" / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_two_nodes_behind_haproxy_deliver_everything(tmp_path: Path) -> None:
    """Associations through haproxy land on both nodes; all instances are delivered. Then one node stops and
    haproxy sends everything to the other: still nothing lost."""
    archive = tmp_path / "archive"
    nodes = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        data = node_config(
            folder,
            {"folder": {"type": "directory", "path": str(archive)}},
            RULES,
            node={"port": free_port()},
            metrics={"port": free_port(), "host": "127.0.0.1"},
        )
        nodes.append((folder, data))
    front = free_port()
    config = _haproxy_config(
        tmp_path / "haproxy.cfg", front, [(d["node"]["port"], d["metrics"]["port"]) for _, d in nodes]
    )
    images = _images(tmp_path / "sent", 60)
    with node_process(*nodes[0]) as node_a, node_process(*nodes[1]) as node_b:
        with _process([tool("haproxy"), "-db", "-f", str(config)], tmp_path / "haproxy.log"):
            wait_for(lambda: listening(front), 10, "haproxy to listen")
            time.sleep(1.0)  # let the first health checks mark both nodes up
            outputs = [_send(front, [p for p, _ in images[i * 10 : (i + 1) * 10]], "MODALITY") for i in range(4)]
            wait_for(lambda: len(_delivered(archive)) == 40, 60, "40 instances through haproxy")
            node_a.stop()
            outputs += [_send(front, [p for p, _ in images[i * 10 : (i + 1) * 10]], "MODALITY") for i in (4, 5)]
            wait_for(lambda: len(_delivered(archive)) == 60, 60, "60 instances with one node down")
        received_by = [node.log.read_text().count(" received ") for node in (node_a, node_b)]
    for output in outputs:
        assert output.count("Received Store Response (Success)") == 10, output[-2000:]
    assert _delivered(archive) == {uid for _, uid in images}
    assert received_by[0] >= 10 and received_by[1] >= 10, f"not balanced: {received_by}"
    assert sum(received_by) == 60
