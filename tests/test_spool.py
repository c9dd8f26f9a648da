"""The spool: commit points, crash consistency, sweeping, quarantine and requeue; no partial data left behind."""

from __future__ import annotations

import errno
import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage

from scp import config, inbound
from scp.errors import SpoolError
from scp.pipeline import Processor
from scp.spool import SPARES, Job, Received, Spool, arrival
from scp.workers import Encoder
from tests.peers import TEST_FILES, free_port, node_config, running_node, storescu, wait_for

RECEIVED = Received("MODALITY", "COMPRESS_SCP", "127.0.0.1", "1.2.3", "1.2.3.4", ExplicitVRLittleEndian, 0.0)


def _written(spool: Spool, data: bytes = b"DICM data") -> Path:
    path = spool.tmp / "tmpreceived.dcm"
    path.write_bytes(data)
    return path


def test_commit_received_is_durable_and_complete(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool_id = spool.commit_received(_written(spool), RECEIVED)
    assert spool.incoming() == [spool_id]
    assert spool.received_info(spool_id) == RECEIVED
    assert spool.received_path(spool_id).read_bytes() == b"DICM data"
    assert not _left_in_tmp(spool)
    stamp = arrival(spool_id)
    assert stamp is not None and abs(stamp - time.time()) < 5
    assert arrival("not-ours") is None


def test_the_check_runs_while_the_instance_and_its_sidecar_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fsync waits (up to 5 s) for the check to start: done one after the other, they would not overlap."""
    spool = Spool(tmp_path)
    checking = threading.Event()
    overlapped: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name.startswith("spool-flush"):
            overlapped.append(checking.wait(5))
        real_fsync(fd)

    def check() -> None:
        checking.set()
        time.sleep(0.05)

    monkeypatch.setattr(os, "fsync", fsync)
    spool_id = spool.commit_received(_written(spool), RECEIVED, check)
    assert overlapped == [True, True]  # the instance's fsync and the sidecar's
    assert spool.received_info(spool_id) == RECEIVED


def test_a_failed_check_commits_nothing_and_leaves_no_sidecar(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    written = _written(spool)

    def refuse() -> None:
        raise ValueError("not DICOM")

    with pytest.raises(ValueError, match="not DICOM"):
        spool.commit_received(written, RECEIVED, refuse)
    assert spool.incoming() == [] and not list(spool.incoming_dir.iterdir())
    assert _left_in_tmp(spool) == [written]  # the handler removes what it received


@pytest.mark.parametrize("failing", ["the instance", "incoming/"])
def test_a_failed_fsync_while_receiving_leaves_nothing_to_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The modality is answered a failure, and sends the instance again: nothing of it may stay in incoming/ (to
    be processed after a restart too), whether the instance's fsync fails or, after the renames, its folder's."""
    spool = Spool(tmp_path)
    written = _written(spool)
    real_fsync = os.fsync
    inode = (written if failing == "the instance" else spool.incoming_dir).stat().st_ino

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == inode:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="I/O error"):
        spool.commit_received(written, RECEIVED)
    assert spool.incoming() == [] and not list(spool.incoming_dir.iterdir())
    if failing == "the instance":
        assert _left_in_tmp(spool) == [written]


@pytest.mark.parametrize("crash_at", [1, 2])
def test_a_crash_inside_commit_received_leaves_all_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: int
) -> None:
    """A crash before either rename leaves no instance after the start-up sweep (and Success was not sent)."""
    spool = Spool(tmp_path)
    calls = 0
    real_replace = os.replace

    def crashing_replace(src: object, dst: object) -> None:
        nonlocal calls
        calls += 1
        if calls == crash_at:
            raise OSError("simulated crash")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError):
        spool.commit_received(_written(spool), RECEIVED)
    monkeypatch.setattr(os, "replace", real_replace)
    Spool(tmp_path).sweep()
    assert spool.incoming() == []
    assert not list(spool.incoming_dir.iterdir()), "an orphan sidecar survived the sweep"
    assert not _left_in_tmp(spool)


def _job(spool: Spool, destination: str = "archive", uid: str = "1.2.3.4") -> Job:
    spool_id = spool.commit_received(_written(spool), RECEIVED)
    info = {"sop_instance_uid": uid, "received_at": 1.0}
    job = spool.commit_job(spool_id, destination, spool.received_path(spool_id), spool.received_path(spool_id), info)
    spool.finish_received(spool_id)
    return job


