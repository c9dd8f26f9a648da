"""The encoder registry: availability, profiles, colour, fallbacks for tiny images, HTJ2K codestreams."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from scp import codecs
from scp.errors import CompressionError

TARGETS = list(codecs.REGISTRY)


def _info(frame: np.ndarray, bits: int, photometric: str) -> codecs.FrameInfo:
    return codecs.FrameInfo(
        rows=frame.shape[0],
        columns=frame.shape[1],
        samples_per_pixel=3 if frame.ndim == 3 else 1,
        bits_allocated=frame.dtype.itemsize * 8,
        bits_stored=bits,
        pixel_representation=int(frame.dtype.kind == "i"),
        photometric_interpretation=photometric,
    )


def without_charls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JPEG-LS codecs without their first plugin (scp/charls.py), as where imagecodecs has no shared CharLS."""
    for syntax in (JPEGLSLossless, JPEGLSNearLossless):
        codec = codecs.get(syntax)
        monkeypatch.setattr(codec, "plugins", [p for p in codec.plugins if p.encode is not codecs._charls_jpegls])


def _decode(syntax: UID, encoded: bytes, info: codecs.FrameInfo) -> np.ndarray:
    decoded, _ = get_decoder(syntax).as_array(pydicom.encaps.encapsulate([encoded]), **info.pixel_keywords())
    return decoded


@pytest.mark.parametrize("syntax", TARGETS, ids=lambda uid: uid.keyword)
def test_every_target_is_available_here(syntax: UID) -> None:
    assert codecs.get(syntax).available, codecs.get(syntax).unavailable_reason()


def test_unavailable_codec_names_what_is_missing() -> None:
    missing = codecs.Plugin("example", lambda *_: b"", ("no_such_module_xyz",))
    codec = codecs.Codec(RLELossless, [], plugins=[missing])
    assert not codec.available
    assert "no_such_module_xyz" in codec.unavailable_reason()
    with pytest.raises(CompressionError, match="no_such_module_xyz"):
        codec.encode(np.zeros((2, 2), np.uint8), _info(np.zeros((2, 2), np.uint8), 8, "MONOCHROME2"), {})


def test_unknown_target_is_refused() -> None:
    with pytest.raises(CompressionError, match="no encoder"):
        codecs.get(pydicom.uid.JPEGBaseline8Bit)


def test_every_failure_is_named() -> None:
    def fails(*_: object) -> bytes:
        raise RuntimeError("boom")

    codec = codecs.Codec(RLELossless, [], plugins=[codecs.Plugin("first", fails), codecs.Plugin("second", fails)])
    with pytest.raises(CompressionError, match=r"first: RuntimeError: boom \| second: RuntimeError: boom"):
        codec.encode(np.zeros((2, 2), np.uint8), _info(np.zeros((2, 2), np.uint8), 8, "MONOCHROME2"), {})


@pytest.mark.parametrize(
    "syntax, photometric, dtype, bits, allowed",
    [
        (JPEG2000, "PALETTE COLOR", np.uint8, 8, False),  # PS3.5 8.2.4: lossy J2K has no palette
        (JPEG2000Lossless, "PALETTE COLOR", np.uint8, 8, True),
        (JPEGLSLossless, "YBR_FULL", np.uint16, 16, False),  # PS3.5 8.2.3: YBR_FULL only 8-bit
        (RLELossless, "MONOCHROME2", np.uint32, 32, False),
        (HTJ2KLossless, "YBR_RCT", np.uint16, 16, True),
        (HTJ2K, "YBR_ICT", np.uint8, 8, True),
    ],
)
def test_profiles(syntax: UID, photometric: str, dtype: type, bits: int, allowed: bool) -> None:
    shape = (4, 4, 3) if photometric.startswith(("YBR", "RGB")) else (4, 4)
    problem = codecs.get(syntax).check(_info(np.zeros(shape, dtype), bits, photometric))
    assert (problem is None) == allowed, problem


