"""Encode speed and ratio of every codec binding on the same frames, on one core and on all cores (processes).

Each binding's output is decoded by pydicom (its own decoders, as an archive's viewer would) and compared with
the source pixels: `exact` means pixel-exact for DICOM, `identical` means the codestream is byte-identical to
the reference binding's (pydicom's own encoder for that syntax).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder, pixel_array
from pydicom.uid import UID, HTJ2KLossless, JPEG2000Lossless, JPEGLSLossless, RLELossless

from benchmarks.stats import median
from scp import charls

EncodeFn = Callable[[np.ndarray, int], bytes]


def _pydicom(syntax: UID, plugin: str) -> EncodeFn:
    def encode(frame: np.ndarray, bits_stored: int) -> bytes:
        return get_encoder(syntax).encode(frame, encoding_plugin=plugin, **_pixel_kwargs(frame, bits_stored))

    return encode


def _pixel_kwargs(frame: np.ndarray, bits_stored: int) -> dict[str, Any]:
    return {
        "rows": frame.shape[0],
        "columns": frame.shape[1],
        "samples_per_pixel": 1,
        "bits_allocated": frame.dtype.itemsize * 8,
        "bits_stored": bits_stored,
        "pixel_representation": int(frame.dtype.kind == "i"),
        "photometric_interpretation": "MONOCHROME2",
        "number_of_frames": 1,
    }


@dataclass(frozen=True)
class Binding:
    """One way to produce one transfer syntax."""

    syntax: UID
    name: str
    encode: EncodeFn
    reference: bool = False
    """pydicom's own encoder: the one tests compare against."""


BINDINGS: tuple[Binding, ...] = (
    Binding(JPEGLSLossless, "pyjpegls via pydicom", _pydicom(JPEGLSLossless, "pyjpegls"), reference=True),
    Binding(JPEGLSLossless, "CharLS via imagecodecs", lambda f, _: bytes(imagecodecs.jpegls_encode(f))),
    Binding(JPEGLSLossless, "CharLS via imagecodecs' library (the node's)", charls.encode),
    Binding(JPEG2000Lossless, "OpenJPEG via pydicom", _pydicom(JPEG2000Lossless, "pylibjpeg"), reference=True),
    Binding(
        JPEG2000Lossless,
        "OpenJPEG via imagecodecs",
        lambda f, bits: bytes(
            imagecodecs.jpeg2k_encode(f, level=0, codecformat="J2K", reversible=True, bitspersample=bits)
        ),
    ),
    Binding(HTJ2KLossless, "OpenJPH via imagecodecs", lambda f, _: bytes(imagecodecs.htj2k_encode(f, reversible=True))),
    Binding(RLELossless, "pylibjpeg-rle via pydicom", _pydicom(RLELossless, "pylibjpeg"), reference=True),
    Binding(RLELossless, "pydicom native RLE", _pydicom(RLELossless, "pydicom")),
    Binding(RLELossless, "imagecodecs dicomrle", lambda f, _: bytes(imagecodecs.dicomrle_encode(f))),
)


@dataclass(frozen=True)
class CodecResult:
    """Medians of several timed runs of one binding over the same frames."""

    syntax: str
    binding: str
    available: bool
    detail: str = ""
    one_core_mb_s: float = 0.0
    all_cores_mb_s: float = 0.0
    cores: int = 0
    ratio: float = 0.0
    exact: bool = False
    identical: bool | None = None
    reference: bool = False
    precision: int | None = None
    """The sample precision the codestream declares (JPEG-LS P, JPEG 2000 Ssiz + 1)."""


def declared_precision(encoded: bytes) -> int | None:
    """The bit depth a JPEG-LS (SOF55 P) or JPEG 2000 / HTJ2K (SIZ Ssiz + 1) codestream declares."""
    sof55 = encoded.find(b"\xff\xf7")
    if encoded.startswith(b"\xff\xd8") and sof55 >= 0 and len(encoded) > sof55 + 4:
        return encoded[sof55 + 4]
    siz = encoded.find(b"\xff\x51")
    if encoded.startswith(b"\xff\x4f") and siz >= 0 and len(encoded) > siz + 40:
        return (encoded[siz + 40] & 0x7F) + 1  # marker, Lsiz, Rsiz, 8 x 32-bit sizes, Csiz, then Ssiz
    return None


