"""Turn measured results into docs/benchmarks.md, docs/benchmarks.png and docs/benchmarks.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from benchmarks.codecs import CodecResult, DecodeResult, fastest_exact
from benchmarks.memory import MIB, MemoryResult
from benchmarks.stats import Ceiling, ratio, shown_down
from benchmarks.throughput import Scenario

JLS = "1.2.840.10008.1.2.4.80"
HTJ2K = "1.2.840.10008.1.2.4.201"
J2K = "1.2.840.10008.1.2.4.90"
MEMORY_LIMIT = 400 * MIB


@dataclass(frozen=True)
class Target:
    """One target of the issue, checked against the measured figures."""

    name: str
    measured: str
    required: str
    met: bool | None  # None: could not be measured in this run


@dataclass
class Results:
    """Everything one `python -m benchmarks all` run measured."""

    command: str
    data: str
    cores: int
    scenarios: list[Scenario]
    codecs: list[CodecResult]
    decoders: list[DecodeResult]
    memory: MemoryResult | None
    environment: dict[str, str]

    def scenario(self, name: str) -> Scenario | None:
        return next((s for s in self.scenarios if s.name == name and s.runs), None)

    def ceiling(self) -> Ceiling | None:
        keep, best = self.scenario("keep"), fastest_exact(self.codecs, "JPEGLSLossless")
        if keep is None or best is None:
            return None
        return Ceiling(best.all_cores_mb_s, keep.receiver_cpu_per_mb, keep.peers_cpu_per_mb, self.cores)

    def targets(self) -> list[Target]:
        jls, route, passthrough = self.scenario("jpegls"), self.scenario("dcmtk-route"), self.scenario("passthrough")
        htj2k, j2k, ceiling = self.scenario("htj2k"), self.scenario("j2k"), self.ceiling()
        targets = []
        if jls is not None and ceiling is not None:
            share = ratio(jls.end_to_end_mb_s, ceiling.whole_machine)
            targets.append(
                Target(
                    "JPEG-LS end-to-end vs the work-limited ceiling",
                    f"{jls.end_to_end_mb_s:.1f} / {ceiling.whole_machine:.1f} MB/s = {shown_down(100 * share, 0)}%",
                    ">= 70%",
                    share >= 0.7 and jls.all_in_target,
                )
            )
        if jls is not None and route is not None:
            times = ratio(jls.end_to_end_mb_s, route.end_to_end_mb_s)
            targets.append(
                Target(
                    "JPEG-LS end-to-end vs the DCMTK compressing route",
                    f"{jls.end_to_end_mb_s:.1f} / {route.end_to_end_mb_s:.1f} MB/s = {shown_down(times, 2)}x",
                    ">= 3x",
                    times >= 3 and jls.all_in_target,
                )
            )
        if jls is not None and passthrough is not None:
            share = ratio(jls.modality_mb_s, passthrough.modality_mb_s)
            targets.append(
                Target(
                    "JPEG-LS modality-side vs the pass-through receiver",
                    f"{jls.modality_mb_s:.1f} / {passthrough.modality_mb_s:.1f} MB/s = {shown_down(100 * share, 0)}%",
                    ">= 80%",
                    share >= 0.8,
                )
            )
        if htj2k is not None and j2k is not None:
            times = ratio(htj2k.end_to_end_mb_s, j2k.end_to_end_mb_s)
            measured = f"{htj2k.end_to_end_mb_s:.1f} / {j2k.end_to_end_mb_s:.1f} MB/s = {shown_down(times, 2)}x"
            both = htj2k.all_in_target and j2k.all_in_target
            if not both:
                measured += " (not all instances arrived in the target syntax: the node passed some through)"
            targets.append(Target("HTJ2K vs JPEG 2000 lossless end-to-end", measured, ">= 3x", times >= 3 and both))
        if self.memory is not None:
            memory = self.memory
            compressed = memory.arrived_syntax == memory.syntax
            measured = f"{memory.peak_rss / MIB:.0f} MiB summed RSS ({memory.peak_pss / MIB:.0f} MiB PSS)"
            if not compressed:
                measured += f"; arrived as {UID(memory.arrived_syntax).name}, not compressed"
            targets.append(
                Target(
                    f"peak RSS of the node for a {memory.size_bytes / 2**30:.2f} GiB multi-frame instance",
                    measured,
                    "< 400 MiB",
                    memory.peak_rss < MEMORY_LIMIT and compressed,
                )
            )
        return targets


def environment() -> dict[str, str]:
    """What the figures were measured on."""
    import imagecodecs
    import pydicom
    import pynetdicom

    dcmtk = subprocess.run(["/usr/bin/storescu", "--version"], capture_output=True, text=True, check=False)
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "load average at start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "imagecodecs": imagecodecs.__version__,
        "dcmtk": (dcmtk.stdout.split("\n", 1)[0].strip("$ ") or "not found"),
    }


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if value else "-"


def scenario_table(scenarios: Sequence[Scenario]) -> str:
    rows = [
        "| scenario | instances | modality inst/s | modality MB/s | end-to-end inst/s | end-to-end MB/s | ratio "
        "| receiver CPU s/MB | peak RSS MiB | in target syntax |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scenarios:
        if not s.runs:
            rows.append(f"| {s.label} | not run: {s.note} | | | | | | | | |")
            continue
        target = "-" if s.syntax is None else ("all" if s.all_in_target else "**no**")
        rows.append(
            f"| {s.label} | {s.instances} | {_fmt(s.modality_instances_s)} | {_fmt(s.modality_mb_s)} "
            f"| {_fmt(s.end_to_end_instances_s)} | {_fmt(s.end_to_end_mb_s)} | {_fmt(s.compression_ratio, 2)} "
            f"| {_fmt(s.receiver_cpu_per_mb, 4)} | {_fmt(s.peak_rss / MIB, 0)} | {target} |"
        )
    return "\n".join(rows)


def codec_table(results: Sequence[CodecResult]) -> str:
    rows = [
        "| syntax | binding | 1 core MB/s | all cores MB/s | ratio | pixel-exact | same codestream as pydicom's "
        "| declared bits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.available:
            rows.append(f"| {r.syntax} | {r.binding} | unavailable: {r.detail} | | | | | |")
            continue
        identical = "reference" if r.reference else {None: "-", True: "yes", False: "no"}[r.identical]
        rows.append(
            f"| {r.syntax} | {r.binding} | {r.one_core_mb_s:.1f} | {r.all_cores_mb_s:.1f} | {r.ratio:.2f} "
            f"| {'yes' if r.exact else '**no**'} | {identical} | {r.precision or '-'} |"
        )
    return "\n".join(rows)


def decoder_table(results: Sequence[DecodeResult]) -> str:
    rows = ["| syntax | decoder | 1 core MB/s | pixel-exact |", "|---|---|---|---|"]
    rows += [
        f"| {r.syntax} | {r.decoder} | {r.one_core_mb_s:.1f} | {'yes' if r.exact else '**no**'} |" for r in results
    ]
    return "\n".join(rows)


def chart(results: Results, path: Path) -> None:
    """Two panels: the scenarios' throughput (with the ceiling) and every codec binding's encode rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 9))
    labels, modality, end_to_end = [], [], []
    for s in results.scenarios:
        if s.runs:
            label = _wrapped(s.label)
            labels.append(label if s.syntax is None or s.all_in_target else f"{label}\n(NOT compressed)")
            modality.append(s.modality_mb_s)
            end_to_end.append(s.end_to_end_mb_s)
    positions = range(len(labels))
    top.barh([p + 0.2 for p in positions], modality, height=0.4, label="modality-side (until last Success)")
    top.barh([p - 0.2 for p in positions], end_to_end, height=0.4, label="end-to-end (until the archive has all)")
    ceiling = results.ceiling()
    if ceiling is not None:
        top.axvline(ceiling.whole_machine, color="k", linestyle="--", label="JPEG-LS work-limited ceiling")
    top.set_yticks(list(positions), labels, fontsize=8)
    top.invert_yaxis()
    top.set_xlabel("MB/s (10^6 bytes of files sent)")
    top.set_title(f"Loopback throughput on {results.cores} cores, medians of several runs")
    top.legend(fontsize=8, loc="lower right")
    available = [r for r in results.codecs if r.available]
    names = [f"{r.syntax}\n{r.binding}" for r in available]
    spots = range(len(available))
    bottom.barh([p + 0.2 for p in spots], [r.one_core_mb_s for r in available], height=0.4, label="1 core")
    bottom.barh(
        [p - 0.2 for p in spots],
        [r.all_cores_mb_s for r in available],
        height=0.4,
        label=f"{results.cores} processes",
    )
    bottom.set_yticks(list(spots), names, fontsize=7)
    bottom.invert_yaxis()
    bottom.set_xscale("log")
    bottom.set_xlabel("encode MB/s of pixel data (log scale)")
    bottom.set_title("Raw codecs on the same frames")
    bottom.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrapped(label: str) -> str:
    """A long scenario label on two lines, broken after its first comma, else after its first colon."""
    if len(label) <= 28:
        return label
    return label.replace(", ", ",\n", 1) if ", " in label else label.replace(": ", ":\n", 1)


