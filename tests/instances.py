"""Many instances for load and durability tests, and what DCMTK's storescu says it got acknowledged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scp.spool import Spool
from tests.peers import TEST_FILES


def make_instances(folder: Path, count: int, source: str = "CT_small.dcm", rows: int = 0) -> dict[Path, str]:
    """Write `count` copies of a bundled test file, each with a fresh SOP Instance UID; map path → UID.

    With `rows`, the image is replaced by rows x rows pixels of 12-bit noise (slow to encode, hardly compressible).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(TEST_FILES / source)
    if rows:
        ds.Rows = ds.Columns = rows
        ds.BitsStored, ds.HighBit = 12, 11
        noise = np.random.default_rng(rows).integers(0, 4096, rows * rows, dtype=np.uint16)
        ds.PixelData = noise.tobytes()
    made = {}
    for index in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made[path] = uid
    return made


def acknowledged(storescu_output: str) -> set[Path]:
    """The files `storescu -v` reported a Success response for (it logs each file before its response)."""
    acked: set[Path] = set()
    current: Path | None = None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.add(current)
            current = None
    return acked


class Arrivals:
    """SOP Instance UIDs of the DICOM files under a folder (DCMTK storescp's, or a directory destination's);
    each file's header is read once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: dict[Path, str] = {}

    def uids(self) -> set[str]:
        if self.folder.is_dir():
            for path in self.folder.rglob("*"):
                if path in self._seen or not path.is_file() or path.name.endswith(".log") or path.name[0] == ".":
                    continue
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                    self._seen[path] = str(ds.SOPInstanceUID)
                except (InvalidDicomError, OSError, AttributeError, EOFError):
                    continue  # storescp may still be writing it: read it next time
        return set(self._seen.values())

    def files(self) -> int:
        self.uids()
        return len(self._seen)


def queue_job(spool: Spool, index: int, path: Path, uid: str) -> None:
    """Commit an Explicit VR Little Endian CT instance as job `index` for the archive, as processing would."""
    info = {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "sop_instance_uid": uid,
        "transfer_syntax": ExplicitVRLittleEndian,
        "original_transfer_syntax": ExplicitVRLittleEndian,
        "received_at": 0,
    }
    spool.commit_job(f"{index:020d}-test", "archive", path, path, info)
