"""The forwarder's C-STORE SCU: what it writes is what pynetdicom writes, and odd peers end in an error, in time."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import CTImageStorage

from scp import pdu, scu
from scp.config import DicomDestination
from scp.forward import DicomForwarder
from scp.spool import Spool
from scp.status import Outcome
from tests.instances import Arrivals, make_instances, queue_job
from tests.peers import storescp, wait_for

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
    elements = pdu.command_elements(encode(response.command_set, True, True))
    assert pdu.us_of(elements, 0x0900) == 0xA700 and pdu.us_of(elements, 0x0120) == 7
    assert elements[0x0902].rstrip(b" ") == b"disk full"
    with pytest.raises(ValueError, match=r"truncated|malformed"):
        pdu.command_elements(encode(response.command_set, True, True)[:-3])


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
    with _scripted(_until_closed, answer=lambda request: answer or b"") as port:
        started = time.monotonic()
        with pytest.raises(scu.AssociationFailed, match=re.escape(reason)):
            scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 1)
        assert time.monotonic() - started < 3


def _accept(request: bytes) -> bytes:
    """An A-ASSOCIATE-AC accepting every context of the A-ASSOCIATE-RQ `request` in its first transfer syntax."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(request)
    asked = rq.to_primitive()
    answer = A_ASSOCIATE()
    answer.application_context_name = asked.application_context_name
    answer.calling_ae_title = asked.calling_ae_title
    answer.called_ae_title = asked.called_ae_title
    answer.result = 0x00
    for context in asked.presentation_context_definition_list:
        context.result = 0x00
        context.transfer_syntax = context.transfer_syntax[:1]
    answer.presentation_context_definition_results_list = asked.presentation_context_definition_list
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    answer.user_information = [maximum]
    accept = A_ASSOCIATE_AC()
    accept.from_primitive(answer)
    return cast(bytes, accept.encode())


def _read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    return pdu.read_pdu(connection, time.monotonic() + 10, scu.MAX_PDU_READ)


@contextlib.contextmanager
def _scripted(then: Callable[[socket.socket], None], answer: Callable[[bytes], bytes] = _accept) -> Iterator[int]:
    """A peer that answers the association request with `answer(request)`, then runs `then` on the connection."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            kind, body = _read_pdu(connection)
            connection.sendall(answer(struct.pack(">BxI", kind, len(body)) + body))
            then(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        thread.join(15)
        server.close()


def _until_closed(connection: socket.socket) -> None:
    """Wait for the other end to close the connection (or reset it, leaving our answer unread)."""
    with contextlib.suppress(OSError):
        connection.recv(1)


def _read_store(connection: socket.socket) -> None:
    """Read one C-STORE request, up to its last data fragment."""
    while True:
        _, body = _read_pdu(connection)
        _, _, control = struct.unpack_from(">IBB", body)
        if control == 0x02:
            return


def test_a_command_set_that_never_ends_is_cut_off(tmp_path: Path) -> None:
    """A peer answering with command fragments none of which is the last: ended once 64 KiB came, not kept in
    memory until the timeout."""
    ((path, _),) = make_instances(tmp_path / "modality", 1).items()

    def flood(connection: socket.socket) -> None:
        _read_store(connection)
        fragment = struct.pack(">IBB", 16002, 1, 0x01) + bytes(16000)
        with contextlib.suppress(OSError):
            for _ in range(200):
                connection.sendall(struct.pack(">BxI", 4, len(fragment)) + fragment)

    with _scripted(flood) as port:
        association = scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 30)
        started = time.monotonic()
        with pytest.raises(scu.AssociationEnded, match="a command set of more than 65536 bytes"):
            association.store(path)
        assert time.monotonic() - started < 10


def test_an_accepted_context_without_a_transfer_syntax_fails_the_request() -> None:
    def without_syntax(request: bytes) -> bytes:
        accepted = _accept(request)
        item = accepted.index(b"\x21\x00", 6 + 68)  # the presentation context item: keep its first 4 bytes
        length = struct.unpack_from(">H", accepted, item + 2)[0]
        body = accepted[6:item] + b"\x21\x00\x00\x04" + accepted[item + 4 : item + 8] + accepted[item + 4 + length :]
        return struct.pack(">BxI", 2, len(body)) + body

    with (
        _scripted(lambda connection: None, answer=without_syntax) as port,
        pytest.raises(scu.AssociationFailed, match="cannot be read"),
    ):
        scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 5)


def test_a_host_that_is_no_host_name_fails_the_request() -> None:
    """`archive..example` fails IDNA encoding (a UnicodeError, not an OSError)."""
    with pytest.raises(scu.AssociationFailed, match="cannot connect"):
        scu.request("archive..example", 104, "SCU", "ARCHIVE", [CT], 5)


def test_a_release_request_between_c_stores_is_answered() -> None:
    received: list[int] = []

    def releases(connection: socket.socket) -> None:
        connection.sendall(struct.pack(">BxI", 5, 4) + bytes(4))
        received.append(_read_pdu(connection)[0])

    with _scripted(releases) as port:
        association = scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 5)
        wait_for(lambda: pdu.readable(association._sock), 10, "the archive's release request")
        assert not association.is_open()
    assert received == [0x06]


def test_a_release_collision_is_answered_at_once() -> None:
    """Both ask to release: the requestor answers first (PS3.8 9.2.3), then gets the answer."""
    received: list[int] = []

    def collides(connection: socket.socket) -> None:
        connection.sendall(struct.pack(">BxI", 5, 4) + bytes(4))
        received.extend(_read_pdu(connection)[0] for _ in range(2))
        connection.sendall(struct.pack(">BxI", 6, 4) + bytes(4))

    with _scripted(collides) as port:
        association = scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 5)
        started = time.monotonic()
        association.release()
        assert time.monotonic() - started < 2
    assert received == [0x05, 0x06]


def test_liveness_is_checked_on_descriptors_from_1024_on() -> None:
    """select() fails on a descriptor of 1024 or more, which a node with many files open reaches."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"the hard limit of open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    try:
        with _scripted(lambda connection: time.sleep(1)) as port:
            association = scu.request("127.0.0.1", port, "SCU", "ARCHIVE", [CT], 5)
            low = association._sock
            association._sock = socket.socket(fileno=os.dup2(low.fileno(), 1090))
            low.close()
            assert association.is_open()
            association.abort()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_jobs_behind_an_association_ended_before_the_first_count_no_attempt(tmp_path: Path) -> None:
    """The archive accepts and closes at once: the first job is charged an attempt (an archive dropping every
    association backs off), the ones behind it not."""
    spool = Spool(tmp_path / "spool")
    for index, (path, uid) in enumerate(make_instances(tmp_path / "modality", 3).items()):
        queue_job(spool, index, path, uid)
    with _scripted(lambda connection: None) as port:
        destination = DicomDestination(type="dicom", ae_title="ARCHIVE", host="127.0.0.1", port=port, timeout=5)
        forwarder = DicomForwarder(destination, "SCU", tmp_path)
        time.sleep(0.5)
        deliveries = list(forwarder.deliver(spool.jobs("archive")))
    assert [(d.outcome, d.sent) for d in deliveries] == [(Outcome.TRANSIENT, True)] + [(Outcome.TRANSIENT, False)] * 2
