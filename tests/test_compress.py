"""The compression core against pydicom's bundled files, random arrays, and each known trap."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.pixels import pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from scp import codecs, compress, syntaxes
from scp.config import CompressSpec
from scp.errors import CompressionError
from scp.workers import Encoder
from tests.images import bundled_files, write_image
from tests.test_codecs import without_charls

LOSSLESS = ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "HTJ2KLossless", "HTJ2KLosslessRPCL"]
LOSSY: list[dict[str, Any]] = [
    {"syntax": "JPEGLSNearLossless", "jls_error": 2},
    {"syntax": "JPEG2000", "j2k_psnr": [50]},
    {"syntax": "JPEG2000", "j2k_cr": [10]},
    {"syntax": "HTJ2K"},
]
SYNTAX_DICTATES = {"PhotometricInterpretation", "PlanarConfiguration", "ExtendedOffsetTable"}
LOSSY_ADDS = {
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "ImageType",
    "DerivationDescription",
    "DerivationCodeSequence",
    "SourceImageSequence",
    "SOPInstanceUID",
}


def _pixels(path: Path) -> np.ndarray:
    """All frames as stored (no colour conversion); read whole, as a deflated file must be."""
    return pixel_array(pydicom.dcmread(path), raw=True)


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _values(ds: pydicom.Dataset, keyword: str) -> list[Any]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]


def _pixel_ratio(path: Path) -> float:
    """Uncompressed size of the pixels over the size of the encoded frames."""
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames") or 1)
    native = frames * ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    return native / sum(len(f) for f in pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=frames))


def _eligible(path: Path) -> bool:
    """8/16-bit, 1 or 3 samples, lossless source: what every lossless target should take."""
    try:
        ds = _header(path)
        _pixels(path)
    except Exception:
        return False
    return (
        "BitsAllocated" in ds
        and ds.BitsAllocated in (8, 16)
        and ds.SamplesPerPixel in (1, 3)
        and syntaxes.is_lossless(ds.file_meta.TransferSyntaxUID)
        and ds.get("LossyImageCompression") != "01"
    )


def _assert_attributes_kept(src: Path, dst: Path, allowed: set[str]) -> None:
    before, after = _header(src), _header(dst)
    for elem in before:
        if elem.keyword in allowed or elem.tag.group == 0x0002 or elem.tag.element == 0:
            continue  # group lengths are retired (PS3.5 7.2) and pydicom drops them
        assert elem.tag in after, f"{elem.keyword or elem.tag} was lost"
        assert after[elem.tag].value == elem.value, f"{elem.keyword or elem.tag} changed"


@pytest.mark.parametrize("target", LOSSLESS)
def test_bundled_files_lossless(target: str, tmp_path: Path) -> None:
    """Every bundled file: nothing lost, decoded output equals the source, attributes and UID kept."""
    spec = CompressSpec(syntax=target)
    forced = CompressSpec(syntax=target, force=True)
    eligible = compressed = 0
    for src in bundled_files():
        dst = tmp_path / src.name
        result = compress.transcode_file(src, dst, spec)
        if not result.compressed:
            assert result.reason and not dst.exists(), src.name
            result = compress.transcode_file(src, dst, forced)
        if _eligible(src) and _header(src).file_meta.TransferSyntaxUID != UID(spec.syntax):
            eligible += 1
            compressed += result.compressed
        if not result.compressed:
            continue
        assert _header(dst).file_meta.TransferSyntaxUID == UID(spec.syntax)
        assert np.array_equal(_pixels(dst), _pixels(src)), src.name
        assert result.sop_instance_uid == _header(src).SOPInstanceUID
        _assert_attributes_kept(src, dst, SYNTAX_DICTATES)
    assert eligible >= 20
    assert compressed >= 0.95 * eligible, f"{compressed} of {eligible} eligible files compressed"


@pytest.mark.parametrize("options", LOSSY, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_bundled_files_lossy(options: dict[str, Any], tmp_path: Path) -> None:
    """Lossy output: marked as PS3.3 C.7.6.1.1.5 says, new UID referencing the original, PSNR measured."""
    spec = CompressSpec(**options)
    method = syntaxes.BY_UID[UID(spec.syntax)].lossy_method
    done = 0
    for src in bundled_files():
        dst = tmp_path / src.name
        result = compress.transcode_file(src, dst, spec)
        if not result.compressed:
            assert result.reason and not dst.exists()
            continue
        done += 1
        before, after = _header(src), _header(dst)
        assert after.LossyImageCompression == "01"
        methods, ratios = _values(after, "LossyImageCompressionMethod"), _values(after, "LossyImageCompressionRatio")
        earlier_methods, earlier_ratios = (
            _values(before, k) for k in ("LossyImageCompressionMethod", "LossyImageCompressionRatio")
        )
        # appended, pairwise (C.7.6.1.1.5): a file giving a method without a ratio gets an empty ratio for it
        assert len(methods) == len(ratios) == max(len(earlier_methods), len(earlier_ratios)) + 1
        assert methods[: len(earlier_methods)] == earlier_methods and methods[-1] == method
        assert ratios[: len(earlier_ratios)] == earlier_ratios
        assert float(ratios[-1]) == pytest.approx(_pixel_ratio(dst), rel=0.02)
        assert after.SOPInstanceUID != before.SOPInstanceUID
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID == result.sop_instance_uid
        assert after.SourceImageSequence[-1].ReferencedSOPInstanceUID == before.SOPInstanceUID
        if "ImageType" in before:
            assert after.ImageType[0] == "DERIVED"
        assert result.psnr is not None and result.psnr > 20
        assert after.PhotometricInterpretation != "YBR_FULL_422"
        assert _pixels(dst).shape == _pixels(src).shape
        _assert_attributes_kept(src, dst, SYNTAX_DICTATES | LOSSY_ADDS)
    assert done >= 10


def test_lossy_can_keep_the_uid(tmp_path: Path) -> None:
    src = write_image(tmp_path / "in.dcm", _smooth((1, 64, 64), np.uint16, 12), 12)
    spec = CompressSpec(syntax="JPEG2000", j2k_psnr=[40], keep_sop_instance_uid=True)
    result = compress.transcode_file(src, tmp_path / "out.dcm", spec)
    assert result.compressed, result.reason
    out = _header(tmp_path / "out.dcm")
    assert out.SOPInstanceUID == _header(src).SOPInstanceUID == result.sop_instance_uid
    assert out.LossyImageCompression == "01" and "SourceImageSequence" not in out


def test_lossy_uid_is_the_same_when_an_instance_is_encoded_again(tmp_path: Path) -> None:
    """Processing is repeated after a crash or a failed commit: the archive must get the same lossy image under the
    same UID (a duplicate), not a second image; other settings make another image, so another UID."""
    src = write_image(tmp_path / "in.dcm", _smooth((1, 64, 64), np.uint16, 12), 12)
    uids = [
        compress.transcode_file(src, tmp_path / f"out{n}.dcm", CompressSpec(**options)).sop_instance_uid
        for n, options in enumerate(
            [
                {"syntax": "JPEG2000", "j2k_psnr": [40]},
                {"syntax": "JPEG2000", "j2k_psnr": [40]},
                {"syntax": "JPEG2000", "j2k_psnr": [50]},
                {"syntax": "JPEGLSNearLossless", "jls_error": 2},
            ]
        )
    ]
    assert uids[0] == uids[1] == _header(tmp_path / "out1.dcm").SOPInstanceUID
    assert len({_header(src).SOPInstanceUID, *uids}) == 4


def _smooth(shape: tuple[int, ...], dtype: type, bits: int, seed: int = 0) -> np.ndarray:
    """A compressible image: a gradient with a little noise, within Bits Stored."""
    rng = np.random.default_rng(seed)
    ramp = np.indices(shape).sum(axis=0) % (1 << (bits - 2))
    return (ramp + rng.integers(0, 4, shape)).astype(dtype)


@st.composite
def images(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """(frames, Bits Stored): signed or unsigned, 2..16 bits, 1 or 3 samples, 1..3 frames, odd and tiny sizes."""
    bits = draw(st.integers(2, 16))
    signed = draw(st.booleans())
    samples = draw(st.sampled_from([1, 3]))
    if samples == 3:
        signed = False  # PS3.5 8.2: colour is unsigned in every profile
    dtype = np.dtype(("i" if signed else "u") + ("1" if bits <= 8 else "2"))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 33)), draw(st.integers(1, 33)))
    if samples == 3:
        shape = (*shape, 3)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(low, high, shape, endpoint=True).astype(dtype), bits


@pytest.mark.parametrize("target", LOSSLESS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=images())
def test_random_arrays_round_trip(target: str, image: tuple[np.ndarray, int], tmp_path: Path) -> None:
    """Lossless means bit-exact, or the source is forwarded: never a silently changed pixel."""
    frames, bits = image
    src = write_image(tmp_path / "in.dcm", frames, bits)
    dst = tmp_path / "out.dcm"
    result = compress.transcode_file(src, dst, CompressSpec(syntax=target, force=True))
    syntax = UID(CompressSpec(syntax=target).syntax)
    info = codecs.FrameInfo(
        frames.shape[1],
        frames.shape[2],
        3 if frames.ndim == 4 else 1,
        frames.dtype.itemsize * 8,
        bits,
        int(frames.dtype.kind == "i"),
        codecs.encoded_photometric(
            UID(CompressSpec(syntax=target).syntax), "RGB" if frames.ndim == 4 else "MONOCHROME2"
        ),
    )
    if codecs.get(syntax).check(info) is not None:
        assert not result.compressed  # the profile excludes it: forwarded unchanged, with the reason
        return
    assert result.compressed, result.reason
    decoded = pixel_array(dst, raw=True)
    assert np.array_equal(decoded.reshape(frames.shape), frames)


def test_frames_of_one_instance_are_encoded_by_one_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyjpegls encodes the first frame, fails on the second (samples outside Bits Stored overflow the buffer it
    gives CharLS): every frame must then come from the next plugin, or pydicom misreads the first frame's signs."""
    without_charls(monkeypatch)  # it encodes both frames: pyjpegls must come first here
    rows = [
        [1, 0, 0, -1, -1, -2, -2, -2, -2, 1, 0, 1, 0, 0, 1, 0, 0],
        [0, 0, 1, -1, 1, 0, -2, -1, 1, 0, -2, 1, 0, 1, -2, -2, 1],
    ]
    frames = np.array(rows, np.int8).reshape(2, 17, 1)
    src = write_image(tmp_path / "in.dcm", frames, 2)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSLossless", force=True))
    assert result.compressed, result.reason
    assert np.array_equal(pixel_array(tmp_path / "out.dcm", raw=True), frames)
    fragments = pydicom.encaps.generate_frames(pydicom.dcmread(tmp_path / "out.dcm").PixelData, number_of_frames=2)
    precisions = {fragment[fragment.find(b"\xff\xf7") + 4] for fragment in fragments}  # SOF55: Lf, then P
    assert len(precisions) == 1


