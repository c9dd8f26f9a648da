"""python -m benchmarks COMMAND: throughput, codecs, memory, or all (which writes docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom

from benchmarks import codecs, data, memory, procs, report, throughput
from benchmarks.report import Results
from benchmarks.throughput import Scenario

UNVERIFIED = ":unverified"
"""Suffix of a syntax keyword (`--syntax JPEGLSLossless:unverified`): the node with `verify: false`."""
CODEC_MB = 32.0
"""Pixel data the codecs encode: 61 generated slices, or every image of the CT/MR corpus (24.7 MB) once."""
SCENARIO_NAMES = {
    "JPEGLSLossless": "jpegls",
    "JPEGLSLossless" + UNVERIFIED: "jpegls-unverified",
    "HTJ2KLossless": "htj2k",
    "JPEG2000Lossless": "j2k",
}
PYNETDICOM_ARCHIVE = ("HTJ2KLossless", "JPEG2000Lossless")
"""Measured against the pynetdicom archive: DCMTK 3.6.7's storescp cannot store HTJ2K, and the two are compared."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.command_line = "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv)
    procs.dcmtk_nagle(args.dcmtk_nagle)
    with _workdir(args) as workdir:
        return int(args.handler(args, workdir))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", type=Path, help="parent of the scratch folder (default: the system temp dir)")
    common.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder (logs, spool)")
    common.add_argument("--runs", type=int, default=3, help="timed runs per scenario, in rounds; medians")
    common.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="the node's encoder processes")
    common.add_argument("--corpus", type=Path, help="real DICOM files to use instead of generated CT slices")
    common.add_argument("--modality", nargs="*", default=[], help="with --corpus: only these modalities")
    common.add_argument("--count", type=int, default=150, help="instances per run")
    common.add_argument(
        "--dcmtk-nagle", action="store_true", help="run DCMTK peers as packaged, Nagle on (default: TCP_NODELAY=1)"
    )

    sub = commands.add_parser("throughput", parents=[common], help="loopback throughput against the baselines")
    sub.add_argument(
        "--syntax",
        action="append",
        help="target syntax keyword (repeatable; default JPEGLSLossless; KEYWORD:unverified for verify: false)",
    )
    sub.add_argument("--no-baselines", action="store_true", help="only the node, no pass-through/DCMTK route")
    sub.set_defaults(handler=_throughput)

    sub = commands.add_parser("codecs", parents=[common], help="encode MB/s and ratio of every codec binding")
    sub.add_argument("--codec-mb", type=float, default=CODEC_MB, help="MB of distinct images' pixels to encode")
    sub.set_defaults(handler=_codecs)

    sub = commands.add_parser("memory", parents=[common], help="peak RSS of the node for one huge instance")
    sub.add_argument("--size-gib", type=float, default=1.0)
    sub.add_argument("--syntax", default="JPEGLSLossless")
    sub.set_defaults(handler=_memory)

    sub = commands.add_parser("all", parents=[common], help="everything; writes docs/benchmarks.{md,png,json}")
    sub.add_argument(
        "--codec-mb", type=float, default=CODEC_MB, help="MB of distinct images' pixels for the codec measurements"
    )
    sub.add_argument("--size-gib", type=float, default=1.0, help="size of the memory benchmark's instance")
    sub.add_argument("--docs", type=Path, default=procs.PROJECT / "docs", help="where to write the report")
    sub.set_defaults(handler=_all)
    return parser


