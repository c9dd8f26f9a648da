"""The node's SCP on the wire (acceptor.py): raw PDUs against a running node. Messages split anyhow are stored
byte for byte, responses fit the requestor's maximum PDU, requests it does not perform are answered, protocol
errors abort and leave no file behind, and the timeouts end an association as documented."""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filereader import read_preamble
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from scp import acceptor, config, pdu, status
from scp.receive import Handler
from scp.service import Service
from scp.spool import ReceiveBudget, Spool
from tests import hostile
from tests.peers import node_config, running_node, wait_for

pytestmark = pytest.mark.peers

CT_CONTEXT, VERIFICATION_CONTEXT = 1, 3
VERIFICATION = "1.2.840.10008.1.1"
KEEP_RULES = [{"name": "all", "compress": "keep", "forward": ["folder"]}]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Service]:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(tmp_path, destinations, KEEP_RULES, node={"network_timeout": 1.5, "dimse_timeout": 1.5})
    with running_node(data) as service:
        yield service


def _associate(port: int, max_pdu: int = 16384) -> socket.socket:
    """An established association proposing CT Image Storage (context 1) and Verification (context 3)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "WIRE", "COMPRESS_SCP"
    contexts = [build_context(CTImageStorage, [ExplicitVRLittleEndian]), build_context(VERIFICATION)]
    for context_id, context in zip((CT_CONTEXT, VERIFICATION_CONTEXT), contexts, strict=True):
        context.context_id = context_id
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    primitive.user_information = [maximum]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request.encode())
    kind, body = _read(sock)
    assert kind == pdu.ASSOCIATE_AC, f"not accepted (PDU type 0x{kind:02X})"
    answer = A_ASSOCIATE_AC()
    answer.decode(pdu.HEADER.pack(kind, len(body)) + body)
    accepted = {
        cx.context_id for cx in answer.to_primitive().presentation_context_definition_results_list if not cx.result
    }
    assert accepted == {CT_CONTEXT, VERIFICATION_CONTEXT}
    return sock


def _read(sock: socket.socket) -> tuple[int, bytes]:
    return pdu.read_pdu(sock, time.monotonic() + 10, 1 << 20)


def _pdv(context_id: int, control: int, value: bytes) -> bytes:
    return pdu.PDV_HEADER.pack(len(value) + 2, context_id, control) + value


def _p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return pdu.HEADER.pack(pdu.P_DATA, len(body)) + body


def _command(field: int, sop_class: str, sop_instance: str | None, data_set: bool) -> bytes:
    elements = [(0x0002, pdu.uid(sop_class)), (0x0100, pdu.us(field)), (0x0110, pdu.us(7))]
    elements.append((0x0800, pdu.us(0x0001 if data_set else pdu.DATA_SET_ABSENT)))
    if sop_instance is not None:
        elements.append((0x1000, pdu.uid(sop_instance)))
    return pdu.command_set(elements)


def _response(sock: socket.socket, max_pdu: int = 1 << 20) -> dict[int, bytes]:
    """The next response's command set, checking every PDU fits `max_pdu`."""
    command = bytearray()
    while True:
        kind, body = _read(sock)
        assert kind == pdu.P_DATA, f"PDU type 0x{kind:02X} instead of a response"
        assert len(body) <= max_pdu, f"a PDU of {len(body)} bytes, over the requestor's {max_pdu}"
        position = 0
        while position < len(body):
            length, _, control = pdu.PDV_HEADER.unpack_from(body, position)
            assert control & pdu.COMMAND
            command += body[position + 6 : position + 4 + length]
            position += 4 + length
            if control & pdu.LAST:
                return pdu.command_elements(bytes(command))


def _aborted(sock: socket.socket) -> bool:
    """Whether the node sent an A-ABORT (source: service provider) and closed the connection."""
    try:
        kind, body = _read(sock)
        return kind == pdu.ABORT and body[2] == 2 and not sock.recv(1)
    except (EOFError, ConnectionResetError):
        return False


def _partials(node: Service) -> list[Path]:
    return list(node.spool.tmp.glob("tmp*.dcm"))