@pytest.mark.parametrize("target", ["JPEGLSLossless", "HTJ2KLossless"])
def test_copied_header_is_what_pydicom_would_write(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the data set is copied from the source byte for byte, the output is the file pydicom would write."""
    spans: list[object] = []
    unchanged_body = compress._unchanged_body

    def recorded(*args: Any) -> object:
        spans.append(unchanged_body(*args))
        return spans[-1]

    copied = 0
    for src in bundled_files():
        spans.clear()
        monkeypatch.setattr(compress, "_unchanged_body", recorded)
        copy = compress.transcode_file(src, tmp_path / "copy.dcm", CompressSpec(syntax=target, force=True))
        monkeypatch.setattr(compress, "_unchanged_body", lambda *_: None)
        written = compress.transcode_file(src, tmp_path / "written.dcm", CompressSpec(syntax=target, force=True))
        assert copy.compressed == written.compressed, src.name
        if copy.compressed:
            copied += any(span is not None for span in spans)
            assert (tmp_path / "copy.dcm").read_bytes() == (tmp_path / "written.dcm").read_bytes(), src.name
    assert copied >= 5  # not vacuous: the explicit VR little endian grayscale files are copied


@pytest.mark.parametrize("target", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "HTJ2KLossless"])
def test_big_endian_source_is_not_byte_swapped(target: str, tmp_path: Path) -> None:
    frames = _smooth((2, 31, 17), np.int16, 12) - 1000
    src = write_image(tmp_path / "be.dcm", frames, 12, syntax=ExplicitVRBigEndian)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=target, force=True))
    assert result.compressed, result.reason
    assert np.array_equal(pixel_array(tmp_path / "out.dcm"), frames)


def test_ybr_full_422_uncompressed_source(tmp_path: Path) -> None:
    src = next(p for p in bundled_files() if p.name == "SC_ybr_full_422_uncompressed.dcm")
    spec = CompressSpec(syntax="JPEGLSLossless", allow_lossy_to_lossless=True)
    result = compress.transcode_file(src, tmp_path / "out.dcm", spec)
    assert result.compressed, result.reason
    out = _header(tmp_path / "out.dcm")
    assert out.PhotometricInterpretation == "YBR_FULL" and out.PlanarConfiguration == 0
    assert np.array_equal(_pixels(tmp_path / "out.dcm"), _pixels(src))


def _planar_image(path: Path, frames: np.ndarray) -> Path:
    """An 8-bit RGB file holding `frames` (frames, rows, columns, 3) with Planar Configuration 1."""
    ds = pydicom.dcmread(write_image(path, frames, 8))
    ds.PlanarConfiguration = 1
    ds.PixelData = np.ascontiguousarray(frames.transpose(0, 3, 1, 2)).tobytes()
    ds.save_as(path)
    return path


def _native_bundled_files() -> list[Path]:
    files = []
    for path in bundled_files():
        try:
            header = compress._read_header(path)
        except Exception:
            continue
        if "PixelData" in header and not header.file_meta.TransferSyntaxUID.is_compressed:
            files.append(path)
    return files


def test_native_frames_are_read_as_pydicom_decodes_them(tmp_path: Path) -> None:
    """Frames read straight from native Pixel Data equal pydicom's raw decode: dtype, shape and every value."""
    planar = _planar_image(tmp_path / "planar.dcm", _smooth((2, 21, 13, 3), np.uint8, 8))
    signed = write_image(tmp_path / "signed.dcm", _smooth((3, 9, 7), np.int16, 12) - 3000, 12)  # outside 12 bits
    read_directly = refused = 0
    for path in [*_native_bundled_files(), planar, signed]:
        header = compress._read_header(path)
        try:
            direct = compress._native_frames(path, header)
            if direct is None:  # big endian, deflated, subsampled, 1-bit: pydicom decodes those
                continue
            got = list(direct)
        except (CompressionError, ValueError):  # e.g. MR_truncated.dcm: pydicom must refuse it too
            with pytest.raises(Exception):  # noqa: B017 - pydicom raises several types
                list(pydicom.pixels.iter_pixels(path, raw=True, correct_unused_bits=False))
            refused += 1
            continue
        read_directly += 1
        expected = list(pydicom.pixels.iter_pixels(path, raw=True, correct_unused_bits=False))
        assert len(got) == len(expected), path.name
        for ours, theirs in zip(got, expected, strict=True):
            assert ours.dtype == theirs.dtype.newbyteorder("=") and ours.shape == theirs.shape, path.name
            assert np.array_equal(ours, theirs), path.name
    assert read_directly >= 12 and refused >= 2  # not vacuous: most bundled native files take this path


def test_native_pixel_data_shorter_than_its_frames(tmp_path: Path) -> None:
    src = write_image(tmp_path / "short.dcm", _smooth((4, 16, 16), np.uint16, 12), 12)
    ds = pydicom.dcmread(src)
    ds.PixelData = ds.PixelData[: 3 * 16 * 16 * 2]  # three frames where Number of Frames says four
    ds.save_as(src)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSLossless", force=True))
    assert not result.compressed and not (tmp_path / "out.dcm").exists()


@pytest.mark.parametrize("frames", [None, "0", 2], ids=["absent", "zero", "two"])
@pytest.mark.parametrize("target", ["JPEGLSLossless", "RLELossless", "ExplicitVRLittleEndian"])
def test_pixel_data_holding_more_frames_than_number_of_frames_passes_through(
    frames: str | int | None, target: str, tmp_path: Path
) -> None:
    """Three frames of data under a Number of Frames saying one, none or two: encoding what it says would drop
    frames without a word. The instance goes on unchanged."""
    src = write_image(tmp_path / "in.dcm", _smooth((3, 16, 16), np.uint16, 12), 12)
    ds = pydicom.dcmread(src)
    if frames is None:
        del ds.NumberOfFrames
    else:
        ds.NumberOfFrames = frames
    if target == "ExplicitVRLittleEndian":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(src)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=target, force=True))
    assert not result.compressed and not (tmp_path / "out.dcm").exists()
    assert "Pixel Data holds 1536 bytes" in result.reason or result.reason == "Number of Frames is 0"


