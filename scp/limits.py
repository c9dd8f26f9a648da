"""Guards against hostile or broken input, closing weak spots of pydicom 3.0.2.

On the wire (`PduLimits`, applied by acceptor.py): an A-ASSOCIATE-RQ (or any other control PDU) longer than
`CONTROL_PDU_LIMIT`, or a P-DATA-TF longer than our maximum PDU size, ends the connection after its 6-byte header,
before anything of it is buffered.

In a received instance (`check_instance`, run by the C-STORE handler before it answers; its size is bounded as
it streams in, by spool.PartialReceive): a Deflated data set that inflates past the limit (read in bounded steps,
never whole), nesting that exhausts the recursion limit, an unreadable file or UIDs, values cut short, and native
Pixel Data shorter than its attributes say.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from scp import status
from scp.syntaxes import UNDEFINED_LENGTH

LOGGER = logging.getLogger(__name__)

P_DATA_TF = 0x04
CONTROL_PDU_LIMIT = 1024 * 1024
"""The largest A-ASSOCIATE-RQ (or other non-data PDU) read: 128 contexts x 40 syntaxes fit in well under 1 MiB."""
PDV_ALLOWANCE = 1024
"""Peers count the PDV item headers against the maximum length differently (PS3.8 D.1); allow for it."""
INFLATE_STEP = 1024 * 1024
PIXEL_DATA = 0x7FE00010
META_PREFIX = 128 + 4 + 12  # preamble, "DICM", the (0002,0000) element (PS3.10 7.1)


@dataclass(frozen=True)
class PduLimits:
    """The largest PDU bodies read from a peer, by PDU type."""

    data: int
    control: int = CONTROL_PDU_LIMIT

    @classmethod
    def for_max_pdu(cls, max_pdu_size: int, max_instance_bytes: int) -> PduLimits:
        """P-DATA-TF up to our Maximum Length Received (0: unlimited, then up to the largest instance)."""
        return cls(max_pdu_size + PDV_ALLOWANCE if max_pdu_size else max_instance_bytes)

    def allows(self, pdu_type: int, length: int) -> bool:
        return length <= (self.data if pdu_type == P_DATA_TF else self.control)


class Refused(Exception):
    """An instance the node will not keep; `status` is the DIMSE status to answer (PS3.4 B.2.3)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_instance(
    path: Path, size: int, transfer_syntax: str, max_inflated: int, sop_class_uid: str, sop_instance_uid: str
) -> None:
    """Read a received Part 10 file of `size` bytes defensively (Pixel Data deferred); raise Refused if the node
    must not keep it: 0xA700 (out of resources) for a Deflated data set inflating past `max_inflated`, 0xA900
    (data set does not match SOP class, PS3.4 B.2.3) when the data set names another SOP Class or Instance UID
    than the C-STORE request (`sop_class_uid`, `sop_instance_uid`: the spool, the rules and the destinations go by
    the request's; DCMTK's storescp does not check), 0xC210 (cannot understand) for anything unreadable. The size
    limit is spool.PartialReceive's.
    """
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    try:
        # what a deferred value's offset is counted in: the file, or the inflated data set
        data_set_bytes = _inflated_size(path, max_inflated) if deflated else size
        if data_set_bytes is None:
            raise Refused(
                status.OUT_OF_RESOURCES, f"the Deflated data set inflates past node.max_inflated_bytes ({max_inflated})"
            )
        if _first_group(path, deflated) in (b"\x02\x00", b"\x00\x02"):
            # pydicom would read them as the file's own: a stale Transfer Syntax UID there misreads the pixels
            raise ValueError("the data set holds File Meta elements (group 0002), which PS3.10 7.1 keeps out of it")
        ds = pydicom.dcmread(path, defer_size=4096)
        # pydicom converts values lazily and a bad one raises on first access: touch what the node relies on.
        # Other values are carried through as received (a stray bad value is not worth refusing an image for).
        for keyword in ("SOPInstanceUID", "SOPClassUID"):
            if not ds.get(keyword):
                raise ValueError(f"the data set has no {keyword}")
        _check_complete(ds, data_set_bytes)
        _check_pixel_data(ds)
    except Refused:
        raise
    except RecursionError:
        raise Refused(status.CANNOT_UNDERSTAND, "sequences nested too deeply to read") from None
    except Exception as exc:  # pydicom raises many types on hostile bytes (NotImplementedError for a bogus VR…)
        raise Refused(status.CANNOT_UNDERSTAND, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    for keyword, requested in (("SOPClassUID", sop_class_uid), ("SOPInstanceUID", sop_instance_uid)):
        if str(ds[keyword].value) != requested:
            raise Refused(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"the data set's {keyword} {as_uid(ds[keyword].value)} is not the C-STORE request's {requested}",
            )


_UID_LIKE = re.compile(r"[0-9.]{1,64}")


def as_uid(value: object) -> str:
    """A UID a peer sent, as a log line may show it: itself when it looks like one, else only its length. One wrong
    length byte makes a UID run over the elements after it, a patient's name and ID among them."""
    text = str(value)
    return text if _UID_LIKE.fullmatch(text) else f"(not a UID: {len(text)} characters)"


def _seek_data_set(f: BinaryIO) -> None:
    """Move a Part 10 file to its data set's first byte, past the file meta its group length covers."""
    f.seek(META_PREFIX - 4)
    (group_length,) = struct.unpack("<L", f.read(4))
    f.seek(META_PREFIX + group_length)


def _first_group(path: Path, deflated: bool) -> bytes:
    """The group number's two bytes of the data set's first element, as written (little or big endian)."""
    with open(path, "rb") as f:
        _seek_data_set(f)
        head = f.read(256 if deflated else 2)  # 256 deflated bytes give the first two, bar a perverse stream
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(head, 2) if deflated else head


def _inflated_size(path: Path, limit: int) -> int | None:
    """The size of the inflated data set of a Deflated file, or None once it passes `limit` (PS3.5 A.5)."""
    with open(path, "rb") as f:
        _seek_data_set(f)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := f.read(INFLATE_STEP):
            while chunk:
                total += len(inflater.decompress(chunk, INFLATE_STEP))
                if total > limit:
                    return None
                chunk = inflater.unconsumed_tail
            if inflater.eof:
                break
        total += len(inflater.flush())
    return total if total <= limit else None


def _check_complete(ds: Dataset, file_size: int) -> None:
    """Every element of the data set has the bytes its length declares: pydicom reads a value cut short by the
    end of the file, or defers one that runs past it, without a word."""
    for tag in list(ds.keys()):  # the tags only: iterating a Dataset converts every value
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, RawDataElement) or raw.length == UNDEFINED_LENGTH:
            continue
        present = file_size - raw.value_tell if raw.value is None else len(raw.value)
        if present < raw.length:
            raise ValueError(f"element {tag} declares {raw.length} bytes but the file ends {present} in")


def _check_pixel_data(ds: Dataset) -> None:
    """Native Pixel Data must hold every frame its attributes describe (running past the file's end is
    _check_complete's)."""
    raw = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.length == UNDEFINED_LENGTH:  # absent, or encapsulated
        return
    declared = int(raw.length)
    if any(ds.get(keyword) is None for keyword in ("Rows", "Columns", "BitsAllocated")):
        return  # not an image the codecs could touch: it is forwarded unchanged
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples == 3 and ds.get("PhotometricInterpretation") in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        samples = 2  # two chrominance samples per pair of pixels (PS3.3 C.7.6.3.1.2)
    expected = math.ceil(int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated) / 8)
    if declared < expected:
        raise ValueError(
            f"Pixel Data has {declared} bytes but Rows x Columns x Samples x Frames x Bits Allocated say {expected}",
        )
