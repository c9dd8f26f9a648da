"""Memory: one huge multi-frame instance through the node while /proc samples the node's processes.

The instance is written frame by frame (never whole in this process's memory), sent by DCMTK storescu, re-encoded
by the node and forwarded to DCMTK storescp. The node's processes (the service, its receiving process and its
encoder processes) are sampled every 50 ms: peak summed RSS (shared pages counted once per process: an upper
bound) and peak summed PSS (shared pages shared out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from benchmarks import data, procs
from benchmarks.throughput import ARCHIVE_AE, NODE_AE, node_config

MIB = 1 << 20


@dataclass(frozen=True)
class MemoryResult:
    """What one huge instance cost the node."""

    size_bytes: int
    frames: int
    syntax: str
    seconds_modality: float
    seconds_end_to_end: float
    peak_rss: int
    peak_pss: int
    idle_rss: int
    arrived_syntax: str
    arrived_bytes: int


def run(workdir: Path, size_bytes: int, syntax: str, processes: int, timeout: float = 900) -> MemoryResult:
    """Send a generated multi-frame instance of `size_bytes` through the node; return its peak memory."""
    folder = workdir / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "in" / "multiframe.dcm"
    source.parent.mkdir(exist_ok=True)
    frames = data.write_multiframe(source, size_bytes)
    archive = folder / "archive"
    archive_port, port = procs.free_port(), procs.free_port()
    try:
        with (
            procs.storescp(archive, archive_port, ARCHIVE_AE),
            procs.node(folder, node_config(folder, port, archive_port, syntax, processes)) as node_pid,
        ):
            idle = procs.TreeMonitor(node_pid)
            idle.start()
            idle.stop()
            with procs.TreeMonitor(node_pid, pss=True) as monitor:
                start = time.perf_counter()
                sent = procs.storescu(port, [source], NODE_AE, folder / "storescu.log", timeout)
                modality = time.perf_counter() - start
                if sent.successes != 1:
                    raise RuntimeError(f"the node did not answer Success; see {folder / 'storescu.log'}")
                procs.wait_for(lambda: _complete(archive), timeout, "the instance at the archive", interval=0.2)
                end_to_end = time.perf_counter() - start
            arrived = next(p for p in archive.iterdir() if p.is_file())
            header = pydicom.dcmread(arrived, stop_before_pixels=True)
            return MemoryResult(
                size_bytes=source.stat().st_size,
                frames=frames,
                syntax=syntax,
                seconds_modality=modality,
                seconds_end_to_end=end_to_end,
                peak_rss=monitor.peak_rss,
                peak_pss=monitor.peak_pss,
                idle_rss=idle.peak_rss,
                arrived_syntax=str(header.file_meta.TransferSyntaxUID),
                arrived_bytes=arrived.stat().st_size,
            )
    finally:
        source.unlink(missing_ok=True)


def _complete(archive: Path) -> bool:
    """True once storescp has written the instance (it writes the file only after the whole dataset arrived:
    the file is complete once its size holds still for half a second)."""
    files = [p for p in archive.iterdir() if p.is_file()]
    if not files:
        return False
    size = files[0].stat().st_size
    time.sleep(0.5)
    return files[0].stat().st_size == size
