"""What Success promises, under a crash, an archive outage, a full disk and SIGTERM: real processes, loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from scp import status
from tests.fake_archive import FakeArchive
from tests.instances import Arrivals, acknowledged, make_instances
from tests.peers import (
    NodeProcess,
    archive_destination,
    free_port,
    listening,
    node_config,
    running_node,
    storescp,
    storescu,
    tool,
    wait_for,
)

pytestmark = pytest.mark.peers

JPEG_LS_RULES = [{"name": "all", "compress": "JPEGLSLossless", "forward": ["archive"]}]
FAST_RETRY = {"initial_delay": 0.3, "max_delay": 2.0}


def _spool_counts(spool: Path) -> tuple[int, int, int]:
    """(received not yet processed, jobs waiting, jobs quarantined)."""
    incoming = len(list((spool / "incoming").glob("*.dcm")))
    outgoing = len([p for p in (spool / "outgoing").glob("*/*") if p.is_dir()])
    quarantined = len([p for p in (spool / "quarantine").glob("*/*") if p.is_dir()])
    return incoming, outgoing, quarantined


class _Modality:
    """`storescu -v` sending in the background; its output is read as it comes, so a test can act on the n-th
    Success response the modality has actually seen (the node logs a reception before its response arrives)."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)

    def successes(self) -> int:
        return sum("Received Store Response (Success)" in line for line in list(self._lines))

    def finish(self, timeout: float) -> str:
        """Wait for storescu to end; return all it printed."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return "".join(self._lines)


def _node_process(tmp_path: Path, archive_port: int) -> NodeProcess:
    """The node as a process on a free port, compressing as JPEG-LS for the archive; started."""
    data = node_config(tmp_path, archive_destination(archive_port, FAST_RETRY), JPEG_LS_RULES)
    data["node"]["port"] = free_port()
    node = NodeProcess(tmp_path, data)
    node.start()
    return node


def _kill_once_acknowledged(
    node: NodeProcess, made: dict[Path, str], count: int, interval: float
) -> tuple[str, set[str]]:
    """Stream `made` to the node with DCMTK storescu and SIGKILL the node once storescu has seen `count`
    Successes; return storescu's output and the UIDs it saw acknowledged."""
    args = [tool("storescu"), "-v", "-aec", "COMPRESS_SCP", "127.0.0.1", str(node.port), *map(str, made)]
    modality = _Modality(args)
    wait_for(lambda: modality.successes() >= count, 60, f"{count} instance(s) acknowledged", interval=interval)
    node.kill()
    output = modality.finish(timeout=60)
    return output, {made[path] for path in acknowledged(output)}


@pytest.mark.slow
def test_kill_9_while_storescu_streams_300_instances(tmp_path: Path) -> None:
    """SIGKILL the node mid-stream (and mid-compression); after a restart on the same spool every instance
    storescu saw acknowledged reaches the archive."""
    made = make_instances(tmp_path / "modality", 300)
    arrivals = Arrivals(tmp_path / "archive")
    with storescp(tmp_path / "archive") as archive_port:
        node = _node_process(tmp_path, archive_port)
        try:
            output, acked = _kill_once_acknowledged(node, made, 100, interval=0.01)
            assert 100 <= len(acked) < 300, output[-2000:]
            left = _spool_counts(tmp_path / "spool")
            assert left[0] + left[1] > 0, "the kill came too late to leave work in the spool"
            delivered_before_restart = len(arrivals.uids())
            node.start()
            wait_for(lambda: acked <= arrivals.uids(), 120, f"{len(acked)} acknowledged instances at the archive")
            wait_for(lambda: _spool_counts(tmp_path / "spool") == (0, 0, 0), 30, "an empty spool")
        finally:
            node.stop()
    print(
        f"acknowledged {len(acked)}/300; spool after kill: {left[0]} incoming, {left[1]} jobs; "
        f"{delivered_before_restart} delivered before the restart; {len(arrivals.uids())} at the archive"
    )