@pytest.mark.parametrize("bits_stored", [8, 5])
def test_rle_of_16_bit_words_holding_8_bits_or_fewer_decodes(bits_stored: int, tmp_path: Path) -> None:
    """RLE codes every byte of a 16-bit word whatever Bits Stored says: with verification off, the output must still
    decode (pylibjpeg-rle refused such frames and pydicom's encoder then wrote half-length segments)."""
    frames = _smooth((2, 32, 32), np.uint16, bits_stored)
    src = write_image(tmp_path / "in.dcm", frames, bits_stored)
    spec = CompressSpec(syntax="RLELossless", verify=False, force=True)
    assert compress.transcode_file(src, tmp_path / "out.dcm", spec).compressed
    np.testing.assert_array_equal(_pixels(tmp_path / "out.dcm"), frames)


@pytest.mark.parametrize("target", ["ExplicitVRLittleEndian", "RLELossless"])
def test_an_icon_with_compressed_pixel_data_passes_through(target: str, tmp_path: Path) -> None:
    """An icon's encapsulated Pixel Data is in the source's syntax: copied under another, it breaks the file."""
    src = write_image(tmp_path / "in.dcm", _smooth((1, 32, 32), np.uint16, 12), 12)
    assert compress.transcode_file(src, tmp_path / "jls.dcm", CompressSpec(syntax="JPEGLSLossless")).compressed
    ds = pydicom.dcmread(tmp_path / "jls.dcm")
    icon = pydicom.Dataset()
    icon.Rows = icon.Columns = 4
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    icon.PixelData = pydicom.encaps.encapsulate([ds.PixelData[16:32]])
    icon["PixelData"].VR, icon["PixelData"].is_undefined_length = "OB", True
    ds.IconImageSequence = [icon]
    ds.save_as(tmp_path / "jls.dcm")
    spec = CompressSpec(syntax=target, force=True)
    result = compress.transcode_file(tmp_path / "jls.dcm", tmp_path / "out.dcm", spec)
    assert not result.compressed and result.reason == "Icon Image Sequence holds compressed pixel data of its own"


