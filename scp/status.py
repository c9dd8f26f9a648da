"""Named DIMSE statuses (PS3.4 B.2.3, PS3.7 C) and how a storage status is classified."""

from enum import Enum

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
COERCION_OF_DATA_ELEMENTS = 0xB000
ELEMENTS_DISCARDED = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007


class Outcome(Enum):
    """What a C-STORE response status means for a forwarded instance."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify_store_status(status: int) -> Outcome:
    """Success and warnings are delivered; 0xA7xx is worth retrying; the rest is permanent."""
    if status == SUCCESS or status in (
        COERCION_OF_DATA_ELEMENTS,
        ELEMENTS_DISCARDED,
        DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    ):
        return Outcome.DELIVERED
    if status & 0xFF00 == 0xA700:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT
