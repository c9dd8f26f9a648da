"""`compressing-scp compress`, and the compress: options it shares with the rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from scp import cli, config
from scp.errors import ConfigError
from scp.offline import parse_spec
from tests.images import write_image


def _tree(root: Path) -> Path:
    """A folder with two images (one in a sub-folder), a text file and noise that will not compress."""
    (root / "sub").mkdir(parents=True)
    ramp = (np.indices((2, 48, 40)).sum(axis=0) * 37 % 4096).astype(np.uint16)
    write_image(root / "a.dcm", ramp, 12)
    write_image(root / "sub" / "b.dcm", (np.indices((1, 33, 17, 3)).sum(axis=0) * 7 % 256).astype(np.uint8), 8)
    write_image(root / "sub" / "noise.dcm", np.random.default_rng(0).integers(0, 256, (1, 8, 8), np.uint8), 8)
    (root / "notes.txt").write_text("not DICOM")
    return root


def test_compress_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _tree(tmp_path / "in")
    out = tmp_path / "out"
    assert cli.main(["compress", "--to", "JPEGLSLossless", "--output", str(out), "--jobs", "1", str(source)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["a.dcm", "notes.txt", "sub/b.dcm", "sub/noise.dcm"]
    assert pydicom.dcmread(out / "a.dcm").file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    assert np.array_equal(pydicom.dcmread(out / "a.dcm").pixel_array, pydicom.dcmread(source / "a.dcm").pixel_array)
    assert (out / "notes.txt").read_bytes() == (source / "notes.txt").read_bytes()  # written unchanged
    assert (out / "sub" / "noise.dcm").read_bytes() == (source / "sub" / "noise.dcm").read_bytes()
    text = capsys.readouterr().out
    assert "passed through unchanged" in text and "not smaller" in text and "InvalidDicomError" in text
    assert "PSNR" not in text


def test_lossy_summary_reports_psnr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _tree(tmp_path / "in")
    argv = ["compress", "--to", "JPEG2000", "--set", "j2k_psnr=[45]", "--output", str(tmp_path / "out")]
    assert cli.main([*argv, "--jobs", "1", str(source / "a.dcm")]) == 0
    assert "PSNR (dB) of lossy output: min" in capsys.readouterr().out
    out = pydicom.dcmread(tmp_path / "out" / "a.dcm")
    assert out.LossyImageCompression == "01"


def test_bad_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compress", "--to", "JPEGLSLossless", "--set", "jls_error=2", "--output", str(tmp_path), str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "jls_error cannot be used with JPEGLSLossless" in capsys.readouterr().err


def test_a_target_nobody_encodes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compress", "--to", "JPEGBaseline8Bit", "--output", str(tmp_path / "o"), str(tmp_path)]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "cannot encode JPEGBaseline8Bit" in capsys.readouterr().err


def test_missing_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compress", "--to", "RLELossless", "--output", str(tmp_path / "o"), str(tmp_path / "nope")]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "syntax, options, expected",
    [
        ("JPEG2000", ["j2k_psnr=[50, 40]"], {"j2k_psnr": [50.0, 40.0]}),
        ("JPEGLSNearLossless", ["jls_error=2"], {"jls_error": 2}),
        ("HTJ2K", ["htj2k_qstep=0.002", "keep_sop_instance_uid=true"], {"keep_sop_instance_uid": True}),
        ("RLELossless", ["verify=false", "force=yes"], {"verify": False, "force": True}),
        ("keep", [], {"syntax": None}),
    ],
)
def test_parse_spec(syntax: str, options: list[str], expected: dict[str, object]) -> None:
    spec = parse_spec(syntax, options)
    for key, value in expected.items():
        assert getattr(spec, key) == value


@pytest.mark.parametrize(
    "compress, message",
    [
        ({"syntax": "JPEG2000"}, "needs exactly one of j2k_cr or j2k_psnr"),
        ({"syntax": "JPEG2000", "j2k_cr": [10], "j2k_psnr": [50]}, "needs exactly one"),
        ({"syntax": "JPEGLSNearLossless"}, "needs jls_error"),
        ({"syntax": "HTJ2KLossless", "htj2k_qstep": 0.01}, "htj2k_qstep cannot be used with HTJ2KLossless"),
        ({"syntax": "RLELossless", "nearness": 2}, "unknown key"),
        ({"syntax": "JPEGBaseline8Bit"}, "cannot encode JPEGBaseline8Bit; targets: RLELossless"),
        ({"syntax": "DeflatedExplicitVRLittleEndian"}, "cannot encode Deflated"),
    ],
)
def test_rule_options_are_checked_at_load(compress: dict[str, object], message: str) -> None:
    data = {
        "destinations": {"a": {"type": "directory", "path": "/tmp/a"}},
        "rules": [{"name": "r", "compress": compress, "forward": ["a"]}],
    }
    with pytest.raises(ConfigError, match=message):
        config.parse(data)


def test_a_target_without_its_package_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from scp import codecs

    absent = codecs.Codec(pydicom.uid.HTJ2K, [], plugins=[codecs.Plugin("x", lambda *_: b"", ("not_installed_pkg",))])
    monkeypatch.setitem(codecs.REGISTRY, pydicom.uid.HTJ2K, absent)
    data = {
        "destinations": {"a": {"type": "directory", "path": "/tmp/a"}},
        "rules": [{"name": "r", "compress": "HTJ2K", "forward": ["a"]}],
    }
    with pytest.raises(ConfigError, match="not_installed_pkg"):
        config.parse(data)


def test_shorthand_still_works() -> None:
    data = {
        "destinations": {"a": {"type": "directory", "path": "/tmp/a"}},
        "rules": [{"name": "r", "compress": "HTJ2KLosslessRPCL", "forward": ["a"]}],
    }
    assert config.parse(data).rules[0].compress.syntax == pydicom.uid.HTJ2KLosslessRPCL


@pytest.mark.parametrize("where", ["input folder", "file's folder", "link to it"])
def test_an_output_over_the_inputs_is_refused_touching_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    source = _tree(tmp_path / "in")
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
    (tmp_path / "link").symlink_to(source)
    inputs, output = {
        "input folder": ([source], source),
        "file's folder": ([source / "a.dcm"], source),
        "link to it": ([source], tmp_path / "link"),
    }[where]
    argv = ["compress", "--to", "RLELossless", "--output", str(output), "--jobs", "1", *map(str, inputs)]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "would write over input files" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before


def test_outputs_are_renamed_into_place(tmp_path: Path) -> None:
    source = _tree(tmp_path / "in")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "noise.dcm").write_bytes(b"an older result")
    assert cli.main(["compress", "--to", "RLELossless", "--output", str(out), "--jobs", "1", str(source)]) == 0
    assert (out / "sub" / "noise.dcm").read_bytes() == (source / "sub" / "noise.dcm").read_bytes()
    assert not [p for p in out.rglob("*.part")]


def test_inputs_with_the_same_output_are_refused_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _tree(tmp_path / "in1"), _tree(tmp_path / "in2")
    out = tmp_path / "out"
    argv = ["compress", "--to", "RLELossless", "--output", str(out), "--jobs", "1", str(first / "a.dcm")]
    assert cli.main([*argv, str(second / "a.dcm")]) == cli.EXIT_FAILURE
    error = capsys.readouterr().err
    assert f"{out / 'a.dcm'} (from {first / 'a.dcm'} and {second / 'a.dcm'})" in error
    assert not out.exists()


def test_an_output_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _tree(tmp_path / "in")
    (tmp_path / "afile").write_text("")
    argv = ["compress", "--to", "RLELossless", "--output", str(tmp_path / "afile"), "--jobs", "1", str(source)]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert "afile is a file; give a folder" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full or read-only output disk stops the command with the file and the reason; no partial file stays."""
    import errno

    from scp import offline

    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(offline.os, "replace", full)
    source, out = _tree(tmp_path / "in"), tmp_path / "out"
    argv = ["compress", "--to", "RLELossless", "--output", str(out), "--jobs", "1", str(source / "a.dcm")]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"compressing-scp: cannot write {out / 'a.dcm'}: No space left on device\n"
    assert not list(out.iterdir())


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_jobs_must_be_at_least_one(tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: str) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main(["compress", "--to", "RLELossless", "--output", str(tmp_path / "out"), "--jobs", jobs, "x.dcm"])
    assert ended.value.code == 2
    assert f"--jobs: expected a whole number of at least 1, got '{jobs}'" in capsys.readouterr().err


def test_an_input_that_cannot_be_read_is_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from scp import offline

    def unreadable(src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "Input/output error", str(src))

    monkeypatch.setattr(offline.shutil, "copyfile", unreadable)
    source, out = _tree(tmp_path / "in"), tmp_path / "out"
    argv = ["compress", "--to", "RLELossless", "--output", str(out), "--jobs", "1", str(source / "notes.txt")]
    assert cli.main(argv) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"compressing-scp: cannot read {source / 'notes.txt'}: Input/output error\n"