def test_an_offset_table_listing_more_frames_than_number_of_frames_passes_through(tmp_path: Path) -> None:
    src = write_image(tmp_path / "in.dcm", _smooth((3, 16, 16), np.uint16, 12), 12)
    assert compress.transcode_file(src, tmp_path / "rle.dcm", CompressSpec(syntax="RLELossless", force=True)).compressed
    ds = pydicom.dcmread(tmp_path / "rle.dcm")
    ds.NumberOfFrames = 2
    ds.save_as(tmp_path / "rle.dcm")
    result = compress.transcode_file(tmp_path / "rle.dcm", tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSLossless"))
    assert not result.compressed and "the offset table lists 3 frames" in result.reason


@pytest.mark.parametrize("target", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "HTJ2KLossless"])
def test_rgb_planar_configuration_1(target: str, tmp_path: Path) -> None:
    frames = _smooth((2, 21, 13, 3), np.uint8, 8)
    src = _planar_image(tmp_path / "in.dcm", frames)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=target, force=True))
    assert result.compressed, result.reason
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.PlanarConfiguration == 0
    assert out.PhotometricInterpretation == codecs.encoded_photometric(UID(out.file_meta.TransferSyntaxUID), "RGB")
    assert np.array_equal(pixel_array(tmp_path / "out.dcm"), frames)


def test_values_outside_bits_stored_are_caught_by_verification(tmp_path: Path) -> None:
    """JPEG 2000 lossless silently changes values Bits Stored cannot hold: verification must catch it."""
    frames = _smooth((1, 32, 32), np.int16, 12)
    frames[0, 5, 5] = 3000  # outside the signed 12-bit range [-2048, 2047]
    src = write_image(tmp_path / "in.dcm", frames, 12)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEG2000Lossless"))
    assert not result.compressed and result.verify_failed, result.reason
    assert "verification failed" in result.reason
    assert not (tmp_path / "out.dcm").exists()


def _padded_ct(signed: bool) -> np.ndarray:
    """One 16/12 frame whose background sits at the end of the range (signed padding -2048, or unsigned 4095
    metal), where a codec's error can leave the range Bits Stored allows."""
    rows, columns = np.indices((64, 64))
    body = (rows - 32) ** 2 + (columns - 32) ** 2 < 24**2
    texture = ((rows * 7 + columns * 3) % 41).astype(np.int32) * 20
    if signed:
        return np.where(body, texture - 400, -2048).astype(np.int16)[None]
    return np.where(body, texture + 1000, 4095).astype(np.uint16)[None]


@pytest.mark.parametrize(
    "options, signed",
    [({"syntax": "JPEGLSNearLossless", "jls_error": 2}, True), ({"syntax": "HTJ2K"}, False)],
    ids=["JPEG-LS near-lossless, signed padding", "HTJ2K, saturated unsigned"],
)
def test_lossy_output_never_leaves_bits_stored(options: dict[str, Any], signed: bool, tmp_path: Path) -> None:
    """Decoded as Bits Stored says (its low bits), an overshoot turns -2050 into +2046 and 4118 into 22 while the
    PSNR looks fine: such output is refused, and with no plugin left the original is forwarded."""
    src = write_image(tmp_path / "in.dcm", _padded_ct(signed), 12)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(**options))
    assert not result.compressed, f"compressed at PSNR {result.psnr}"
    assert "outside the range Bits Stored 12 allows" in result.reason
    assert not (tmp_path / "out.dcm").exists()


def test_lossy_output_inside_bits_stored_is_kept(tmp_path: Path) -> None:
    """The same images away from the ends of the range compress as before."""
    frames = np.clip(_padded_ct(signed=True), -2000, 2000).astype(np.int16)
    src = write_image(tmp_path / "in.dcm", frames, 12)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSNearLossless", jls_error=2))
    assert result.compressed, result.reason
    decoded = _pixels(tmp_path / "out.dcm").astype(np.int64)
    assert decoded.min() >= -2048 and np.abs(decoded - frames[0]).max() <= 2


def test_near_lossless_never_swaps_the_ends_of_a_full_signed_range(tmp_path: Path) -> None:
    """Signed 16 of 16 bits, a few samples at -32768 and 32767: a codec that wraps their error around turns
    padding white and metal black while the PSNR stays high. No sample may be off by more than jls_error."""
    rows, columns = np.indices((128, 128))
    frame = (((rows * 7 + columns * 3) % 41) * 20 - 400).astype(np.int16)
    frame[10:14, 10:14], frame[100:103, 100:103] = -32768, 32767
    src = write_image(tmp_path / "in.dcm", frame[None], 16)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSNearLossless", jls_error=2))
    if result.compressed:
        assert np.abs(_pixels(tmp_path / "out.dcm").astype(np.int64) - frame).max() <= 2
    else:
        assert "more than jls_error 2" in result.reason, result.reason


def _lossy_source(tmp_path: Path, flag: str | None, syntax: str = "JPEGLSNearLossless") -> Path:
    """A bundled lossy file, its Lossy Image Compression set to `flag` (None: absent, as pydicom ships it)."""
    name = {"JPEGLSNearLossless": "JPEGLSNearLossless_08.dcm", "JPEGBaseline8Bit": "SC_rgb_jpeg_dcmtk.dcm"}[syntax]
    ds = pydicom.dcmread(next(p for p in bundled_files() if p.name == name))
    assert ds.file_meta.TransferSyntaxUID.keyword == syntax
    for keyword in ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in ds:
            delattr(ds, keyword)
    if flag is not None:
        ds.LossyImageCompression = flag
    ds.save_as(tmp_path / "lossy.dcm")
    return tmp_path / "lossy.dcm"


@pytest.mark.parametrize(
    "spec",
    [
        CompressSpec(syntax="ExplicitVRLittleEndian"),
        CompressSpec(syntax="JPEGLSLossless", allow_lossy_to_lossless=True, force=True),
        CompressSpec(syntax="JPEG2000", j2k_psnr=[50], force=True),
    ],
    ids=lambda spec: UID(spec.syntax).keyword,
)
def test_a_lossy_source_stays_marked_lossy(spec: CompressSpec, tmp_path: Path) -> None:
    """pydicom's near-lossless JPEG-LS file does not say it is lossy: every output says so, with its step first
    (PS3.3 C.7.6.1.1.5), as DCMTK's and GDCM's decompressors write."""
    src = _lossy_source(tmp_path, None)
    assert compress.transcode_file(src, tmp_path / "out.dcm", spec).compressed
    out = _header(tmp_path / "out.dcm")
    assert out.LossyImageCompression == "01"
    methods = _values(out, "LossyImageCompressionMethod")
    assert methods[0] == "ISO_14495_1"
    assert len(methods) == len(_values(out, "LossyImageCompressionRatio")) == (2 if spec.syntax == JPEG2000 else 1)
    assert float(_values(out, "LossyImageCompressionRatio")[0]) > 1


def test_lossy_history_stays_pairwise_and_keeps_earlier_derivations(tmp_path: Path) -> None:
    """pydicom's lossy JPEG 2000 file gives a ratio and no method, as many do: the method missing is its syntax's,
    so that the new step's ratio and method stay a pair (PS3.3 C.7.6.1.1.5). Earlier derivation codes are kept."""
    ds = pydicom.dcmread(next(p for p in bundled_files() if p.name == "693_J2KI.dcm"))
    assert ds.LossyImageCompression == "01" and "LossyImageCompressionMethod" not in ds
    segmentation = pydicom.Dataset()
    segmentation.CodeValue, segmentation.CodingSchemeDesignator, segmentation.CodeMeaning = "113076", "DCM", "Seg"
    ds.DerivationCodeSequence = [segmentation]
    ds.save_as(tmp_path / "in.dcm")
    spec = CompressSpec(syntax="JPEGLSNearLossless", jls_error=2, force=True)  # larger than the lossy source
    assert compress.transcode_file(tmp_path / "in.dcm", tmp_path / "out.dcm", spec).compressed
    out = _header(tmp_path / "out.dcm")
    assert _values(out, "LossyImageCompressionMethod") == ["ISO_15444_1", "ISO_14495_1"]
    assert len(_values(out, "LossyImageCompressionRatio")) == 2
    assert [item.CodeValue for item in out.DerivationCodeSequence] == ["113076", "113040"]


def test_an_unknown_earlier_method_is_left_empty_not_misattributed(tmp_path: Path) -> None:
    """A native image marked lossy with a ratio and no method: the earlier step's method is unknown."""
    src = write_image(tmp_path / "in.dcm", _smooth((1, 32, 32), np.uint16, 12), 12)
    ds = pydicom.dcmread(src)
    ds.LossyImageCompression, ds.LossyImageCompressionRatio = "01", "10"
    ds.save_as(src)
    spec = CompressSpec(syntax="JPEG2000", j2k_psnr=[50], force=True)
    assert compress.transcode_file(src, tmp_path / "out.dcm", spec).compressed
    out = _header(tmp_path / "out.dcm")
    assert _values(out, "LossyImageCompressionMethod") == ["", "ISO_15444_1"]
    assert _values(out, "LossyImageCompressionRatio")[0] == 10


@pytest.mark.parametrize(
    "syntax, flag, expected",
    [("JPEGLSNearLossless", "00", "00"), ("JPEGBaseline8Bit", "00", "01"), ("JPEGBaseline8Bit", None, "01")],
)
def test_a_header_saying_lossless_is_believed_where_the_syntax_can_be(
    syntax: str, flag: str | None, expected: str, tmp_path: Path
) -> None:
    """Near-lossless JPEG-LS with NEAR 0 is lossless; JPEG baseline never is."""
    src = _lossy_source(tmp_path, flag, syntax)
    compress.decompress_file(src, tmp_path / "out.dcm")
    assert _header(tmp_path / "out.dcm").LossyImageCompression == expected


def test_verification_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(compress, "_decode", lambda *args: calls.append(args))
    src = write_image(tmp_path / "in.dcm", _smooth((1, 32, 32), np.uint16, 12), 12)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="RLELossless", verify=False))
    assert result.compressed and not calls


