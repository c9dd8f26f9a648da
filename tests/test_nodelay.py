"""receive.set_nodelay: no Nagle, and no delayed ACKs, on an association's socket."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from scp.receive import set_nodelay


class _Transport:
    """The part of pynetdicom's AssociationSocket that set_nodelay touches."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def recv(self, nr_bytes: int) -> bytearray:
        return bytearray(self.socket.recv(nr_bytes))


def test_set_nodelay_disables_nagle_and_acks_before_every_read() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            transport = _Transport(client)
            set_nodelay(SimpleNamespace(dul=SimpleNamespace(socket=transport)))  # type: ignore[arg-type]
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            if not hasattr(socket, "TCP_QUICKACK"):
                pytest.skip("TCP_QUICKACK is Linux only")
            for payload in (b"first", b"second"):
                peer.sendall(payload)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
                assert transport.recv(len(payload)) == payload
                assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_set_nodelay_ignores_an_association_without_a_socket() -> None:
    set_nodelay(SimpleNamespace(dul=SimpleNamespace(socket=None)))  # type: ignore[arg-type]