def test_kill_9_while_encoding(tmp_path: Path) -> None:
    """SIGKILL as soon as the first of three 8 MB instances (about 0.5 s each to encode as JPEG-LS) is
    acknowledged, so the encoder is at work or about to be; after a restart all three reach the archive as
    JPEG-LS and the spool ends empty (the start-up sweep took what the kill left in tmp/)."""
    made = make_instances(tmp_path / "modality", 3, rows=2048)
    arrivals = Arrivals(tmp_path / "archive")
    with storescp(tmp_path / "archive") as archive_port:
        node = _node_process(tmp_path, archive_port)
        try:
            output, acked = _kill_once_acknowledged(node, made, 1, interval=0.005)
            first_run = node.log.read_text()
            assert acked, output[-2000:]
            assert any(f"compressed {uid}" not in first_run for uid in acked), "the kill came after the encoding"
            node.start()
            wait_for(lambda: acked <= arrivals.uids(), 60, "the acknowledged instances at the archive")
            wait_for(lambda: _spool_counts(tmp_path / "spool") == (0, 0, 0), 30, "an empty spool")
        finally:
            node.stop()
    for path in (tmp_path / "archive").glob("CT*"):
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGLSLossless


@pytest.mark.slow
def test_archive_down_while_200_arrive_then_up(tmp_path: Path) -> None:
    """The archive is down while 200 instances arrive and comes up ~12 s later (the issue's "a minute later",
    shortened to keep the suite fast, with retry delays to match): all delivered, none quarantined."""
    made = make_instances(tmp_path / "modality", 200)
    archive_port = free_port()
    arrivals = Arrivals(tmp_path / "archive")
    spool = tmp_path / "spool"
    data = node_config(
        tmp_path, archive_destination(archive_port, FAST_RETRY, associations=2, batch_size=32), JPEG_LS_RULES
    )
    with running_node(data) as node:
        started = time.monotonic()
        output = storescu(node.port, list(made))
        assert len(acknowledged(output)) == 200, output[-2000:]
        wait_for(lambda: _spool_counts(spool)[0] == 0, 60, "all 200 processed into jobs")
        while time.monotonic() < started + 12:
            assert _spool_counts(spool) == (0, 200, 0)
            time.sleep(0.5)
        with storescp(tmp_path / "archive", port=archive_port):
            up = time.monotonic()
            wait_for(lambda: arrivals.uids() == set(made.values()), 60, "200 instances at the archive")
            delivered_in = time.monotonic() - up
            wait_for(lambda: _spool_counts(spool) == (0, 0, 0), 10, "an empty spool")
    print(f"200 delivered {delivered_in:.1f} s after the archive came up")


def test_full_spool_answers_out_of_resources_and_recovers(tmp_path: Path) -> None:
    """A spool on a 6 MB tmpfs with min_free_mb 2 and the archive down: once the spool is full the node answers
    0xA700, still answers C-ECHO, loses nothing it acknowledged, and takes instances again once the archive is
    back and deliveries free the space."""
    made = make_instances(tmp_path / "modality", 150)
    archive_port = free_port()
    arrivals = Arrivals(tmp_path / "archive")
    with _tmpfs(tmp_path / "small", "6m") as small:
        data = node_config(
            tmp_path, archive_destination(archive_port, FAST_RETRY), JPEG_LS_RULES, spool={"path": str(small / "spool")}
        )
        data["spool"]["min_free_mb"] = 2
        with running_node(data) as node:
            output = storescu(node.port, list(made), extra=["--no-halt"])
            acked = {made[path] for path in acknowledged(output)}
            refused = output.count("Received Store Response (Refused: OutOfResources")
            assert acked and refused, output[-2000:]
            assert len(acked) + refused == len(made), output[-2000:]
            echo = subprocess.run(
                [tool("echoscu"), "-aec", "COMPRESS_SCP", "127.0.0.1", str(node.port)], capture_output=True, timeout=30
            )
            assert echo.returncode == 0, echo.stdout + echo.stderr
            assert not list(node.spool.tmp.glob("tmp*.dcm")), "refused data left in tmp/"
            with storescp(tmp_path / "archive", port=archive_port):
                wait_for(lambda: acked <= arrivals.uids(), 60, f"the {len(acked)} acknowledged instances")
                wait_for(lambda: _spool_counts(node.spool.root) == (0, 0, 0), 30, "an empty spool")
                rest = [path for path, uid in made.items() if uid not in acked]
                again = storescu(node.port, rest)
                assert len(acknowledged(again)) == len(rest), again[-2000:]
                wait_for(lambda: arrivals.uids() == set(made.values()), 60, "all 150 at the archive")
    print(f"acknowledged {len(acked)} then refused {refused} with 0xA700; the rest taken after recovery")


