"""The wire format both ends of the node share (pdu.py), and what the acceptor writes, read by pydicom and
pynetdicom."""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pydicom.uid import CTImageStorage, JPEGLSLossless
from pynetdicom.dsutils import decode

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, acceptor, config, pdu
from scp.receive import Handler
from scp.spool import ReceiveBudget, Spool


def test_ack_at_once_rearms_quickack_before_every_read() -> None:
    if not hasattr(socket, "TCP_QUICKACK"):
        pytest.skip("TCP_QUICKACK is Linux only")
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            for payload in (b"first", b"second"):
                peer.sendall(payload)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
                pdu.ack_at_once(client)
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
                assert client.recv(len(payload)) == payload


def test_a_command_set_is_what_pynetdicom_decodes() -> None:
    command = pdu.command_set([(0x0100, pdu.us(0x8001)), (0x0120, pdu.us(7)), (0x1000, pdu.uid("1.2.3"))])
    decoded = decode(io.BytesIO(command), True, True)
    assert (decoded.CommandField, decoded.MessageIDBeingRespondedTo, decoded.AffectedSOPInstanceUID) == (
        0x8001,
        7,
        "1.2.3",
    )
    assert decoded.CommandGroupLength == len(command) - 12
    assert pdu.command_elements(command)[0x1000] == b"1.2.3\0"


@pytest.mark.parametrize("max_pdu", [0, 64, 4096])
def test_fragments_are_no_longer_than_the_peer_takes(max_pdu: int) -> None:
    data = bytes(range(256)) * 40
    left, right = socket.socketpair()
    with left, right:
        threading.Thread(target=pdu.send_fragments, args=(left, 3, 0, io.BytesIO(data), len(data), max_pdu)).start()
        received = bytearray()
        while True:
            kind, length = pdu.HEADER.unpack(right.recv(6, socket.MSG_WAITALL))
            assert kind == pdu.P_DATA and (max_pdu == 0 or length <= max_pdu)
            item_length, context_id, control = pdu.PDV_HEADER.unpack(right.recv(6, socket.MSG_WAITALL))
            assert (item_length, context_id) == (length - 4, 3)
            received += right.recv(item_length - 2, socket.MSG_WAITALL)
            if control & pdu.LAST:
                break
    assert received == data


def test_the_file_meta_written_before_a_data_set_is_what_pydicom_reads(tmp_path: Path) -> None:
    path = tmp_path / "meta.dcm"
    path.write_bytes(acceptor._file_meta(CTImageStorage, "1.2.345", JPEGLSLossless))
    meta = read_file_meta_info(path)
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == "1.2.345"
    assert meta.TransferSyntaxUID == JPEGLSLossless
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION
    assert meta.FileMetaInformationVersion == b"\x00\x01"


def test_accepted_connections_turn_off_nagle(tmp_path: Path) -> None:
    """Without TCP_NODELAY our small responses would wait for the peer's delayed ACK (~40 ms each)."""

    class Told:
        def received(self, *args: object) -> None: ...

        def refused(self, *args: object) -> None: ...

        def rejected(self, *args: object) -> None: ...

    node = config.NodeConfig(host="127.0.0.1", port=0)
    spool = Spool(tmp_path / "spool")

    server = acceptor.Acceptor(node, Handler(spool, Told(), node), ReceiveBudget(2**30, 0), Told().rejected)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(server.server_address, timeout=5):
            for _ in range(100):
                connections = server._snapshot()
                if connections and connections[0].sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                    break
                threading.Event().wait(0.02)
            else:
                pytest.fail("the accepted socket kept Nagle's algorithm on")
    finally:
        server.shutdown()
        server.end(0)
