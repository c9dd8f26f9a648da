"""`compressing-scp compress`: the node's compression core run over files and folders, with a summary."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from scp.compress import Result
from scp.config import CompressSpec, check_encodable
from scp.errors import ConfigError, ScpError
from scp.workers import Encoder


def parse_spec(syntax: str, options: Sequence[str]) -> CompressSpec:
    """`--to` and `--set KEY=VALUE` (VALUE read as YAML) as a rule's `compress:` mapping."""
    data: dict[str, object] = {"syntax": syntax}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {option!r}: expected KEY=VALUE, e.g. --set j2k_psnr=[50]")
        try:
            data[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {option!r}: the value is not valid YAML: {exc}") from exc
    try:
        spec = CompressSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'compress'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid compress options: {problems}") from exc
    try:
        return check_encodable(spec)
    except ValueError as exc:
        raise ConfigError(f"--to {syntax}: {exc}") from exc


@dataclass
class Report:
    """What happened to every input file."""

    results: list[tuple[Path, Result]] = field(default_factory=list)

    @property
    def passed(self) -> Counter[str]:
        return Counter(result.reason for _, result in self.results if not result.compressed)


def _inputs(inputs: Sequence[Path]) -> Iterator[tuple[Path, Path]]:
    """(source, path relative to the output folder): a file keeps its name, a folder its relative paths."""
    for item in inputs:
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if p.is_file()):
                yield path, path.relative_to(item)
        else:
            yield item, Path(item.name)


def _check_outputs(pairs: Sequence[tuple[Path, Path]], output: Path) -> None:
    """Stop before anything is written when `output` is a file, two inputs share an output, or an output would be
    one of the inputs (same file, by inode)."""
    if output.exists() and not output.is_dir():
        raise ScpError(f"--output {output} is a file; give a folder (it is created if missing)")
    by_output: dict[Path, list[str]] = {}
    for src, relative in pairs:
        by_output.setdefault(output / relative, []).append(str(src))
    if shared := [f"{dst} (from {' and '.join(srcs)})" for dst, srcs in by_output.items() if len(srcs) > 1]:
        raise ScpError(f"inputs would overwrite each other's output: {'; '.join(shared)}; compress them separately")
    sources = {_identity(src) for src, _ in pairs}
    targets = [output / relative for _, relative in pairs]
    clashing = [str(dst) for dst in targets if dst.exists() and _identity(dst) in sources]
    if clashing:
        raise ScpError(
            f"--output {output} would write over input files: {', '.join(clashing)}; "
            "choose an output folder that holds none of the inputs"
        )


def _identity(path: Path) -> tuple[int, int]:
    """The file a path names, whatever links lead to it."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def compress_tree(
    inputs: Sequence[Path], output: Path, spec: CompressSpec, jobs: int = 1, progress: bool = False
) -> Report:
    """Re-encode every input into `output`; an input that is not re-encoded is copied unchanged.

    Each output is written to a temporary file beside it and renamed into place; nothing is written when the
    outputs clash (see `_check_outputs`)."""
    if missing := [str(p) for p in inputs if not p.exists()]:
        raise ScpError(f"no such file or folder: {', '.join(missing)}")
    pairs = list(_inputs(inputs))
    _check_outputs(pairs, output)
    report = Report()
    encoder = Encoder(max(1, jobs))

    def one(pair: tuple[Path, Path]) -> tuple[Path, Result]:
        src, relative = pair
        dst = output / relative
        partial = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.part")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            result = encoder.transcode(src, partial, spec)
            if not result.compressed:
                shutil.copyfile(src, partial)
            os.replace(partial, dst)
        except OSError as exc:  # the output cannot be written (read-only, full): the next one could not be either
            what = f"read {src}" if exc.filename == str(src) else f"write {dst}"
            raise ScpError(f"cannot {what}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        return relative, result

    try:
        with ThreadPoolExecutor(max(1, jobs)) as threads, Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("compressing", total=len(pairs))
            for done in threads.map(one, pairs):
                report.results.append(done)
                bar.advance(task)
    finally:
        encoder.close()
    return report


def print_summary(report: Report, console: Console | None = None) -> None:
    """Files, bytes in and out, ratio, PSNR of lossy output, and what passed through and why."""
    console = console or Console()
    results = [r for _, r in report.results]
    compressed = [r for r in results if r.compressed]
    bytes_in = sum(r.bytes_in for r in results)
    bytes_out = sum(r.bytes_out for r in results)
    table = Table(title="compressing-scp compress")
    for column in ("files", "compressed", "passed through", "bytes in", "bytes out", "ratio"):
        table.add_column(column, justify="right")
    ratio = f"{bytes_in / bytes_out:.2f}" if bytes_out else "-"
    passed = len(results) - len(compressed)
    table.add_row(str(len(results)), str(len(compressed)), str(passed), str(bytes_in), str(bytes_out), ratio)
    console.print(table)
    psnrs = [r.psnr for r in compressed if r.psnr is not None]
    if psnrs:
        finite = [p for p in psnrs if math.isfinite(p)]
        low = f"{min(finite):.1f}" if finite else "inf"
        mean = f"{sum(finite) / len(finite):.1f}" if finite else "inf"
        console.print(f"PSNR (dB) of lossy output: min {low}, mean {mean} over {len(psnrs)} files")
    if report.passed:
        reasons = Table(title="passed through unchanged")
        reasons.add_column("files", justify="right")
        reasons.add_column("reason")
        for reason, count in report.passed.most_common():
            reasons.add_row(str(count), reason)
        console.print(reasons)