def test_lossy_source_is_not_made_lossless(tmp_path: Path) -> None:
    src = next(p for p in bundled_files() if p.name == "SC_rgb_jpeg_dcmtk.dcm")
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSLossless"))
    assert not result.compressed and "lossy" in result.reason
    allowed = CompressSpec(syntax="JPEGLSLossless", allow_lossy_to_lossless=True, force=True)
    assert compress.transcode_file(src, tmp_path / "out.dcm", allowed).compressed


@pytest.mark.parametrize("name, why", [("liver_1frame.dcm", "1-bit"), ("rtplan.dcm", "no pixel data")])
def test_what_no_codec_takes_passes_through(name: str, why: str, tmp_path: Path) -> None:
    src = next(p for p in bundled_files() if p.name == name)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEGLSLossless"))
    assert not result.compressed and why in result.reason


def _full_32_bits(shape: tuple[int, ...], signed: bool) -> np.ndarray:
    """A compressible image whose values need every one of 32 bits."""
    frames = _smooth(shape, np.int64, 24) << 8
    frames[0, 0, :2] = (-(1 << 31), (1 << 31) - 1) if signed else (0, (1 << 32) - 1)
    return frames.astype(np.int32 if signed else np.uint32)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("options", [{}, {"j2k_psnr": [60]}], ids=["lossless", "lossy"])
def test_jpeg2000_of_more_than_24_bits_stored_passes_through(
    signed: bool, options: dict[str, Any], tmp_path: Path
) -> None:
    """OpenJPEG keeps at most 24 bits of a sample exactly (pylibjpeg-openjpeg refuses more; imagecodecs' build
    decodes other values): such an image passes through unencoded, so without a failed verification."""
    src = write_image(tmp_path / "in.dcm", _full_32_bits((2, 16, 16), signed), 32)
    syntax = "JPEG2000" if options else "JPEG2000Lossless"
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=syntax, **options))
    assert not result.compressed and "24" in result.reason and "OpenJPEG" in result.reason
    assert not result.verify_failed


@pytest.mark.parametrize("syntax", ["HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K"])
def test_htj2k_of_32_bit_words_passes_through(syntax: str, tmp_path: Path) -> None:
    """OpenJPH codes the whole 32-bit word, which OpenJPEG (pydicom's and GDCM's decoder) cannot read."""
    src = next(p for p in bundled_files() if p.name == "rtdose.dcm")  # Bits Allocated 32, values within 16 bits
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=syntax))
    assert not result.compressed and "OpenJPEG" in result.reason
    assert not result.verify_failed


@pytest.mark.parametrize("signed", [False, True])
def test_jpeg2000_keeps_24_bits_stored_in_32_bit_words(signed: bool, tmp_path: Path) -> None:
    """The limit above is on Bits Stored: 24 of them in 32-bit words round-trip exactly."""
    frames = _smooth((2, 16, 16), np.int32 if signed else np.uint32, 24) << 2
    frames[0, 0, :2] = (-(1 << 23), (1 << 23) - 1) if signed else (0, (1 << 24) - 1)
    src = write_image(tmp_path / "in.dcm", frames, 24)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEG2000Lossless"))
    assert result.compressed, result.reason
    assert np.array_equal(pixel_array(tmp_path / "out.dcm"), frames)


def test_float_pixel_data_passes_through(tmp_path: Path) -> None:
    src = write_image(tmp_path / "in.dcm", _smooth((1, 8, 8), np.uint16, 12), 12)
    ds = pydicom.dcmread(src)
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated = 32
    ds.FloatPixelData = np.zeros((8, 8), np.float32).tobytes()
    ds.save_as(src)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="JPEG2000Lossless"))
    assert not result.compressed and "float" in result.reason


def test_larger_result_passes_through_unless_forced(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (1, 16, 16), endpoint=False).astype(np.uint8)
    src = write_image(tmp_path / "in.dcm", noise, 8)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="RLELossless"))
    assert not result.compressed and "not smaller" in result.reason
    forced = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="RLELossless", force=True))
    assert forced.compressed and forced.bytes_out >= forced.bytes_in


def test_a_broken_file_passes_through(tmp_path: Path) -> None:
    src = tmp_path / "junk.dcm"
    src.write_bytes(b"\0" * 200)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="RLELossless"))
    assert not result.compressed and result.reason