def _data_set(uid: str) -> bytes:
    return hostile.header(uid) + hostile.image(64, 64, bytes(range(256)) * 16)


def test_a_store_split_anyhow_is_stored_byte_for_byte(node: Service, tmp_path: Path) -> None:
    """The command in three PDUs, the data set in fragments of uneven sizes, several to a PDU."""
    uid = generate_uid()
    command, data = _command(0x0001, CTImageStorage, uid, True), _data_set(uid)
    with _associate(node.port) as sock:
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND, command[:10])))
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND, command[10:11])))
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, command[11:])))
        cuts = [0, 1, 7, 100, 2000, 2001, len(data)]
        fragments = [
            _pdv(CT_CONTEXT, pdu.LAST if end == len(data) else 0, data[start:end])
            for start, end in itertools.pairwise(cuts)
        ]
        sock.sendall(_p_data(*fragments[:3]) + _p_data(fragments[3]) + _p_data(*fragments[4:]))
        answer = _response(sock)
        assert pdu.us_of(answer, 0x0900) == status.SUCCESS
        assert (pdu.us_of(answer, 0x0100), pdu.us_of(answer, 0x0120)) == (0x8001, 7)
        assert pdu.uid_of(answer, 0x1000) == uid
        sock.sendall(pdu.RELEASE_RQ_PDU)
        assert _read(sock)[0] == pdu.RELEASE_RP
    stored = tmp_path / "folder" / f"{uid}.dcm"
    wait_for(stored.exists, 30, "the instance in the folder")
    with open(stored, "rb") as f:
        read_preamble(f, False)
        meta_length = struct.unpack("<I", f.read(12)[8:])[0]
        f.seek(meta_length, 1)
        assert f.read() == data


def test_responses_fit_the_requestors_maximum_pdu(node: Service) -> None:
    with _associate(node.port, max_pdu=40) as sock:
        sock.sendall(
            _p_data(_pdv(VERIFICATION_CONTEXT, pdu.COMMAND | pdu.LAST, _command(0x0030, VERIFICATION, None, False)))
        )
        assert pdu.us_of(_response(sock, max_pdu=40), 0x0900) == status.SUCCESS


def test_a_request_the_node_does_not_perform_is_answered_and_the_association_goes_on(node: Service) -> None:
    """A C-FIND with its identifier: C-FIND-RSP 0x0211 (unrecognized operation), then an echo is served."""
    identifier = hostile.element(0x0010, 0x0010, "PN", b"DOE^J ")
    with _associate(node.port) as sock:
        find = _command(0x0020, CTImageStorage, None, True)
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, find), _pdv(CT_CONTEXT, pdu.LAST, identifier)))
        answer = _response(sock)
        assert (pdu.us_of(answer, 0x0100), pdu.us_of(answer, 0x0900)) == (0x8020, 0x0211)
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, _command(0x0030, VERIFICATION, None, False))))
        assert pdu.us_of(_response(sock), 0x0900) == status.SOP_CLASS_NOT_SUPPORTED  # an echo on the CT context
        sock.sendall(
            _p_data(_pdv(VERIFICATION_CONTEXT, pdu.COMMAND | pdu.LAST, _command(0x0030, VERIFICATION, None, False)))
        )
        assert pdu.us_of(_response(sock), 0x0900) == status.SUCCESS
    assert not node.spool.incoming()


@pytest.mark.parametrize(
    "breach",
    [
        _p_data(_pdv(CT_CONTEXT, pdu.LAST, b"\x08\x00")),  # a data set fragment with no command before it
        _p_data(_pdv(5, pdu.COMMAND | pdu.LAST, b"")),  # a context never proposed
        pdu.HEADER.pack(0x09, 4) + bytes(4),  # no such PDU type
        hostile.associate_rq(),  # a second association request
        _p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, b"\x00\x00\x00")),  # a command set that cannot be read
        _p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, _command(0x8001, CTImageStorage, "1.2", False))),  # a response
    ],
)
def test_a_protocol_error_aborts_the_association(node: Service, breach: bytes) -> None:
    with _associate(node.port) as sock:
        sock.sendall(breach)
        assert _aborted(sock)
    assert hostile.echo(node.port) == status.SUCCESS