def test_an_instance_larger_than_the_space_left_is_refused_and_its_space_freed(tmp_path: Path) -> None:
    """A spool on a 2 MB tmpfs, min_free_mb 0, the archive down: a 3 MB instance is answered 0xA700 (the disk
    fills as it streams in; the association used to die with no status), nothing of it stays on the disk, and
    the next instance is taken."""
    from pydicom.uid import generate_uid

    from tests import hostile

    big_uid, small_uid = generate_uid(), generate_uid()
    big = hostile.part10(
        tmp_path / "big.dcm", big_uid, hostile.header(big_uid) + hostile.image(1536, 2048, bytes(1536 * 2048))
    )
    small = hostile.part10(
        tmp_path / "small.dcm", small_uid, hostile.header(small_uid) + hostile.image(8, 8, bytes(64))
    )
    with _tmpfs(tmp_path / "tiny", "2m") as tiny:
        data = node_config(tmp_path, archive_destination(free_port(), FAST_RETRY), JPEG_LS_RULES)
        data["spool"] = {"path": str(tiny / "spool"), "min_free_mb": 0}
        with running_node(data) as node:
            assert hostile.store(node.port, big) == status.OUT_OF_RESOURCES
            assert not list(node.spool.tmp.glob("tmp*.dcm")), "the refused instance left in tmp/"
            assert hostile.store(node.port, small) == status.SUCCESS
            assert len(node.spool.incoming()) + len(node.spool.jobs()) >= 1


