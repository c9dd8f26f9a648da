"""The compression core: a Part 10 file in, a re-encoded Part 10 file out, or a reason to pass it through.

Transcoding is a match on (source encapsulated?, target encapsulated?) (STYLE rule 3): encapsulated sources
are decoded first; native targets only rewrite the encoding. Lossless output keeps the SOP Instance UID
(PS3.2 N.5.2.5.1.1) and is decoded and compared with the source before it is accepted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, UID, ExplicitVRLittleEndian, JPEG2000Lossless

from scp import syntaxes
from scp.config import CompressSpec
from scp.errors import CompressionError

LOGGER = logging.getLogger(__name__)

_FLOAT_PIXELS = ("FloatPixelData", "DoubleFloatPixelData")
_JPEG2000_FAMILY = (JPEG2000, JPEG2000Lossless)


@dataclass(frozen=True)
class Result:
    """What happened to one instance. `compressed` False means: forward the source unchanged."""

    compressed: bool
    reason: str
    transfer_syntax: str
    bytes_in: int
    bytes_out: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 1.0


def transcode_file(src: Path, dst: Path, spec: CompressSpec) -> Result:
    """Re-encode `src` as `spec` says and write it to `dst`; never raises for a bad image.

    When the result says `compressed=False`, nothing was written and the reason says why.
    """
    start = time.perf_counter()
    size_in = src.stat().st_size
    try:
        ds = pydicom.dcmread(src)
        source_syntax = str(ds.file_meta.TransferSyntaxUID)
        reason = _reason_to_pass(ds, spec)
        if reason is None:
            assert spec.syntax is not None
            out = transcode(ds, spec)
            out.save_as(dst, enforce_file_format=True)
            size_out = dst.stat().st_size
            if size_out >= size_in and syntaxes.is_lossless(spec.syntax) and spec.syntax.is_compressed:
                dst.unlink()
                reason = f"the encoded result ({size_out} bytes) is not smaller than the source ({size_in})"
    except Exception as exc:  # a bad image must never stop the node: it is forwarded unchanged
        dst.unlink(missing_ok=True)
        reason = f"{type(exc).__name__}: {exc}"
        source_syntax = ""
    seconds = time.perf_counter() - start
    if reason is not None:
        return Result(False, reason, source_syntax, size_in, size_in, seconds)
    assert spec.syntax is not None
    return Result(True, "compressed", str(spec.syntax), size_in, dst.stat().st_size, seconds)


def _reason_to_pass(ds: Dataset, spec: CompressSpec) -> str | None:
    """Why this instance should be forwarded unchanged, or None if it should be re-encoded."""
    source = UID(ds.file_meta.TransferSyntaxUID)
    if spec.syntax is None:
        return "the rule keeps the original encoding"
    if "PixelData" not in ds:
        if any(keyword in ds for keyword in _FLOAT_PIXELS):
            return "float pixel data cannot be compressed by any codec in DICOM"
        return "no pixel data"
    if source == spec.syntax:
        return f"already encoded as {spec.syntax.name}"
    if not syntaxes.is_lossless(source) and syntaxes.is_lossless(spec.syntax):
        return f"the source is lossy ({source.name}); a lossless re-encode would only grow it"
    if ds.BitsAllocated == 1:
        return "1-bit pixel data is not compressed"
    return None


def transcode(ds: Dataset, spec: CompressSpec) -> Dataset:
    """Return `ds` re-encoded as `spec.syntax`; raises CompressionError when the codec fails or lies."""
    assert spec.syntax is not None
    target = spec.syntax
    arr = ds.pixel_array
    _normalise_native(ds)
    if not target.is_compressed:
        ds.decompress(generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = target
        return ds
    try:
        ds.compress(target, arr, generate_instance_uid=False, **_codec_options(ds, spec))
    except Exception as exc:
        raise CompressionError(f"{target.name} encoder failed: {exc}") from exc
    if spec.verify and syntaxes.is_lossless(target):
        _verify(ds, arr)
    return ds


def _normalise_native(ds: Dataset) -> None:
    """Little endian, interleaved: what the encoders expect, whatever the source was."""
    if "PlanarConfiguration" in ds:
        ds.PlanarConfiguration = 0


def _codec_options(ds: Dataset, spec: CompressSpec) -> dict[str, Any]:
    options = spec.encoder_options()
    if spec.syntax in _JPEG2000_FAMILY and ds.SamplesPerPixel == 3:
        options["use_mct"] = False  # keeps Photometric Interpretation RGB, which every J2K syntax allows
    return options


def _verify(ds: Dataset, expected: np.ndarray) -> None:
    """Decode what was just encoded and compare it with the source pixels (lossless only)."""
    decoded = pydicom.pixels.pixel_array(ds)
    if decoded.shape != expected.shape or not np.array_equal(decoded, expected):
        raise CompressionError(
            f"lossless verification failed for {ds.file_meta.TransferSyntaxUID.name}: "
            "decoded pixels differ from the source"
        )


def decompress_file(src: Path, dst: Path, syntax: UID = ExplicitVRLittleEndian) -> None:
    """Write `src` with native (uncompressed) pixel data in `syntax`, keeping the SOP Instance UID."""
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(dst, enforce_file_format=True)
