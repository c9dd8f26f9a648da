"""Association establishment as the acceptor: read an A-ASSOCIATE-RQ, decide, and write the answer (PS3.8 7.1,
9.3.2-9.3.4; PS3.7 Annex D).

The node accepts Verification and every storage SOP class (sop_classes.accepts) in every transfer syntax pydicom
knows (Verification in the uncompressed ones), picking for each context, of the syntaxes the requestor lists, the
one it prefers (syntaxes.ACCEPTED's order: lossless before lossy, whatever order the requestor lists them in).
Of the user information it answers the Maximum Length, its Implementation Class UID and Version Name, and SCP/SCU
Role Selection for the classes it accepts (the requestor may be an SCU, never the SCP); it does not answer
Asynchronous Operations Window (so operations are not asynchronous, PS3.7 D.3.3.3), extended negotiation or user
identity (optional for the acceptor).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from scp import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, pdu, sop_classes, syntaxes

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM application context name (PS3.7 A.2.1)."""
VERIFICATION = "1.2.840.10008.1.1"
VERIFICATION_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
"""Implicit and Explicit VR Little Endian, Explicit VR Big Endian: a C-ECHO carries no data set."""
ACCEPTANCE, USER_REJECTION, NO_REASON, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = range(5)
"""Presentation context results (PS3.8 9.3.3.2)."""
_FIXED = struct.Struct(">HH16s16s32s")
"""Protocol version, reserved, called AE title, calling AE title, reserved (PS3.8 9.3.2)."""
_ITEM = struct.Struct(">BxH")
"""An item's type, a reserved byte and its length."""


class Rejection(Exception):
    """The association is rejected (PS3.8 9.3.4): `result` 1 permanent or 2 transient, `source` 1 service user,
    2 service provider (ACSE) or 3 service provider (presentation), and `reason` as that source defines it."""

    def __init__(self, why: str, result: int, source: int, reason: int) -> None:
        super().__init__(why)
        self.why, self.result, self.source, self.reason = why, result, source, reason

    def pdu(self) -> bytes:
        """The A-ASSOCIATE-RJ PDU."""
        return pdu.HEADER.pack(pdu.ASSOCIATE_RJ, 4) + bytes((0, self.result, self.source, self.reason))


PROTOCOL_VERSION_NOT_SUPPORTED = 2
APPLICATION_CONTEXT_NOT_SUPPORTED = 2
CALLING_AE_NOT_RECOGNISED = 3
CALLED_AE_NOT_RECOGNISED = 7
LOCAL_LIMIT_EXCEEDED = 2
PERMANENT, TRANSIENT = 1, 2
SERVICE_USER, SERVICE_PROVIDER_ACSE, SERVICE_PROVIDER_PRESENTATION = 1, 2, 3


@dataclass(frozen=True)
class ProposedContext:
    """One presentation context of the request."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass
class AssociationRequest:
    """What an A-ASSOCIATE-RQ asks for; AE titles as sent, trailing spaces removed."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    raw_titles: bytes
    """The called and calling AE title fields as sent: the A-ASSOCIATE-AC repeats them (PS3.8 9.3.3)."""
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu: int = 0
    """The requestor's Maximum Length Received: the longest P-DATA-TF it takes (0: no limit)."""
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)
    """SCP/SCU Role Selection proposed: SOP class -> (SCU role, SCP role)."""


@dataclass(frozen=True)
class Negotiated:
    """The accepted contexts by ID, as (abstract syntax, transfer syntax), and the A-ASSOCIATE-AC saying so."""

    contexts: dict[int, tuple[str, str]]
    answer: bytes


def parse_request(body: bytes) -> AssociationRequest:
    """The A-ASSOCIATE-RQ whose PDU body (after the 6-byte header) is `body`; ValueError if it is malformed."""
    if len(body) < _FIXED.size:
        raise ValueError(f"an A-ASSOCIATE-RQ of {len(body)} bytes is too short")
    version, _, called, calling, _ = _FIXED.unpack_from(body)
    request = AssociationRequest(version, _title(called), _title(calling), called + calling)
    for kind, value in _items(body, _FIXED.size):
        if kind == 0x10:
            request.application_context = _text(value)
        elif kind == 0x20:
            context = _proposed_context(value)
            if any(c.context_id == context.context_id for c in request.contexts):
                raise ValueError(f"presentation context ID {context.context_id} is proposed twice (PS3.8 9.3.2.2)")
            request.contexts.append(context)
        elif kind == 0x50:
            _read_user_information(value, request)
    return request


def check_request(request: AssociationRequest) -> None:
    """Raise Rejection for a request no acceptor may take: wrong protocol version or application context, an
    AE title PS3.5 6.2 forbids (empty, all spaces, a backslash or a control character)."""
    if not request.protocol_version & 0x0001:
        raise Rejection(
            f"protocol version 0x{request.protocol_version:04X}",
            PERMANENT,
            SERVICE_PROVIDER_ACSE,
            PROTOCOL_VERSION_NOT_SUPPORTED,
        )
    if request.application_context != APPLICATION_CONTEXT:
        raise Rejection(
            f"application context {request.application_context!r}",
            PERMANENT,
            SERVICE_USER,
            APPLICATION_CONTEXT_NOT_SUPPORTED,
        )
    for title, reason in (
        (request.calling_ae, CALLING_AE_NOT_RECOGNISED),
        (request.called_ae, CALLED_AE_NOT_RECOGNISED),
    ):
        if not valid_title(title):
            which = "calling" if reason == CALLING_AE_NOT_RECOGNISED else "called"
            raise Rejection(f"invalid {which} AE title {title!r}", PERMANENT, SERVICE_USER, reason)


