"""JPEG-LS through CharLS's C API in imagecodecs' build: pydicom's codestream, Bits Stored declared, exact."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_decoder, get_encoder
from pydicom.uid import UID, JPEGLSLossless, JPEGLSNearLossless

from benchmarks.codecs import declared_precision
from scp import charls, codecs
from tests.test_codecs import _info


def _smooth(shape: tuple[int, ...], dtype: str, low: int, high: int) -> np.ndarray:
    """A gradient with texture spanning [low, high]: compressible, and reaching both ends of the range."""
    grid = np.indices(shape[:2]).sum(axis=0).astype(np.float64)
    texture = (np.indices(shape[:2])[0] * 7 % 5) * (high - low) / 50
    values = low + (grid / grid.max()) * (high - low) * 0.9 + texture
    values = np.clip(np.round(values), low, high)
    if len(shape) == 3:
        values = np.stack([values, values[::-1], values[:, ::-1]], axis=-1)
    frame = values.astype(dtype)
    frame.flat[0], frame.flat[-1] = low, high
    return frame


def _keywords(frame: np.ndarray, bits_stored: int) -> dict[str, object]:
    return _info(frame, bits_stored, "RGB" if frame.ndim == 3 else "MONOCHROME2").pixel_keywords()


FRAMES = [
    pytest.param(_smooth((64, 48), "<u2", 0, 4095), 12, 0, id="unsigned 12 of 16"),
    pytest.param(_smooth((64, 48), "<u2", 0, 65535), 16, 0, id="unsigned 16"),
    pytest.param(_smooth((64, 48), "<i2", -2048, 2047), 12, 0, id="signed 12 of 16, negative samples"),
    pytest.param(_smooth((64, 48), "<i2", -32768, 32767), 16, 0, id="signed 16"),
    pytest.param(_smooth((64, 48), "u1", 0, 255), 8, 0, id="unsigned 8"),
    pytest.param(_smooth((40, 30, 3), "u1", 0, 255), 8, 0, id="RGB 8"),
    pytest.param(_smooth((64, 48), "<u2", 0, 4095), 12, 3, id="near-lossless 3, unsigned 12"),
]


@pytest.mark.parametrize("frame, bits_stored, near", FRAMES)
def test_writes_pydicoms_codestream_declaring_bits_stored(frame: np.ndarray, bits_stored: int, near: int) -> None:
    syntax = JPEGLSNearLossless if near else JPEGLSLossless
    options = {"jls_error": near} if near else {}
    reference = get_encoder(syntax).encode(
        frame, encoding_plugin="pyjpegls", **_keywords(frame, bits_stored), **options
    )
    encoded = charls.encode(frame, bits_stored, near)
    assert encoded == reference
    assert declared_precision(encoded) == bits_stored
    decoded, _ = get_decoder(syntax).as_array(pydicom.encaps.encapsulate([encoded]), **_keywords(frame, bits_stored))
    error = np.abs(decoded.astype(np.int64) - frame.astype(np.int64)).max()
    assert error <= near and (near or np.array_equal(decoded, frame))


@pytest.mark.parametrize(
    "frame, bits_stored",
    [
        pytest.param(_smooth((64, 48), "<u2", 0, 255), 8, id="unsigned 8 of 16"),
        pytest.param(_smooth((64, 48), "<i2", -32, 31), 6, id="signed 6 of 16"),
        pytest.param(_smooth((40, 30, 3), "<u2", 0, 255), 8, id="RGB 8 of 16"),
    ],
)
def test_at_most_8_bits_in_16_bit_words_declare_9(frame: np.ndarray, bits_stored: int) -> None:
    """pyjpegls declares Bits Stored here, and decoders other than pydicom's then make 8-bit samples (DCMTK refuses
    the frame, GDCM aborts; tests/test_compress_peers.py): 9 bits keeps the samples 16-bit, exactly."""
    encoded = charls.encode(frame, bits_stored)
    assert declared_precision(encoded) == 9
    keywords = _keywords(frame, bits_stored)
    decoded, _ = get_decoder(JPEGLSLossless).as_array(pydicom.encaps.encapsulate([encoded]), **keywords)
    assert np.array_equal(decoded, frame)


@pytest.mark.parametrize(
    "frame, bits_stored",
    [
        (np.array([[0, 4096], [1, 2]], np.uint16), 12),
        (np.array([[0, -2049], [1, 2]], np.int16), 12),
        (np.array([[0, 2048], [1, 2]], np.int16), 12),
    ],
)
def test_samples_outside_bits_stored_are_refused(frame: np.ndarray, bits_stored: int) -> None:
    """As pydicom's encoder refuses them: the codec then tries its next plugin."""
    with pytest.raises(ValueError, match="outside the range of Bits Stored"):
        charls.encode(frame, bits_stored)


def test_tiny_images_pyjpegls_rejects_are_encoded() -> None:
    frame = np.array([[-5, 3], [100, -2048]], np.int16)
    with pytest.raises(Exception, match="buffer"):
        get_encoder(JPEGLSLossless).encode(frame, encoding_plugin="pyjpegls", **_keywords(frame, 12))
    encoded = charls.encode(frame, 12)
    assert declared_precision(encoded) == 12
    decoded, _ = get_decoder(JPEGLSLossless).as_array(pydicom.encaps.encapsulate([encoded]), **_keywords(frame, 12))
    assert np.array_equal(decoded, frame)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEGLSNearLossless], ids=lambda uid: uid.keyword)
def test_the_jpegls_codecs_encode_with_it_first(syntax: UID) -> None:
    first = codecs.get(syntax).plugins[0]
    assert first.name == "CharLS via imagecodecs' library"
    assert not first.missing()
    frame = _smooth((32, 32), "<u2", 0, 1023)
    info = codecs.FrameInfo(32, 32, 1, 16, 10, 0, "MONOCHROME2")
    assert declared_precision(codecs.get(syntax).encode(frame, info, {})) == 10