def decodes_exactly(syntax: UID, encoded: bytes, frame: np.ndarray, bits_stored: int) -> bool:
    """Decode one encoded frame with pydicom, as a receiving application would, and compare with `frame`."""
    try:
        decoded = pixel_array(_dataset(syntax, encoded, frame, bits_stored))
    except Exception:
        return False
    return decoded.shape == frame.shape and bool(np.array_equal(decoded, frame))


def _dataset(syntax: UID, encoded: bytes, frame: np.ndarray, bits_stored: int) -> Dataset:
    """A minimal dataset holding one encoded frame like `frame`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    kwargs = _pixel_kwargs(frame, bits_stored)
    ds.Rows, ds.Columns = kwargs["rows"], kwargs["columns"]
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = kwargs["bits_allocated"], bits_stored, bits_stored - 1
    ds.PixelRepresentation = kwargs["pixel_representation"]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([encoded])
    ds["PixelData"].VR = "OB"
    return ds


# Frames for the worker processes: set before the pool forks, so they are not pickled per call.
_FRAMES: list[np.ndarray] = []
_BITS: list[int] = []


def _encode_indexes(args: tuple[int, list[int]]) -> int:
    binding_index, frame_indexes = args
    return sum(len(BINDINGS[binding_index].encode(_FRAMES[i], _BITS[i])) for i in frame_indexes)


def balanced_tasks(sizes: Sequence[int], cores: int) -> list[list[int]]:
    """Frame indexes in tasks of about a (cores x 8)th of the bytes each, largest frames first, so that frames of
    unequal size (a corpus) keep every core busy to the end and equal ones are not sent one by one."""
    share = sum(sizes) / (cores * 8)
    tasks: list[list[int]] = []
    load = share
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if load >= share:
            tasks.append([])
            load = 0
        tasks[-1].append(index)
        load += sizes[index]
    return tasks


def _probe(binding: Binding, frame: np.ndarray, bits_stored: int) -> str:
    """Why the binding cannot encode `frame` here, or "" when it can (the call also warms it up)."""
    try:
        binding.encode(frame, bits_stored)
    except Exception as exc:
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
    return ""


def measure(
    frames: Sequence[np.ndarray], bits_stored: Sequence[int], runs: int = 3, cores: int | None = None
) -> list[CodecResult]:
    """Measure every binding on `frames`, each declaring its own Bits Stored; MB is 10^6 bytes of uncompressed
    pixel data."""
    cores = cores or os.cpu_count() or 1
    _FRAMES[:] = list(frames)
    _BITS[:] = list(bits_stored)
    megabytes = sum(f.nbytes for f in frames) / 1e6
    pairs = list(zip(frames, bits_stored, strict=True))
    references = {b.syntax: b.encode(*pairs[0]) for b in BINDINGS if b.reference and not _probe(b, *pairs[0])}
    tasks = balanced_tasks([f.nbytes for f in frames], cores)
    context = multiprocessing.get_context("fork")
    results = []
    with ProcessPoolExecutor(cores, mp_context=context) as pool:
        for index, binding in enumerate(BINDINGS):
            why = _probe(binding, *pairs[0])
            if why:
                results.append(CodecResult(binding.syntax.keyword, binding.name, False, why))
                continue
            one, many, sizes = [], [], []
            for _ in range(runs):
                start = time.perf_counter()
                sizes = [len(binding.encode(f, bits)) for f, bits in pairs]
                one.append(megabytes / (time.perf_counter() - start))
                list(pool.map(_encode_indexes, [(index, [0])] * cores))  # warm the workers
                start = time.perf_counter()
                list(pool.map(_encode_indexes, [(index, task) for task in tasks]))
                many.append(megabytes / (time.perf_counter() - start))
            exact = all(decodes_exactly(binding.syntax, binding.encode(f, bits), f, bits) for f, bits in pairs[:4])
            reference = references.get(binding.syntax)
            results.append(
                CodecResult(
                    syntax=binding.syntax.keyword,
                    binding=binding.name,
                    available=True,
                    one_core_mb_s=median(one),
                    all_cores_mb_s=median(many),
                    cores=cores,
                    ratio=megabytes * 1e6 / sum(sizes),
                    exact=exact,
                    identical=None if reference is None else binding.encode(*pairs[0]) == reference,
                    reference=binding.reference,
                    precision=declared_precision(binding.encode(*pairs[0])),
                )
            )
    return results


def _pydicom_decoder(syntax: UID, plugin: str = "") -> Callable[[bytes, np.ndarray, int], np.ndarray]:
    """pydicom's own decoding path: its default plugin order (as `ds.pixel_array` runs it), or one plugin."""

    def decode(encoded: bytes, frame: np.ndarray, bits_stored: int) -> np.ndarray:
        return pixel_array(_dataset(syntax, encoded, frame, bits_stored), decoding_plugin=plugin)

    return decode