def to_json(results: Results) -> dict[str, Any]:
    """The raw figures, every run, for anyone who wants to recompute."""
    ceiling = results.ceiling()
    return {
        "command": results.command,
        "data": results.data,
        "cores": results.cores,
        "environment": results.environment,
        "scenarios": [
            {"name": s.name, "label": s.label, "syntax": s.syntax, "note": s.note, "runs": [asdict(r) for r in s.runs]}
            for s in results.scenarios
        ],
        "codecs": [asdict(r) for r in results.codecs],
        "decoders": [asdict(r) for r in results.decoders],
        "memory": asdict(results.memory) if results.memory else None,
        "ceiling": None
        if ceiling is None
        else {**asdict(ceiling), "node_only": ceiling.node_only, "whole_machine": ceiling.whole_machine},
        "targets": [asdict(t) for t in results.targets()],
    }


def write(results: Results, docs: Path) -> Path:
    """Write docs/benchmarks.{md,png,json}; return the Markdown path."""
    docs.mkdir(parents=True, exist_ok=True)
    chart(results, docs / "benchmarks.png")
    (docs / "benchmarks.json").write_text(json.dumps(to_json(results), indent=2) + "\n")
    path = docs / "benchmarks.md"
    path.write_text(markdown(results))
    return path


def markdown(results: Results) -> str:
    ceiling = results.ceiling()
    best = {s: fastest_exact(results.codecs, s) for s in ("JPEGLSLossless", "HTJ2KLossless", "JPEG2000Lossless")}
    best_lines = "\n".join(
        f"- {syntax}: **{b.binding}** ({b.all_cores_mb_s:.0f} MB/s on {b.cores} processes, ratio {b.ratio:.2f})"
        if b
        else f"- {syntax}: no pixel-exact binding available"
        for syntax, b in best.items()
    )
    best_rle = fastest_exact(results.codecs, "RLELossless")
    if best_rle:
        best_lines += f"\n- RLELossless: **{best_rle.binding}** ({best_rle.all_cores_mb_s:.0f} MB/s)"
    env = "\n".join(f"| {k} | {v} |" for k, v in results.environment.items())
    verdicts = {True: "met", False: "**not met**", None: "not measured"}
    targets = "\n".join(f"| {t.name} | {t.measured} | {t.required} | {verdicts[t.met]} |" for t in results.targets())
    if ceiling is not None:
        ceiling_text = CEILING.format(
            codec=ceiling.codec_mb_s,
            node=ceiling.node_cpu_per_mb,
            peers=ceiling.peers_cpu_per_mb,
            cores=ceiling.cores,
            node_only=ceiling.node_only,
            whole=ceiling.whole_machine,
        )
        ceiling_text += _unverified_text(results, ceiling)
    else:
        ceiling_text = "Not computed in this run (it needs the forward-only scenario and the codec figures)."
    memory = results.memory
    memory_text = (
        "Not run."
        if memory is None
        else (
            f"A generated {memory.size_bytes / 2**30:.2f} GiB instance ({memory.frames} frames of 512x512x16 bits) "
            f"sent as {UID(memory.syntax).name}: modality done in {memory.seconds_modality:.1f} s, at the archive "
            f"after {memory.seconds_end_to_end:.1f} s, arrived as {UID(memory.arrived_syntax).name} "
            f"({memory.arrived_bytes / 2**20:.0f} MiB). Node idle: {memory.idle_rss / MIB:.0f} MiB summed RSS; "
            f"peak: **{memory.peak_rss / MIB:.0f} MiB summed RSS**, {memory.peak_pss / MIB:.0f} MiB summed PSS."
        )
    )
    return TEMPLATE.format(
        command=results.command,
        data=results.data,
        cores=results.cores,
        load=" / ".join(
            results.environment.get(k, "?").split(" ")[0] for k in ("load average at start", "load average at end")
        ),
        env=env,
        targets=targets,
        scenarios=scenario_table(results.scenarios),
        codecs=codec_table(results.codecs),
        decoders=decoder_table(results.decoders),
        best=best_lines,
        ceiling=ceiling_text,
        memory=memory_text,
    )