def valid_title(title: str) -> bool:
    """PS3.5 6.2 (AE): not empty or all spaces, no backslash, no control character."""
    return bool(title.strip()) and "\\" not in title and all(" " <= c <= "~" for c in title)


def negotiate(request: AssociationRequest, max_pdu: int) -> Negotiated:
    """Decide each proposed context; `max_pdu` is our Maximum Length Received (0: no limit)."""
    accepted: dict[int, tuple[str, str]] = {}
    answered: list[bytes] = []
    for proposed in request.contexts:
        result, syntax = _decide(proposed)
        if result == ACCEPTANCE:
            accepted[proposed.context_id] = (proposed.abstract_syntax, syntax)
        answered.append(_item(0x21, bytes((proposed.context_id, 0, result, 0)) + _item(0x40, syntax.encode())))
    roles = [
        _item(0x54, struct.pack(">H", len(uid)) + uid.encode() + bytes((scu, 0)))
        for uid, (scu, _) in request.roles.items()
        if sop_classes.accepts(uid) and any(cx[0] == uid for cx in accepted.values())
    ]
    user = b"".join(
        (
            _item(0x51, struct.pack(">I", max_pdu)),
            _item(0x52, IMPLEMENTATION_CLASS_UID.encode()),
            *roles,
            _item(0x55, IMPLEMENTATION_VERSION.encode()),
        )
    )
    body = b"".join(
        (
            _FIXED.pack(1, 0, request.raw_titles[:16], request.raw_titles[16:], bytes(32)),
            _item(0x10, APPLICATION_CONTEXT.encode()),
            *answered,
            _item(0x50, user),
        )
    )
    return Negotiated(accepted, pdu.HEADER.pack(pdu.ASSOCIATE_AC, len(body)) + body)


def _decide(proposed: ProposedContext) -> tuple[int, str]:
    """A context's result and transfer syntax (for a rejected one, the first proposed: PS3.8 9.3.3.2 says the
    field is then not significant)."""
    first = proposed.transfer_syntaxes[0]
    preferred: tuple[str, ...]
    if proposed.abstract_syntax == VERIFICATION:
        preferred = VERIFICATION_SYNTAXES
    elif sop_classes.accepts(proposed.abstract_syntax):
        preferred = _ACCEPTED_SYNTAXES
    else:
        return ABSTRACT_SYNTAX_NOT_SUPPORTED, first
    offered = set(proposed.transfer_syntaxes)
    for syntax in preferred:
        if syntax in offered:
            return ACCEPTANCE, syntax
    return TRANSFER_SYNTAXES_NOT_SUPPORTED, first


_ACCEPTED_SYNTAXES = tuple(str(uid) for uid in syntaxes.ACCEPTED)


def _items(body: bytes, position: int) -> list[tuple[int, bytes]]:
    """The items (type, value) of a PDU body or of an item, from `position` to the end."""
    items = []
    while position < len(body):
        if position + _ITEM.size > len(body):
            raise ValueError("an item header cut short")
        kind, length = _ITEM.unpack_from(body, position)
        position += _ITEM.size
        if position + length > len(body):
            raise ValueError(f"an item of type 0x{kind:02X} runs past its PDU")
        items.append((kind, body[position : position + length]))
        position += length
    return items


def _proposed_context(value: bytes) -> ProposedContext:
    if len(value) < 4:
        raise ValueError("a presentation context item cut short")
    abstract, transfer = "", []
    for kind, sub in _items(value, 4):
        if kind == 0x30:
            abstract = _text(sub)
        elif kind == 0x40:
            transfer.append(_text(sub))
    if not abstract or not transfer:
        raise ValueError(f"presentation context {value[0]} lacks its abstract syntax or transfer syntaxes")
    return ProposedContext(value[0], abstract, tuple(transfer))


def _read_user_information(value: bytes, request: AssociationRequest) -> None:
    for kind, sub in _items(value, 0):
        if kind == 0x51:
            if len(sub) != 4:
                raise ValueError("a Maximum Length item not 4 bytes long")
            (request.max_pdu,) = struct.unpack(">I", sub)
        elif kind == 0x54:
            if len(sub) < 2 or len(sub) != 2 + struct.unpack_from(">H", sub)[0] + 2:
                raise ValueError("a malformed SCP/SCU Role Selection item")
            request.roles[_text(sub[2:-2])] = (sub[-2], sub[-1])


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, len(value)) + value


def _text(value: bytes) -> str:
    """A UID or title field: ASCII (anything else shown escaped, so it fails every comparison), padding removed."""
    return value.decode("ascii", "backslashreplace").rstrip("\0 ")


def _title(value: bytes) -> str:
    """An AE title field: leading and trailing spaces are not significant (PS3.5 6.2); NUL padding is tolerated."""
    return value.decode("ascii", "backslashreplace").rstrip("\0 ").lstrip(" ")
