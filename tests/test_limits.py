"""The weak spots of the stack, each closed: huge PDU lengths, deflate bombs, deep nesting, truncated Pixel Data,
oversized instances. After each the node answers a failure status (or drops the connection) and keeps serving."""

from __future__ import annotations

import contextlib
import resource
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from scp import limits, status
from tests import hostile
from tests.peers import TEST_FILES, node_config, running_node, wait_for

pytestmark = pytest.mark.peers

KEEP_RULES = [{"name": "all", "compress": "keep", "forward": ["folder"]}]
MIB = 1024 * 1024


def _config(tmp_path: Path, **node: object) -> dict:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    return node_config(tmp_path, destinations, KEEP_RULES, node=node)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _push(port: int, first: bytes, total: int) -> int:
    """Send `first`, then zeros up to `total` bytes, until the node stops reading; return the bytes it took."""
    sent = 0
    chunk = bytes(MIB)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(first)
            sent = len(first)
            while sent < total:
                sent += sock.send(chunk)
        except OSError:  # reset, broken pipe, or a send timeout once the node stopped reading
            pass
    return sent


def test_huge_pdu_length_is_refused_before_buffering(tmp_path: Path) -> None:
    """An A-ASSOCIATE-RQ header declaring 400 MB: the node closes the connection after the header instead of
    buffering what follows, and serves the next association."""
    with running_node(_config(tmp_path)) as node:
        before = _peak_rss_mib()
        taken = _push(node.port, struct.pack(">BBL", 0x01, 0, 400 * MIB), 256 * MIB)
        assert taken < 32 * MIB, f"the node kept reading {taken / MIB:.0f} MiB of a bogus PDU"
        assert _peak_rss_mib() - before < 64, "memory grew while the bogus PDU was sent"
        assert hostile.echo(node.port) == status.SUCCESS


def test_huge_p_data_pdu_inside_an_association_is_refused(tmp_path: Path) -> None:
    """After a valid A-ASSOCIATE-RQ, a P-DATA-TF header declaring 100 MB (max_pdu_size is 256 KiB): the node
    drops the association instead of buffering, and serves the next one."""
    with running_node(_config(tmp_path)) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(hostile.associate_rq())
            assert sock.recv(65536)[0] == 0x02, "no A-ASSOCIATE-AC"
            sock.sendall(struct.pack(">BBL", 0x04, 0, 100 * MIB))
            taken = 0
            with contextlib.suppress(OSError):
                for _ in range(64):
                    sock.sendall(bytes(MIB))
                    taken += MIB
        assert taken < 32 * MIB, f"the node kept reading {taken / MIB:.0f} MiB of a bogus P-DATA-TF"
        assert hostile.echo(node.port) == status.SUCCESS


def test_pdu_limits_by_type() -> None:
    pdu = limits.PduLimits.for_max_pdu(16_384, 2**31)
    assert pdu.allows(0x04, 16_384) and not pdu.allows(0x04, 16_384 + limits.PDV_ALLOWANCE + 1)
    assert pdu.allows(0x01, 300_000) and not pdu.allows(0x01, limits.CONTROL_PDU_LIMIT + 1)
    assert limits.PduLimits.for_max_pdu(0, 5000).allows(0x04, 5000)


def test_deflate_bomb_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """A ~250 KB Deflated file that inflates to 256 MiB: 0xA700, memory flat, and the node keeps serving."""
    uid = generate_uid()
    bomb = hostile.deflate_bomb(tmp_path / "bomb.dcm", uid, 256 * MIB)
    assert bomb.stat().st_size < 2 * MIB
    with running_node(_config(tmp_path)) as node:
        before = _peak_rss_mib()
        answered = hostile.store(node.port, bomb)
        assert _peak_rss_mib() - before < 64, "the bomb was inflated in memory"
        assert answered == status.OUT_OF_RESOURCES
        assert hostile.echo(node.port) == status.SUCCESS
        assert not node.spool.incoming()


