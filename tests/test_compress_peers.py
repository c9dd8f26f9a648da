"""Output checked by programs that share no code with our encoders: DCMTK, GDCM, dicom3tools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array
from pydicom.uid import UID

from scp import compress
from scp.config import CompressSpec
from tests.images import bundled_files, write_image
from tests.peers import tool
from tests.test_codecs import without_charls

pytestmark = pytest.mark.peers

# The independent decoder of each lossless target, writing Explicit VR Little Endian.
DECODERS = {
    "RLELossless": ["dcmdrle"],
    "JPEGLSLossless": ["dcmdjpls"],
    "JPEG2000Lossless": ["gdcmconv", "--raw"],
}
TARGETS: list[dict[str, Any]] = [
    {"syntax": "RLELossless"},
    {"syntax": "JPEGLSLossless"},
    {"syntax": "JPEG2000Lossless"},
    {"syntax": "HTJ2KLossless"},
    {"syntax": "JPEGLSNearLossless", "jls_error": 2},
    {"syntax": "JPEG2000", "j2k_psnr": [50]},
    {"syntax": "HTJ2K"},
]


def _stored(path: Path) -> np.ndarray:
    return pixel_array(pydicom.dcmread(path), raw=True)


def _fails_on_source_too(command: list[str], src: Path, tmp_path: Path) -> bool:
    run = subprocess.run([*command, str(src), str(tmp_path / "source.dcm")], capture_output=True, timeout=60)
    return run.returncode != 0


@pytest.mark.parametrize("target", list(DECODERS))
def test_independent_decoder_agrees(target: str, tmp_path: Path) -> None:
    """Every bundled file our node compresses losslessly decodes, with DCMTK or GDCM, to the source pixels."""
    program, *args = DECODERS[target]
    command = [tool(program), *args]
    checked = 0
    for src in bundled_files():
        encoded = tmp_path / f"{src.stem}.enc.dcm"
        if not compress.transcode_file(src, encoded, CompressSpec(syntax=target, force=True)).compressed:
            continue
        decoded = tmp_path / f"{src.stem}.dec.dcm"
        run = subprocess.run([*command, str(encoded), str(decoded)], capture_output=True, text=True, timeout=60)
        if run.returncode and _fails_on_source_too(command, src, tmp_path):
            continue  # e.g. GDCM will not write a multi-frame Secondary Capture Image, whatever its encoding
        assert run.returncode == 0, f"{src.name}: {program} failed: {run.stderr or run.stdout}"
        assert np.array_equal(_stored(decoded), _stored(src)), f"{src.name}: {program} decodes other pixels"
        checked += 1
    assert checked >= 20


def _gradient(shape: tuple[int, ...], dtype: str, low: int, high: int) -> np.ndarray:
    ramp = np.linspace(low, high, num=int(np.prod(shape))).reshape(shape)
    return np.round(ramp).astype(dtype)


NARROW_IN_16_BITS = [
    pytest.param(_gradient((1, 40, 30), "<u2", 0, 255), 8, id="unsigned 8 of 16"),
    pytest.param(_gradient((1, 40, 30), "<i2", -128, 127), 8, id="signed 8 of 16"),
    pytest.param(_gradient((1, 40, 30), "<u2", 0, 63), 6, id="unsigned 6 of 16"),
    pytest.param(_gradient((1, 20, 30, 3), "<u2", 0, 255), 8, id="RGB 8 of 16"),
    pytest.param(_gradient((1, 40, 30), "u1", 0, 63), 6, id="unsigned 6 of 8"),
    pytest.param(_gradient((1, 40, 30), "u1", 0, 3), 2, id="unsigned 2 of 8"),
]


@pytest.mark.parametrize("charls", [True, False], ids=["CharLS first", "without CharLS"])
@pytest.mark.parametrize("frames, bits_stored", NARROW_IN_16_BITS)
def test_jpegls_of_narrow_samples_in_16_bit_words_decodes_everywhere(
    frames: np.ndarray, bits_stored: int, charls: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A codestream declaring at most 8 bits makes decoders write 8-bit samples where Bits Allocated says 16: DCMTK
    refused such output and GDCM aborted on it. DCMTK also refuses fewer than 8 bits in 8-bit words. Every plugin
    order must give both the source pixels."""
    if not charls:
        without_charls(monkeypatch)
    src = write_image(tmp_path / "in.dcm", frames, bits_stored)
    encoded = tmp_path / "out.dcm"
    assert compress.transcode_file(src, encoded, CompressSpec(syntax="JPEGLSLossless", force=True)).compressed
    for program, *args in DECODERS["JPEGLSLossless"], DECODERS["JPEG2000Lossless"]:
        decoded = tmp_path / f"{program}.dcm"
        run = subprocess.run([tool(program), *args, str(encoded), str(decoded)], capture_output=True, timeout=60)
        assert run.returncode == 0, f"{program} failed: {run.stderr!r}"
        assert np.array_equal(_stored(decoded), _stored(src)), f"{program} decodes other pixels"


def _errors(path: Path) -> set[str] | None:
    """dciodvfy's error lines, without the values that legitimately differ; None when dciodvfy crashes."""
    run = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    if run.returncode < 0:
        return None  # e.g. its assertion on 32-bit pixel data (attrothr.cc, bitsallocated <= 16)
    lines = (run.stdout + run.stderr).splitlines()
    return {re.sub(r"<[^>]*>\s*=?\s*\S*|\d+", "#", line) for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("options", TARGETS, ids=lambda o: "-".join(map(str, o.values())))
def test_dciodvfy_finds_no_new_error(options: dict[str, Any], tmp_path: Path) -> None:
    spec = CompressSpec(**options)
    checked = 0
    for src in bundled_files():
        dst = tmp_path / src.name
        if not compress.transcode_file(src, dst, spec).compressed:
            continue
        if UID(spec.syntax).keyword.startswith("HTJ2K"):
            # this dicom3tools release does not know the HTJ2K syntaxes: check the header we wrote, natively
            native = tmp_path / f"{src.stem}.native.dcm"
            compress.decompress_file(dst, native)
            dst = native
        before = _errors(src)
        if before is None:
            continue
        new = (_errors(dst) or set()) - before
        assert not new, f"{src.name}: dciodvfy reports new errors: {sorted(new)}"
        checked += 1
    assert checked >= 10
