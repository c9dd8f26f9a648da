"""The forwarder's C-STORE SCU: what it writes is what pynetdicom writes, and odd peers end in an error, in time."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from scp import scu
from tests.instances import Arrivals, make_instances
from tests.peers import storescp

CT = (str(CTImageStorage), str(ExplicitVRLittleEndian))


@pytest.mark.parametrize(("message_id", "instance"), [(1, "1.2.3.4"), (65535, "1.2.826.0.1.3680043.8.498.123")])
def test_the_command_set_is_pynetdicoms_byte_for_byte(message_id: int, instance: str) -> None:
    """Odd and even UID lengths, the largest message ID."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = instance
    primitive.Priority = scu.LOW_PRIORITY
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0001
    assert scu._store_command(message_id, CTImageStorage, instance) == encode(message.command_set, True, True)


def test_a_response_is_read_as_pynetdicom_writes_it() -> None:
    response = C_STORE_RSP()
    response.command_set.AffectedSOPClassUID = CTImageStorage
    response.command_set.CommandField = 0x8001
    response.command_set.MessageIDBeingRespondedTo = 7
    response.command_set.CommandDataSetType = 0x0101
    response.command_set.Status = 0xA700
    response.command_set.ErrorComment = "disk full"
    elements = scu._command_elements(encode(response.command_set, True, True))
    assert scu._us(elements, 0x0900) == 0xA700 and scu._us(elements, 0x0120) == 7
    assert elements[0x0902].rstrip(b" ") == b"disk full"
    with pytest.raises(ValueError, match=r"truncated|malformed"):
        scu._command_elements(encode(response.command_set, True, True)[:-3])


def test_fragments_fit_the_archives_maximum_pdu(tmp_path: Path) -> None:
    """DCMTK storescp taking PDUs of at most 4096 bytes gets a 0.5 MB instance in 4090-byte fragments, whole."""
    ((path, uid),) = make_instances(tmp_path / "modality", 1).items()
    arrivals = Arrivals(tmp_path / "archive")
    with storescp(tmp_path / "archive", extra=["-pdu", "4096"]) as port:
        association = scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 10)
        assert association.max_pdu == 4096
        assert association.store(path).status == 0x0000
        association.release()
    assert arrivals.uids() == {uid}
    (received,) = (tmp_path / "archive").glob("CT*")
    assert pydicom.dcmread(received).PixelData == pydicom.dcmread(path).PixelData


@contextlib.contextmanager
def _peer(answer: bytes | None) -> Iterator[int]:
    """A TCP peer that reads the association request, then sends `answer` (None: nothing) and keeps the
    connection open until the test ends."""
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            if answer is not None:
                connection.sendall(answer)
            done.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        server.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (None, "no answer within 1 s"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "the peer sent a PDU of"),
        (b"\x02\x00" + struct.pack(">I", 8) + b"\x00\x01garbag", "cannot be read"),
        (b"\x07\x00" + struct.pack(">I", 4) + b"\x00\x00\x02\x00", "aborted by the peer (DUL service-provider"),
        (b"\x04\x00" + struct.pack(">I", 0), "unexpected PDU (type 0x04)"),
    ],
)
def test_a_peer_that_does_not_accept_properly_fails_the_request_in_time(answer: bytes | None, reason: str) -> None:
    """Silence, an HTTP server, a malformed A-ASSOCIATE-AC, an A-ABORT, a P-DATA: AssociationFailed with the reason,
    within the timeout."""
    with _peer(answer) as port:
        started = time.monotonic()
        with pytest.raises(scu.AssociationFailed, match=re.escape(reason)):
            scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 1)
        assert time.monotonic() - started < 3