def test_jobs_are_hard_links_and_commit_job_is_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool_id = spool.commit_received(_written(spool), RECEIVED)
    source = spool.received_path(spool_id)
    first = spool.commit_job(spool_id, "a", source, source, {"sop_instance_uid": "1"})
    second = spool.commit_job(spool_id, "b", source, source, {"sop_instance_uid": "1"})
    again = spool.commit_job(spool_id, "a", source, source, {"sop_instance_uid": "changed"})
    assert first.instance.stat().st_ino == second.instance.stat().st_ino == source.stat().st_ino
    assert again.info() == {"sop_instance_uid": "1"}
    assert [j.destination for j in spool.jobs()] == ["a", "b"]


def test_a_job_made_from_the_instance_is_fsynced_before_it_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder's output is written in tmp/ without an fsync; the job holding it must be on disk, not in the
    page cache, before the received instance (fsynced when received) is dropped."""
    spool = Spool(tmp_path)
    spool_id = spool.commit_received(_written(spool), RECEIVED)
    made = spool.new_tmp_path(".dcm")
    made.write_bytes(b"DICM encoded")
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    job = spool.commit_job(spool_id, "a", made, spool.received_path(spool_id), {"sop_instance_uid": "1"})
    assert job.instance.read_bytes() == b"DICM encoded"
    assert job.instance.stat().st_ino in synced
    synced.clear()
    source = spool.received_path(spool_id)
    passed = spool.commit_job(spool_id, "b", source, source, {"sop_instance_uid": "1"})
    assert passed.instance.stat().st_ino not in synced  # fsynced once already, when it was received


def test_a_job_made_again_replaces_its_quarantined_copy(tmp_path: Path) -> None:
    """An instance processed a second time (a retried commit) makes its job again after it was quarantined: moving
    it to quarantine must not fail (the job would be sent again and again)."""
    spool = Spool(tmp_path)
    spool_id = spool.commit_received(_written(spool), RECEIVED)
    source = spool.received_path(spool_id)
    spool.quarantine(spool.commit_job(spool_id, "archive", source, source, {"n": 1}), "reason: first")
    again = spool.commit_job(spool_id, "archive", source, source, {"n": 2})
    quarantined = spool.quarantine(again, "reason: second")
    assert spool.jobs() == [] and spool.quarantined() == [quarantined]
    assert quarantined.reason() == "reason: second" and quarantined.info() == {"n": 2}
    assert not _left_in_tmp(spool)


def test_quarantine_requeue_and_purge(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    job = _job(spool)
    quarantined = spool.quarantine(job, "destination: archive\nreason: status 0xA900")
    assert spool.jobs() == []
    assert quarantined.reason() == "destination: archive\nreason: status 0xA900"
    before = time.time()
    back = spool.requeue(quarantined)
    assert spool.quarantined() == [] and spool.jobs() == [back]
    assert back.queued_at() >= before, "a requeued job must get a fresh max_age clock"
    assert "0xA900" in back.reason(), "the last reason stays with the job"
    assert back.instance.read_bytes() == b"DICM data"
    spool.purge(spool.quarantine(back, "reason: again"))
    assert spool.quarantined() == [] and spool.jobs() == []
    assert not _left_in_tmp(spool)


def test_requeue_refuses_to_overwrite_a_waiting_job(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    job = _job(spool)
    quarantined = spool.quarantine(job, "reason: x")
    spool.commit_job(job.id, job.destination, quarantined.instance, quarantined.instance, {"sop_instance_uid": "1"})
    with pytest.raises(SpoolError, match="cannot requeue"):
        spool.requeue(quarantined)
    assert len(spool.jobs()) == 1 and len(spool.quarantined()) == 1


def test_census_counts_each_state_and_destination(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.commit_received(_written(spool), RECEIVED)
    _job(spool, "a")
    _job(spool, "a")
    spool.quarantine(_job(spool, "b"), "reason: x")
    (spool.outgoing_dir / "a" / "copied-by-hand").mkdir()
    counts = {(c.state, c.destination): c.count for c in spool.census()}
    assert counts == {("incoming", ""): 1, ("outgoing", "a"): 3, ("outgoing", "b"): 0, ("quarantine", "b"): 1}
    assert all(c.oldest is None or c.oldest <= time.time() for c in spool.census())


def test_sweep_at_start_and_abandoned_receives_while_running(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.commit_received(_written(spool), RECEIVED)
    old, fresh, ours = spool.tmp / "tmpold.dcm", spool.tmp / "tmpfresh.dcm", spool.tmp / "123-abc.dcm"
    for path in (old, fresh, ours):
        path.write_bytes(b"partial")
    os.utime(old, (time.time() - 120, time.time() - 120))
    os.utime(ours, (time.time() - 120, time.time() - 120))
    still_open = open(old, "ab")  # noqa: SIM115 (a dead transfer's file, which pynetdicom never closed)
    assert spool.sweep_abandoned_receives(60) == 1
    assert not old.exists() and fresh.exists() and ours.exists(), "only pynetdicom's old partial files go"
    assert os.fstat(still_open.fileno()).st_size == 0, "emptied: its space is free though it is still open"
    still_open.close()
    (spool.incoming_dir / "orphan.json").write_text("{}")
    assert spool.sweep() == 3
    assert not _left_in_tmp(spool) and spool.incoming() == [kept]


RULES = [{"name": "all", "compress": "keep", "forward": ["folder"]}]


class _Told:
    """A receive.Reporter that keeps what it is told."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.refusals: list[int] = []

    def received(self, spool_id: str, calling_ae: str, size: int) -> None:
        self.kept.append(spool_id)

    def refused(self, status: int) -> None:
        self.refusals.append(status)

    def rejected(self, reason: str) -> None:
        raise AssertionError(f"no calling AE is refused here ({reason})")


