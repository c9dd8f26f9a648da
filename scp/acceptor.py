"""The SCP on blocking sockets: one thread per connection, reading each PDU straight into place.

pynetdicom served each association with two threads handing every PDU from one to the other through queues, and
decoded each message into Python objects: the receiving process spent most of a core at 75 MB/s, most of it in
those reactors (py-spy). Here the connection's thread reads a PDU header, then each presentation data value:
a command fragment into a small buffer, a data set fragment from the socket straight into the instance's file
(in steps of at most STREAM_STEP bytes, so memory stays flat whatever PDU size a peer sends).

The protocol (PS3.8, PS3.7): the first PDU must be an A-ASSOCIATE-RQ within `acse_timeout` (acse.py decides it;
a port probe that connects and closes costs nothing); then C-STORE and C-ECHO requests, answered one by one
(no asynchronous operations, no C-CANCEL to act on); any other request is answered "unrecognized operation"
(0x0211). A release request is answered and ends the association; a protocol error (a PDU out of place, a data
set fragment without its command, a context never accepted, a malformed command) aborts it. Timeouts: each read
or write inside a PDU `network_timeout`; between two PDUs of one message `dimse_timeout` (then an abort);
between messages `network_timeout` (then a release). Deadlines per step, kept by the accept loop, stop a peer that
sends a byte at a time: the TLS handshake and the association request, then each PDU once its header has come.
PDU lengths are checked before anything is read (PduLimits).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, acse, limits, pdu, security, status
from scp.config import NodeConfig
from scp.receive import Handler, StoreRequest
from scp.spool import PartialReceive, ReceiveBudget

LOGGER = logging.getLogger(__name__)

STREAM_STEP = 1 << 18
"""The most bytes of a data set fragment read from the socket at a time (a buffer of this size per association
that receives a data set)."""
ABORT_PATIENCE = 1.0
"""Seconds an A-ABORT may take to go out."""
ACCEPT_CHECK = 0.5
"""Seconds between two looks at the stop flag while no connection comes."""
SPARE_CONNECTIONS = 32
"""Connections kept open beyond twice max_associations (not yet associated: port probes, a load balancer's checks);
past that, a flood of connections is closed as they come instead of costing a thread each."""
FLOOD_LOG_INTERVAL = 10.0
"""Seconds between two warnings about connections closed for the limit."""
SLOWEST_PDU_RATE = 1 << 20
"""Bytes a second a PDU must come at, beyond node.network_timeout, once its header has come (per-read timeouts
alone let a peer that sends a byte at a time hold a thread for ever)."""
END_PATIENCE = 2.0
"""Seconds the node's end waits for the connection threads it aborted (each removes its unfinished file)."""
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
RESPONSE_BIT = 0x8000
UNRECOGNIZED_OPERATION = 0x0211
"""PS3.7 C.4.4: the request is not one the node performs."""
PROVIDER = 2
"""A-ABORT source: the service provider (PS3.8 9.3.8)."""
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PDU_PARAMETER = 1, 2, 6
"""A-ABORT reasons of the service provider (PS3.8 9.3.8)."""
_REJECTION_LABELS = {
    acse.CALLING_AE_NOT_RECOGNISED: "calling AE not recognised",
    acse.CALLED_AE_NOT_RECOGNISED: "called AE not recognised",
}
"""Rejections counted in scp_associations_rejected_total, by reason (access control)."""
_FILE_META_HEADER = struct.Struct("<HH2sH")


class ProtocolError(Exception):
    """The peer broke the protocol: the association is aborted by `source` (the service provider, or before any
    association the service user: PS3.8 AA-1) with `reason`."""

    def __init__(self, message: str, reason: int = UNEXPECTED_PDU, source: int = PROVIDER) -> None:
        super().__init__(message)
        self.reason, self.source = reason, source


class _Closed(Exception):
    """The association is over: nothing more to read or send."""


@dataclass
class _Message:
    """A request whose data set is streaming in."""

    command: int
    message_id: int
    context_id: int
    elements: dict[int, bytes]
    data_set: PartialReceive | None
    """Where the data set goes; None: drained (an echo or an unrecognized request carrying one)."""


class Acceptor:
    """Listens on the node's address and serves each association in a thread of its own."""

    def __init__(
        self,
        node: NodeConfig,
        handler: Handler,
        budget: ReceiveBudget,
        on_reject: Callable[[str], None],
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        self.handler = handler
        self.budget = budget
        self.on_reject = on_reject
        self.tls_context = tls_context
        self.callers = security.caller_policy(node)
        self.limits = limits.PduLimits.for_max_pdu(node.max_pdu_size, node.max_instance_bytes)
        family, _, _, _, address = socket.getaddrinfo(
            node.host, node.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._listener = socket.create_server(address, family=family, backlog=128)
        self.server_address: tuple[str, int] = self._listener.getsockname()[:2]
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.connection_limit = 2 * node.max_associations + SPARE_CONNECTIONS
        self._turned_away = 0
        self._warned_at = -FLOOD_LOG_INTERVAL

    @property
    def associations(self) -> int:
        """Associations requested and not yet ended (established, or being negotiated)."""
        with self._lock:
            return sum(1 for connection in self._connections if connection.requested)

    def serve_forever(self) -> None:
        """Accept connections until `shutdown`."""
        try:
            poller = select.poll()
            poller.register(self._listener, select.POLLIN)
            while not self._stopping.is_set():
                self._expire_overdue()
                if not poller.poll(ACCEPT_CHECK * 1000):
                    continue
                try:
                    sock, address = self._listener.accept()
                except OSError as exc:  # out of descriptors, a connection reset before it was accepted
                    LOGGER.warning("accepting a connection failed: %s", exc)
                    time.sleep(0.1)
                    continue
                self._start(sock, str(address[0]))
        finally:
            self._listener.close()
            self._stopped.set()

    def _start(self, sock: socket.socket, address: str) -> None:
        """Serve a new connection in a thread of its own, unless too many are open or no thread can be had."""
        with self._lock:
            crowded = len(self._connections) >= self.connection_limit
        if crowded:
            self._turn_away(sock, address)
            return
        connection = _Connection(self, sock, address)
        with self._lock:
            self._connections.add(connection)
        try:
            connection.thread.start()
        except Exception as exc:  # RuntimeError: no thread to be had (TasksMax, memory); the next one may get one
            LOGGER.error("closing the connection from %s: cannot start its thread: %s", address, exc)
            self.forget(connection)
            sock.close()

    def _expire_overdue(self) -> None:
        now = time.monotonic()
        for connection in self._snapshot():
            if connection.deadline is not None and now > connection.deadline:
                connection.expire()

    def _turn_away(self, sock: socket.socket, address: str) -> None:
        """Close a connection at once: `connection_limit` connections are open."""
        sock.close()
        self._turned_away += 1
        now = time.monotonic()
        if now - self._warned_at >= FLOOD_LOG_INTERVAL:
            LOGGER.warning(
                "closed %d connection(s) at once, the last from %s: %d connections are open (2 x node.max_associations"
                " + %d)",
                self._turned_away,
                address,
                self.connection_limit,
                SPARE_CONNECTIONS,
            )
            self._warned_at, self._turned_away = now, 0

    @property
    def stopping(self) -> bool:
        """Whether `shutdown` was called."""
        return self._stopping.is_set()

    def shutdown(self) -> None:
        """Stop accepting (returns once the listener is closed)."""
        self._stopping.set()
        self._stopped.wait(ACCEPT_CHECK * 4)

    def end(self, deadline: float) -> None:
        """Let established associations end until `deadline`, then abort the rest (including connections that
        never sent an association request)."""
        while time.monotonic() < deadline and any(c.established for c in self._snapshot()):
            time.sleep(0.05)
        left = self._snapshot()
        for connection in left:
            connection.abort("to stop")
        until = time.monotonic() + END_PATIENCE
        for connection in left:
            connection.thread.join(max(0.0, until - time.monotonic()))

    def admit(self, connection: _Connection) -> bool:
        """Count `connection` as an association unless max_associations are under way already."""
        with self._lock:
            if sum(1 for c in self._connections if c.requested) >= self.node.max_associations:
                return False
            connection.requested = True
            return True

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _snapshot(self) -> list[_Connection]:
        with self._lock:
            return list(self._connections)


class _Connection:
    """One connection: its association, if it asks for one, served from the thread that runs `run`."""

    def __init__(self, acceptor: Acceptor, sock: socket.socket, address: str) -> None:
        self.acceptor = acceptor
        self.node = acceptor.node
        self.sock = sock
        self.address = address
        self.requested = False
        self.established = False
        self.calling_ae = ""
        self.called_ae = ""
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_max_pdu = 0
        self._sending = threading.Lock()
        self._buffer: bytearray | None = None
        self._incoming: _Message | None = None
        """The request whose data set is streaming in."""
        self.thread = threading.Thread(target=self.run, name=f"association-{address}", daemon=True)
        self.deadline: float | None = time.monotonic() + self.node.tls_handshake_timeout + self.node.acse_timeout
        """When the step under way must be over (the accept loop closes the connection then), or None: the TLS
        handshake and the association request together, then each PDU once its header has come."""
        self._overdue = "its TLS handshake and association request (node.tls_handshake_timeout + acse_timeout)"

    def run(self) -> None:
        try:
            self._open()
            if self._associate():
                self._serve()
        except _Closed:
            pass
        except ProtocolError as exc:
            LOGGER.warning("aborting the association from %s (%s): %s", self._who(), self.address, exc)
            self._send_abort(exc.source, exc.reason if exc.source == PROVIDER else 0)
        except (OSError, EOFError) as exc:
            if self.established:
                LOGGER.warning("the association from %s (%s) ended: %s", self._who(), self.address, _said(exc))
                self._send_abort(PROVIDER, 0)
        except Exception:
            LOGGER.exception("aborting the association from %s (%s) after an error", self._who(), self.address)
            self._send_abort(PROVIDER, 0)
        finally:
            self._discard(self._incoming)
            self.established = False
            with contextlib.suppress(OSError):
                self.sock.close()
            self.acceptor.forget(self)

    def abort(self, why: str) -> None:
        """Abort from another thread (the node stops): an A-ABORT (not over TLS, whose connection object is not
        for two threads at once), then the connection is shut so that its thread ends."""
        if self.requested:
            LOGGER.warning("aborting the association from %s (%s) %s", self._who(), self.address, why)
            if not isinstance(self.sock, ssl.SSLSocket):
                self._send_abort(0, 0)
        self._shut()

    def expire(self) -> None:
        """Close a connection whose step under way is overdue (called by the accept loop)."""
        self.deadline = None
        LOGGER.warning(
            "closing the connection from %s (%s): %s took too long", self._who(), self.address, self._overdue
        )
        self._shut()

    def _shut(self) -> None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the descriptor itself, under any TLS layer

    def _who(self) -> str:
        return self.calling_ae or "no AE title yet"

    def _open(self) -> None:
        """No Nagle (our small PDUs must not wait for the peer's ACK); TLS shaken hands with within its timeout."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.acceptor.tls_context
        if tls is not None:
            self.sock.settimeout(self.node.tls_handshake_timeout)
            try:
                self.sock = tls.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
                self.sock.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                LOGGER.warning("TLS handshake with %s failed: %s", self.address, exc)
                raise _Closed from exc
        self.sock.settimeout(self.node.network_timeout)

    def _associate(self) -> bool:
        """Read the A-ASSOCIATE-RQ and answer it; True once the association is established."""
        deadline = time.monotonic() + self.node.acse_timeout
        try:
            kind, body = pdu.read_pdu(self.sock, deadline, self.acceptor.limits.control)
        except EOFError:
            return False  # a port probe: connected, sent nothing, closed
        except TimeoutError:
            LOGGER.warning("no association request from %s within %g s", self.address, self.node.acse_timeout)
            return False
        except ValueError as exc:
            raise ProtocolError(str(exc), INVALID_PDU_PARAMETER) from exc
        if kind == pdu.ABORT:
            return False  # aborted before it began: nothing to answer (PS3.8 AA-2)
        if kind != pdu.ASSOCIATE_RQ:
            raise ProtocolError(f"a PDU of type 0x{kind:02X} before an association request", source=0)
        try:
            request = acse.parse_request(body)
        except ValueError as exc:
            raise ProtocolError(f"its association request cannot be read: {exc}", INVALID_PDU_PARAMETER) from exc
        self.calling_ae, self.called_ae = request.calling_ae, request.called_ae
        try:
            acse.check_request(request)
            self._check_access(request)
            if not self.acceptor.admit(self):
                raise acse.Rejection(
                    f"{self.node.max_associations} associations are under way (node.max_associations)",
                    acse.TRANSIENT,
                    acse.SERVICE_PROVIDER_PRESENTATION,
                    acse.LOCAL_LIMIT_EXCEEDED,
                )
        except acse.Rejection as rejection:
            LOGGER.warning(
                "rejected association from %s at %s to %s: %s",
                request.calling_ae,
                self.address,
                request.called_ae,
                rejection.why,
            )
            if rejection.source == acse.SERVICE_USER and rejection.reason in _REJECTION_LABELS:
                self.acceptor.on_reject(_REJECTION_LABELS[rejection.reason])
            self._send(rejection.pdu())
            return False
        negotiated = acse.negotiate(request, self.node.max_pdu_size)
        self.contexts = negotiated.contexts
        self.peer_max_pdu = request.max_pdu
        self._send(negotiated.answer)
        self.established = True
        self.deadline = None
        LOGGER.info(
            "accepted association from %s at %s to %s: %d of %d presentation contexts",
            self.calling_ae,
            self.address,
            self.called_ae,
            len(self.contexts),
            len(request.contexts),
        )
        return True

    def _check_access(self, request: acse.AssociationRequest) -> None:
        refusal = security.refused(
            self.node, self.acceptor.callers, request.called_ae, request.calling_ae, self.address
        )
        if refusal is not None:
            why, reason = refusal
            raise acse.Rejection(why, acse.PERMANENT, acse.SERVICE_USER, reason)

    def _serve(self) -> None:
        """Serve requests until the association ends."""
        command = bytearray()
        command_context: int | None = None
        while True:
            mid_message = self._incoming is not None or bool(command)
            kind, length = self._next_pdu(mid_message)
            self.deadline = time.monotonic() + self.node.network_timeout + length / SLOWEST_PDU_RATE
            self._overdue = f"a PDU of {length} bytes (node.network_timeout, then 1 MiB/s)"
            if kind == pdu.P_DATA:
                if length > self.acceptor.limits.data:
                    raise ProtocolError(
                        f"a P-DATA-TF declaring {length} bytes (limit {self.acceptor.limits.data})",
                        INVALID_PDU_PARAMETER,
                    )
                left = length
                while left:
                    left -= pdu.PDV_HEADER.size
                    if left < 0:
                        raise ProtocolError("a presentation data value cut short", INVALID_PDU_PARAMETER)
                    item_length, context_id, control = pdu.PDV_HEADER.unpack(self._read(pdu.PDV_HEADER.size))
                    size = item_length - 2
                    if size < 0 or size > left:
                        raise ProtocolError("a presentation data value of a wrong length", INVALID_PDU_PARAMETER)
                    left -= size
                    if context_id not in self.contexts:
                        raise ProtocolError(f"a fragment on presentation context {context_id}, never accepted")
                    if control & pdu.COMMAND:
                        if self._incoming is not None:
                            raise ProtocolError("a command fragment in the middle of a data set")
                        if command_context not in (None, context_id):
                            raise ProtocolError("a command's fragments on two presentation contexts")
                        if len(command) + size > pdu.MAX_COMMAND:
                            raise ProtocolError(f"a command set of more than {pdu.MAX_COMMAND} bytes")
                        command += self._read(size)
                        command_context = context_id
                        if control & pdu.LAST:
                            self._incoming = self._dispatch(bytes(command), context_id)
                            command.clear()
                            command_context = None
                    else:
                        current = self._incoming
                        if current is None:
                            raise ProtocolError("a data set fragment with no command before it")
                        if context_id != current.context_id:
                            raise ProtocolError("a data set fragment on another context than its command")
                        self._take(size, current.data_set)
                        if control & pdu.LAST:
                            self._incoming = None
                            self._complete(current)
            elif kind == pdu.RELEASE_RQ:
                self._read(length)
                if mid_message:
                    raise ProtocolError("a release request in the middle of a message")
                self._send(pdu.RELEASE_RP_PDU)
                LOGGER.info("association from %s (%s) released", self.calling_ae, self.address)
                raise _Closed
            elif kind == pdu.ABORT:
                LOGGER.info("association from %s (%s) aborted by the peer", self.calling_ae, self.address)
                raise _Closed
            elif kind in (pdu.ASSOCIATE_RQ, pdu.ASSOCIATE_AC, pdu.ASSOCIATE_RJ, pdu.RELEASE_RP):
                raise ProtocolError(f"an unexpected PDU (type 0x{kind:02X})")
            else:
                raise ProtocolError(f"an unrecognized PDU (type 0x{kind:02X})", UNRECOGNIZED_PDU)
            self.deadline = None

    def _next_pdu(self, mid_message: bool) -> tuple[int, int]:
        """The next PDU's type and length. Between messages, `network_timeout` of silence releases the
        association; in the middle of one, `dimse_timeout` aborts it."""
        wait = self.node.dimse_timeout if mid_message else self.node.network_timeout
        self.sock.settimeout(wait)
        pdu.ack_at_once(self.sock)
        try:
            header = self._read(pdu.HEADER.size, at_start=True)
        except TimeoutError:
            if mid_message:
                raise ProtocolError(f"no fragment of the message for {wait:g} s (node.dimse_timeout)") from None
            self._release_idle()
            raise _Closed from None
        finally:
            self.sock.settimeout(self.node.network_timeout)
        kind, length = pdu.HEADER.unpack(header)
        if kind != pdu.P_DATA and length > self.acceptor.limits.control:
            raise ProtocolError(f"a PDU of type 0x{kind:02X} declaring {length} bytes", INVALID_PDU_PARAMETER)
        return kind, length

    def _release_idle(self) -> None:
        """Release an association silent for network_timeout (the peer may answer within acse_timeout)."""
        LOGGER.warning(
            "releasing the association from %s (%s): no message for %g s (node.network_timeout)",
            self.calling_ae,
            self.address,
            self.node.network_timeout,
        )
        self._send(pdu.RELEASE_RQ_PDU)
        deadline = time.monotonic() + self.node.acse_timeout
        collided = False
        with contextlib.suppress(OSError, EOFError, ValueError):
            while (kind := pdu.read_pdu(self.sock, deadline, self.acceptor.limits.control)[0]) != pdu.ABORT:
                if kind == pdu.RELEASE_RQ:
                    collided = True  # a release collision: the acceptor answers after the requestor (PS3.8 AR-10)
                elif kind == pdu.RELEASE_RP:
                    if collided:
                        self._send(pdu.RELEASE_RP_PDU)
                    return

    def _dispatch(self, command: bytes, context_id: int) -> _Message | None:
        """Act on a whole command set: answer it, or return the message whose data set follows."""
        try:
            elements = pdu.command_elements(command)
        except ValueError as exc:
            raise ProtocolError(f"a command set that cannot be read: {exc}", INVALID_PDU_PARAMETER) from exc
        field = pdu.us_of(elements, 0x0100)
        message_id = pdu.us_of(elements, 0x0110)
        data_set_type = pdu.us_of(elements, 0x0800)
        if field == C_CANCEL_RQ:
            return None  # every request is answered before the next is read: nothing to cancel
        if field is None or message_id is None or data_set_type is None:
            raise ProtocolError("a command set lacking its Command Field, Message ID or Command Data Set Type")
        if field & RESPONSE_BIT:
            raise ProtocolError(f"a response (Command Field 0x{field:04X}) to a request never sent")
        carries_data_set = data_set_type != pdu.DATA_SET_ABSENT
        if field == C_STORE_RQ and carries_data_set:
            return _Message(field, message_id, context_id, elements, self._open_data_set(elements, context_id))
        if carries_data_set:
            return _Message(field, message_id, context_id, elements, None)
        self._complete(_Message(field, message_id, context_id, elements, None))
        return None

    def _open_data_set(self, elements: dict[int, bytes], context_id: int) -> PartialReceive:
        """A file in the spool's tmp/ holding the file meta the data set's fragments will follow."""
        sop_class, sop_instance = pdu.uid_of(elements, 0x0002), pdu.uid_of(elements, 0x1000)
        data_set = self.acceptor.handler.spool.open_partial_receive(budget=self.acceptor.budget)
        data_set.write(_file_meta(sop_class, sop_instance, self.contexts[context_id][1]))
        return data_set

    def _complete(self, message: _Message) -> None:
        """Answer a request whose data set (if any) has come whole."""
        abstract_syntax, transfer_syntax = self.contexts[message.context_id]
        elements = message.elements
        self.deadline = None  # the handler's commit takes what the disk takes
        if message.command == C_STORE_RQ:
            if message.data_set is not None:
                message.data_set.close()
            answer = self.acceptor.handler.store(
                StoreRequest(
                    self.calling_ae,
                    self.called_ae,
                    self.address,
                    abstract_syntax,
                    transfer_syntax,
                    limits.as_uid(pdu.uid_of(elements, 0x0002)),
                    limits.as_uid(pdu.uid_of(elements, 0x1000)),
                ),
                message.data_set,
            )
            self._respond(message, answer, with_instance=True)
        elif message.command == C_ECHO_RQ:
            ok = abstract_syntax == acse.VERIFICATION
            self._respond(message, status.SUCCESS if ok else status.SOP_CLASS_NOT_SUPPORTED, with_instance=False)
        else:
            LOGGER.warning(
                "answered a request the node does not perform (Command Field 0x%04X) from %s with 0x%04X",
                message.command,
                self.calling_ae,
                UNRECOGNIZED_OPERATION,
            )
            self._respond(message, UNRECOGNIZED_OPERATION, with_instance=True)

    def _respond(self, message: _Message, code: int, with_instance: bool) -> None:
        """Send the response to `message` with status `code` (PS3.7 9.3, 10.3)."""
        elements = message.elements
        response = [
            (0x0002, _even(elements[0x0002])) if 0x0002 in elements else None,
            (0x0100, pdu.us(message.command | RESPONSE_BIT)),
            (0x0120, pdu.us(message.message_id)),
            (0x0800, pdu.us(pdu.DATA_SET_ABSENT)),
            (0x0900, pdu.us(code)),
            (0x1000, _even(elements[0x1000])) if with_instance and 0x1000 in elements else None,
        ]
        command = pdu.command_set([element for element in response if element is not None])
        with self._sending:
            pdu.send_fragments(
                self.sock, message.context_id, pdu.COMMAND, io.BytesIO(command), len(command), self.peer_max_pdu
            )

    def _take(self, size: int, data_set: PartialReceive | None) -> None:
        """Move `size` bytes of a data set fragment from the socket to `data_set` (None: drop them)."""
        if self._buffer is None:
            self._buffer = bytearray(STREAM_STEP)
        view = memoryview(self._buffer)
        while size:
            step = min(size, STREAM_STEP)
            self._read_into(view[:step])
            if data_set is not None:
                data_set.write(view[:step])
            size -= step

    def _read(self, size: int, at_start: bool = False) -> bytes:
        """`size` bytes; at the start of a PDU the connection closing is the end of the association."""
        data = bytearray(size)
        self._read_into(memoryview(data), at_start)
        return bytes(data)

    def _read_into(self, view: memoryview, at_start: bool = False) -> None:
        got = 0
        while got < len(view):
            count = self.sock.recv_into(view[got:])
            if not count:
                if at_start and got == 0:
                    LOGGER.info("the connection from %s (%s) closed", self._who(), self.address)
                    raise _Closed
                raise EOFError("the peer closed the connection in the middle of a PDU")
            got += count

    def _send(self, data: bytes) -> None:
        with self._sending:
            self.sock.sendall(data)

    def _send_abort(self, source: int, reason: int) -> None:
        """Send an A-ABORT without waiting long (the peer may have stopped reading), then say no more."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(ABORT_PATIENCE)
            if self._sending.acquire(timeout=ABORT_PATIENCE):
                try:
                    self.sock.sendall(pdu.abort_pdu(source, reason))
                    self.sock.shutdown(socket.SHUT_WR)
                finally:
                    self._sending.release()

    def _discard(self, message: _Message | None) -> None:
        """Remove the file of a data set that will never come whole."""
        if message is None or message.data_set is None:
            return
        with contextlib.suppress(OSError):
            message.data_set.close()
        with contextlib.suppress(OSError):
            os.unlink(message.data_set.name)


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """A Part 10 preamble, prefix and File Meta Information (PS3.10 7.1), naming the node as the implementation."""
    elements = b"".join(
        _meta_element(element, vr, value)
        for element, vr, value in (
            (0x0001, "OB", b"\x00\x01"),
            (0x0002, "UI", _padded(sop_class, b"\0")),
            (0x0003, "UI", _padded(sop_instance, b"\0")),
            (0x0010, "UI", _padded(transfer_syntax, b"\0")),
            (0x0012, "UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0")),
            (0x0013, "SH", _padded(IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return bytes(128) + b"DICM" + _meta_element(0x0000, "UL", struct.pack("<I", len(elements))) + elements


def _meta_element(element: int, vr: str, value: bytes) -> bytes:
    if vr == "OB":
        return _FILE_META_HEADER.pack(0x0002, element, b"OB", 0) + struct.pack("<I", len(value)) + value
    return _FILE_META_HEADER.pack(0x0002, element, vr.encode(), len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii", "replace")
    return encoded + pad * (len(encoded) % 2)


def _even(value: bytes) -> bytes:
    return value + b"\0" * (len(value) % 2)


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
