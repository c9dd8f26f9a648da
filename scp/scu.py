"""A C-STORE SCU on one blocking socket: the forwarder's end of an association to a destination.

pynetdicom's Association runs two threads per association and hands every PDU from one to the other through
queues; on a node whose threads also receive, spool and encode, each hand-off waits for the GIL. Sending 300 CT
slices to DCMTK storescp on loopback cost 1.7 ms of CPU per instance through it, 0.4 ms here.

pynetdicom still encodes the A-ASSOCIATE-RQ, decodes the A-ASSOCIATE-AC/RJ and the A-ABORT, and negotiates the
presentation contexts. This module writes the C-STORE-RQ command sets (byte for byte what pynetdicom writes, tested),
reads the responses' status, and puts the PDUs in order on the socket, from the calling thread: the request; then one
C-STORE at a time (no asynchronous operations window is proposed, so the peer answers each before the next is sent,
PS3.7 D.3.3.3); then a release or an abort.

Every wait is bounded by the destination's `timeout`: connecting, the association's answer, sending one PDU (a
peer that stops reading), each response, the release.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom.uid import UID
from pynetdicom._globals import APPLICATION_CONTEXT_NAME, DEFAULT_MAX_LENGTH
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_requestor

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, pdu

LOGGER = logging.getLogger(__name__)

_ASSOCIATE_FIXED_FIELDS = 68
"""Protocol version, reserved, called and calling AE titles, reserved: before an A-ASSOCIATE's items (PS3.8 9.3.3)."""
MAX_PDU_READ = 1 << 20
"""The largest PDU taken from a destination: its A-ASSOCIATE-AC for 128 contexts is a few KiB, responses less."""
ABORT_PATIENCE = 1.0
"""Seconds an A-ABORT may take to go out: the peer may have stopped reading, which is often why we abort."""
LOW_PRIORITY = 0x0002
"""The priority pynetdicom's send_c_store gave every C-STORE (PS3.7 9.1.1.1.6)."""
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
_DATA_SET_PRESENT = 0x0001
"""Command Data Set Type: any value but 0x0101 says a data set follows (PS3.7 E.1); pynetdicom writes 1."""
_FILE_META_NEEDED = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")


class AssociationFailed(Exception):
    """No association: the connection failed, or the peer rejected, aborted or did not answer the request."""


