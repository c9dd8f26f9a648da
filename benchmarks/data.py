"""Benchmark data: generated CT-like slices (deterministic), a real corpus, and a huge multi-frame instance.

Random noise does not compress, so it would make every codec look slow and useless: the generated slices look
like CT instead (a body ellipse with fat, muscle, organs, lungs, spine and table, smooth tissue texture, partial
volume at the edges, a few HU of noise, 12 bits stored, air outside the reconstruction circle).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SIZE = 512
BITS_STORED = 12
INTERCEPT = -1024
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MULTIFRAME_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")  # Multi-frame Grayscale Word Secondary Capture
UID_PREFIX = "1.2.826.0.1.3680043.10.1117."


def _smooth(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by FFT (no SciPy needed); wraps at the edges, which texture does not mind."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(field) * kernel, s=field.shape)


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def ct_slice(index: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """One CT-like slice as stored values (uint16, 12 bits used, HU = value - 1024); deterministic."""
    rng = np.random.default_rng([seed, index])
    z = index / 40.0
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    hu = np.full((size, size), -1000.0)
    body_ry, body_rx = 0.55 + 0.03 * np.sin(z), 0.78 + 0.03 * np.cos(z)
    hu[_ellipse(y, x, 0.0, 0.0, body_ry, body_rx)] = -100.0  # subcutaneous fat
    hu[_ellipse(y, x, 0.0, 0.0, body_ry - 0.05, body_rx - 0.06)] = 40.0  # muscle and soft tissue
    lung_r = max(0.0, 0.3 * np.cos(z / 3.0))
    if lung_r > 0.05:
        for side in (-1, 1):
            hu[_ellipse(y, x, -0.05, side * 0.35, lung_r * 1.1, lung_r * 0.9)] = -850.0
    hu[_ellipse(y, x, 0.05, -0.25, 0.22, 0.3 * (1 - lung_r))] = 60.0  # liver
    for side in (-1, 1):
        hu[_ellipse(y, x, 0.3, side * 0.28, 0.08, 0.06)] = 30.0  # kidneys
    hu[_ellipse(y, x, 0.02, 0.05, 0.05, 0.05)] = 180.0  # aorta with contrast
    hu[_ellipse(y, x, 0.38, 0.0, 0.1, 0.1)] = 700.0  # vertebral body: cortical ring ...
    hu[_ellipse(y, x, 0.38, 0.0, 0.085, 0.085)] = 250.0  # ... around cancellous bone
    hu[(y > 0.66) & (y < 0.7) & (np.abs(x) < 0.9)] = 300.0  # the table
    inside = hu > -900
    texture = _smooth(rng.standard_normal((size, size)), 3.0)
    texture *= 40.0 / (texture.std() or 1.0)
    hu = _smooth(hu, 0.8) + np.where(inside, texture, 0.0) + rng.normal(0.0, 4.0, (size, size))
    values = np.clip(np.rint(hu - INTERCEPT), 0, 2**BITS_STORED - 1).astype(np.uint16)
    values[x**2 + y**2 > 1.0] = 0  # outside the reconstruction circle
    return values


def _header(sop_class: UID, instance_uid: str, series_uid: str, study_uid: str, rows: int, columns: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Benchmark^Phantom"
    ds.PatientID = "BENCH-0001"
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = 1
    return ds


def write_ct_series(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write `count` CT-like slices as Explicit VR Little Endian Part 10 files; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid(UID_PREFIX, [f"study-{seed}"])
    series = generate_uid(UID_PREFIX, [f"series-{seed}"])
    paths = []
    for index in range(count):
        ds = _header(CT_IMAGE_STORAGE, generate_uid(UID_PREFIX, [f"{seed}-{index}"]), series, study, SIZE, SIZE)
        ds.InstanceNumber = index + 1
        ds.SliceLocation = float(index)
        ds.PixelData = ct_slice(index, seed).tobytes()
        path = folder / f"ct{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def corpus_images(corpus: Path, modalities: tuple[str, ...] = ()) -> list[Path]:
    """The uncompressed DICOM images with pixel data under `corpus` (of `modalities`, if given), by name."""
    sources = []
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM: a README, a checksum list
            continue
        syntax = header.file_meta.get("TransferSyntaxUID")
        if syntax is None or UID(syntax).is_compressed or "Rows" not in header:
            continue
        if modalities and header.get("Modality") not in modalities:
            continue
        sources.append(path)
    if not sources:
        wanted = f" of modality {', '.join(modalities)}" if modalities else ""
        raise SystemExit(f"no uncompressed DICOM images{wanted} with pixel data found in {corpus}")
    return sources


def copy_cycled(sources: list[Path], folder: Path, count: int) -> list[Path]:
    """Copy `count` instances into `folder`, cycling through `sources`, each with a new SOP Instance UID so that
    repeats are distinct instances: the first `len(sources)` copies are one of each source, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        ds = pydicom.dcmread(sources[index % len(sources)])
        uid = generate_uid(UID_PREFIX, [str(sources[index % len(sources)]), str(index)])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"corpus{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def pixel_frames(paths: list[Path]) -> Iterator[np.ndarray]:
    """The frames of the given files as arrays (single-frame: one each)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        yield from (arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else [arr])


def write_multiframe(path: Path, size_bytes: int, seed: int = 0, distinct: int = 32) -> int:
    """Write a multi-frame 16-bit instance of about `size_bytes` of pixel data without holding it in memory.

    The Part 10 header is written by pydicom, then the Pixel Data element header (explicit length), then the
    frames one by one (cycling through `distinct` generated slices). Returns the number of frames.
    """
    frame_bytes = SIZE * SIZE * 2
    frames = max(1, size_bytes // frame_bytes)
    study = generate_uid(UID_PREFIX, [f"big-study-{seed}"])
    series = generate_uid(UID_PREFIX, [f"big-series-{seed}"])
    instance = generate_uid(UID_PREFIX, [f"big-{seed}-{size_bytes}"])
    ds = _header(MULTIFRAME_WORD_SC, instance, series, study, SIZE, SIZE)
    ds.NumberOfFrames = frames
    ds.ConversionType = "WSD"
    ds.FrameIncrementPointer = 0x00181063  # Frame Time (PS3.3 C.7.6.6)
    ds.FrameTime = 1.0
    slices = [ct_slice(index, seed).tobytes() for index in range(min(distinct, frames))]
    with open(path, "wb") as out:
        ds.save_as(out, enforce_file_format=True)
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for index in range(frames):
            out.write(slices[index % len(slices)])
    return frames