def test_extended_offset_table_when_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past 2^32 bytes the Basic Offset Table cannot point at frames: PS3.5 A.4, the table is extended."""
    frames = _smooth((3, 40, 30), np.uint16, 12)
    src = write_image(tmp_path / "in.dcm", frames, 12)
    result = compress.transcode_file(src, tmp_path / "basic.dcm", CompressSpec(syntax="JPEGLSLossless"))
    assert result.compressed
    assert "ExtendedOffsetTable" not in _header(tmp_path / "basic.dcm")
    monkeypatch.setattr(compress, "_BOT_LIMIT", 100)
    result = compress.transcode_file(src, tmp_path / "extended.dcm", CompressSpec(syntax="JPEGLSLossless"))
    assert result.compressed
    out = pydicom.dcmread(tmp_path / "extended.dcm")
    offsets = struct.unpack("<3Q", out.ExtendedOffsetTable)
    lengths = struct.unpack("<3Q", out.ExtendedOffsetTableLengths)
    assert offsets[0] == 0 and offsets[1] == lengths[0] + 8 and offsets[2] == offsets[1] + lengths[1] + 8
    assert np.array_equal(out.pixel_array, frames)


def test_native_targets_keep_the_uid(tmp_path: Path) -> None:
    src = next(p for p in bundled_files() if p.name == "MR_small_jpeg_ls_lossless.dcm")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        dst = tmp_path / f"{syntax.name}.dcm"
        compress.decompress_file(src, dst, syntax)
        out = pydicom.dcmread(dst)
        assert out.file_meta.TransferSyntaxUID == syntax
        assert out.SOPInstanceUID == _header(src).SOPInstanceUID
        assert np.array_equal(out.pixel_array, pixel_array(src))


def test_elements_after_pixel_data_are_kept(tmp_path: Path) -> None:
    src = write_image(tmp_path / "in.dcm", _smooth((1, 16, 16), np.uint16, 12), 12)
    ds = pydicom.dcmread(src)
    ds.DataSetTrailingPadding = b"\0" * 6
    ds.save_as(src)
    assert compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax="RLELossless")).compressed
    assert pydicom.dcmread(tmp_path / "out.dcm").DataSetTrailingPadding == b"\0" * 6


NAMES = {
    "latin-1 mislabelled as UTF-8": ("ISO_IR 192", b"M\xfcller^Hans"),
    "UTF-8": ("ISO_IR 192", "Müller^Hans".encode()),
    "ISO 2022 JIS": ("\\ISO 2022 IR 87", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B"),
}
TEXT_TARGETS: list[dict[str, Any]] = [
    {"syntax": "JPEGLSLossless"},
    {"syntax": "JPEGLSNearLossless", "jls_error": 2},
    {"syntax": "ExplicitVRLittleEndian"},
]


def _text_values(path: Path) -> list[bytes]:
    """Patient's Name, a sequence item's Patient ID and Image Comments, as raw bytes."""
    ds = pydicom.dcmread(path)
    item = ds.OtherPatientIDsSequence[0]
    return [ds.get_item("PatientName").value, item.get_item("PatientID").value, ds.get_item("ImageComments").value]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
@pytest.mark.parametrize("target", TEXT_TARGETS)
def test_text_values_are_written_as_received(target: dict[str, Any], source: UID, name: str, tmp_path: Path) -> None:
    """Where pydicom writes the header, text reaches the output byte for byte: bytes invalid in the declared
    character set are not replaced by U+FFFD, nor valid ISO 2022 re-encoded; in a sequence item too, and in a value
    longer than the reader's defer size."""
    charset, value = NAMES[name]
    src = write_image(tmp_path / "in.dcm", _smooth((1, 32, 32), np.uint8, 8), 8, syntax=source)
    ds = pydicom.dcmread(src)
    placeholder = "@" * len(value)  # same length: patched with the raw bytes below, as a modality would send them
    ds.SpecificCharacterSet = charset
    ds.PatientName = placeholder
    ds.OtherPatientIDsSequence = [pydicom.Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = placeholder
    ds.ImageComments = placeholder + "x" * 5000
    ds.save_as(src)
    src.write_bytes(src.read_bytes().replace(placeholder.encode(), value))
    received = _text_values(src)
    assert all(v.startswith(value) for v in received)
    spec = CompressSpec.model_validate({**target, "force": True})
    result = compress.transcode_file(src, tmp_path / "out.dcm", spec)
    assert result.compressed, result.reason
    assert _text_values(tmp_path / "out.dcm") == received


# A crash of the native codec: only the instance that crashes it falls back to its original.

CRASH_ROWS = 13


def _aborting_rle(frame: np.ndarray, info: codecs.FrameInfo, options: Any) -> bytes:
    if info.rows == CRASH_ROWS:
        os.abort()  # what GDCM's terminate() does: the whole process dies
    raise ValueError("declined: the next plugin encodes it")


def install_aborting_codec() -> None:
    """Worker initializer: an RLE codec that kills its process on images with CRASH_ROWS rows."""
    real = codecs.REGISTRY[RLELossless]
    codecs.register(
        codecs.Codec(RLELossless, real.profiles, plugins=[codecs.Plugin("abort", _aborting_rle), *real.plugins])
    )


def test_a_crashing_codec_takes_down_only_its_instance(tmp_path: Path) -> None:
    sources = [
        write_image(tmp_path / f"in{i}.dcm", _smooth((1, rows, 32), np.uint16, 12), 12)
        for i, rows in enumerate([CRASH_ROWS, 40, 41, 42])
    ]
    encoder = Encoder(2, initializer=install_aborting_codec)
    results: dict[int, compress.Result] = {}

    def run(i: int) -> None:
        results[i] = encoder.transcode(sources[i], tmp_path / f"out{i}.dcm", CompressSpec(syntax="RLELossless"))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sources))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        encoder.close()
    assert not results[0].compressed and "crashed" in results[0].reason
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("in"))
    assert left == ["out1.dcm", "out2.dcm", "out3.dcm"]  # nothing of the crashed one, no scratch file
    assert all(results[i].compressed for i in (1, 2, 3)), [results[i].reason for i in (1, 2, 3)]
    assert encoder.crashes == 1


# Memory stays flat in the instance size: frames are read, encoded and written one at a time.

