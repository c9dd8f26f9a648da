"""Test images: synthetic Part 10 files from arrays, the bundled pydicom files, and external decoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def bundled_files() -> list[Path]:
    """pydicom's bundled test files (globbed directly: get_testdata_files() would try to download)."""
    return sorted(p for p in TEST_FILES.iterdir() if p.is_file() and p.suffix == ".dcm")


def write_image(
    path: Path,
    frames: np.ndarray,
    bits_stored: int,
    photometric: str | None = None,
    syntax: UID = ExplicitVRLittleEndian,
) -> Path:
    """A minimal Secondary Capture file holding `frames`, shaped (frames, rows, columns[, 3])."""
    samples = 3 if frames.ndim == 4 else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric or ("RGB" if samples == 3 else "MONOCHROME2")
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = frames.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(frames.dtype.kind == "i")
    order = "<" if syntax.is_little_endian else ">"
    ds.PixelData = frames.astype(frames.dtype.newbyteorder(order)).tobytes()
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
