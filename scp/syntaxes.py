"""The transfer-syntax table: what each syntax is, and the order we accept them in.

Capabilities are data, checked by one lookup, not if-chains (STYLE rule 1).
"""

from dataclasses import dataclass

import pydicom.uid
from pydicom.uid import UID, AllTransferSyntaxes

UNDEFINED_LENGTH = 0xFFFFFFFF
"""An element length meaning: up to a delimiter (PS3.5 7.1.1); encapsulated Pixel Data has it (PS3.5 A.4)."""


@dataclass(frozen=True)
class Syntax:
    """Facts about one transfer syntax that the node needs."""

    uid: UID
    lossless: bool
    lossy_method: str | None = None
    """Lossy Image Compression Method (0028,2114) defined term (PS3.3 C.7.6.1.1.5.1)."""
    may_be_reversible: bool = False
    """A lossy syntax that can also carry a lossless stream (near-lossless JPEG-LS with NEAR 0, reversible JPEG 2000
    and HTJ2K): a header saying Lossy Image Compression 00 is then believed."""


def _syntax(keyword: str, lossless: bool, lossy_method: str | None = None, may_be_reversible: bool = False) -> Syntax:
    return Syntax(UID(getattr(pydicom.uid, keyword)), lossless, lossy_method, may_be_reversible)


# Ordered by our preference as an acceptor: acse.py picks the first syntax of *our* list that the
# requestor offered, so lossless syntaxes come before lossy ones and the cheap-to-read before the rest.
TABLE: tuple[Syntax, ...] = (
    _syntax("ExplicitVRLittleEndian", True),
    _syntax("ImplicitVRLittleEndian", True),
    _syntax("DeflatedExplicitVRLittleEndian", True),
    _syntax("ExplicitVRBigEndian", True),
    _syntax("JPEGLSLossless", True),
    _syntax("HTJ2KLossless", True),
    _syntax("HTJ2KLosslessRPCL", True),
    _syntax("JPEG2000Lossless", True),
    _syntax("JPEG2000MCLossless", True),
    _syntax("RLELossless", True),
    _syntax("JPEGLosslessSV1", True),
    _syntax("JPEGLossless", True),
    _syntax("JPEGLSNearLossless", False, "ISO_14495_1", True),
    _syntax("HTJ2K", False, "ISO_15444_15", True),
    _syntax("JPEG2000", False, "ISO_15444_1", True),
    _syntax("JPEG2000MC", False, "ISO_15444_2", True),
    _syntax("JPEGBaseline8Bit", False, "ISO_10918_1"),
    _syntax("JPEGExtended12Bit", False, "ISO_10918_1"),
)

BY_UID: dict[str, Syntax] = {s.uid: s for s in TABLE}

# Everything pydicom knows, ours first in preference order, then the rest (video, JPIP, SMPTE):
# those are accepted and forwarded unchanged.
ACCEPTED: tuple[UID, ...] = tuple(s.uid for s in TABLE) + tuple(UID(u) for u in AllTransferSyntaxes if u not in BY_UID)

UNCOMPRESSED: tuple[UID, ...] = tuple(
    s.uid for s in TABLE if s.lossless and not s.uid.is_compressed and not s.uid.is_deflated
)


NATIVE_TARGETS: tuple[UID, ...] = (UID(pydicom.uid.ExplicitVRLittleEndian), UID(pydicom.uid.ImplicitVRLittleEndian))
"""The uncompressed syntaxes a rule may target (decompression writes little endian only)."""


def is_lossless(uid: str) -> bool:
    """True for syntaxes that keep every pixel value; unknown syntaxes count as lossy."""
    syntax = BY_UID.get(uid)
    return syntax is not None and syntax.lossless


def resolve(name: str) -> UID:
    """Turn a pydicom UID keyword or a dotted UID into a known transfer syntax UID.

    Raises ValueError naming the closest fix when the name is not a transfer syntax pydicom knows.
    """
    by_keyword = {UID(u).keyword: UID(u) for u in AllTransferSyntaxes}
    if name in by_keyword:
        return by_keyword[name]
    if name in AllTransferSyntaxes:
        return UID(name)
    close = [k for k in by_keyword if k.lower() == name.lower()]
    hint = f" - did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(by_keyword))}"
    raise ValueError(f"'{name}' is not a transfer syntax keyword or UID pydicom knows{hint}")
