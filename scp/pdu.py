"""The upper layer's wire format (PS3.8 9.3) and DIMSE command sets (PS3.7 6.3), as both ends of the node use them:
the forwarder's SCU (scu.py) and the receiving SCP (acceptor.py). Blocking sockets, every read bounded.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import time
from typing import BinaryIO

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = (
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x07,
)
HEADER = struct.Struct(">BxI")
"""A PDU's type, a reserved byte and the length of what follows (PS3.8 9.3.1)."""
PDV_HEADER = struct.Struct(">IBB")
"""A presentation data value item's length, presentation context ID and message control header (PS3.8 9.3.5.1)."""
COMMAND, LAST = 0x01, 0x02
"""The message control header's bits: a command fragment (else data set), the last fragment (PS3.8 E.2)."""
RELEASE_RQ_PDU, RELEASE_RP_PDU = (HEADER.pack(kind, 4) + bytes(4) for kind in (RELEASE_RQ, RELEASE_RP))
"""The two release PDUs: a fixed body of four zero bytes (PS3.8 9.3.6, 9.3.7)."""
MAX_COMMAND = 1 << 16
"""The largest command set taken: a C-STORE request or response is a few hundred bytes."""
MAX_PDV = 1 << 20
"""The largest fragment sent, also to a peer that declares no maximum PDU length (0) or a huge one: memory stays
flat, and each PDU can go out within the timeout on a slow link."""
DATA_SET_ABSENT = 0x0101
"""Command Data Set Type saying no data set follows (PS3.7 E.1); any other value says one does."""

_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")


def abort_pdu(source: int = 0, reason: int = 0) -> bytes:
    """An A-ABORT (PS3.8 9.3.8): source 0 the service user (reason 0), 2 the service provider, with its reason."""
    return HEADER.pack(ABORT, 4) + bytes((0, 0, source, reason))


def read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """`size` bytes from `sock` by `deadline`; EOFError when the peer closes the connection first."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(remaining)
        ack_at_once(sock)
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError("the peer closed the connection")
        data += chunk
    return bytes(data)


def read_pdu(sock: socket.socket, deadline: float, limit: int) -> tuple[int, bytes]:
    """The next PDU's type and body, by `deadline`; ValueError for a PDU declaring more than `limit` bytes (before
    any of them is read)."""
    kind, length = HEADER.unpack(read_exactly(sock, HEADER.size, deadline))
    if length > limit:
        raise ValueError(f"the peer sent a PDU of type 0x{kind:02X} declaring {length} bytes (limit {limit})")
    return kind, read_exactly(sock, length, deadline)


def send_fragments(sock: socket.socket, context_id: int, kind: int, source: BinaryIO, size: int, max_pdu: int) -> None:
    """Send `size` bytes read from `source` as P-DATA-TF PDUs of one PDV each, none longer than the peer's
    `max_pdu` (0: no limit) allows; `kind` is COMMAND or 0 (data set)."""
    fragment = max(min(max_pdu - PDV_HEADER.size, MAX_PDV), 1) if max_pdu else MAX_PDV
    left = size
    while left > 0:
        chunk = source.read(min(fragment, left))
        if not chunk:
            raise OSError(f"the source ended {left} bytes early")
        left -= len(chunk)
        control = kind | (LAST if left == 0 else 0)
        pdv = PDV_HEADER.pack(len(chunk) + 2, context_id, control)
        sock.sendall(HEADER.pack(P_DATA, len(pdv) + len(chunk)) + pdv + chunk)


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, Implicit VR Little Endian) of `elements` (element number, value) in order, with
    its Command Group Length first (PS3.7 6.3.1)."""
    body = b"".join(_ELEMENT_HEADER.pack(0x0000, element, len(value)) + value for element, value in elements)
    return _ELEMENT_HEADER.pack(0x0000, 0x0000, 4) + struct.pack("<I", len(body)) + body


def command_elements(command: bytes) -> dict[int, bytes]:
    """The elements of a command set (group 0000, Implicit VR Little Endian) by element number."""
    elements: dict[int, bytes] = {}
    position = 0
    while position < len(command):
        if position + _ELEMENT_HEADER.size > len(command):
            raise ValueError("a truncated command set")
        group, element, length = _ELEMENT_HEADER.unpack_from(command, position)
        position += _ELEMENT_HEADER.size
        if group != 0x0000 or position + length > len(command):
            raise ValueError("a malformed command set")
        elements[element] = command[position : position + length]
        position += length
    return elements


def us(value: int) -> bytes:
    """A US value."""
    return _US.pack(value)


def us_of(elements: dict[int, bytes], element: int) -> int | None:
    """A command set's US value, or None when it is absent or not two bytes long."""
    value = elements.get(element)
    return _US.unpack(value)[0] if value is not None and len(value) == _US.size else None


def uid(value: str) -> bytes:
    """A UI value, padded to even length with a NUL (PS3.5 6.2)."""
    encoded = value.encode("ascii")
    return encoded + b"\0" * (len(encoded) % 2)


def uid_of(elements: dict[int, bytes], element: int) -> str:
    """A command set's UI value without its padding ('' when absent)."""
    return elements.get(element, b"").decode("ascii", "replace").rstrip("\0 ")


def readable(sock: socket.socket) -> bool:
    """Whether the peer sent something (or closed the connection): bytes TLS has already decrypted count too."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()  # not select(): it fails on descriptors from 1024 on
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def ack_at_once(sock: socket.socket) -> None:
    """Linux clears TCP_QUICKACK by itself: set it before every read, so that a peer keeping Nagle's algorithm on
    (Debian's DCMTK) does not wait ~40 ms for our delayed ACK before its next PDU goes out."""
    quickack = getattr(socket, "TCP_QUICKACK", None)  # Linux only
    if quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