def test_small_deflated_instance_is_accepted(tmp_path: Path) -> None:
    uid = generate_uid()
    small = hostile.deflate_bomb(tmp_path / "small.dcm", uid, 2 * MIB)
    with running_node(_config(tmp_path)) as node:
        assert hostile.store(node.port, small) == status.SUCCESS
        wait_for(lambda: (tmp_path / "folder" / f"{uid}.dcm").exists(), 30, "the deflated instance delivered")


def test_deeply_nested_sequences_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    path = hostile.part10(tmp_path / "nested.dcm", uid, hostile.header(uid) + hostile.nested_sequences(5000))
    with running_node(_config(tmp_path)) as node:
        assert hostile.store(node.port, path) == status.CANNOT_UNDERSTAND
        assert hostile.echo(node.port) == status.SUCCESS
        assert not node.spool.incoming()


def test_pixel_data_shorter_than_rows_times_columns_is_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    short = hostile.part10(tmp_path / "short.dcm", uid, hostile.header(uid) + hostile.image(64, 64, bytes(1000)))
    whole_uid = generate_uid()
    whole = hostile.part10(
        tmp_path / "whole.dcm", whole_uid, hostile.header(whole_uid) + hostile.image(8, 8, bytes(64))
    )
    with running_node(_config(tmp_path)) as node:
        assert hostile.store(node.port, short) == status.CANNOT_UNDERSTAND
        assert hostile.store(node.port, TEST_FILES / "MR_truncated.dcm") == status.CANNOT_UNDERSTAND
        assert hostile.store(node.port, whole) == status.SUCCESS
        wait_for(lambda: (tmp_path / "folder" / f"{whole_uid}.dcm").exists(), 30, "the whole image delivered")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == [f"{whole_uid}.dcm"]


def test_data_sets_with_no_uids_or_values_cut_short_are_refused(tmp_path: Path) -> None:
    """pydicom reads all of these without an error; each would have been answered Success and forwarded."""
    uid = generate_uid()
    body = hostile.header(uid) + hostile.image(8, 8, bytes(64))
    broken = {
        "garbage": b"\xff" * 1000,
        "empty": b"",
        "no SOP Instance UID": hostile.element(0x0008, 0x0016, "UI", hostile.uid_value("1.2.840.10008.5.1.4.1.1.2")),
        "a value cut short": hostile.header(uid) + hostile.element(0x0008, 0x103E, "LO", b"abcdefghij")[:-4],
        "a value running past the end": hostile.header(uid) + hostile.element(0x0008, 0x1030, "LO", b"x" * 20, 0x7FF0),
    }
    paths = {name: hostile.part10(tmp_path / f"{n}.dcm", uid, data) for n, (name, data) in enumerate(broken.items())}
    whole = hostile.part10(tmp_path / "whole.dcm", uid, body)
    with running_node(_config(tmp_path)) as node:
        answers = {name: hostile.store(node.port, path) for name, path in paths.items()}
        assert answers == dict.fromkeys(broken, status.CANNOT_UNDERSTAND)
        assert not node.spool.incoming()
        assert hostile.store(node.port, whole) == status.SUCCESS


def test_data_set_naming_other_uids_than_the_request_is_refused(tmp_path: Path) -> None:
    """The spool, rules and destinations go by the request's UIDs: a data set naming others is answered 0xA900 (a
    directory destination would have written it under another instance's name)."""
    uid, other = generate_uid(), generate_uid()
    body = hostile.header(other) + hostile.image(8, 8, bytes(64))
    instance = hostile.part10(tmp_path / "instance.dcm", uid, body)
    sop_class = hostile.part10(
        tmp_path / "class.dcm", other, body, sop_class="1.2.840.10008.5.1.4.1.1.7"
    )  # Secondary Capture in the request, CT in the data set
    with running_node(_config(tmp_path)) as node:
        assert hostile.store(node.port, instance) == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert hostile.store(node.port, sop_class) == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert not node.spool.incoming()