_PEAK_RSS = """
import resource, sys
from pathlib import Path
from scp import compress
from scp.config import CompressSpec
result = compress.transcode_file(Path(sys.argv[1]), Path(sys.argv[2]), CompressSpec(syntax=sys.argv[3]))
assert result.compressed, result.reason
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["HTJ2KLossless", "ExplicitVRLittleEndian"])
def test_peak_memory_is_flat_in_the_instance_size(target: str, tmp_path: Path) -> None:
    """A 256 MiB multi-frame instance is transcoded in far less memory than its size."""
    frame = (np.indices((1024, 1024)).sum(axis=0) % 4096).astype("<u2")
    src = write_image(tmp_path / "big.dcm", frame[np.newaxis], 12, syntax=ImplicitVRLittleEndian)
    ds = pydicom.dcmread(src)
    ds.NumberOfFrames = 128
    ds.PixelData = b""
    ds.save_as(src, enforce_file_format=True)  # the header; 128 frames of pixel data are appended below
    raw = src.read_bytes()
    with src.open("wb") as out:
        out.write(raw[:-8])  # everything but the empty Pixel Data element (tag + length, implicit VR)
        out.write(struct.pack("<HHI", 0x7FE0, 0x0010, 128 * frame.nbytes))
        for index in range(128):
            out.write((frame + index).tobytes())
    assert src.stat().st_size > 256 * 2**20
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(src), str(tmp_path / "out.dcm"), target],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert run.returncode == 0, run.stderr
    peak_mib = int(run.stdout.split()[-1])
    assert peak_mib < 200, f"peak RSS {peak_mib} MiB for a 256 MiB instance"
    assert np.array_equal(pixel_array(tmp_path / "out.dcm", index=127), frame + 127)


@pytest.mark.parametrize(
    ("target", "plugin"), [("JPEGLSLossless", "pyjpegls"), ("HTJ2KLossless", "pylibjpeg"), ("RLELossless", "")]
)
def test_verification_decodes_with_the_codecs_verify_plugin(
    target: str, plugin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEG-LS is checked with CharLS (fast), HTJ2K with OpenJPEG (not the OpenJPH encoder); others: pydicom's."""
    assert codecs.get(getattr(pydicom.uid, target)).verify_plugin() == plugin
    used = []
    real = compress._decode

    def spy(decoder: object, encoded: bytes, info: codecs.FrameInfo, index: int, name: str = "") -> np.ndarray:
        used.append(name)
        return real(decoder, encoded, info, index, name)

    monkeypatch.setattr(compress, "_decode", spy)
    src = write_image(tmp_path / "in.dcm", _smooth((2, 32, 32), np.uint16, 12), 12)
    assert compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=target, force=True)).compressed
    assert used == [plugin, plugin]


@pytest.mark.parametrize("target", ["JPEGLSLossless", "HTJ2KLossless", "JPEG2000Lossless"])
def test_verification_catches_a_corrupted_codestream(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verifying decoder reads the bytes that are written: a flipped bit there never reaches the archive."""
    codec = codecs.get(getattr(pydicom.uid, target))

    def corrupting(encode: codecs.EncodeFunction) -> codecs.EncodeFunction:
        def corrupt(frame: np.ndarray, info: codecs.FrameInfo, options: Mapping[str, Any]) -> bytes:
            data = bytearray(encode(frame, info, options))
            data[len(data) * 2 // 3] ^= 0x10  # in the entropy-coded data, past the headers
            return bytes(data)

        return corrupt

    monkeypatch.setattr(codec, "plugins", [replace(p, encode=corrupting(p.encode)) for p in codec.plugins])
    frames = _smooth((1, 64, 64), np.uint16, 12)
    frames += np.arange(64, dtype=np.uint16)[None, :, None] * 7  # enough detail for a long codestream
    src = write_image(tmp_path / "in.dcm", frames, 12)
    result = compress.transcode_file(src, tmp_path / "out.dcm", CompressSpec(syntax=target, force=True))
    assert not result.compressed, result.reason
    assert "verification failed" in result.reason or "cannot be decoded" in result.reason
    assert not (tmp_path / "out.dcm").exists()


def test_frames_past_the_memory_limit_go_to_an_unnamed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small limit forces the encoded frames out of memory: the output is the same, and nothing is left over."""
    monkeypatch.setattr(compress, "FRAMES_IN_MEMORY", 1000)
    frames = _smooth((6, 64, 64), np.uint16, 12)
    src = write_image(tmp_path / "in.dcm", frames, 12)
    (tmp_path / "out").mkdir()
    result = compress.transcode_file(src, tmp_path / "out" / "out.dcm", CompressSpec(syntax="JPEGLSLossless"))
    assert result.compressed, result.reason
    assert np.array_equal(pixel_array(tmp_path / "out" / "out.dcm"), frames)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["out.dcm"]


def test_background_threads_and_encoder_processes_yield_to_receiving() -> None:
    """Linux: a processing or delivery thread runs at niceness 5 (the rest of the node is untouched); encoder
    processes at 10 whatever they inherit."""
    from scp import service, workers

    seen: dict[str, int] = {}

    def background() -> None:
        service._yield_to_receiving()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    base = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    if sys.platform.startswith("linux"):
        assert seen["thread"] == max(base, service.BACKGROUND_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    encoder = workers.Encoder(1)
    try:
        niceness = encoder._pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(60)
    finally:
        encoder.close()
    assert niceness == max(base, workers.WORKER_NICENESS)


def test_encoder_processes_outlive_a_sigterm_to_the_process_group() -> None:
    """SIGTERM to every process of the node (systemd's default KillMode, `kill -- -PGID`) leaves the encoders to
    finish the instance in hand: the node stops them itself."""
    encoder = Encoder(1)
    try:
        pid = encoder._pool.submit(os.getpid).result(60)
        os.kill(pid, signal.SIGTERM)
        assert encoder._pool.submit(os.getpid).result(60) == pid
    finally:
        encoder.close()


def _page_faults_of_frame_buffers() -> int:
    """Minor page faults while frame-sized buffers (1 MiB) are allocated, filled and freed, as frames are."""
    import resource

    def churn(times: int) -> None:
        for _ in range(times):
            buffers = [np.ones(1 << 20, np.uint8) for _ in range(4)]
            del buffers

    churn(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_encoder_processes_reuse_freed_frame_buffers() -> None:
    """An encoder process keeps freed frame buffers: 80 MiB allocated and freed again faults in no new pages
    (glibc's default maps and unmaps each buffer: ~20,000 faults, measured here in a process of its own)."""
    encoder = Encoder(1)
    try:
        in_encoder = encoder._pool.submit(_page_faults_of_frame_buffers).result(60)
    finally:
        encoder.close()
    with_defaults = subprocess.run(
        [sys.executable, "-c", "from tests.test_compress import _page_faults_of_frame_buffers as f; print(f())"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert int(with_defaults.stdout) > 10_000
    assert in_encoder < 100