def _unverified_text(results: Results, ceiling: Ceiling) -> str:
    """What the lossless verification costs against the ceiling, from the scenario without it (if run)."""
    verified, unverified = results.scenario("jpegls"), results.scenario("jpegls-unverified")
    if verified is None or unverified is None:
        return ""
    return UNVERIFIED.format(
        verified=verified.end_to_end_mb_s,
        verified_share=shown_down(100 * ratio(verified.end_to_end_mb_s, ceiling.whole_machine), 0),
        verified_cpu=verified.receiver_cpu_per_mb,
        unverified=unverified.end_to_end_mb_s,
        unverified_share=shown_down(100 * ratio(unverified.end_to_end_mb_s, ceiling.whole_machine), 0),
        unverified_cpu=unverified.receiver_cpu_per_mb,
    )


UNVERIFIED = """
The ceiling counts the codec's encode only; the node also decodes every lossless output to compare it with the
source (`verify: true`, its default). The same run without that (`verify: false`, the scenario
*node -> JPEGLSLossless, verify: false*): {unverified:.1f} MB/s end to end = {unverified_share}% of the ceiling, the
node's CPU {unverified_cpu:.4f} s/MB, against {verified:.1f} MB/s = {verified_share}% and {verified_cpu:.4f} s/MB
verified. The target is judged on the verified node.
"""

