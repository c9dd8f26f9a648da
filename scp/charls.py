"""JPEG-LS encoding through CharLS's C API, in the copy of CharLS that imagecodecs has loaded.

imagecodecs' `jpegls_encode` takes no bit depth: it declares the container's 16 bits for 12-bit data, where
pydicom's encoder (pyjpegls) declares Bits Stored, as DICOM toolkits expect. pyjpegls is slower: a generated
512x512 12-bit slice took 5.0 ms in its `encode_buffer` against 3.7 ms in imagecodecs' build of CharLS, and
4.1 against 3.8 ms through the node's encoder plugins in a process that keeps freed buffers
(workers.keep_freed_memory). Called here through its C API with the sample precision set to Bits Stored,
imagecodecs' CharLS writes the same codestream as pyjpegls, byte for byte (tests/test_charls.py), except for at
most 8 bits stored in 16-bit words, where it declares 9 so that decoders keep the samples 16-bit.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
from pathlib import Path

import numpy as np

_INTERLEAVE_SAMPLE = 2
"""CHARLS_INTERLEAVE_MODE_SAMPLE: R1G1B1R2G2B2..., the order of Planar Configuration 0 (pyjpegls' choice too)."""


class _FrameInfo(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("bits_per_sample", ctypes.c_int32),
        ("component_count", ctypes.c_int32),
    ]


def _loaded_charls() -> Path | None:
    """The CharLS shared library imagecodecs' JPEG-LS module runs on, as this process mapped it."""
    try:
        importlib.import_module("imagecodecs._jpegls")
        maps = Path("/proc/self/maps").read_text()
    except (ImportError, OSError):
        return None
    paths = sorted({line.split(maxsplit=5)[-1] for line in maps.splitlines() if "libcharls" in line.rsplit("/", 1)[-1]})
    return Path(next((path for path in paths if "imagecodecs" in path), paths[0])) if paths else None


@functools.cache
def library() -> ctypes.CDLL | None:
    """CharLS with its C API declared, or None when imagecodecs does not run on a shared CharLS here."""
    path = _loaded_charls()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    encoder = ctypes.c_void_p
    size = ctypes.POINTER(ctypes.c_size_t)
    signatures = {
        "charls_jpegls_encoder_create": ([], encoder),
        "charls_jpegls_encoder_destroy": ([encoder], None),
        "charls_jpegls_encoder_set_frame_info": ([encoder, ctypes.POINTER(_FrameInfo)], ctypes.c_int32),
        "charls_jpegls_encoder_set_near_lossless": ([encoder, ctypes.c_int32], ctypes.c_int32),
        "charls_jpegls_encoder_set_interleave_mode": ([encoder, ctypes.c_int32], ctypes.c_int32),
        "charls_jpegls_encoder_get_estimated_destination_size": ([encoder, size], ctypes.c_int32),
        "charls_jpegls_encoder_set_destination_buffer": ([encoder, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int32),
        "charls_jpegls_encoder_encode_from_buffer": (
            [encoder, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32],
            ctypes.c_int32,
        ),
        "charls_jpegls_encoder_get_bytes_written": ([encoder, size], ctypes.c_int32),
        "charls_get_error_message": ([ctypes.c_int32], ctypes.c_char_p),
    }
    try:
        for name, (arguments, result) in signatures.items():
            function = getattr(lib, name)
            function.argtypes = arguments
            function.restype = result
    except AttributeError:
        return None
    return lib


def available() -> bool:
    return library() is not None


def encode(frame: np.ndarray, bits_stored: int, near: int = 0) -> bytes:
    """One frame, shaped (rows, columns[, samples]), as a JPEG-LS codestream declaring `bits_stored` (at least 8
    for 8-bit samples, 9 for 16-bit ones).

    Samples outside the range Bits Stored gives (with the frame's signedness) raise ValueError, as pydicom's
    encoder does, so that another encoder takes the frame. Signed samples go in as their two's complement in the
    container, as pyjpegls passes them; CharLS codes their low Bits Stored bits, and pydicom's decoder restores
    the sign.
    """
    lib = library()
    if lib is None:
        raise RuntimeError("imagecodecs' CharLS library is not loaded")
    signed = frame.dtype.kind == "i"
    if near and signed:
        raise ValueError("near-lossless JPEG-LS of signed samples is left to pydicom's range checks")
    low, high = stored_range(bits_stored, signed)
    if int(frame.max()) > high or (signed and int(frame.min()) < low):
        raise ValueError(f"samples outside the range of Bits Stored {bits_stored}")
    samples = unsigned_samples(frame)
    # Decoders size their output by the declared precision: up to 8 bits, one byte a sample, which DCMTK refuses
    # and GDCM aborts on when Bits Allocated is 16. For 16-bit words, 9 bits is the least that keeps them 16-bit;
    # for 8-bit words DCMTK reads nothing under 8 bits (as its own dcmcjpls writes).
    precision = max(bits_stored, 8 if samples.dtype.itemsize == 1 else 9)
    components = frame.shape[2] if frame.ndim == 3 else 1
    info = _FrameInfo(frame.shape[1], frame.shape[0], precision, components)
    encoder = lib.charls_jpegls_encoder_create()
    if not encoder:
        raise MemoryError("CharLS could not create an encoder")
    try:
        _check(lib, lib.charls_jpegls_encoder_set_frame_info(encoder, ctypes.byref(info)))
        if components > 1:
            _check(lib, lib.charls_jpegls_encoder_set_interleave_mode(encoder, _INTERLEAVE_SAMPLE))
        if near:
            _check(lib, lib.charls_jpegls_encoder_set_near_lossless(encoder, near))
        estimate = ctypes.c_size_t()
        _check(lib, lib.charls_jpegls_encoder_get_estimated_destination_size(encoder, ctypes.byref(estimate)))
        out = np.empty(estimate.value, np.uint8)
        _check(lib, lib.charls_jpegls_encoder_set_destination_buffer(encoder, out.ctypes.data, out.nbytes))
        _check(lib, lib.charls_jpegls_encoder_encode_from_buffer(encoder, samples.ctypes.data, samples.nbytes, 0))
        written = ctypes.c_size_t()
        _check(lib, lib.charls_jpegls_encoder_get_bytes_written(encoder, ctypes.byref(written)))
    finally:
        lib.charls_jpegls_encoder_destroy(encoder)
    return out[: written.value].tobytes()


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The least and greatest sample value Bits Stored can hold, two's complement when `signed`."""
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def unsigned_samples(frame: np.ndarray) -> np.ndarray:
    """The frame as CharLS takes it: contiguous, two's complement samples as unsigned words of the same width
    (decoders sign them again)."""
    return np.ascontiguousarray(frame).view(frame.dtype.str.replace("i", "u"))


def _check(lib: ctypes.CDLL, error: int) -> None:
    if error:
        message = lib.charls_get_error_message(error) or b"unknown error"
        raise RuntimeError(f"CharLS error {error}: {message.decode(errors='replace')}")
