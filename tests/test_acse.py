"""Association establishment as the acceptor (acse.py), checked against pynetdicom's own encoder and decoder."""

from __future__ import annotations

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
)
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import build_context

from scp import IMPLEMENTATION_CLASS_UID, acse

WORKLIST = "1.2.840.10008.5.1.4.31"
RT_PLAN = "1.2.840.10008.5.1.4.1.1.481.5"


def _request(contexts: list[tuple[str, list[str]]], calling: str = "MODALITY", extra: tuple = ()) -> bytes:
    """An A-ASSOCIATE-RQ PDU's body as pynetdicom encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = acse.APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "COMPRESS_SCP"
    proposed = [build_context(uid, syntaxes) for uid, syntaxes in contexts]
    for number, context in enumerate(proposed):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = proposed
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum, *extra]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())[6:]


def test_a_request_is_read_and_answered_as_pynetdicom_reads_it() -> None:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, False
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.primary_field, identity.positive_response_requested = 1, b"nurse", True
    body = _request(
        [
            (CTImageStorage, [JPEGBaseline8Bit, JPEGLSLossless]),
            (acse.VERIFICATION, [ImplicitVRLittleEndian]),
            (WORKLIST, [ImplicitVRLittleEndian]),
            (MRImageStorage, ["1.2.3.4"]),
            ("1.3.12.2.1107.5.9.1", [ImplicitVRLittleEndian]),  # Siemens CSA Non-Image: storage-like
            (RT_PLAN, ["1.2.840.10008.1.2.2", ImplicitVRLittleEndian]),  # as DCMTK's storescu proposes them
        ],
        extra=(role, window, identity),
    )
    request = acse.parse_request(body)
    assert (request.calling_ae, request.called_ae, request.max_pdu) == ("MODALITY", "COMPRESS_SCP", 16384)
    assert request.roles == {CTImageStorage: (1, 0)}
    acse.check_request(request)

    negotiated = acse.negotiate(request, 262144)
    answer = A_ASSOCIATE_AC()
    answer.decode(negotiated.answer)
    primitive = answer.to_primitive()
    answered = primitive.presentation_context_definition_results_list
    results = {cx.context_id: (cx.result, cx.transfer_syntax[0]) for cx in answered}
    assert results == {
        1: (acse.ACCEPTANCE, JPEGLSLossless),  # lossless before lossy, whatever the requestor's order
        3: (acse.ACCEPTANCE, ImplicitVRLittleEndian),
        5: (acse.ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian),
        7: (acse.TRANSFER_SYNTAXES_NOT_SUPPORTED, "1.2.3.4"),
        9: (acse.ACCEPTANCE, ImplicitVRLittleEndian),
        11: (acse.ACCEPTANCE, ImplicitVRLittleEndian),  # not the retired Big Endian
    }
    assert negotiated.contexts == {
        1: (CTImageStorage, JPEGLSLossless),
        3: (acse.VERIFICATION, ImplicitVRLittleEndian),
        9: ("1.3.12.2.1107.5.9.1", ImplicitVRLittleEndian),
        11: (RT_PLAN, ImplicitVRLittleEndian),
    }
    user = {type(item).__name__: item for item in primitive.user_information}
    assert user["MaximumLengthNotification"].maximum_length_received == 262144
    assert user["ImplementationClassUIDNotification"].implementation_class_uid == IMPLEMENTATION_CLASS_UID
    roles = user["SCP_SCU_RoleSelectionNegotiation"]
    assert (roles.sop_class_uid, roles.scu_role, roles.scp_role) == (CTImageStorage, True, False)
    assert "AsynchronousOperationsWindowNegotiation" not in user  # not answered: no asynchronous operations
    assert "UserIdentityNegotiation" not in user
    assert (primitive.calling_ae_title, primitive.called_ae_title) == ("MODALITY", "COMPRESS_SCP")


def test_two_contexts_of_one_id_make_a_malformed_request() -> None:
    """PS3.8 9.3.2.2: each context's ID is its own; which of two the peer's data would be on cannot be told."""
    body = _request([(CTImageStorage, [ExplicitVRLittleEndian]), (MRImageStorage, [ExplicitVRLittleEndian])])
    second = body.index(MRImageStorage.encode()) - 8  # the ID of the item holding it (PS3.8 9.3.2.2)
    assert body[second] == 3
    with pytest.raises(ValueError, match="proposed twice"):
        acse.parse_request(body[:second] + b"\x01" + body[second + 1 :])


@pytest.mark.parametrize(
    ("change", "answer"),
    [
        (lambda r: setattr(r, "protocol_version", 2), (1, 2, 2)),
        (lambda r: setattr(r, "application_context", "1.2.3"), (1, 1, 2)),
        (lambda r: setattr(r, "calling_ae", "A\\B"), (1, 1, 3)),
        (lambda r: setattr(r, "calling_ae", ""), (1, 1, 3)),
        (lambda r: setattr(r, "called_ae", "TAB\tHERE"), (1, 1, 7)),
    ],
)
def test_requests_no_acceptor_may_take_are_rejected(change: object, answer: tuple[int, int, int]) -> None:
    """PS3.8 9.3.4: result, source and reason of each, in a PDU pynetdicom reads."""
    request = acse.parse_request(_request([(CTImageStorage, [ExplicitVRLittleEndian])]))
    change(request)  # type: ignore[operator]
    with pytest.raises(acse.Rejection) as caught:
        acse.check_request(request)
    rejected = A_ASSOCIATE_RJ()
    rejected.decode(caught.value.pdu())
    assert (rejected.result, rejected.source, rejected.reason_diagnostic) == answer


@pytest.mark.parametrize("cut", [1, 5, 60, 80])
def test_a_request_cut_short_or_overrunning_its_items_is_malformed(cut: int) -> None:
    body = _request([(CTImageStorage, [ExplicitVRLittleEndian])])
    with pytest.raises(ValueError):
        acse.parse_request(body[: len(body) - cut])


def test_ae_titles_are_read_without_their_padding() -> None:
    body = bytearray(_request([(CTImageStorage, [ExplicitVRLittleEndian])], calling="CT1"))
    body[20:36] = b"  CT1\0\0\0\0\0\0\0\0\0\0\0"  # leading spaces, NUL padding
    assert acse.parse_request(bytes(body)).calling_ae == "CT1"
