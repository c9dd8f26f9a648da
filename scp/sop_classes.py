"""Which SOP classes the SCP accepts for storage: every one pynetdicom lists, and the storage-like others.

pynetdicom 3.0.4 knows 170 storage SOP classes. A modality may propose others: Siemens CT and MR send their
CSA Non-Image Storage (1.3.12.2.1107.5.9.1) with each study, older ultrasound units the retired Ultrasound
Image Storage (1.2.840.10008.5.1.4.1.1.6); pydicom names 12 standard storage classes that pynetdicom lacks. An
SCP that rejects their presentation contexts makes the modality fail the study. So each proposed SOP class that
is not listed but is storage-like is accepted too.
"""

from __future__ import annotations

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import RE_VALID_UID
from pynetdicom.presentation import AllStoragePresentationContexts

DICOM_ROOT = "1.2.840.10008."
STORAGE_BRANCH = "1.2.840.10008.5.1.4.1.1."
"""PS3.4 Annex B: the standard's image and object storage SOP classes, including those yet to come."""
LISTED = frozenset(str(context.abstract_syntax) for context in AllStoragePresentationContexts)
"""The storage SOP classes pynetdicom lists (some, such as Digital X-Ray Image Storage - For Presentation, have
names that do not end in 'Storage')."""


def accepts(uid: str) -> bool:
    """Whether the SCP stores instances of SOP class `uid`."""
    return uid in LISTED or is_storage_like(uid)


def is_storage_like(uid: str) -> bool:
    """A private SOP class (a vendor's storage class, as far as a router can tell), one pydicom names a storage
    SOP class, or an unknown one in the standard's storage branch."""
    if len(uid) > 64 or not RE_VALID_UID.fullmatch(uid):
        return False
    if not uid.startswith(DICOM_ROOT):
        return True
    if uid in UID_dictionary:
        name, kind = UID_dictionary[uid][:2]
        return kind == "SOP Class" and name.endswith("Storage")
    return uid.startswith(STORAGE_BRANCH)
