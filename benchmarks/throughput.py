"""Throughput scenarios on loopback: DCMTK storescu (the modality) → receiver → DCMTK storescp (the archive).

Each scenario starts its processes, sends a small warm-up batch, times `runs` sends of the whole set and stops
them (`python -m benchmarks` runs every scenario once per round, see cli.py): modality-side time is until storescu
exits (every Success received), end-to-end time until the archive folder holds every instance. MB is 10^6 bytes
of the files sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from benchmarks import procs
from benchmarks.stats import median, ratio

NODE_AE = "BENCH_NODE"
ARCHIVE_AE = "ARCHIVE"
MAX_PDU = 262_144
ARCHIVE_FORK = ("--fork",)
"""The node's archive serves each association in a process of its own, as an archive does: the node forwards over
several associations at once (`associations`, default 2) and keeps each open between batches. A storescp serving
one association at a time would leave the second waiting for the first to end (the node's docs say to set
`associations: 1` for such an archive)."""
WARMUP = 4


@dataclass(frozen=True)
class Run:
    """One timed send of the whole set."""

    instances: int
    megabytes: float
    modality_s: float
    end_to_end_s: float | None
    successes: int
    receiver_cpu_s: float
    peers_cpu_s: float
    peak_rss: int
    archived_bytes: int
    in_target_syntax: int


@dataclass
class Scenario:
    """The runs of one scenario and their medians."""

    name: str
    label: str
    syntax: str | None
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def _median(self, attribute: str) -> float:
        return median(getattr(r, attribute) for r in self.runs)

    @property
    def megabytes(self) -> float:
        return self._median("megabytes")

    @property
    def instances(self) -> int:
        return int(self._median("instances"))

    @property
    def modality_mb_s(self) -> float:
        return median(ratio(r.megabytes, r.modality_s) for r in self.runs)

    @property
    def modality_instances_s(self) -> float:
        return median(ratio(r.instances, r.modality_s) for r in self.runs)

    @property
    def end_to_end_mb_s(self) -> float:
        return median(ratio(r.megabytes, r.end_to_end_s or 0.0) for r in self.runs)

    @property
    def end_to_end_instances_s(self) -> float:
        return median(ratio(r.instances, r.end_to_end_s or 0.0) for r in self.runs)

    @property
    def compression_ratio(self) -> float:
        return median(ratio(r.megabytes * 1e6, r.archived_bytes) for r in self.runs if r.archived_bytes)

    @property
    def receiver_cpu_per_mb(self) -> float:
        return median(ratio(r.receiver_cpu_s, r.megabytes) for r in self.runs)

    @property
    def peers_cpu_per_mb(self) -> float:
        return median(ratio(r.peers_cpu_s, r.megabytes) for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max((r.peak_rss for r in self.runs), default=0)

    @property
    def all_in_target(self) -> bool:
        return bool(self.runs) and all(r.in_target_syntax == r.instances for r in self.runs)


def _clear(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name.startswith("."):  # a pynetdicom archive's folder for partial receives
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _count(folder: Path) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.is_file() and not e.name.startswith("."))


def _archived(folder: Path, syntax: str | None) -> tuple[int, int]:
    """(total bytes, instances in `syntax`) of what the archive holds."""
    total = in_target = 0
    for path in folder.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        total += path.stat().st_size
        if syntax is not None:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["TransferSyntaxUID"])
            in_target += str(header.file_meta.TransferSyntaxUID) == syntax
    return total, in_target


def _timed_send(
    files: Sequence[Path],
    port: int,
    called: str,
    archive: Path | None,
    receiver: int,
    peers: Sequence[int],
    workdir: Path,
    timeout: float,
) -> tuple[procs.Sent, float | None, procs.TreeMonitor, float]:
    """Send `files`; wait for the archive (if any) to hold them all; returns storescu's result, end-to-end
    seconds, the receiver's monitor and the peers' CPU seconds."""
    peers_before = sum(map(procs.cpu_seconds, peers))
    with procs.TreeMonitor(receiver) as monitor:
        start = time.perf_counter()
        sent = procs.storescu(port, files, called, workdir / "storescu.log", timeout)
        end_to_end = None
        if archive is not None:
            procs.wait_for(lambda: _count(archive) >= len(files), timeout, f"{len(files)} instances in {archive}")
            end_to_end = time.perf_counter() - start
    peers_cpu = sum(map(procs.cpu_seconds, peers)) - peers_before + sent.cpu_seconds
    return sent, end_to_end, monitor, peers_cpu


def _measure(
    scenario: Scenario,
    files: Sequence[Path],
    runs: int,
    port: int,
    called: str,
    archive: Path | None,
    receiver: int,
    peers: Sequence[int],
    workdir: Path,
    timeout: float,
) -> Scenario:
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    for number in range(runs + 1):
        batch = files[:WARMUP] if number == 0 else files
        if archive is not None:
            _clear(archive)
        sent, end_to_end, monitor, peers_cpu = _timed_send(
            batch, port, called, archive, receiver, peers, workdir, timeout
        )
        if sent.successes != len(batch):
            raise RuntimeError(
                f"{scenario.name}: storescu got {sent.successes} Success responses for {len(batch)} instances "
                f"(exit code {sent.exit_code}); see {workdir / 'storescu.log'}"
            )
        if number == 0:
            continue
        archived_bytes, in_target = _archived(archive, scenario.syntax) if archive is not None else (0, 0)
        scenario.runs.append(
            Run(
                instances=len(files),
                megabytes=megabytes,
                modality_s=sent.seconds,
                end_to_end_s=end_to_end,
                successes=sent.successes,
                receiver_cpu_s=monitor.cpu_seconds,
                peers_cpu_s=peers_cpu,
                peak_rss=monitor.peak_rss,
                archived_bytes=archived_bytes,
                in_target_syntax=in_target,
            )
        )
    return scenario


def node_config(
    workdir: Path, port: int, archive_port: int, syntax: str | None, processes: int, verify: bool = True
) -> dict[str, Any]:
    """The node's configuration: everything is re-encoded to `syntax` (None: kept) and sent to the archive;
    `verify=False` turns off the lossless verification (`verify: false`)."""
    compress: str | dict[str, Any] = syntax or "keep"
    if syntax and not verify:
        compress = {"syntax": syntax, "verify": False}
    return {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": port, "max_pdu_size": MAX_PDU},
        "spool": {"path": str(workdir / "spool")},
        "workers": {"processes": processes},
        "destinations": {
            "archive": {"type": "dicom", "ae_title": ARCHIVE_AE, "host": "127.0.0.1", "port": archive_port}
        },
        "rules": [{"name": "benchmark", "compress": compress, "forward": ["archive"]}],
        "logging": {"level": "INFO"},
    }


def run_node(
    name: str,
    label: str,
    files: Sequence[Path],
    syntax: str | None,
    workdir: Path,
    runs: int,
    processes: int,
    pynetdicom_archive: bool = False,
    verify: bool = True,
) -> Scenario:
    """The node between storescu and storescp, re-encoding to `syntax` (None: forward-only).

    `pynetdicom_archive`: the archive is benchmarks/passthrough.py accepting every syntax instead of storescp
    (DCMTK 3.6.7's storescp cannot store HTJ2K: the node would fall back to sending the original).
    `verify`: the node's lossless verification (its default, on).
    """
    folder = workdir / name
    archive = folder / "archive"
    archive_port, port = procs.free_port(), procs.free_port()
    scenario = Scenario(name, label, syntax)
    archive_server = (
        procs.passthrough(folder, archive_port, ARCHIVE_AE, MAX_PDU, archive=archive)
        if pynetdicom_archive
        else procs.storescp(archive, archive_port, ARCHIVE_AE, ARCHIVE_FORK)
    )
    with (
        archive_server as archive_pid,
        procs.node(folder, node_config(folder, port, archive_port, syntax, processes, verify)) as node_pid,
    ):
        timeout = 60 + 2 * len(files)
        return _measure(scenario, files, runs, port, NODE_AE, archive, node_pid, [archive_pid], folder, timeout)


def run_passthrough(files: Sequence[Path], workdir: Path, runs: int, durable: bool = False) -> Scenario:
    """Baseline 1: the pass-through pynetdicom receiver (modality-side throughput only); `durable` adds the
    fsyncs of file and folder that any receiver answering Success only for kept data must do."""
    name = "passthrough-durable" if durable else "passthrough"
    folder = workdir / name
    port = procs.free_port()
    label = "pass-through receiver + fsync" if durable else "pass-through pynetdicom receiver"
    scenario = Scenario(name, label, None)
    with procs.passthrough(folder, port, "PASSTHROUGH", MAX_PDU, durable) as pid:
        return _measure(scenario, files, runs, port, "PASSTHROUGH", None, pid, [], folder, 60 + 2 * len(files))


@contextlib.contextmanager
def _dcmtk_router(folder: Path, port: int, final_port: int) -> Iterator[int]:
    """storescp that runs dcmcjpls then storescu on each received file (DCMTK's own compressing route)."""
    inbound, outbound = folder / "inbound", folder / "outbound"
    outbound.mkdir(parents=True, exist_ok=True)
    command = (
        f"{procs.tool('dcmcjpls')} #p/#f {outbound}/#f && "
        f"{procs.tool('storescu')} -xt -aec FINAL -pdu 131072 127.0.0.1 {final_port} {outbound}/#f"
    )
    with procs.storescp(inbound, port, "ROUTER", ["--exec-on-reception", command]) as pid:
        yield pid


def run_dcmtk_route(files: Sequence[Path], workdir: Path, runs: int) -> Scenario:
    """Baseline 3: storescp --exec-on-reception "dcmcjpls && storescu" forwarding to a second storescp.

    The second storescp serves each association in a process of its own (`--fork`), as the node's archive does:
    storescp runs the command of each instance without waiting for it, so their associations overlap, and a
    storescp serving them one at a time refused some once a few hundred were waiting (instances lost on the way,
    the run never complete)."""
    folder = workdir / "dcmtk-route"
    final = folder / "final"
    final_port, port = procs.free_port(), procs.free_port()
    scenario = Scenario(
        "dcmtk-route",
        "DCMTK route: storescp -xcr dcmcjpls + storescu",
        "1.2.840.10008.1.2.4.80",
        note="one dcmcjpls and one storescu process (and association) per instance",
    )
    with (
        procs.storescp(final, final_port, "FINAL", ARCHIVE_FORK) as final_pid,
        _dcmtk_router(folder, port, final_port) as router_pid,
    ):
        for sub in ("inbound", "outbound"):
            (folder / sub).mkdir(exist_ok=True)
        timeout = 60 + 2 * len(files)
        return _measure(scenario, files, runs, port, "ROUTER", final, router_pid, [final_pid], folder, timeout)
