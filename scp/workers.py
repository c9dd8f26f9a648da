"""The encoder processes: pixel work runs here, where a crashing native codec cannot take the node down."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from scp import compress
from scp.config import CompressSpec

LOGGER = logging.getLogger(__name__)


class Encoder:
    """Runs compress.transcode_file in worker processes and survives a worker that dies."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = ProcessPoolExecutor(processes)

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
                self._pool = ProcessPoolExecutor(self.processes)
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
