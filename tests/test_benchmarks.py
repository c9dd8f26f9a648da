"""The benchmark harness's own helpers: generated data, arithmetic, /proc accounting, report, and a tiny run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom import examples
from pydicom.uid import JPEGLSLossless

from benchmarks import cli, codecs, data, procs, report, stats, throughput
from benchmarks.memory import MIB, MemoryResult
from benchmarks.throughput import Run, Scenario
from scp.config import Config


def _jls_ratio(arr: np.ndarray) -> float:
    return arr.nbytes / len(imagecodecs.jpegls_encode(arr))


def test_ct_slices_are_deterministic_12_bit_and_differ_along_the_series() -> None:
    first = data.ct_slice(0)
    assert first.dtype == np.uint16 and first.shape == (512, 512)
    assert np.array_equal(first, data.ct_slice(0))
    assert 0 < int(first.max()) < 2**12
    assert not np.array_equal(first, data.ct_slice(1))


def test_ct_slices_compress_like_ct_not_like_noise() -> None:
    arr = data.ct_slice(5)
    noise = np.random.default_rng(0).integers(0, 2**12, arr.shape, dtype=np.uint16)
    assert _jls_ratio(arr) > 2.0
    assert _jls_ratio(noise) < 1.5
    # neighbouring pixels are alike (tissue, not noise): horizontal differences are far smaller than the spread
    body = arr[200:300, 100:400].astype(float)
    assert np.abs(np.diff(body, axis=1)).mean() < 0.2 * np.abs(body - body.mean()).mean() + 20


def test_ct_series_files_are_valid_part10(tmp_path: Path) -> None:
    paths = data.write_ct_series(tmp_path, 2)
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({str(ds.SOPInstanceUID) for ds in datasets}) == 2
    assert np.array_equal(datasets[1].pixel_array, data.ct_slice(1))
    assert datasets[0].BitsStored == 12 and datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_multiframe_is_written_frame_by_frame_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "big.dcm"
    frames = data.write_multiframe(path, 3 * 512 * 512 * 2, distinct=2)
    ds = pydicom.dcmread(path)
    assert frames == 3 and ds.NumberOfFrames == 3
    arr = ds.pixel_array
    assert arr.shape == (3, 512, 512)
    assert np.array_equal(arr[0], data.ct_slice(0)) and np.array_equal(arr[2], data.ct_slice(0))
    assert np.array_equal(arr[1], data.ct_slice(1))


def test_corpus_copies_get_new_instance_uids(tmp_path: Path) -> None:
    source = tmp_path / "corpus"
    data.write_ct_series(source, 2)
    (source / "README.md").write_text("not DICOM")
    sources = data.corpus_images(source)
    assert [p.name for p in sources] == ["ct00000.dcm", "ct00001.dcm"]
    copies = data.copy_cycled(sources, tmp_path / "copies", 5)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in copies}
    assert len(copies) == 5 and len(uids) == 5
    assert pydicom.dcmread(copies[2]).PixelData == pydicom.dcmread(sources[0]).PixelData
    with pytest.raises(SystemExit, match="modality MR"):
        data.corpus_images(source, ("MR",))


def test_the_codecs_encode_each_distinct_image_of_a_corpus_once_with_its_own_bits_stored(tmp_path: Path) -> None:
    """The raw codec rate behind the ceiling must come from the pixels the node is sent: every image of a cycled
    corpus, not the first frames of its first files."""
    corpus = tmp_path / "corpus"
    data.write_ct_series(corpus, 1)
    data.write_multiframe(corpus / "multi.dcm", 3 * 512 * 512 * 2)
    small = pydicom.dcmread(examples.get_path("ct"))  # 128x128, 16 bits stored, signed
    small.save_as(corpus / "small.dcm")
    args = cli._parser().parse_args(["all", "--corpus", str(corpus), "--count", "7"])
    instances = cli._instances(args, tmp_path / "work")
    assert len(instances.files) == 7 and len(instances.distinct) == 3
    frames, bits = cli._codec_frames(instances.distinct, cli.CODEC_MB)
    assert [f.shape for f in frames] == [(512, 512)] + [(512, 512)] * 3 + [(128, 128)]
    assert bits == [12, 12, 12, 12, 16] and all(f.dtype == np.uint16 for f in frames)
    frames, bits = cli._codec_frames(instances.distinct, 2 * 512 * 512 * 2 / 1e6)
    assert len(frames) == len(bits) == 2


def test_parallel_encode_tasks_hold_every_frame_once_largest_first() -> None:
    sizes = [100, 5000, 100, 100, 2000, 100, 100, 100]
    tasks = codecs.balanced_tasks(sizes, cores=2)
    assert sorted(i for task in tasks for i in task) == list(range(len(sizes)))
    assert tasks[0] == [1] and tasks[1] == [4]
    equal = codecs.balanced_tasks([10] * 64, cores=2)
    assert len(equal) == 16 and all(len(task) == 4 for task in equal)


def test_median() -> None:
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0]) == 2.5
    assert stats.median([]) == 0.0


def test_a_figure_just_under_a_target_never_shows_as_reaching_it() -> None:
    assert stats.shown_down(49.27 / 16.435, 2) == "2.99"  # 2.998: not "3.00x" next to "not met"
    assert stats.shown_down(100 * 0.6999, 0) == "69" and stats.shown_down(3.0, 2) == "3.00"


def test_ceiling_arithmetic() -> None:
    assert stats.ceiling(100.0, 0.0, 2) == pytest.approx(100.0)
    # 1/100 s of encoding + 0.02 CPU-s shared by 2 cores per MB: 1 / (0.01 + 0.01) = 50 MB/s
    assert stats.ceiling(100.0, 0.02, 2) == pytest.approx(50.0)
    assert stats.ceiling(0.0, 0.02, 2) == 0.0
    ceiling = stats.Ceiling(codec_mb_s=100.0, node_cpu_per_mb=0.02, peers_cpu_per_mb=0.02, cores=2)
    assert ceiling.node_only == pytest.approx(50.0)
    assert ceiling.whole_machine == pytest.approx(1 / (0.01 + 0.02))
    assert stats.ratio(3.0, 0.0) == 0.0


def test_declared_precision_reads_the_codestream_headers() -> None:
    frame = data.ct_slice(0)[:64, :64].copy()
    assert codecs.declared_precision(bytes(imagecodecs.jpegls_encode(frame))) == 16
    j2k = imagecodecs.jpeg2k_encode(frame, level=0, codecformat="J2K", reversible=True, bitspersample=12)
    assert codecs.declared_precision(bytes(j2k)) == 12
    assert codecs.declared_precision(b"not a codestream") is None


def test_decodes_exactly_detects_a_wrong_frame() -> None:
    frame = data.ct_slice(0)[:64, :64].copy()
    encoded = bytes(imagecodecs.jpegls_encode(frame))
    assert codecs.decodes_exactly(JPEGLSLossless, encoded, frame, 12)
    other = frame.copy()
    other[0, 0] += 1
    assert not codecs.decodes_exactly(JPEGLSLossless, encoded, other, 12)


def test_codec_measure_on_a_few_small_frames() -> None:
    frames = [data.ct_slice(i)[:128, :128].copy() for i in range(2)]
    results = codecs.measure(frames, [12, 12], runs=1, cores=2)
    by_name = {r.binding: r for r in results}
    assert set(by_name) == {b.name for b in codecs.BINDINGS}
    reference = by_name["pyjpegls via pydicom"]
    assert reference.available and reference.exact and reference.ratio > 1.5 and reference.one_core_mb_s > 0
    assert reference.precision == 12  # pydicom declares Bits Stored
    node = by_name["CharLS via imagecodecs' library (the node's)"]
    assert node.exact and node.identical and node.precision == 12
    best = codecs.fastest_exact(results, "JPEGLSLossless")
    assert best is not None and best.syntax == "JPEGLSLossless"
    decoders = codecs.measure_decoders(frames, [12, 12], runs=1)
    assert {(d.syntax, d.decoder) for d in decoders} == {(d.syntax.keyword, d.name) for d in codecs.DECODERS}
    assert all(d.exact and d.one_core_mb_s > 0 for d in decoders)


def test_tree_monitor_counts_cpu_and_memory_of_children() -> None:
    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.5: pass"  # CPU, on any Python
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with procs.TreeMonitor(proc.pid, interval=0.02, pss=True) as monitor:
            proc.wait(60)
    finally:
        procs.stop_process(proc)
    assert monitor.cpu_seconds > 0.3, "the grandchild's 0.5 s of CPU, but for the last sampling interval"
    assert monitor.peak_rss > 1 * MIB and monitor.peak_pss > 0


def _spinning_children(count: int, seconds: float) -> subprocess.Popen[bytes]:
    """A process that runs `count` children one after the other, each spinning `seconds` of CPU, then sleeps."""
    spin = f"import time\nwhile time.process_time() < {seconds}: pass"
    code = (
        "import subprocess, sys, time\n"
        f"for _ in range({count}): subprocess.run([sys.executable, '-c', {spin!r}])\n"
        "print('done', flush=True)\n"
        "time.sleep(60)"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)


@pytest.mark.parametrize("interval", [1.0, 0.005])
def test_tree_monitor_counts_children_that_end_between_samples_once(interval: float) -> None:
    """Children living shorter than the sampling interval (the DCMTK route's dcmcjpls and storescu) are counted
    through their parent; children sampled many times are not counted twice."""
    proc = _spinning_children(12, 0.05)
    try:
        with procs.TreeMonitor(proc.pid, interval=interval) as monitor:
            assert proc.stdout is not None and proc.stdout.readline() == b"done\n"
        whole_tree = procs.cpu_seconds(proc.pid)
    finally:
        procs.stop_process(proc)
    assert 0.55 <= monitor.cpu_seconds <= whole_tree + 0.02
    assert monitor.cpu_seconds < 1.1, "each child's 0.05 s counted once (12 children), plus the parent's own"


def test_cpu_seconds_counts_the_children_of_a_forking_server() -> None:
    """A peer such as `storescp --fork` spends its CPU in children: the peers' CPU must count them."""
    proc = _spinning_children(6, 0.05)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"done\n"
        assert procs.cpu_seconds(proc.pid) >= 0.3
    finally:
        procs.stop_process(proc)


def _scenario(name: str, syntax: str | None, modality_s: float, end_to_end_s: float, in_target: int = 10) -> Scenario:
    run = Run(10, 10.0, modality_s, end_to_end_s, 10, 0.2, 0.05, 100 * MIB, 2_500_000, in_target)
    return Scenario(name, name, syntax, [run, run])


def test_report_checks_the_targets_from_the_figures(tmp_path: Path) -> None:
    jls = report.JLS
    scenarios = [
        _scenario("passthrough", None, 0.1, 0.0),
        _scenario("keep", None, 0.1, 0.2),
        _scenario("jpegls", jls, 0.11, 0.25),
        _scenario("htj2k", report.HTJ2K, 0.1, 0.2),
        _scenario("j2k", report.J2K, 0.1, 1.0, in_target=0),
        _scenario("dcmtk-route", jls, 0.5, 1.0),
    ]
    codec = codecs.CodecResult("JPEGLSLossless", "x", True, "", 50.0, 100.0, 2, 4.0, True, True, True)
    memory = MemoryResult(2**30, 2048, jls, 10.0, 20.0, 500 * MIB, 300 * MIB, 70 * MIB, jls, 2**28)
    decoder = codecs.DecodeResult("JPEGLSLossless", "y", 80.0, True)
    results = report.Results(
        "python -m benchmarks all", "test data", 2, scenarios, [codec], [decoder], memory, {"cpu": "x"}
    )
    targets = {t.name: t for t in results.targets()}
    assert len(targets) == 5
    # keep: 0.02 node CPU-s/MB + 0.005 peers; codec 100 MB/s on 2 cores: ceiling 1 / (0.01 + 0.0125) = 44.4 MB/s
    ceiling = targets["JPEG-LS end-to-end vs the work-limited ceiling"]
    assert ceiling.met and "40.0 / 44.4 MB/s = 90%" in ceiling.measured
    route = targets["JPEG-LS end-to-end vs the DCMTK compressing route"]
    assert route.met and "4.00x" in route.measured
    modality = targets["JPEG-LS modality-side vs the pass-through receiver"]
    assert modality.met and "= 90%" in modality.measured  # 90.9%, shown rounded down
    htj2k = targets["HTJ2K vs JPEG 2000 lossless end-to-end"]
    assert not htj2k.met and "passed some through" in htj2k.measured  # 5x, but JPEG 2000 was not compressed
    memory_target = next(t for name, t in targets.items() if "RSS" in name)
    assert not memory_target.met and "500 MiB" in memory_target.measured
    text = report.markdown(results)
    assert "python -m benchmarks all" in text and "| JPEG-LS modality-side" in text and "**not met**" in text
    assert "judged on the verified node" not in text  # the scenario without verification did not run
    if importlib.util.find_spec("matplotlib"):
        report.write(results, tmp_path)
        assert (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "benchmarks.json").is_file()


def test_report_sets_the_unverified_node_against_the_same_ceiling() -> None:
    jls = report.JLS
    scenarios = [
        _scenario("keep", None, 0.1, 0.2),
        _scenario("jpegls", jls, 0.11, 0.25),
        _scenario("jpegls-unverified", jls, 0.11, 0.22),
    ]
    codec = codecs.CodecResult("JPEGLSLossless", "x", True, "", 50.0, 100.0, 2, 4.0, True, True, True)
    results = report.Results("python -m benchmarks all", "test data", 2, scenarios, [codec], [], None, {})
    text = report.markdown(results)
    # the ceiling as above, 44.4 MB/s: 10 MB in 0.22 s = 45.5 MB/s = 102%; verified 40.0 MB/s = 90%
    assert "45.5 MB/s end to end = 102% of the ceiling" in text
    assert "40.0 MB/s = 90%" in text
    targets = {t.name: t.measured for t in results.targets()}
    assert targets["JPEG-LS end-to-end vs the work-limited ceiling"].startswith("40.0 / 44.4")  # the verified node


def test_an_unverified_scenario_runs_the_node_with_verify_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str, object, bool]] = []

    def node(name: str, label: str, files: object, syntax: object, *rest: object) -> Scenario:
        seen.append((name, label, syntax, bool(rest[-1])))
        return Scenario(name, label, None)

    monkeypatch.setattr(cli.throughput, "run_node", node)
    args = cli._parser().parse_args(["throughput", "--runs", "1", "--no-baselines"])
    cli._run_throughput(args, tmp_path, [], ["JPEGLSLossless", "JPEGLSLossless:unverified"])
    assert seen[1:] == [
        ("jpegls", "node -> JPEGLSLossless", str(JPEGLSLossless), True),
        ("jpegls-unverified", "node -> JPEGLSLossless, verify: false", str(JPEGLSLossless), False),
    ]
    config = throughput.node_config(tmp_path, 1, 2, str(JPEGLSLossless), 2, verify=False)
    assert config["rules"][0]["compress"] == {"syntax": str(JPEGLSLossless), "verify": False}
    assert Config.model_validate(config).rules[0].compress.verify is False


