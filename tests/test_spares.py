"""Spare inodes: reused, never while another name links them, shared safely, bounded; and the spool's use of them."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from scp import spool as spool_module
from scp.spares import Spares
from scp.spool import PARTIAL_RECEIVE, SPARES, PartialReceive, ReceiveBudget, Received, Spool

RECEIVED = Received("MODALITY", "COMPRESS_SCP", "127.0.0.1", "1.2.3", "1.2.3.4", ExplicitVRLittleEndian, 0.0)


def _file(path: Path, data: bytes = b"old data") -> Path:
    path.write_bytes(data)
    return path


def test_a_given_file_is_emptied_and_claimed_again_with_fresh_times(tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spare")
    old = _file(tmp_path / "old")
    os.utime(old, (1, 1))
    inode = old.stat().st_ino
    spares.give_file(old)
    assert not old.exists()
    target = tmp_path / "new"
    assert spares.claim_file(target)
    assert target.stat().st_ino == inode and target.read_bytes() == b""
    assert abs(target.stat().st_mtime - time.time()) < 60, "the janitor judges partial receives by their age"
    assert not spares.claim_file(tmp_path / "more"), "one spare was given, one claimed"


def test_a_file_another_name_links_is_removed_not_emptied(tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spare")
    job_a = _file(tmp_path / "a")
    job_b = tmp_path / "b"
    os.link(job_a, job_b)  # another destination's job holds the same instance
    spares.give_file(job_a)
    assert not job_a.exists() and job_b.read_bytes() == b"old data"
    assert not spares.claim_file(tmp_path / "new")
    spares.give_file(job_b)  # the last name: now it may be reused
    assert spares.claim_file(tmp_path / "new")


def test_a_given_folder_is_reused_empty_and_its_files_become_spares(tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spare")
    folder = tmp_path / "job"
    folder.mkdir()
    _file(folder / "instance.dcm")
    _file(folder / "job.json", b"{}")
    inode = folder.stat().st_ino
    spares.give_folder(folder)
    staging = tmp_path / "staging"
    assert spares.claim_folder(staging)
    assert staging.stat().st_ino == inode and not list(staging.iterdir())
    assert spares.claim_file(tmp_path / "f1") and spares.claim_file(tmp_path / "f2")
    assert not spares.claim_folder(tmp_path / "other")


def test_the_pool_is_bounded(tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spare", limit=2)
    for index in range(5):
        spares.give_file(_file(tmp_path / f"f{index}"))
    assert len(os.listdir(tmp_path / "spare" / "files")) == 2
    assert not any(tmp_path.glob("f*")), "a file beyond the limit is removed"


def test_two_processes_share_one_pool_each_spare_claimed_once(tmp_path: Path) -> None:
    """Two Spares on one folder stand for two processes: each caches names, a rename decides who gets one."""
    first, second = Spares(tmp_path / "spare"), Spares(tmp_path / "spare")
    for index in range(3):
        first.give_file(_file(tmp_path / f"f{index}"))
    assert second.claim_file(tmp_path / "s1")  # second lists all three
    assert first.claim_file(tmp_path / "p1") and first.claim_file(tmp_path / "p2")
    assert not second.claim_file(tmp_path / "s2"), "its cached names were taken: no spare, no error"
    assert not first.claim_file(tmp_path / "p3")
    assert len({(tmp_path / name).stat().st_ino for name in ("s1", "p1", "p2")}) == 3


def test_a_claim_into_a_missing_folder_raises_and_keeps_the_spare(tmp_path: Path) -> None:
    spares = Spares(tmp_path / "spare")
    spares.give_file(_file(tmp_path / "f"))
    with pytest.raises(FileNotFoundError):
        spares.claim_file(tmp_path / "missing" / "x")
    assert spares.claim_file(tmp_path / "x")


def test_the_pool_folder_is_made_again_after_the_sweep(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.spares.give_file(_file(spool.tmp / "f"))
    assert spool.sweep() == 0, "spares are not partial files"
    assert not (spool.tmp / SPARES).exists()
    spool.spares.give_file(_file(spool.tmp / "g"))
    assert spool.spares.claim_file(spool.tmp / "h")


def test_the_spool_reuses_a_delivered_jobs_inodes_and_keeps_shared_instances(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    written = _file(spool.tmp / "tmpreceived.dcm", b"DICM data")
    spool_id = spool.commit_received(written, RECEIVED)
    source = spool.received_path(spool_id)
    first = spool.commit_job(spool_id, "a", source, source, {"sop_instance_uid": "1"})
    second = spool.commit_job(spool_id, "b", source, source, {"sop_instance_uid": "1"})
    spool.finish_received(spool_id)
    folder, info = first.path.stat().st_ino, (first.path / "job.json").stat().st_ino
    spool.delivered(first)
    assert second.instance.read_bytes() == b"DICM data", "the other destination's job is intact"
    again = spool.commit_received(_file(spool.tmp / "tmpreceived.dcm", b"DICM next"), RECEIVED)
    next_source = spool.received_path(again)
    job = spool.commit_job(again, "a", next_source, next_source, {"sop_instance_uid": "2"})
    assert job.path.stat().st_ino == folder
    reused = {(job.path / "job.json").stat().st_ino, (spool.incoming_dir / f"{again}.json").stat().st_ino}
    assert info in reused, "the delivered job's job.json became the next job's or the next sidecar"
    assert job.info() == {"sop_instance_uid": "2"} and job.instance.read_bytes() == b"DICM next"
    assert second.instance.read_bytes() == b"DICM data"


def test_partial_receives_are_spare_files_pynetdicom_can_use(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.spares.give_file(_file(spool.tmp / "old", b"x" * 1000))
    partial = spool.open_partial_receive()
    partial.write(b"DICM")
    partial.file.flush()  # as pynetdicom does after each P-DATA
    partial.close()
    path = Path(partial.name)
    assert path.parent == spool.tmp and path.match(PARTIAL_RECEIVE)
    assert path.read_bytes() == b"DICM", "nothing of the spare's old content is left"
    assert not spool.spares.claim_file(spool.tmp / "none"), "the partial receive took the spare"


def test_a_partial_receive_past_its_budget_is_emptied_and_drained(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    partial = spool.open_partial_receive(budget=ReceiveBudget(max_bytes=10, min_free=0))
    assert partial.write(b"DICM") == 4 and not partial.refused
    assert partial.write(b"0123456789") == 10, "drained as if written, so that pynetdicom reads on"
    assert "node.max_instance_bytes (10)" in partial.refused
    assert partial.write(b"more") == 4
    partial.close()
    assert Path(partial.name).stat().st_size == 0


def test_a_partial_receive_stops_where_the_spool_fills_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    free = spool.free_bytes()
    partial = spool.open_partial_receive(budget=ReceiveBudget(max_bytes=2**40, min_free=free + 2**30))
    partial.write(b"DICM")
    partial.close()
    assert "spool.min_free_mb" in partial.refused and Path(partial.name).stat().st_size == 0


def test_a_partial_receive_whose_write_fails_is_refused(tmp_path: Path) -> None:
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    partial = PartialReceive(Path("/dev/full"), Spool(tmp_path).free_bytes)
    assert partial.write(b"DICM") == 4
    partial.close()
    assert "No space left on device" in partial.refused


def test_a_partial_receive_whose_file_cannot_be_made_is_refused_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of inodes, open() fails with ENOSPC: raised in pynetdicom's reactor thread, it aborted the association."""

    def no_inode_left(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    spool = Spool(tmp_path)
    monkeypatch.setattr(spool_module, "open", no_inode_left, raising=False)
    partial = spool.open_partial_receive()
    assert "No space left on device" in partial.refused
    assert partial.write(b"DICM") == 4, "drained as if written, so that pynetdicom reads on"
    partial.file.flush()  # what pynetdicom calls after each P-DATA, and at the end
    partial.close()
    assert not list(spool.tmp.glob(PARTIAL_RECEIVE))


def _statvfs(files: int, favail: int) -> Callable[[object], os.statvfs_result]:
    real = os.statvfs("/")

    def statvfs(path: object) -> os.statvfs_result:
        fields = list(real)
        fields[5:8] = [files, favail, favail]  # f_files, f_ffree, f_favail
        return os.statvfs_result(fields)

    return statvfs


def test_receiving_is_refused_below_the_inode_reserve_spares_counting_as_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processing needs inodes for the jobs of what was acknowledged: receiving stops short of taking them all."""
    spool = Spool(tmp_path)
    budget = ReceiveBudget(max_bytes=2**40, min_free=0, min_free_inodes=100)
    monkeypatch.setattr(os, "statvfs", _statvfs(files=1000, favail=99))
    partial = spool.open_partial_receive(budget=budget)
    assert "only 99 inodes free on the spool (spool.min_free_inodes 100)" in partial.refused
    assert not Path(partial.name).exists(), "nothing is made for a refused data set"
    spool.spares.give_file(_file(spool.tmp / "done"))
    partial = spool.open_partial_receive(budget=budget)
    assert not partial.refused, "a spare is an inode the spool reuses"
    partial.close()


def test_a_filesystem_counting_no_inodes_is_never_short_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """btrfs and some network filesystems report 0 inodes in all, and 0 free."""
    monkeypatch.setattr(os, "statvfs", _statvfs(files=0, favail=0))
    partial = Spool(tmp_path).open_partial_receive(budget=ReceiveBudget(2**40, 0, min_free_inodes=100))
    assert not partial.refused
    partial.close()