def test_deflated_data_set_cut_short_is_refused(tmp_path: Path) -> None:
    """Inflated, a Deflated data set must hold what its elements declare, as a native one must."""
    uid = generate_uid()
    body = hostile.header(uid) + hostile.image(64, 64, bytes(4096))

    def deflated(data: bytes, name: str) -> Path:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        compressed = deflater.compress(data) + deflater.flush()
        return hostile.part10(tmp_path / name, uid, compressed, DeflatedExplicitVRLittleEndian)

    with running_node(_config(tmp_path)) as node:
        assert hostile.store(node.port, deflated(body[:-1000], "cut.dcm")) == status.CANNOT_UNDERSTAND
        assert not node.spool.incoming()
        assert hostile.store(node.port, deflated(body, "whole.dcm")) == status.SUCCESS


def test_instance_over_max_instance_bytes_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Refused as it streams in: the rest of it never reaches the disk (a full disk is caught the same way)."""
    with running_node(_config(tmp_path, max_instance_bytes=16_384)) as node:
        assert hostile.store(node.port, TEST_FILES / "CT_small.dcm") == status.OUT_OF_RESOURCES
        assert not node.spool.incoming()
        uid = generate_uid()
        small = hostile.part10(tmp_path / "small.dcm", uid, hostile.header(uid) + hostile.image(8, 8, bytes(64)))
        assert hostile.store(node.port, small) == status.SUCCESS
    assert "while it streamed in: it is larger than node.max_instance_bytes (16384)" in caplog.text


def test_peer_that_stops_mid_pdu_is_dropped_after_network_timeout(tmp_path: Path) -> None:
    """A peer that sends half a PDU and then nothing holds its thread only for node.network_timeout."""
    with running_node(_config(tmp_path, network_timeout=1.5, acse_timeout=1.5)) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 200) + bytes(20))
            started = time.monotonic()
            while sock.recv(1024):  # an A-ABORT may come first; then the node closes the connection
                pass
            assert time.monotonic() - started < 6
        assert hostile.echo(node.port) == status.SUCCESS


def test_associations_beyond_max_associations_are_rejected_then_served(tmp_path: Path) -> None:
    """node.max_associations is enforced (A-ASSOCIATE-RJ, local limit exceeded), and a slot freed is reused."""
    with running_node(_config(tmp_path, max_associations=2)) as node:
        held = [hostile.open_association(node.port) for _ in range(2)]
        try:
            with pytest.raises(AssertionError, match="refused"):
                hostile.open_association(node.port)
        finally:
            for assoc in held:
                assoc.release()
        wait_for(lambda: _echoes(node.port), 10, "a freed association slot")


def test_a_connection_closed_before_its_request_frees_its_slot_at_once(tmp_path: Path) -> None:
    """A port probe (a scanner, a balancer's TCP check) connects and closes. Its slot was held for acse_timeout
    (30 s): 32 probes locked every modality out ("local limit exceeded") for that long."""
    with running_node(_config(tmp_path, max_associations=2)) as node:
        for _ in range(6):
            socket.create_connection(("127.0.0.1", node.port), timeout=5).close()
        wait_for(lambda: _echoes(node.port), 3, "a slot (the probes held them for the ACSE timeout)")


def _echoes(port: int) -> bool:
    try:
        return hostile.echo(port) == status.SUCCESS
    except AssertionError:  # rejected: the released associations' threads have not ended yet
        return False


def test_a_refusal_never_logs_what_a_broken_uid_swallowed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One wrong length byte makes the SOP Instance UID run over the Patient module: the 0xA900 refusal must not
    write the patient's name, ID and birth date into the log (nor the control bytes between them)."""
    uid = generate_uid()
    patient = b"".join(
        (
            hostile.element(0x0010, 0x0010, "PN", b"DOE^JANE"),
            hostile.element(0x0010, 0x0020, "LO", b"MRN4711 "),
            hostile.element(0x0010, 0x0030, "DA", b"19700101"),
        )
    )
    value = hostile.uid_value(uid)
    body = (
        hostile.element(0x0008, 0x0016, "UI", hostile.uid_value("1.2.840.10008.5.1.4.1.1.2"))
        + hostile.element(0x0008, 0x0018, "UI", value, len(value) + len(patient))
        + patient
    )
    path = hostile.part10(tmp_path / "swallowing.dcm", uid, body)
    with running_node(_config(tmp_path)) as node:
        assert hostile.store(node.port, path) == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    refusal = next(r.getMessage() for r in caplog.records if "refused instance" in r.getMessage())
    assert "is not the C-STORE request's" in refusal and "not a UID" in refusal
    for secret in ("DOE", "MRN4711", "19700101"):
        assert secret not in caplog.text


def test_native_ybr_partial_422_holds_two_samples_a_pixel(tmp_path: Path) -> None:
    """YBR_PARTIAL_422 (retired, found in old ultrasound archives) is subsampled like YBR_FULL_422: 8 x 8 pixels
    take 128 bytes, not 192."""
    paths = []
    for photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        uid = generate_uid()
        pixels = b"".join(
            (
                hostile.element(0x0028, 0x0002, "US", struct.pack("<H", 3)),
                hostile.element(0x0028, 0x0004, "CS", photometric.encode().ljust(16)),
                hostile.element(0x0028, 0x0006, "US", struct.pack("<H", 0)),
                hostile.element(0x0028, 0x0010, "US", struct.pack("<H", 8)),
                hostile.element(0x0028, 0x0011, "US", struct.pack("<H", 8)),
                hostile.element(0x0028, 0x0100, "US", struct.pack("<H", 8)),
                hostile.element(0x0028, 0x0101, "US", struct.pack("<H", 8)),
                hostile.element(0x0028, 0x0102, "US", struct.pack("<H", 7)),
                hostile.element(0x0028, 0x0103, "US", struct.pack("<H", 0)),
                hostile.element(0x7FE0, 0x0010, "OB", bytes(128)),
            )
        )
        paths.append(hostile.part10(tmp_path / f"{photometric}.dcm", uid, hostile.header(uid) + pixels))
    with running_node(_config(tmp_path)) as node:
        assert [hostile.store(node.port, path) for path in paths] == [status.SUCCESS, status.SUCCESS]


def test_a_data_set_holding_file_meta_elements_is_refused(tmp_path: Path) -> None:
    """File Meta elements (group 0002) have no place in a C-STORE data set; pydicom would read a stale Transfer
    Syntax UID there as the file's own, and the node would then misread (and mis-forward) the pixels."""
    uid = generate_uid()
    stale = hostile.element(0x0002, 0x0010, "UI", hostile.uid_value("1.2.840.10008.1.2.4.80"))
    body = hostile.header(uid) + hostile.image(8, 8, bytes(64))
    ct = "1.2.840.10008.5.1.4.1.1.2"
    with running_node(_config(tmp_path)) as node:
        assert hostile.raw_store(node.port, ct, ct, uid, stale + body) == status.CANNOT_UNDERSTAND
        assert not node.spool.incoming()
        assert hostile.raw_store(node.port, ct, ct, uid, body) == status.SUCCESS


def test_a_request_on_another_classs_context_or_without_a_data_set_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An MR C-STORE sent on the context negotiated for CT: 0x0122 (not stored under a class the association never
    agreed on), as is one naming a class that is no storage class (pynetdicom aborted the association for
    Modality Worklist or an unknown class, and answered Verification with a C-ECHO response). A C-STORE whose
    command says it carries no data set: 0xC210, one log line, counted."""
    mr, uid = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    data_set = hostile.header(uid, mr) + hostile.element(0x0008, 0x0060, "CS", b"MR")
    ct = "1.2.840.10008.5.1.4.1.1.2"
    not_storage = ["1.2.840.10008.5.1.4.31", "1.2.3.4", "1.2.840.10008.1.1"]  # worklist, unknown, Verification
    with running_node(_config(tmp_path)) as node:
        assert hostile.raw_store(node.port, ct, mr, uid, data_set) == status.SOP_CLASS_NOT_SUPPORTED
        for named in not_storage:
            answer = hostile.raw_store(node.port, ct, named, uid, hostile.header(uid, named))
            assert answer == status.SOP_CLASS_NOT_SUPPORTED, named
        assert hostile.raw_store(node.port, ct, ct, generate_uid(), None) == status.CANNOT_UNDERSTAND
        assert hostile.echo(node.port) == status.SUCCESS
        assert not node.spool.incoming()
    assert "Traceback" not in caplog.text
    assert "carries no data set" in caplog.text and "on the presentation context of" in caplog.text