def test_scenarios_run_in_rounds_and_a_failed_one_drops_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, str]] = []

    def measure(name: str, workdir: Path, runs: int) -> Scenario:
        assert runs == 1
        calls.append((name, workdir.name))
        if name == "jpegls" and workdir.name == "round-2":
            raise TimeoutError("the archive never got everything")
        one_run = _scenario(name, None, modality_s=1.0, end_to_end_s=2.0).runs[:1]
        return Scenario(name, name, None, one_run)

    def node(name: str, label: str, files: object, syntax: object, workdir: Path, runs: int, *_: object) -> Scenario:
        return measure(name, workdir, runs)

    def passthrough(files: object, workdir: Path, runs: int, durable: bool) -> Scenario:
        return measure("passthrough-durable" if durable else "passthrough", workdir, runs)

    monkeypatch.setattr(cli.throughput, "run_node", node)
    monkeypatch.setattr(cli.throughput, "run_passthrough", passthrough)
    monkeypatch.setattr(cli.throughput, "run_dcmtk_route", lambda files, w, r: measure("dcmtk-route", w, r))
    args = cli._parser().parse_args(["throughput", "--runs", "3"])
    scenarios = cli._run_throughput(args, tmp_path, [], ["JPEGLSLossless"])

    names = ["passthrough", "passthrough-durable", "keep", "jpegls", "dcmtk-route"]
    expected = [(n, f"round-{r}") for r in (1, 2, 3) for n in names if not (n == "jpegls" and r == 3)]
    assert calls == expected  # every scenario once per round; the failed one not again
    assert [len(s.runs) for s in scenarios] == [3, 3, 3, 0, 3]
    assert [s.name for s in scenarios] == names
    assert "never got everything" in scenarios[3].note
    assert "node -> JPEGLSLossless failed" in capsys.readouterr().err


@pytest.mark.peers
@pytest.mark.slow
def test_tiny_throughput_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not Path("/usr/bin/storescu").exists() or not Path("/usr/bin/dcmcjpls").exists():
        pytest.skip("DCMTK is not installed (Debian package dcmtk)")
    argv = ["throughput", "--count", "3", "--runs", "1", "--processes", "1", "--workdir", str(tmp_path)]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    for label in ("pass-through", "node, forward only", "node -> JPEGLSLossless", "DCMTK route"):
        assert label in table
    jls_row = next(line for line in table.splitlines() if "node -> JPEGLSLossless" in line)
    assert jls_row.rstrip().endswith("| all |"), jls_row


def test_long_chart_labels_break_after_a_comma_else_a_colon() -> None:
    assert report._wrapped("node -> JPEGLSLossless, verify: false") == "node -> JPEGLSLossless,\nverify: false"
    assert report._wrapped("DCMTK route: storescp -xcr dcmcjpls + storescu") == (
        "DCMTK route:\nstorescp -xcr dcmcjpls + storescu"
    )
    assert report._wrapped("node, forward only") == "node, forward only"
