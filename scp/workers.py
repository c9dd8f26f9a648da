"""The encoder processes: pixel work runs here, where a crashing native codec cannot take the node down."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from scp import compress
from scp.config import CompressSpec

LOGGER = logging.getLogger(__name__)

# Workers come from a fork server, not from a fork of the node: a fork would inherit the listening socket and
# every open association (a peer would not see its connection close, and after `kill -9` an orphan would keep
# the port), and the node's signal handlers.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["scp.compress"])


def _exit_with_parent() -> None:
    """Pool initializer: end this worker when the node goes (after `kill -9` of the node nothing else does)."""
    node = multiprocessing.parent_process()
    if node is None:
        return

    def watch() -> None:
        node.join()  # returns when the node's end of a pipe closes, however the node ended
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _new_pool(processes: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(processes, mp_context=_CONTEXT, initializer=_exit_with_parent)


class Encoder:
    """Runs compress.transcode_file in worker processes and survives a worker that dies."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = _new_pool(processes)

    def transcode(self, src: Path, dst: Path, spec: CompressSpec) -> compress.Result:
        with self._lock:
            pool = self._pool
        try:
            return pool.submit(compress.transcode_file, src, dst, spec).result()
        except BrokenProcessPool:
            self._replace_broken(pool)
            size = src.stat().st_size
            return compress.Result(False, "the encoder process crashed on this image", "", size, size, 0.0)

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                LOGGER.error("an encoder process died; starting a new pool")
                self._pool = _new_pool(self.processes)
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