class AssociationEnded(Exception):
    """The association cannot carry the C-STORE: it had ended before anything was sent (`sent` False), or ended
    while the request was going out or before its response came (`sent` True: the outcome is unknown)."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True)
class StoreResponse:
    """A C-STORE-RSP: its status and, when the peer gave one, its error comment."""

    status: int
    error_comment: str = ""


class StoreAssociation:
    """An established association we requested, sending C-STOREs one after the other from one thread."""

    def __init__(self, sock: socket.socket, called_ae: str, contexts: Sequence[PresentationContext], timeout: float):
        self._sock = sock
        self.called_ae = called_ae
        self.timeout = timeout
        self._context_ids = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cast(int, cx.context_id)
            for cx in contexts
            if cx.result == 0x00
        }
        self.max_pdu = DEFAULT_MAX_LENGTH
        self._message_id = 0
        self.is_established = True

    @property
    def accepted_contexts(self) -> set[tuple[str, str]]:
        """The (SOP class, transfer syntax) pairs the peer accepted."""
        return set(self._context_ids)

    def store(self, path: Path) -> StoreResponse:
        """Send the Part 10 file at `path` (its data set as written, in its file meta's transfer syntax, which must
        have an accepted context) and return the peer's response.

        ValueError: the file cannot be sent on this association (nothing was sent; the association is unchanged).
        AssociationEnded: the association is over (aborted here when it ended in the middle of the C-STORE).
        """
        if not self.is_open():
            raise AssociationEnded("the association had ended", sent=False)
        try:
            file_meta, offset = split_dataset(path)
        except OSError:
            raise
        except Exception as exc:  # pydicom raises what the bytes make it: not a Part 10 file
            raise ValueError(f"its file meta cannot be read: {exc}") from exc
        missing = [keyword for keyword in _FILE_META_NEEDED if keyword not in file_meta]
        if missing:
            raise ValueError(f"its file meta lacks {', '.join(missing)}")
        sop_class, syntax = str(file_meta.MediaStorageSOPClassUID), str(file_meta.TransferSyntaxUID)
        context_id = self._context_ids.get((sop_class, syntax))
        if context_id is None:
            raise ValueError(f"no accepted presentation context for {UID(sop_class).name} in {UID(syntax).name}")
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size - offset
            if size <= 0:
                raise ValueError("it has no data set after its file meta")
            file.seek(offset)
            message_id = self._next_message_id()
            command = _store_command(message_id, sop_class, str(file_meta.MediaStorageSOPInstanceUID))
            try:
                self._sock.settimeout(self.timeout)  # for each PDU: a peer that stops reading
                pdu.send_fragments(self._sock, context_id, pdu.COMMAND, io.BytesIO(command), len(command), self.max_pdu)
                pdu.send_fragments(self._sock, context_id, 0, file, size, self.max_pdu)
            except OSError as exc:
                self.abort()
                raise AssociationEnded(f"sending failed: {exc}; association aborted", sent=True) from exc
        return self._response(message_id)

    def release(self) -> None:
        """Release the association (PS3.8 7.2), closing the connection whatever the peer does."""
        if not self.is_established:
            return
        self.is_established = False
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(pdu.RELEASE_RQ_PDU)
            deadline = time.monotonic() + self.timeout
            while (kind := pdu.read_pdu(self._sock, deadline, MAX_PDU_READ)[0]) not in (pdu.RELEASE_RP, pdu.ABORT):
                if kind == pdu.RELEASE_RQ:  # a release collision: the requestor answers first (PS3.8 9.2.3, AR-9)
                    self._sock.sendall(pdu.RELEASE_RP_PDU)
        except (OSError, EOFError, ValueError):
            pass  # the peer closed the connection or did not answer: it is closed all the same
        self._close()

    def abort(self) -> None:
        """Abort the association (A-ABORT, source: service user) and close the connection."""
        if self.is_established:
            with contextlib.suppress(OSError):
                self._sock.settimeout(ABORT_PATIENCE)
                self._sock.sendall(pdu.abort_pdu())
        self._close()

    def _close(self) -> None:
        self.is_established = False
        with contextlib.suppress(OSError):
            self._sock.close()

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def is_open(self) -> bool:
        """Whether the association can carry a C-STORE. Between C-STOREs a peer has nothing to say: one that sent
        something (an abort, a release request) or closed the connection has ended it, and it is closed here."""
        if not self.is_established:
            return False
        if not pdu.readable(self._sock):
            return True
        try:  # what it said: a release request is answered (PS3.8 9.2.3), anything else ends it
            if pdu.read_pdu(self._sock, time.monotonic() + ABORT_PATIENCE, MAX_PDU_READ)[0] == pdu.RELEASE_RQ:
                self._sock.sendall(pdu.RELEASE_RP_PDU)
        except (OSError, EOFError, ValueError):
            pass  # closed, aborted or unreadable: ended all the same
        self._close()
        return False

    def _response(self, message_id: int) -> StoreResponse:
        """Read the C-STORE-RSP to `message_id`; anything else ends the association."""
        deadline = time.monotonic() + self.timeout
        command = bytearray()
        try:
            while True:
                kind, body = pdu.read_pdu(self._sock, deadline, MAX_PDU_READ)
                if kind != pdu.P_DATA:
                    if kind == pdu.ABORT:
                        self._close()
                    else:
                        self.abort()
                    raise AssociationEnded(f"no response: {_ended_by(kind, body)}", sent=True)
                if _take_command(body, command):
                    break
            answer = pdu.command_elements(bytes(command))
        except EOFError as exc:
            self._close()
            raise AssociationEnded(f"no response: {exc}", sent=True) from exc
        except TimeoutError as exc:
            self.abort()
            raise AssociationEnded(f"no response within {self.timeout:g} s; association aborted", sent=True) from exc
        except (OSError, ValueError) as exc:
            self.abort()
            raise AssociationEnded(f"no response: {exc}; association aborted", sent=True) from exc
        status = pdu.us_of(answer, 0x0900)
        if pdu.us_of(answer, 0x0100) != C_STORE_RSP or pdu.us_of(answer, 0x0120) != message_id or status is None:
            self.abort()
            raise AssociationEnded("no response: the peer answered another message; association aborted", sent=True)
        comment = answer.get(0x0902, b"").decode("ascii", "replace").strip(" \0")
        return StoreResponse(status, comment)


def request(
    host: str,
    port: int,
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, str]],
    timeout: float,
    tls_context: ssl.SSLContext | None = None,
) -> StoreAssociation:
    """Connect and request an association proposing one presentation context per (SOP class, transfer syntax);
    AssociationFailed says why there is none. An association in which the peer accepted no context is returned
    (released by the caller) so that the caller can tell that apart."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, UnicodeError) as exc:  # refused, unreachable, unresolvable, timed out; not a host name (IDNA)
        raise AssociationFailed(f"cannot connect: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_side=False, server_hostname=None)
        proposed = [build_context(sop_class, [ts]) for sop_class, ts in contexts]
        for number, context in enumerate(proposed):
            context.context_id = 2 * number + 1
        sock.sendall(_associate_rq(calling_ae, called_ae, proposed))
        deadline = time.monotonic() + timeout
        kind, body = pdu.read_pdu(sock, deadline, MAX_PDU_READ)
    except ssl.SSLError as exc:
        sock.close()
        raise AssociationFailed(f"cannot connect: {exc}") from exc
    except OSError as exc:
        sock.close()
        raise AssociationFailed(_no_answer(exc, timeout)) from exc
    except (EOFError, ValueError) as exc:
        sock.close()
        raise AssociationFailed(f"no answer: {exc}") from exc
    try:
        return _answered(sock, pdu.HEADER.pack(kind, len(body)) + body, called_ae, proposed, timeout)
    except Exception:
        sock.close()
        raise


def _answered(
    sock: socket.socket, reply: bytes, called_ae: str, proposed: Sequence[PresentationContext], timeout: float
) -> StoreAssociation:
    """The association the peer's answer (`reply`, a whole PDU) establishes; AssociationFailed if none."""
    kind = reply[0]
    try:
        if kind == pdu.ASSOCIATE_AC:
            if len(reply) < pdu.HEADER.size + _ASSOCIATE_FIXED_FIELDS:
                raise ValueError(f"{len(reply)} bytes are too short for an A-ASSOCIATE-AC")
            accepted = A_ASSOCIATE_AC()
            accepted.decode(reply)
            primitive = accepted.to_primitive()
            answered = primitive.presentation_context_definition_results_list
            if not answered:  # PS3.8 9.3.3.2: one result for each proposed context
                raise ValueError("it answers none of the proposed presentation contexts")
            results = negotiate_as_requestor(list(proposed), answered)
            association = StoreAssociation(sock, called_ae, results, timeout)  # an accepted context lacking its
            association.max_pdu = _max_length(primitive)  # transfer syntax raises here
        elif kind == pdu.ASSOCIATE_RJ:
            rejected = A_ASSOCIATE_RJ()
            rejected.decode(reply)
            answer = rejected.to_primitive()
            why = f"rejected ({answer.result_str}, {answer.source_str}: {answer.reason_str})"
        else:
            why = _ended_by(kind, reply[pdu.HEADER.size :])
    except Exception as exc:  # pynetdicom's decoders raise whatever a malformed PDU makes them
        raise AssociationFailed(f"the peer's answer (PDU type 0x{kind:02X}) cannot be read: {exc}") from exc
    if kind != pdu.ASSOCIATE_AC:
        raise AssociationFailed(why)
    accepted_count = len(association.accepted_contexts)
    LOGGER.debug("association to %s accepted %d of %d contexts", called_ae, accepted_count, len(proposed))
    return association


def _associate_rq(calling_ae: str, called_ae: str, contexts: Sequence[PresentationContext]) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = list(contexts)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = DEFAULT_MAX_LENGTH
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    primitive.user_information = [maximum, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _max_length(primitive: A_ASSOCIATE) -> int:
    """The peer's Maximum Length Received (0: no limit); PS3.7 D.3.3.1 makes it mandatory, so none is taken as
    pynetdicom's default."""
    for item in primitive.user_information:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return DEFAULT_MAX_LENGTH


def _store_command(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set announcing a data set, in Implicit VR Little Endian (PS3.7 6.3.1, 9.3.1.1)."""
    return pdu.command_set(
        [
            (0x0002, pdu.uid(sop_class)),  # Affected SOP Class UID
            (0x0100, pdu.us(C_STORE_RQ)),  # Command Field
            (0x0110, pdu.us(message_id)),  # Message ID
            (0x0700, pdu.us(LOW_PRIORITY)),  # Priority
            (0x0800, pdu.us(_DATA_SET_PRESENT)),  # Command Data Set Type
            (0x1000, pdu.uid(sop_instance)),  # Affected SOP Instance UID
        ]
    )


def _take_command(body: bytes, command: bytearray) -> bool:
    """Add the command fragments of a P-DATA-TF PDU's body to `command`; True once the last one came."""
    position = 0
    while position + pdu.PDV_HEADER.size <= len(body):
        length, _, control = pdu.PDV_HEADER.unpack_from(body, position)
        if length < 2 or position + 4 + length > len(body):
            raise ValueError("a malformed presentation data value")
        if control & pdu.COMMAND:
            command += body[position + pdu.PDV_HEADER.size : position + 4 + length]
            if len(command) > pdu.MAX_COMMAND:
                raise ValueError(f"a command set of more than {pdu.MAX_COMMAND} bytes")
            if control & pdu.LAST:
                return True
        position += 4 + length
    return False


def _ended_by(kind: int, body: bytes) -> str:
    """What a PDU other than the expected one says about the association."""
    if kind == pdu.ABORT:
        abort = A_ABORT_RQ()
        try:
            abort.decode(pdu.HEADER.pack(kind, len(body)) + body)
            return f"aborted by the peer ({abort.source_str}: {abort.reason_str})"
        except Exception:  # a malformed A-ABORT is an abort all the same
            return "aborted by the peer"
    if kind == pdu.RELEASE_RQ:
        return "the peer asked to release the association"
    return f"the peer sent an unexpected PDU (type 0x{kind:02X})"


def _no_answer(exc: OSError, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return f"the connection failed: {exc}"
