"""The encoder processes: pixel work runs here, where a crashing native codec cannot take the node down.

Native codecs can abort the whole process (GDCM's RLE encoder calls terminate() on some odd-sized RGB images),
and pyjpegls / openjpeg hold the GIL and are not thread-safe, so encoding runs in worker processes. When a worker
dies, every task in flight in that pool fails with it; each of those is retried once, alone, in a process of its
own, so only the instance that really crashes the codec falls back to its original.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from pydicom import config as pydicom_config

from scp import compress
from scp.config import CompressSpec

LOGGER = logging.getLogger(__name__)

# Workers come from a fork server, not from a fork of the multi-threaded node: a fork can inherit a held lock,
# the listening socket and every open association (a peer would not see its connection close, and after
# `kill -9` an orphan would keep the port), and the node's signal handlers.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["scp.compress"])

WORKER_NICENESS = 10
"""Encoding yields the CPU to receiving: a modality waiting for its C-STORE response comes first."""


def skip_value_validation() -> None:
    """Turn off pydicom's per-value VR checks (regex and length) in this process.

    pydicom checks every value it reads or builds and only warns (the default mode): the node forwards values as
    received, and its own values are tested (dciodvfy). The checks cost ~9% of the service process's CPU
    (profiled while receiving and forwarding) and fill the log with warnings about the modality's data.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE


HEAP_KEPT = 16 << 20
"""Buffers up to this size come from the heap, and this much freed heap is kept for the next frame."""

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed frame-sized buffers for the next frame (elsewhere: nothing changes).

    By default glibc maps each buffer over 128 KiB (a 512x512 slice is 512 KiB) or grows the heap for it, and
    gives it back to the kernel when it is freed: every page of every frame, encoded and decoded again, faults
    in and is zeroed anew. In an encoder process that was 18% of its time (page faults and brk, measured with
    perf while the node encoded JPEG-LS); keeping them saves ~20% per instance. At most HEAP_KEPT of free heap
    stays with the process; larger buffers are still mapped and unmapped.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_KEPT)
    mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT)


def _start_worker(initializer: Callable[[], None] | None) -> None:
    """Pool initializer: lower priority, ignore SIGTERM (sent to every process of the node by `systemctl stop`:
    the node lets the instance in hand finish, then stops its workers itself), end with the node (after
    `kill -9` of the node nothing else does)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Niceness WORKER_NICENESS whatever the process inherited (the node's background threads run at 5).
    os.nice(max(0, WORKER_NICENESS - os.getpriority(os.PRIO_PROCESS, 0)))
    skip_value_validation()
    keep_freed_memory()
    node = multiprocessing.parent_process()
    if node is not None:

        def watch() -> None:
            node.join()  # returns when the node's end of a pipe closes, however the node ended
            os._exit(1)

        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    if initializer is not None:
        initializer()


class Encoder:
    """Runs compress.transcode_file in worker processes and survives a worker that dies.

    `initializer` runs once in every worker process (e.g. to set up logging or register a codec).
    """

    def __init__(self, processes: int, initializer: Callable[[], None] | None = None) -> None:
        self.processes = processes
        self.initializer = initializer
        self.crashes = 0
        """Instances whose encoding crashed a worker process even when run alone."""
        self._lock = threading.Lock()
        self._pool = self._new_pool(processes)

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            processes, mp_context=_CONTEXT, initializer=_start_worker, initargs=(self.initializer,)
        )

    def transcode(self, src: Path, dst: Path, spec: CompressSpec) -> compress.Result:
        """Transcode in the shared pool; never raises, even when the codec kills its process."""
        with self._lock:
            pool = self._pool
        try:
            return pool.submit(compress.transcode_file, src, dst, spec).result()
        except BrokenProcessPool:
            self._replace_broken(pool)
        return self._transcode_alone(src, dst, spec)

    def _transcode_alone(self, src: Path, dst: Path, spec: CompressSpec) -> compress.Result:
        """Retry in a process of its own, so a crash there can only be this instance's."""
        alone = self._new_pool(1)
        try:
            return alone.submit(compress.transcode_file, src, dst, spec).result()
        except BrokenProcessPool:
            with self._lock:
                self.crashes += 1
            LOGGER.error("the encoder process crashed on %s; forwarding the original", src.name)
            dst.unlink(missing_ok=True)  # what the dead process wrote of it (its frames were in an unnamed file)
            size = src.stat().st_size
            return compress.Result(False, "the encoder process crashed on this image", "", size, size, 0.0)
        finally:
            alone.shutdown(wait=True)

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                LOGGER.error("an encoder process died; starting a new pool and retrying its instances alone")
                self._pool = self._new_pool(self.processes)
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