def test_a_raising_handler_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler that raises removes the data set's file and never says Success.

    The node's SCP runs in a child process; to make its handler raise, the same SCP runs here."""
    spool = Spool(tmp_path / "spool")

    def broken(*args: object) -> str:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(spool, "commit_received", broken)
    node = config.NodeConfig(port=free_port(), host="127.0.0.1")
    told = _Told()
    server = inbound.make_server(node, spool, told, min_free=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        output = storescu(node.port, [TEST_FILES / "CT_small.dcm"])
    finally:
        server.shutdown()
        server.end(time.monotonic())
    assert "Received Store Response (Success)" not in output, output
    assert "Failed" in output or "Error" in output, output
    assert not list(spool.tmp.glob("tmp*.dcm"))
    assert spool.incoming() == [] and told.kept == []


def test_a_peer_dying_mid_transfer_leaves_nothing(tmp_path: Path) -> None:
    """Half a C-STORE, then the connection drops: the partial file in tmp/ is removed, and nothing reaches
    incoming/."""
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(tmp_path, destinations, RULES, spool={"partial_max_age": 1.0}, node={"max_pdu_size": 16384})
    with running_node(data) as node:
        ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
        ds.SOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = 512
        ds.PixelData = np.arange(512 * 512, dtype=np.uint16).tobytes()
        ae = AE(ae_title="DIES")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="COMPRESS_SCP")
        assert assoc.is_established
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = CTImageStorage
        request.AffectedSOPInstanceUID = ds.SOPInstanceUID
        request.Priority = 2
        request.DataSet = io.BytesIO(encode(ds, False, True))
        message = C_STORE_RQ()
        message.primitive_to_message(request)
        context_id = assoc.accepted_contexts[0].context_id
        fragments = list(message.encode_msg(context_id, assoc.acceptor.maximum_length))
        assert len(fragments) > 4
        for fragment in fragments[: len(fragments) // 2]:
            assoc.dul.send_pdu(fragment)
        wait_for(lambda: any(p.stat().st_size > 100_000 for p in node.spool.tmp.glob("tmp*.dcm")), 10, "half")
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # the peer dies: no A-RELEASE, no A-ABORT
        assoc.kill()
        wait_for(lambda: not list(node.spool.tmp.glob("tmp*.dcm")), 10, "the partial file to be removed")
        assert node.spool.incoming() == [] and node.spool.jobs() == []


def test_a_failed_job_commit_leaks_no_encoded_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while committing jobs: the encoded file is removed, the received instance stays for later."""
    spool = Spool(tmp_path / "spool")
    source = spool.tmp / "tmpreceived.dcm"
    source.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    spool_id = spool.commit_received(source, RECEIVED)
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    rules = [{"name": "all", "compress": "JPEGLSLossless", "forward": ["folder"]}]
    parsed = config.parse(node_config(tmp_path, destinations, rules))

    def disk_full(*args: object) -> Job:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "commit_job", disk_full)
    encoder = Encoder(1)
    try:
        with pytest.raises(OSError):
            Processor(parsed, spool, encoder).process(spool_id)
    finally:
        encoder.close()
    assert not _left_in_tmp(spool)
    assert spool.incoming() == [spool_id]


def _left_in_tmp(spool: Spool) -> list[Path]:
    """What tmp/ holds besides the pool of spare inodes."""
    return [path for path in spool.tmp.iterdir() if path.name != SPARES]
