"""Which SOP classes the SCP accepts for storage (sop_classes.py)."""

from __future__ import annotations

import pytest

from scp import sop_classes


@pytest.mark.parametrize(
    ("uid", "storage"),
    [
        ("1.3.12.2.1107.5.9.1", True),  # Siemens CSA Non-Image Storage (private)
        ("1.2.840.10008.5.1.4.1.1.6", True),  # Ultrasound Image Storage (Retired)
        ("1.2.840.10008.5.1.4.1.1.501.1", True),  # DICOS CT Image Storage: pydicom knows it, pynetdicom does not
        ("1.2.840.10008.5.1.4.1.1.999.1", True),  # a storage class the standard may add
        ("1.2.840.10008.5.1.4.31", False),  # Modality Worklist Information Model - FIND
        ("1.2.840.10008.9.9.9", False),  # unknown, outside the storage branch
        ("1.2.840.10008.1.2.4.80", False),  # a transfer syntax
        ("1.2.3.04", False),  # not a valid UID (a leading zero)
        ("1.2.3.4\n", False),  # nor is this
    ],
)
def test_storage_like(uid: str, storage: bool) -> None:
    assert sop_classes.is_storage_like(uid) is storage


@pytest.mark.parametrize(
    ("uid", "accepted"),
    [
        ("1.2.840.10008.5.1.4.1.1.1.1", True),  # DX Image Storage - For Presentation: listed, no "Storage" at the end
        ("1.2.840.10008.5.1.4.1.1.2", True),  # CT Image Storage
        ("1.3.12.2.1107.5.9.1", True),  # storage-like
        ("1.2.840.10008.5.1.4.31", False),  # Modality Worklist Information Model - FIND
        ("1.2.840.10008.1.1", False),  # Verification: no instances to store
    ],
)
def test_accepted_for_storage(uid: str, accepted: bool) -> None:
    assert sop_classes.accepts(uid) is accepted