@pytest.mark.parametrize("then", ["abort", "close", "command", "release"])
def test_a_data_set_that_never_comes_whole_leaves_no_file(node: Service, then: str) -> None:
    """Half a data set, then the peer's A-ABORT, a closed connection, a new command or a release request: nothing
    stored, the file of the half gone at once."""
    uid = generate_uid()
    data = _data_set(uid)
    with _associate(node.port) as sock:
        command = _command(0x0001, CTImageStorage, uid, True)
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, command), _pdv(CT_CONTEXT, 0, data[:3000])))
        wait_for(lambda: _partials(node), 10, "the half data set's file")
        if then == "abort":
            sock.sendall(pdu.abort_pdu())
        elif then == "command":
            sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND | pdu.LAST, command)))
            assert _aborted(sock)
        elif then == "release":
            sock.sendall(pdu.RELEASE_RQ_PDU)
            assert _aborted(sock)
    wait_for(lambda: not _partials(node), 5, "the half data set's file removed")
    assert not node.spool.incoming()


def test_an_idle_association_is_released_after_network_timeout(node: Service) -> None:
    with _associate(node.port) as sock:
        started = time.monotonic()
        assert _read(sock)[0] == pdu.RELEASE_RQ
        assert 1.0 < time.monotonic() - started < 6
        sock.sendall(pdu.RELEASE_RP_PDU)
        assert sock.recv(1) == b""


def test_a_message_paused_past_dimse_timeout_is_aborted(node: Service) -> None:
    with _associate(node.port) as sock:
        sock.sendall(_p_data(_pdv(CT_CONTEXT, pdu.COMMAND, _command(0x0001, CTImageStorage, "1.2.3", True)[:20])))
        started = time.monotonic()
        assert _aborted(sock)
        assert 1.0 < time.monotonic() - started < 6


def test_a_flood_of_connections_is_turned_away_and_the_node_recovers(tmp_path: Path) -> None:
    """Past 2 x max_associations + 32 open connections, more are closed at once instead of costing a thread
    each; once the flood's connections are gone, modalities are served again."""
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    with running_node(node_config(tmp_path, destinations, KEEP_RULES, node={"max_associations": 1})) as node:
        flood = [socket.create_connection(("127.0.0.1", node.port), timeout=5) for _ in range(34 + 6)]
        try:
            closed = 0
            for sock in flood[34:]:
                sock.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    closed += sock.recv(1) == b""
            assert closed == 6
            assert not _echoes(node.port), "served past the connection limit"
        finally:
            for sock in flood:
                sock.close()
        wait_for(lambda: _echoes(node.port), 10, "an echo once the flood is gone")


def _echoes(port: int) -> bool:
    try:
        return hostile.echo(port) == status.SUCCESS
    except (AssertionError, OSError):
        return False


def test_a_pdu_dripping_in_slower_than_its_deadline_is_closed(node: Service) -> None:
    """Each byte within network_timeout of the last, but the PDU not within network_timeout (+ 1 MiB/s): a peer
    dripping bytes holds a thread no longer than that."""
    with _associate(node.port) as sock:
        sock.sendall(pdu.HEADER.pack(pdu.P_DATA, 1000) + pdu.PDV_HEADER.pack(996, CT_CONTEXT, pdu.COMMAND))
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < 10:
                sock.sendall(b"\0")
                if pdu.readable(sock) and not sock.recv(64):
                    break
                time.sleep(0.4)
        assert time.monotonic() - started < 5, "the node kept reading the dripping PDU"