@contextlib.contextmanager
def _workdir(args: argparse.Namespace) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="compressing-scp-bench-", dir=args.workdir))
    try:
        yield folder
    finally:
        if args.keep_workdir:
            print(f"scratch folder kept: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


class Instances(NamedTuple):
    """The files to send, a description of them, and one of each distinct image among them, in sending order."""

    files: list[Path]
    description: str
    distinct: list[Path]


def _instances(args: argparse.Namespace, workdir: Path) -> Instances:
    if args.corpus:
        sources = data.corpus_images(args.corpus, tuple(args.modality))
        files = data.copy_cycled(sources, workdir / "in", args.count)
        kinds = f" ({', '.join(args.modality)})" if args.modality else ""
        description = f"{len(files)} instances cycled from the {len(sources)} images of the corpus {args.corpus}{kinds}"
        return Instances(files, description, files[: len(sources)])
    files = data.write_ct_series(workdir / "in", args.count)
    return Instances(files, f"{len(files)} generated CT-like 512x512 slices, 12 bits stored", files)


def _codec_frames(paths: Sequence[Path], megabytes: float) -> tuple[list[np.ndarray], list[int]]:
    """The single-sample 16-bit frames of `paths`, in order, up to `megabytes` of pixel data, and the Bits Stored
    each declares (signed samples are viewed as unsigned 16-bit words: the codecs differ in how they take them)."""
    frames: list[np.ndarray] = []
    bits: list[int] = []
    total = 0
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if header.get("SamplesPerPixel", 1) != 1 or header.get("BitsAllocated") != 16:
            continue
        signed = header.get("PixelRepresentation", 0) == 1
        for frame in data.pixel_frames([path]):
            total += frame.nbytes
            if frames and total > megabytes * 1e6:
                return frames, bits
            frames.append(frame.view(np.uint16) if signed else frame)
            bits.append(16 if signed else int(header.BitsStored))
    if not frames:
        raise SystemExit("no single-sample 16-bit images to measure the codecs on")
    return frames, bits


def _node_scenario(
    args: argparse.Namespace, files: list[Path], keyword: str | None, workdir: Path, runs: int
) -> Scenario:
    if keyword is None:
        return throughput.run_node("keep", "node, forward only", files, None, workdir, runs, args.processes)
    syntax = keyword.removesuffix(UNVERIFIED)
    uid = str(pydicom.uid.UID(getattr(pydicom.uid, syntax)))
    name = SCENARIO_NAMES.get(keyword, keyword.lower())
    label, pynetdicom_archive = _node_label(keyword), syntax in PYNETDICOM_ARCHIVE
    verify = not keyword.endswith(UNVERIFIED)
    return throughput.run_node(name, label, files, uid, workdir, runs, args.processes, pynetdicom_archive, verify)


def _node_label(keyword: str) -> str:
    syntax = keyword.removesuffix(UNVERIFIED)
    label = f"node -> {syntax}" + (", verify: false" if syntax != keyword else "")
    return label + (" (pynetdicom archive)" if syntax in PYNETDICOM_ARCHIVE else "")


Step = Callable[[Path, int], Scenario]
"""Runs one scenario in a scratch folder: starts its processes, warms up, times `runs` sends, stops them."""


def _run_throughput(
    args: argparse.Namespace, workdir: Path, files: list[Path], syntaxes: Sequence[str]
) -> list[Scenario]:
    """Every scenario, in `args.runs` rounds; a scenario that fails is reported as not run (with why), and the
    others still run.

    Each round starts every scenario afresh and times one send of the whole set, scenario after scenario: the
    speed of this shared machine drifts by a third within minutes, and in rounds the drift weighs on every
    scenario alike instead of on whichever ran last, so the ratios between scenarios stay fair.
    """
    baselines = not getattr(args, "no_baselines", False)
    steps: list[tuple[str, str, Step]] = []
    if baselines:
        for durable, name, label in (
            (False, "passthrough", "pass-through pynetdicom receiver"),
            (True, "passthrough-durable", "pass-through receiver + fsync"),
        ):
            steps.append((name, label, partial(throughput.run_passthrough, files, durable=durable)))
    steps.append(("keep", "node, forward only", partial(_node_scenario, args, files, None)))
    for keyword in syntaxes:
        name = SCENARIO_NAMES.get(keyword, keyword.lower())
        steps.append((name, _node_label(keyword), partial(_node_scenario, args, files, keyword)))
    if baselines and "JPEGLSLossless" in syntaxes:
        label = "DCMTK route: storescp -xcr dcmcjpls + storescu"
        steps.append(("dcmtk-route", label, partial(throughput.run_dcmtk_route, files)))
    measured: dict[str, Scenario] = {}
    failed: dict[str, Scenario] = {}
    for number in range(1, args.runs + 1):
        folder = workdir / f"round-{number}"
        for name, label, step in steps:
            if name in failed:
                continue
            _progress(f"{label} (round {number} of {args.runs})")
            try:
                scenario = step(folder, 1)
            except (TimeoutError, RuntimeError) as exc:
                print(f"    {label} failed: {exc}", file=sys.stderr)
                failed[name] = Scenario(name, label, None, note=f"failed: {exc}")
                continue
            if name in measured:
                measured[name].runs.extend(scenario.runs)
            else:
                measured[name] = scenario
        if not args.keep_workdir:
            shutil.rmtree(folder, ignore_errors=True)  # the archives' copies: up to the whole set per scenario
    return [failed.get(name) or measured[name] for name, _, _ in steps]


def _throughput(args: argparse.Namespace, workdir: Path) -> int:
    files, description, _ = _instances(args, workdir)
    scenarios = _run_throughput(args, workdir, files, args.syntax or ["JPEGLSLossless"])
    print(f"{description}, {args.runs} runs, medians\n")
    print(report.scenario_table(scenarios))
    return 0


def _codecs(args: argparse.Namespace, workdir: Path) -> int:
    instances = _instances(args, workdir)
    frames, bits = _codec_frames(instances.distinct, args.codec_mb)
    results = codecs.measure(frames, bits, args.runs)
    print(f"{len(frames)} frames from {instances.description}, {args.runs} runs, medians\n")
    print(report.codec_table(results), "\n")
    print(report.decoder_table(codecs.measure_decoders(frames, bits, args.runs)))
    return 0


def _memory(args: argparse.Namespace, workdir: Path) -> int:
    uid = str(pydicom.uid.UID(getattr(pydicom.uid, args.syntax)))
    result = memory.run(workdir, int(args.size_gib * 2**30), uid, args.processes)
    print(
        f"{result.size_bytes / 2**30:.2f} GiB, {result.frames} frames -> {pydicom.uid.UID(result.arrived_syntax).name}"
        f" ({result.arrived_bytes / 2**20:.0f} MiB) in {result.seconds_end_to_end:.1f} s; node peak summed RSS "
        f"{result.peak_rss / memory.MIB:.0f} MiB (PSS {result.peak_pss / memory.MIB:.0f} MiB, idle "
        f"{result.idle_rss / memory.MIB:.0f} MiB)"
    )
    return 0 if result.peak_rss < report.MEMORY_LIMIT else 1


def _all(args: argparse.Namespace, workdir: Path) -> int:
    environment = report.environment()
    files, description, distinct = _instances(args, workdir)
    _progress("codecs")
    frames, bits = _codec_frames(distinct, args.codec_mb)
    codec_results = codecs.measure(frames, bits, args.runs)
    decoder_results = codecs.measure_decoders(frames, bits, args.runs)
    scenarios = _run_throughput(args, workdir, files, list(SCENARIO_NAMES))
    _progress("memory")
    uid = str(pydicom.uid.JPEGLSLossless)
    memory_result = memory.run(workdir, int(args.size_gib * 2**30), uid, args.processes) if args.size_gib else None
    environment["load average at end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results = Results(
        command=args.command_line,
        data=f"{description}, {args.runs} runs per scenario (one per round), {args.processes} encoder processes; "
        f"the codecs encode {len(frames)} frames ({sum(f.nbytes for f in frames) / 1e6:.1f} MB) of its distinct images",
        cores=os.cpu_count() or 1,
        scenarios=scenarios,
        codecs=codec_results,
        decoders=decoder_results,
        memory=memory_result,
        environment=environment,
    )
    path = report.write(results, args.docs)
    print(report.scenario_table(scenarios), "\n")
    print(report.codec_table(codec_results), "\n")
    print(report.decoder_table(decoder_results), "\n")
    for target in results.targets():
        print(f"{target.name}: {target.measured} (required {target.required}): {'met' if target.met else 'NOT met'}")
    print(f"\nwritten: {path}, {path.with_suffix('.png')}, {path.with_suffix('.json')}")
    return 0


def _progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)