CEILING = """\
ceiling = 1 / (1 / R + C / cores), where

- R = {codec:.1f} MB/s: the fastest pixel-exact JPEG-LS binding encoding the pixels of the set's distinct images
  (see the codecs below) with one process per core, the frames handed out in tasks balanced by size (the
  parallel efficiency of the machine is in this figure);
- C = CPU-seconds per MB of everything else that must run per MB: the node's receive + forward measured in the
  forward-only scenario (all the node's processes and the children they waited for, from /proc utime + stime +
  cutime + cstime) = {node:.4f} s/MB, plus the DCMTK modality and archive on the same cores (the archive's
  `--fork` children included) = {peers:.4f} s/MB;
- cores = {cores}.

Whole-machine ceiling (used for the target): **{whole:.1f} MB/s**. Counting only the node's own work
(the peers on other machines): {node_only:.1f} MB/s.
"""

TEMPLATE = """\
# Benchmarks

Produced by:

```sh
{command}
```

Data: {data}. Everything runs on loopback; the raw figures of every run are in `benchmarks.json` beside this
file. The runs go in rounds: each round starts every scenario afresh and times one send of the whole set, scenario
after scenario, so that the drift of this shared machine's speed weighs on every scenario alike. Load
average at the start and end of the run: {load} on {cores} cores. The load average counts the benchmark's own
processes (the node, its encoders and the peers, five or more running at a time), so the figure at the end is
mostly the benchmark itself; a load at the start means other work was running. The machine's other tenants do
not show in it: the same scenario's CPU per MB is what tells a slow run (see the forward-only scenario's).

![throughput and codec rates](benchmarks.png)

## Targets

| target | measured | required | verdict |
|---|---|---|---|
{targets}

## Loopback throughput (medians)

{scenarios}

- **modality-side**: from starting DCMTK `storescu` until it exits, every C-STORE answered Success (one
  association, as a scanner sends a series).
- **end-to-end**: from the same start until the archive (DCMTK `storescp`) folder holds every instance.
- **ratio**: bytes sent / bytes the archive holds. **in target syntax**: whether every archived instance is in
  the transfer syntax the scenario asked for (a node that passes instances through would show ratio 1.0 here).
- **receiver CPU s/MB**: user + system CPU of the receiver's process tree (for the node: the service, its
  receiving process and its encoder processes; for the DCMTK route: its storescp and the dcmcjpls and storescu
  it runs per instance), ended children included, per MB sent.
- **peak RSS**: summed over the receiver's processes, sampled every 50 ms.

Scenarios: *pass-through pynetdicom receiver* (baseline 1: a minimal pynetdicom SCP that streams each dataset to
a file and answers Success; `benchmarks/passthrough.py`), *pass-through receiver + fsync* (the same, fsyncing
the file and its folder before Success: what durability alone costs on this disk; the node fsyncs the instance,
its sidecar and the folder), *node, forward only* (the node with `compress: keep`:
receive + spool + forward, used for the ceiling), *node → X* (the node re-encoding everything as X, two encoder
processes, forwarding to storescp `--fork`, which serves each association in a process of its own, as an archive
does; HTJ2K and JPEG 2000 forward to `benchmarks/passthrough.py --all-syntaxes`
instead, as DCMTK 3.6.7's storescp cannot store HTJ2K and the node would fall back to the original),
*node → JPEGLSLossless, verify: false* (the same without the lossless verification decode, not the node's default:
what verifying costs), *DCMTK route* (baseline 3: `storescp --exec-on-reception "dcmcjpls #p/#f
OUT/#f && storescu ... OUT/#f"` forwarding to a second storescp, which also runs with `--fork`: one process pair
and one association per instance).

DCMTK as packaged by Debian leaves Nagle's algorithm on unless `TCP_NODELAY=1` is in its environment; each small
PDU then waits for the peer's delayed ACK (~40 ms per instance). The benchmark runs every DCMTK program with
`TCP_NODELAY=1` (the DCMTK route needs it: its storescu cannot help it); `--dcmtk-nagle` runs them as packaged.
The node copes with such peers either way: it turns off Nagle and re-arms TCP_QUICKACK before every read on
each of its sockets (forwarding to a Nagle storescp, 100 slices: 11 MB/s without, 44 MB/s with).

## The work-limited ceiling

{ceiling}

## Codecs on the same pixels

Every binding encodes the same frames: those of the distinct images of the set sent, in sending order, up to
`--codec-mb` MB (32 by default; with a corpus, which the set cycles through, each image once, so that large and
small images weigh as in the set), each frame declaring its own Bits Stored as the node does. MB is 10^6 bytes of
uncompressed pixel data. "all cores" is one process per core (baseline 2: the raw codec with all cores). Each
output is decoded by pydicom's decoders and compared with the source ("pixel-exact"); "same codestream" compares
the bytes with pydicom's own encoder; "declared bits" is the sample precision written in the first frame's
codestream (JPEG-LS P, JPEG 2000 Ssiz + 1), to compare with its Bits Stored: imagecodecs' `jpegls_encode` and
`htj2k_encode` take no bit depth and declare the container's 16 bits for 12-bit data (still pixel-exact; JPEG-LS
ratio about 1% lower, and a codestream that differs from pydicom's).

{codecs}

Fastest pixel-exact binding per syntax:

{best}

Decoders, on one core: what verifying a lossless result by decoding it costs (the node decodes every encoded
instance and compares it with the source before forwarding it).

{decoders}

## Memory

{memory}

Summed RSS counts pages that the forked encoder processes share with the service once per process (an upper
bound); PSS shares them out.

## How to run

```sh
pip install -e ".[bench]"                      # matplotlib for the chart; DCMTK from Debian's dcmtk package
python -m benchmarks all                       # everything below, writes docs/benchmarks.md/.png/.json
python -m benchmarks throughput --syntax JPEGLSLossless --runs 3 --count 150
python -m benchmarks throughput --corpus /path/to/dicom --modality CT MR
python -m benchmarks codecs --codec-mb 32
python -m benchmarks memory --size-gib 1
```

Without `--corpus` the data are generated CT-like slices (512x512, 12 bits stored, a body with organs, texture
and a few HU of noise; deterministic): random noise would not compress and would say nothing about a router.
With `--corpus DIR` the uncompressed images found in DIR are cycled to the requested count, each copy with a new
SOP Instance UID, in a temporary folder.

## Environment

| | |
|---|---|
{env}
"""