@dataclass(frozen=True)
class Decoder:
    """One way to decode one transfer syntax (what lossless verification costs)."""

    syntax: UID
    name: str
    decode: Callable[[bytes, np.ndarray, int], np.ndarray]


DECODERS: tuple[Decoder, ...] = (
    Decoder(JPEGLSLossless, "pydicom default (ds.pixel_array)", _pydicom_decoder(JPEGLSLossless)),
    Decoder(JPEGLSLossless, "pydicom, decoding_plugin='pyjpegls'", _pydicom_decoder(JPEGLSLossless, "pyjpegls")),
    Decoder(JPEGLSLossless, "CharLS via imagecodecs", lambda e, *_: imagecodecs.jpegls_decode(e)),
    Decoder(JPEG2000Lossless, "pydicom default (ds.pixel_array)", _pydicom_decoder(JPEG2000Lossless)),
    Decoder(JPEG2000Lossless, "OpenJPEG via imagecodecs", lambda e, *_: imagecodecs.jpeg2k_decode(e)),
    Decoder(HTJ2KLossless, "pydicom default (ds.pixel_array)", _pydicom_decoder(HTJ2KLossless)),
    Decoder(HTJ2KLossless, "OpenJPH via imagecodecs", lambda e, *_: imagecodecs.htj2k_decode(e)),
    Decoder(RLELossless, "pydicom default (ds.pixel_array)", _pydicom_decoder(RLELossless)),
)


@dataclass(frozen=True)
class DecodeResult:
    """Median single-core decode rate of one decoder on the reference encoder's output."""

    syntax: str
    decoder: str
    one_core_mb_s: float
    exact: bool


def measure_decoders(frames: Sequence[np.ndarray], bits_stored: Sequence[int], runs: int = 3) -> list[DecodeResult]:
    """Decode every frame as encoded by each syntax's reference binding (or the first that works here) with
    every decoder, on one core."""
    megabytes = sum(f.nbytes for f in frames) / 1e6
    pairs = list(zip(frames, bits_stored, strict=True))
    results = []
    for decoder in DECODERS:
        candidates = sorted((b for b in BINDINGS if b.syntax == decoder.syntax), key=lambda b: not b.reference)
        encoder = next(b for b in candidates if not _probe(b, *pairs[0]))
        encoded = [(encoder.encode(f, bits), f, bits) for f, bits in pairs]
        exact = all(np.array_equal(decoder.decode(*e), e[1]) for e in encoded[:4])
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            for e in encoded:
                decoder.decode(*e)
            rates.append(megabytes / (time.perf_counter() - start))
        results.append(DecodeResult(decoder.syntax.keyword, decoder.name, median(rates), exact))
    return results


def fastest_exact(results: Sequence[CodecResult], syntax: str) -> CodecResult | None:
    """The binding with the highest all-cores rate among the pixel-exact ones for `syntax`."""
    exact = [r for r in results if r.syntax == syntax and r.available and r.exact]
    return max(exact, key=lambda r: r.all_cores_mb_s, default=None)
