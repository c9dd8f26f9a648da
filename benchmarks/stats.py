"""The arithmetic of the report: medians and the work-limited ceiling. Pure functions, tested alone."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass


def median(values: Iterable[float]) -> float:
    """The median, or 0.0 for no values (a scenario that never ran)."""
    data = list(values)
    return float(statistics.median(data)) if data else 0.0


@dataclass(frozen=True)
class Ceiling:
    """The best end-to-end rate the machine's CPUs allow, given all the work there is per MB.

    On `cores` cores, each MB needs `1 / codec_mb_s` machine-seconds of encoding (the raw codec's rate with one
    process per core, measured, so its parallel efficiency is included) plus `cpu_per_mb / cores`
    machine-seconds for everything else that must run (CPU-seconds per MB, measured: the node's receive and
    forward in a run that does not compress, and - for the whole-machine figure - the DCMTK modality and archive
    running on the same cores). Ceiling = 1 / (1 / codec_mb_s + cpu_per_mb / cores).
    """

    codec_mb_s: float
    node_cpu_per_mb: float
    peers_cpu_per_mb: float
    cores: int

    @property
    def node_only(self) -> float:
        """Ceiling counting only the node's own receive + forward work (the peers run elsewhere)."""
        return ceiling(self.codec_mb_s, self.node_cpu_per_mb, self.cores)

    @property
    def whole_machine(self) -> float:
        """Ceiling when the modality and the archive share the node's cores, as in this benchmark."""
        return ceiling(self.codec_mb_s, self.node_cpu_per_mb + self.peers_cpu_per_mb, self.cores)


def ceiling(codec_mb_s: float, cpu_per_mb: float, cores: int) -> float:
    """MB/s reachable when each MB costs `1/codec_mb_s` machine-seconds plus `cpu_per_mb` CPU-seconds."""
    if codec_mb_s <= 0 or cores <= 0:
        return 0.0
    return 1.0 / (1.0 / codec_mb_s + max(cpu_per_mb, 0.0) / cores)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0.0 when the denominator is missing."""
    return numerator / denominator if denominator > 0 else 0.0


def shown_down(value: float, places: int) -> str:
    """`value` with `places` decimals, rounded down: a figure just under a target never reads as reaching it
    (2.998 shows as 2.99, not 3.00)."""
    return f"{math.floor(value * 10**places) / 10**places:.{places}f}"
