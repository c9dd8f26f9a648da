"""Named DIMSE statuses (PS3.4 B.2.3, PS3.7 C) and how a storage status is classified."""

from enum import Enum

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
RESOURCE_LIMITATION = 0x0213
CANCEL = 0xFE00
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
ATTRIBUTE_LIST_ERROR = 0x0107
ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
WARNINGS = frozenset({OPTIONAL_ATTRIBUTES_NOT_SUPPORTED, ATTRIBUTE_LIST_ERROR, ATTRIBUTE_VALUE_OUT_OF_RANGE})
"""The general warning statuses (PS3.7 Annex C): the archive kept the instance. Storage's own are 0xBxxx."""


class Outcome(Enum):
    """What a C-STORE response status means for a forwarded instance."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


# Exact statuses first, then (mask, value) ranges; anything else is a failure retrying will not fix.
_EXACT: dict[int, Outcome] = {
    SUCCESS: Outcome.DELIVERED,
    # Warnings (PS3.4 B.2.3): the archive kept the instance.
    COERCION_OF_DATA_ELEMENTS: Outcome.DELIVERED,
    ELEMENTS_DISCARDED: Outcome.DELIVERED,
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Outcome.DELIVERED,
    **dict.fromkeys(WARNINGS, Outcome.DELIVERED),  # general warnings (PS3.7 Annex C)
    # General failures that say nothing about the instance itself (PS3.7 C.4, C.5.19).
    PROCESSING_FAILURE: Outcome.TRANSIENT,
    RESOURCE_LIMITATION: Outcome.TRANSIENT,
    CANCEL: Outcome.TRANSIENT,
}
_RANGES: tuple[tuple[int, int, Outcome], ...] = (
    (0xFF00, 0xA700, Outcome.TRANSIENT),  # Refused: Out of Resources
    (0xF000, 0xB000, Outcome.DELIVERED),  # any other warning
)


_DESCRIPTIONS = {
    **STORAGE_SERVICE_CLASS_STATUS,
    OPTIONAL_ATTRIBUTES_NOT_SUPPORTED: ("Warning", "Requested Optional Attributes Are Not Supported"),
}


def classify_store_status(status: int) -> Outcome:
    """Success and warnings (0xBxxx, 0x0001, 0x0107, 0x0116) are delivered; out-of-resources, processing failure
    and resource limitation are worth retrying; the rest (0xA9xx, 0xCxxx, 0x0122 SOP class not supported, ...)
    is permanent."""
    if status in _EXACT:
        return _EXACT[status]
    for mask, value, outcome in _RANGES:
        if status & mask == value:
            return outcome
    return Outcome.PERMANENT


def is_warning(status: int) -> bool:
    """A warning status (0xBxxx, PS3.4 B.2.3, or a general one, PS3.7 Annex C): delivered, worth a log line."""
    return status & 0xF000 == 0xB000 or status in WARNINGS


def describe(status: int) -> str:
    """`0xA900 (Failure: Data Set Does Not Match SOP Class)`, for logs and reason files."""
    category, meaning = _DESCRIPTIONS.get(status, ("Unknown", "not a storage status"))
    return f"0x{status:04X} ({category}: {meaning})" if meaning else f"0x{status:04X} ({category})"
