"""Fuzzing the path from the socket through the spool and compression (hypothesis).

Three kinds of cases: C-STOREs whose data set bytes are broken (truncated, bogus lengths, wrong VRs, Pixel Data
shorter than Rows x Columns, flipped bytes, deep nesting); random PDUs on a fresh connection; random P-DATA-TF
PDUs inside an established association. The node must answer a failure status or abort, never crash, keep
serving, and deliver every instance it acknowledged. The number of cases tried is printed.
"""

from __future__ import annotations

import random
import socket
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pynetdicom.association import Association

from scp import status
from tests import hostile
from tests.peers import node_config, running_node, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.slow]

DATASET_CASES = 300
PDU_CASES = 120
PDATA_CASES = 120
ALLOWED = {status.SUCCESS, status.CANNOT_UNDERSTAND, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, status.OUT_OF_RESOURCES}
VRS = ("AE", "CS", "DS", "IS", "LO", "OB", "OW", "SQ", "UI", "UL", "US", "UN", "UT", "ZZ", "\0\0")
FUZZ = dict(deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))


@st.composite
def datasets(draw: st.DrawFn) -> tuple[str, bytes]:
    """A data set built from an 8-bit image, then damaged in the ways hostile peers damage them."""
    uid = f"2.25.{uuid.uuid4().int | 1 << 127}"  # unique, always 39 digits (so every draw below is reproducible)
    rows, columns = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pixel_count = draw(st.one_of(st.just(rows * columns), st.integers(0, 2 * rows * columns)))
    pixels = random.Random(draw(st.integers(0, 2**32))).randbytes(pixel_count)
    body = bytearray(hostile.header(uid) + hostile.image(rows, columns, pixels))
    # wrong VRs: overwrite the VR of elements after the UIDs
    for _ in range(draw(st.integers(0, 2))):
        offset = _element_offsets(bytes(body))[draw(st.integers(2, 11))]
        body[offset + 4 : offset + 6] = draw(st.sampled_from(VRS)).encode("latin-1")
    # bogus lengths: overwrite a 16- or 32-bit length with a random value
    for _ in range(draw(st.integers(0, 2))):
        offset = _element_offsets(bytes(body))[draw(st.integers(2, 11))]
        body[offset + 6 : offset + 8] = struct.pack("<H", draw(st.integers(0, 0xFFFF)))
    if draw(st.booleans()):
        body[len(hostile.header(uid)) : len(hostile.header(uid))] = hostile.nested_sequences(draw(st.integers(1, 3000)))
    uids = len(hostile.header(uid))
    for _ in range(draw(st.integers(0, 3))):  # flipped bytes, never in the UIDs (they name the instance)
        if len(body) > uids:
            body[draw(st.integers(uids, len(body) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    return uid, bytes(body[:cut])


def _element_offsets(body: bytes) -> list[int]:
    """Offsets of the elements of an undamaged header + image: the 12 elements made by tests.hostile."""
    offsets, offset = [], 0
    while offset + 8 <= len(body) and len(offsets) < 12:
        offsets.append(offset)
        vr = body[offset + 4 : offset + 6].decode("latin-1")
        if vr in hostile.LONG_VRS:
            (length,) = struct.unpack_from("<L", body, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", body, offset + 6)
            offset += 8 + length
    return offsets + [offsets[-1]] * (12 - len(offsets))


pdus = st.tuples(
    st.one_of(st.integers(1, 7), st.integers(0, 255)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    st.binary(max_size=2048),
)


def _talk(port: int, first: bytes, then: bytes) -> None:
    """Send `first`, read the answer, send `then`, and read until the node closes or is quiet for 50 ms."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(first)
            if then:
                sock.recv(65536)
                sock.sendall(then)
            sock.settimeout(0.05)
            while sock.recv(65536):
                pass
        except OSError:  # reset, or quiet for 2 s: both fine
            pass


def test_fuzz_socket_spool_compression(tmp_path: Path) -> None:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    rules = [{"name": "ct", "compress": "JPEGLSLossless", "forward": ["folder"]}]
    data = node_config(tmp_path, destinations, rules, node={"acse_timeout": 2, "network_timeout": 2})
    acknowledged: set[str] = set()
    answers: dict[str, int] = {}
    tried = {"datasets": 0, "pdus": 0, "p-data": 0}
    cases = tmp_path / "cases"
    cases.mkdir()
    with running_node(data) as node:
        current: list[Association] = []

        def association() -> Association:
            """The open association, or a new one when the node ended the last."""
            if not current or not current[0].is_established:
                current[:] = [hostile.open_association(node.port)]
            return current[0]

        @settings(max_examples=DATASET_CASES, **FUZZ)
        @given(case=datasets())
        def store(case: tuple[str, bytes]) -> None:
            uid, body = case
            tried["datasets"] += 1
            path = hostile.part10(cases / f"{uid}.dcm", uid, body)
            response = association().send_c_store(path)
            path.unlink()
            answer = int(response.Status) if "Status" in response else None
            key = "aborted" if answer is None else f"0x{answer:04X}"
            answers[key] = answers.get(key, 0) + 1
            assert answer is None or answer in ALLOWED, f"unexpected status 0x{answer:04X}"
            if answer == status.SUCCESS:
                acknowledged.add(uid)

        @settings(max_examples=PDU_CASES, **FUZZ)
        @given(pdu=pdus)
        def raw_pdu(pdu: tuple[int, int | None, bytes]) -> None:
            kind, length, body = pdu
            tried["pdus"] += 1
            _talk(node.port, struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body, b"")

        @settings(max_examples=PDATA_CASES, **FUZZ)
        @given(pdv=st.tuples(st.integers(0, 255), st.integers(0, 3), st.binary(max_size=1024)))
        def p_data(pdv: tuple[int, int, bytes]) -> None:
            context_id, control, value = pdv
            tried["p-data"] += 1
            item = struct.pack(">LBB", len(value) + 2, context_id, control) + value
            _talk(node.port, hostile.associate_rq(), struct.pack(">BBL", 4, 0, len(item)) + item)

        def serving() -> bool:
            """C-ECHO answered (hostile connections still in their timeouts may hold every association slot
            for a moment: the node then rejects, which is not a crash) and every thread healthy."""
            try:
                return hostile.echo(node.port) == status.SUCCESS and not node.health()
            except AssertionError:
                return False

        for phase in (store, raw_pdu, p_data):
            phase()
            wait_for(serving, 15, f"the node to serve after {phase.__name__}")
        if current and current[0].is_established:
            current[0].release()

        folder = tmp_path / "folder"

        def lost() -> set[str]:
            delivered = {p.name.removesuffix(".dcm") for p in folder.glob("*.dcm")} if folder.exists() else set()
            kept = {job.info()["sop_instance_uid"] for job in node.spool.quarantined()}
            return acknowledged - delivered - kept

        wait_for(lambda: not lost(), 120, "every acknowledged instance delivered (or quarantined)")
        assert not node.spool.incoming(), "acknowledged instances stuck before processing"
    total = sum(tried.values())
    print(
        f"\nfuzz: {total} cases tried ({tried}); C-STORE answers {dict(sorted(answers.items()))}; "
        f"{len(acknowledged)} acknowledged, 0 lost, 0 crashes"
    )
    assert tried == {"datasets": DATASET_CASES, "pdus": PDU_CASES, "p-data": PDATA_CASES}
    assert acknowledged, "no case was accepted: the generator no longer makes valid instances"
