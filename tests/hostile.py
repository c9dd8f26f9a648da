"""Hostile input for tests: Part 10 files with arbitrary data set bytes, raw elements, and a C-STORE SCU that
streams those bytes to the node unchanged (pynetdicom's chunked send reads only the file meta)."""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
UNDEFINED = 0xFFFFFFFF


def element(group: int, elem: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2); `length` overrides the true length."""
    length = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr.encode(), 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), length & 0xFFFF) + value


def uid_value(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" * (len(raw) % 2)


def header(sop_instance_uid: str, sop_class_uid: str = CTImageStorage) -> bytes:
    """SOP Class and SOP Instance UID elements: the start of every data set built here."""
    return element(0x0008, 0x0016, "UI", uid_value(sop_class_uid)) + element(
        0x0008, 0x0018, "UI", uid_value(sop_instance_uid)
    )


def image(rows: int, columns: int, pixel_bytes: bytes) -> bytes:
    """The Image Pixel module of an 8-bit MONOCHROME2 image with the given Pixel Data bytes."""
    return b"".join(
        (
            element(0x0008, 0x0060, "CS", b"CT"),
            element(0x0028, 0x0002, "US", _us(1)),
            element(0x0028, 0x0004, "CS", b"MONOCHROME2 "),
            element(0x0028, 0x0010, "US", _us(rows)),
            element(0x0028, 0x0011, "US", _us(columns)),
            element(0x0028, 0x0100, "US", _us(8)),
            element(0x0028, 0x0101, "US", _us(8)),
            element(0x0028, 0x0102, "US", _us(7)),
            element(0x0028, 0x0103, "US", _us(0)),
            element(0x7FE0, 0x0010, "OB", pixel_bytes + b"\0" * (len(pixel_bytes) % 2)),
        )
    )


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def nested_sequences(depth: int) -> bytes:
    """`depth` sequences nested one inside the other's item, all of undefined length."""
    opening = element(0x0040, 0xA730, "SQ", b"", UNDEFINED) + struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def part10(
    path: Path,
    sop_instance_uid: str,
    body: bytes,
    syntax: str = ExplicitVRLittleEndian,
    sop_class: str = CTImageStorage,
) -> Path:
    """A Part 10 file with a valid file meta and `body` as its data set bytes, whatever they are."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.10.1494.1")
    buffer = BytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + body)
    return path


def deflate_bomb(path: Path, sop_instance_uid: str, inflated: int) -> Path:
    """A Deflated Explicit VR file whose data set inflates to about `inflated` bytes of one private OB value."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = (
        header(sop_instance_uid) + element(0x0011, 0x0010, "LO", b"BOMB") + element(0x0011, 0x1010, "OB", b"", inflated)
    )
    parts = [deflater.compress(start)]
    zeros = bytes(1024 * 1024)
    for _ in range(inflated // len(zeros)):
        parts.append(deflater.compress(zeros))
    parts.append(deflater.flush())
    return part10(path, sop_instance_uid, b"".join(parts), DeflatedExplicitVRLittleEndian)


def associate_rq(calling: str = "FUZZER", called: str = "COMPRESS_SCP") -> bytes:
    """A minimal valid A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing CT Image Storage in Explicit VR LE."""

    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value

    context = (
        struct.pack(">BBBB", 1, 0, 0, 0) + item(0x30, CTImageStorage.encode()) + item(0x40, b"1.2.840.10008.1.2.1")
    )
    user = item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.826.0.1.3680043.10.1494.1")
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + item(0x10, b"1.2.840.10008.3.1.1.1")
        + item(0x20, context)
        + item(0x50, user)
    )
    return struct.pack(">BBL", 1, 0, len(body)) + body


@contextlib.contextmanager
def association(
    port: int,
    syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,),
    sop_class: str = CTImageStorage,
    calling: str = "FUZZER",
) -> Iterator[Association]:
    """An association to the node proposing `sop_class` in `syntaxes`, and Verification; released at the end."""
    assoc = open_association(port, syntaxes, sop_class, calling)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def open_association(
    port: int,
    syntaxes: tuple[str, ...] = (ExplicitVRLittleEndian,),
    sop_class: str = CTImageStorage,
    calling: str = "FUZZER",
) -> Association:
    """An established association to the node (the caller releases it)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for syntax in syntaxes:
        ae.add_requested_context(sop_class, syntax)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="COMPRESS_SCP")
    assert assoc.is_established, "the node refused the association"
    return assoc


def store(port: int, path: Path) -> int | None:
    """Send one file over a new association; the status answered, or None if the association ended first."""
    meta = read_file_meta_info(path)
    with association(port, (meta.TransferSyntaxUID,), meta.MediaStorageSOPClassUID) as assoc:
        response = assoc.send_c_store(path)
        return int(response.Status) if "Status" in response else None


def echo(port: int) -> int | None:
    with association(port) as assoc:
        response = assoc.send_c_echo()
        return int(response.Status) if "Status" in response else None


def raw_store(port: int, context_class: str, request_class: str, uid: str, data_set: bytes | None) -> int | None:
    """Send a C-STORE-RQ naming `request_class` on a presentation context for `context_class`, with `data_set`
    (Explicit VR Little Endian bytes) or with none at all; the status answered, or None."""
    import io
    import time

    from pynetdicom.dimse_primitives import C_STORE

    with association(port, (ExplicitVRLittleEndian,), context_class) as assoc:
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = request_class
        request.AffectedSOPInstanceUID = uid
        request.Priority = 2
        if data_set is not None:
            request.DataSet = io.BytesIO(data_set)
        context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == context_class)
        assoc._reactor_checkpoint.clear()  # take the reactor's place to read the response ourselves
        deadline = time.monotonic() + 10
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(request, context.context_id)
            _, response = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        return None if response is None or response.Status is None else int(response.Status)