def test_a_connection_whose_thread_cannot_start_is_closed_and_the_next_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread to be had (TasksMax, memory) for one connection: that one is closed, the accept loop goes on."""
    starting = acceptor._Connection.__init__
    failed: list[int] = []

    def first_cannot_start(self: acceptor._Connection, *args: Any) -> None:
        starting(self, *args)
        if not failed:
            failed.append(1)
            self.thread.start = _no_thread  # type: ignore[method-assign]

    monkeypatch.setattr(acceptor._Connection, "__init__", first_cannot_start)
    node = config.NodeConfig(host="127.0.0.1", port=0)
    server = acceptor.Acceptor(
        node, Handler(Spool(tmp_path / "spool"), _Silent(), node), ReceiveBudget(2**30, 0), print
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(server.server_address, timeout=5) as refused:
            assert refused.recv(1) == b""
        with socket.create_connection(server.server_address, timeout=5) as served:
            served.sendall(hostile.associate_rq())
            assert _read(served)[0] == pdu.ASSOCIATE_AC
    finally:
        server.shutdown()
        server.end(time.monotonic())


def _no_thread() -> None:
    raise RuntimeError("can't start new thread")


class _Silent:
    def received(self, *args: object) -> None: ...

    def refused(self, *args: object) -> None: ...

    def rejected(self, *args: object) -> None: ...


def test_a_release_collision_is_answered_after_the_requestors_answer(node: Service) -> None:
    """The node releases an idle association; the peer asks to release too. The acceptor answers only once the
    requestor has answered its request (PS3.8 9.2.3, AR-10 then AR-4)."""
    with _associate(node.port) as sock:
        assert _read(sock)[0] == pdu.RELEASE_RQ
        sock.sendall(pdu.RELEASE_RQ_PDU)
        time.sleep(0.5)
        assert not pdu.readable(sock), "the acceptor answered before the requestor"
        sock.sendall(pdu.RELEASE_RP_PDU)
        assert _read(sock)[0] == pdu.RELEASE_RP
        assert sock.recv(1) == b""


def test_role_selection_and_an_operations_window_proposed_still_store(node: Service, tmp_path: Path) -> None:
    """PS3.7 D.3.3.3-4: the role item answered with the requestor as SCU only, the window left unanswered (no
    asynchronous operations), and the instance stored."""
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, True
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    ae = AE(ae_title="WIRE")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COMPRESS_SCP", ext_neg=[role, window])
    assert assoc.is_established
    try:
        answered = {type(item).__name__ for item in assoc.acceptor.user_information}
        assert "AsynchronousOperationsWindowNegotiation" not in answered
        assert "SCP_SCU_RoleSelectionNegotiation" in answered
        (context,) = assoc.accepted_contexts
        assert (context.as_scu, context.as_scp) == (True, False)  # the requestor's roles
        uid = generate_uid()
        dataset = pydicom.dcmread(hostile.part10(tmp_path / f"{uid}.sent", uid, _data_set(uid)))
        assert assoc.send_c_store(dataset).Status == status.SUCCESS
    finally:
        assoc.release()
    wait_for((tmp_path / "folder" / f"{uid}.dcm").exists, 30, "the instance in the folder")


def test_two_contexts_of_one_class_in_two_syntaxes_keep_each_syntax(node: Service, tmp_path: Path) -> None:
    ae = AE(ae_title="WIRE")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="COMPRESS_SCP")
    assert assoc.is_established
    uids = {ImplicitVRLittleEndian: generate_uid(), ExplicitVRLittleEndian: generate_uid()}
    try:
        for syntax, uid in uids.items():
            read = pydicom.dcmread(hostile.part10(tmp_path / f"{uid}.sent", uid, _data_set(uid)))
            dataset = pydicom.Dataset(read)  # no encoding of its own: sent in the syntax its file meta names
            dataset.file_meta = read.file_meta
            dataset.file_meta.TransferSyntaxUID = syntax
            assert assoc.send_c_store(dataset).Status == status.SUCCESS
    finally:
        assoc.release()
    for syntax, uid in uids.items():
        stored = tmp_path / "folder" / f"{uid}.dcm"
        wait_for(stored.exists, 30, "the instance in the folder")
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax


def test_a_pdu_before_any_association_request_is_aborted_by_the_service_user(node: Service) -> None:
    """PS3.8 9.2 (Sta2, AA-1): an A-ABORT of source 0, no answer to what was sent; the node serves on."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(
            _p_data(_pdv(VERIFICATION_CONTEXT, pdu.COMMAND | pdu.LAST, _command(0x0030, VERIFICATION, None, False)))
        )
        kind, body = _read(sock)
        assert (kind, body[2]) == (pdu.ABORT, 0)
    assert hostile.echo(node.port) == status.SUCCESS