@pytest.mark.parametrize(
    "syntax, source, expected",
    [
        (JPEG2000Lossless, "RGB", "YBR_RCT"),
        (HTJ2KLosslessRPCL, "RGB", "YBR_RCT"),
        (JPEG2000, "RGB", "YBR_ICT"),
        (HTJ2K, "RGB", "YBR_ICT"),
        (JPEG2000Lossless, "YBR_FULL", "YBR_FULL"),
        (JPEGLSLossless, "RGB", "RGB"),
        (RLELossless, "YBR_FULL", "YBR_FULL"),
        (RLELossless, "MONOCHROME1", "MONOCHROME1"),
    ],
)
def test_encoded_photometric(syntax: UID, source: str, expected: str) -> None:
    assert codecs.encoded_photometric(syntax, source) == expected


@pytest.mark.parametrize(
    "syntax, frame, bits",
    [
        (JPEGLSLossless, np.array([[-5, 3], [100, -2048]], np.int16), 12),  # pyjpegls: "buffer too small"
        (JPEG2000Lossless, np.arange(63, dtype=np.uint16).reshape(9, 7) * 60, 12),  # openjpeg: too few pixels
        (JPEG2000Lossless, np.arange(6, dtype=np.int16).reshape(3, 2) - 3, 4),
    ],
)
def test_tiny_images_fall_back_to_another_plugin(
    syntax: UID, frame: np.ndarray, bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_charls(monkeypatch)  # it takes the tiny JPEG-LS image (tests/test_charls.py): pyjpegls comes first
    info = _info(frame, bits, "MONOCHROME2")
    encoded = codecs.get(syntax).encode(frame, info, {})
    assert np.array_equal(_decode(syntax, encoded, info), frame)


def _marker(codestream: bytes, code: bytes) -> int:
    """Offset of a main-header marker segment, or -1 (ISO 15444-1 A.4)."""
    offset = 2  # after SOC
    while offset + 4 <= len(codestream) and codestream[offset] == 0xFF:
        if codestream[offset : offset + 2] == code:
            return offset
        if codestream[offset + 1] == 0x90:  # SOT: end of the main header
            return -1
        offset += 2 + int.from_bytes(codestream[offset + 2 : offset + 4], "big")
    return -1


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL])
def test_htj2k_codestreams(syntax: UID) -> None:
    frame = (np.indices((40, 30, 3)).sum(axis=0) * 5 % 256).astype(np.uint8)
    info = _info(frame, 8, codecs.encoded_photometric(syntax, "RGB"))
    encoded = codecs.get(syntax).encode(frame, info, {})
    assert encoded[:2] == b"\xff\x4f"
    assert _marker(encoded, b"\xff\x50") > 0  # CAP: the HT block coder (ISO 15444-15)
    cod = _marker(encoded, b"\xff\x52")
    assert encoded[cod + 5] == 2  # progression order RPCL
    assert encoded[cod + 8] == 1  # the reversible colour transform, as YBR_RCT says
    if syntax == HTJ2KLosslessRPCL:
        assert _marker(encoded, b"\xff\x55") > 0  # TLM
    assert np.array_equal(_decode(syntax, encoded, info), frame)


def test_htj2k_lossy_quantisation_step_is_relative_to_bits_stored() -> None:
    """htj2k_qstep means the same for 12-bit data in 16-bit words as for 16-bit data."""
    ramp = np.indices((64, 64)).sum(axis=0).astype(np.uint16)
    errors = []
    for bits, scale in ((12, 1), (16, 16)):
        frame = ramp * scale * 16
        info = _info(frame, bits, "MONOCHROME2")
        decoded = _decode(HTJ2K, codecs.get(HTJ2K).encode(frame, info, {"htj2k_qstep": 0.01}), info)
        errors.append(np.abs(decoded.astype(float) - frame).max() / (2**bits))
    assert 0 < errors[0] < 0.02 and errors[0] == pytest.approx(errors[1], rel=0.5)