def test_inodes_running_out_answers_out_of_resources_and_keeps_room_for_processing(tmp_path: Path) -> None:
    """A spool on a tmpfs of 200 inodes, min_free_inodes 130, the archive down: once the reserve is reached the
    node answers 0xA700 (the association used to be aborted when a file could not be made), the instances it
    acknowledged are all made into jobs and delivered once the archive is back, and the rest are taken again
    (the delivered jobs' spares count as free inodes)."""
    made = make_instances(tmp_path / "modality", 80)
    archive_port = free_port()
    arrivals = Arrivals(tmp_path / "archive")
    with _tmpfs(tmp_path / "few", "64m", nr_inodes=200) as few:
        spool = {"path": str(few / "spool"), "min_free_mb": 1, "min_free_inodes": 130}
        data = node_config(tmp_path, archive_destination(archive_port, FAST_RETRY), JPEG_LS_RULES, spool=spool)
        with running_node(data) as node:
            output = storescu(node.port, list(made), extra=["--no-halt"])
            acked = {made[path] for path in acknowledged(output)}
            refused = output.count("Received Store Response (Refused: OutOfResources")
            assert acked and refused and len(acked) + refused == len(made), output[-2000:]
            wait_for(lambda: _spool_counts(node.spool.root) == (0, len(acked), 0), 30, "every acknowledged one a job")
            with storescp(tmp_path / "archive", port=archive_port):
                wait_for(lambda: acked <= arrivals.uids(), 60, f"the {len(acked)} acknowledged instances")
                wait_for(lambda: _spool_counts(node.spool.root) == (0, 0, 0), 30, "an empty spool")
                rest = [path for path, uid in made.items() if uid not in acked][:20]
                again = storescu(node.port, rest)
                assert len(acknowledged(again)) == len(rest), again[-2000:]
            assert node.health() == []
    print(f"acknowledged {len(acked)} then refused {refused} with 0xA700; 20 more taken after recovery")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, nr_inodes: int = 0) -> Iterator[Path]:
    """A small tmpfs mounted for the test (needs root: skipped otherwise, failed under CI); always unmounted."""
    path.mkdir()
    options = f"size={size},nr_inodes={nr_inodes}" if nr_inodes else f"size={size}"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        message = f"cannot mount a tmpfs for the full-disk test: {done.stderr.decode(errors='replace').strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_sigterm_stops_within_the_bound(tmp_path: Path) -> None:
    """SIGTERM while storescu streams and a slow archive is being fed: the node stops listening, exits within
    node.shutdown_timeout, and the next start delivers everything that was acknowledged."""
    made = make_instances(tmp_path / "modality", 150)
    slow = FakeArchive(delay=0.3)
    with slow.serving() as archive_port:
        data = node_config(tmp_path, archive_destination(archive_port, FAST_RETRY, associations=1), JPEG_LS_RULES)
        data["node"].update(port=free_port(), shutdown_timeout=4)
        node = NodeProcess(tmp_path, data)
        node.start()
        try:
            args = [tool("storescu"), "-v", "-aec", "COMPRESS_SCP", "127.0.0.1", str(node.port), *map(str, made)]
            with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as modality:
                wait_for(lambda: len(slow.received) >= 2, 30, "deliveries to start")
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
                asked = time.monotonic()
                code = node.proc.wait(timeout=15)
                took = time.monotonic() - asked
                output, _ = modality.communicate(timeout=30)
            assert code == 0
            assert took < 4 + 2, f"took {took:.1f} s to stop"
            assert not listening(node.port)
            acked = {made[path] for path in acknowledged(output)}
            delivered_first = slow.uids()
            assert len(delivered_first) < len(acked), "the archive was not slow enough to leave work in hand"
        finally:
            node.stop()
    fast = FakeArchive()
    with fast.serving() as archive_port:
        data["destinations"] = archive_destination(archive_port, FAST_RETRY)
        node = NodeProcess(tmp_path, data)
        node.start()
        try:
            wait_for(lambda: acked <= delivered_first | fast.uids(), 30, "the rest after the restart")
        finally:
            node.stop()
    print(
        f"SIGTERM: stopped in {took:.2f} s; {len(acked)} acknowledged, {len(delivered_first)} delivered before, "
        "the rest after the restart"
    )


def test_sigterm_exits_within_the_bound_even_with_a_stuck_c_store(tmp_path: Path) -> None:
    """An archive taking 20 s per C-STORE and shutdown_timeout 2: SIGTERM still ends the process in about
    2 s, the job in flight stays in the spool."""
    made = make_instances(tmp_path / "modality", 2)
    stuck = FakeArchive(delay=20)
    with stuck.serving() as archive_port:
        data = node_config(tmp_path, archive_destination(archive_port, FAST_RETRY, timeout=60), JPEG_LS_RULES)
        data["node"].update(port=free_port(), shutdown_timeout=2)
        node = NodeProcess(tmp_path, data)
        node.start()
        try:
            assert len(acknowledged(storescu(node.port, list(made)))) == 2
            wait_for(lambda: len(stuck.received) >= 1, 30, "a C-STORE in flight")
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            asked = time.monotonic()
            code = node.proc.wait(timeout=15)
            took = time.monotonic() - asked
        finally:
            node.stop()
    assert code == 0
    assert took < 2 + 2, f"took {took:.1f} s to stop"
    assert "with work in hand" in node.log.read_text()
    assert _spool_counts(tmp_path / "spool") == (0, 2, 0)
