"""Delivery: status classification, fallbacks, quarantine, retries, association reuse and parallelism."""

from __future__ import annotations

import errno
import os
import select
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from scp import compress, config, metrics, scu, status
from scp.config import DicomDestination, DirectoryDestination
from scp.forward import Delivery, DicomForwarder, DirectoryForwarder
from scp.pipeline import Deliverer
from scp.spool import Job, Spool
from scp.status import Outcome
from tests.fake_archive import FakeArchive
from tests.instances import Arrivals, make_instances, queue_job
from tests.peers import (
    TEST_FILES,
    archive_destination,
    free_port,
    node_config,
    running_node,
    storescp,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.peers

JPEG_LS = [{"name": "all", "compress": "JPEGLSLossless", "forward": ["archive"]}]


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0000, Outcome.DELIVERED),
        (0xB000, Outcome.DELIVERED),
        (0xB006, Outcome.DELIVERED),
        (0xB007, Outcome.DELIVERED),
        (0x0001, Outcome.DELIVERED),
        (0x0107, Outcome.DELIVERED),
        (0x0116, Outcome.DELIVERED),
        (0xA700, Outcome.TRANSIENT),
        (0xA7FF, Outcome.TRANSIENT),
        (0x0110, Outcome.TRANSIENT),
        (0x0213, Outcome.TRANSIENT),
        (0xA900, Outcome.PERMANENT),
        (0xA9FF, Outcome.PERMANENT),
        (0xC000, Outcome.PERMANENT),
        (0xC211, Outcome.PERMANENT),
        (0x0122, Outcome.PERMANENT),
        (0x0124, Outcome.PERMANENT),
    ],
)
def test_store_status_classification(code: int, outcome: Outcome) -> None:
    """PS3.4 B.2.3: warnings are delivered, out of resources is retried, the rest is refused for good."""
    assert status.classify_store_status(code) is outcome


def _quarantined(spool: Spool) -> dict[str, str]:
    return {str(job.info()["sop_instance_uid"]): job.reason() for job in spool.quarantined()}


def test_uncompressed_only_archive_gets_decompressed_instances(tmp_path: Path) -> None:
    """The rule says JPEG-LS; DCMTK storescp accepting only uncompressed syntaxes gets every instance, decoded
    to the same pixels, with its SOP Instance UID kept."""
    made = make_instances(tmp_path / "modality", 10)
    arrivals = Arrivals(tmp_path / "archive")
    with (
        storescp(tmp_path / "archive", accept="") as port,
        running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node,
    ):
        storescu(node.port, list(made))
        wait_for(lambda: arrivals.uids() == set(made.values()), 60, "10 instances at storescp")
        wait_for(lambda: not node.spool.jobs(), 10, "an empty queue")
        assert not node.spool.quarantined()
    source = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    for path in (tmp_path / "archive").glob("CT*"):
        out = pydicom.dcmread(path)
        assert out.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        assert np.array_equal(out.pixel_array, source.pixel_array)


@pytest.mark.parametrize("code", [0xA900, 0xC000, 0x0122])
def test_permanent_failure_is_quarantined_with_its_reason(tmp_path: Path, code: int) -> None:
    """An archive answering a permanent failure: each instance is sent once and quarantined with the status."""
    made = make_instances(tmp_path / "modality", 3)
    archive = FakeArchive(answer=lambda n: code)
    with archive.serving() as port, running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: len(node.spool.quarantined()) == 3, 30, "three quarantined jobs")
        quarantined = _quarantined(node.spool)
        assert not node.spool.jobs()
    assert sorted(quarantined) == sorted(made.values())
    assert all(f"status 0x{code:04X}" in reason for reason in quarantined.values()), quarantined
    assert all("destination: archive" in reason for reason in quarantined.values())
    assert len(archive.received) == 3, "a permanent failure was retried"


@pytest.mark.parametrize("code", [0xB000, 0x0001, 0x0107, 0x0116])
def test_warning_counts_as_delivered(tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int) -> None:
    """A storage warning (0xBxxx) or a general one (PS3.7 Annex C): the archive kept it; logged as a warning."""
    made = make_instances(tmp_path / "modality", 2)
    archive = FakeArchive(answer=lambda n: code)
    with archive.serving() as port, running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: archive.uids() == set(made.values()), 30, "two instances")
        wait_for(lambda: not node.spool.jobs(), 10, "an empty queue")
        assert not node.spool.quarantined()
    assert len(archive.received) == 2
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "with a warning" in r.getMessage()]
    assert len(warned) == 2 and f"0x{code:04X} (Warning" in warned[0].getMessage(), caplog.text


def test_out_of_resources_is_retried_until_accepted(tmp_path: Path) -> None:
    """0xA700 twice, then Success: delivered, not quarantined."""
    made = make_instances(tmp_path / "modality", 1)
    archive = FakeArchive(answer=lambda n: status.OUT_OF_RESOURCES if n < 2 else status.SUCCESS)
    with archive.serving() as port, running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: len(archive.received) == 3, 30, "two refusals and a success")
        wait_for(lambda: not node.spool.jobs(), 10, "an empty queue")
        assert not node.spool.quarantined()


def _quarantine_reason(tmp_path: Path, archive: FakeArchive, max_attempts: int, **destination: Any) -> str:
    """Send one instance through the node to `archive` (a destination with `destination`'s settings, retried
    quickly up to `max_attempts`); return the reason it was quarantined with."""
    made = make_instances(tmp_path / "modality", 1)
    retry = {"initial_delay": 0.1, "max_delay": 0.2, "max_attempts": max_attempts}
    destinations = archive_destination(0, retry=retry)
    with archive.serving() as port:
        destinations["archive"].update(port=port, **destination)
        with running_node(node_config(tmp_path, destinations, JPEG_LS)) as node:
            storescu(node.port, list(made))
            wait_for(lambda: len(node.spool.quarantined()) == 1, 30, "a quarantined job")
            return node.spool.quarantined()[0].reason()


def test_max_attempts_quarantines_a_transient_failure(tmp_path: Path) -> None:
    archive = FakeArchive(answer=lambda n: status.OUT_OF_RESOURCES)
    reason = _quarantine_reason(tmp_path, archive, max_attempts=3)
    assert len(archive.received) == 3
    assert "0xA700" in reason and "gave up after 3 attempts" in reason, reason


def test_unreachable_destination_pauses_and_max_age_quarantines(tmp_path: Path) -> None:
    """Connection refused is transient; after max_age the job goes to quarantine, saying why."""
    made = make_instances(tmp_path / "modality", 2)
    destinations = archive_destination(free_port(), retry={"initial_delay": 0.1, "max_delay": 0.3, "max_age": 1.5})
    with running_node(node_config(tmp_path, destinations, JPEG_LS)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: len(node.spool.quarantined()) == 2, 30, "two quarantined jobs")
        reasons = list(_quarantined(node.spool).values())
    assert all("cannot connect: [Errno 111] Connection refused" in r for r in reasons), reasons
    assert all("older than max_age" in r for r in reasons), reasons


def test_a_response_timeout_is_transient(tmp_path: Path) -> None:
    """An archive slower than the destination's timeout: no response is a transient failure (retried until
    max_attempts), never a delivery."""
    archive = FakeArchive(delay=2.5)
    reason = _quarantine_reason(tmp_path, archive, max_attempts=2, timeout=1)
    assert "no response" in reason and "gave up after 2 attempts" in reason, reason
    assert len(archive.received) == 2


def test_rejected_association_is_retried_then_gives_up(tmp_path: Path) -> None:
    """An archive that rejects our AE title: transient (retried, the destination pauses), quarantined only
    once max_attempts is reached."""
    archive = FakeArchive(require_calling_aet=["SOMEONE_ELSE"])
    reason = _quarantine_reason(tmp_path, archive, max_attempts=3)
    assert "rejected (Rejected Permanent, Service User: Calling AE title not recognised)" in reason, reason
    assert "gave up after 3 attempts" in reason, reason
    assert archive.received == []


def test_no_acceptable_presentation_context_is_permanent(tmp_path: Path) -> None:
    """An archive that supports only MR storage gets CT: nothing to negotiate, quarantined (not retried)."""
    made = make_instances(tmp_path / "modality", 2)
    archive = FakeArchive(sop_classes=[MRImageStorage])
    with archive.serving() as port, running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: len(node.spool.quarantined()) == 2, 30, "two quarantined jobs")
        reasons = list(_quarantined(node.spool).values())
    assert all("accepted no presentation context for CT Image Storage" in r for r in reasons), reasons
    assert archive.associations <= 2


def test_batches_reuse_associations_and_run_in_parallel(tmp_path: Path) -> None:
    """60 jobs, batch_size 10, 3 delivery threads, a slowish archive: each thread keeps one association for all
    its batches, and the three run at once."""
    spool = Spool(tmp_path / "spool")
    made = make_instances(tmp_path / "modality", 60)
    for index, (path, uid) in enumerate(made.items()):
        queue_job(spool, index, path, uid)
    archive = FakeArchive(delay=0.02)
    with archive.serving() as port:
        parsed = config.parse(node_config(tmp_path, archive_destination(port, associations=3, batch_size=10), JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        threads = [threading.Thread(target=_drain, args=(deliverer,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert archive.uids() == set(made.values())
    assert not spool.jobs()
    assert archive.associations == 3, archive.associations
    assert archive.max_concurrent == 3, archive.max_concurrent
    wait_for(lambda: archive.concurrent == 0, 5, "every thread released its association as it ended")
    assert len({ts for _, ts in archive.received}) == 1


def _drain(deliverer: Deliverer) -> None:
    try:
        for _ in range(100):
            if not deliverer.run_once():
                return
    finally:
        deliverer.close()


def test_an_idle_association_is_released_after_the_linger(tmp_path: Path) -> None:
    """The association kept after a batch serves the next one; once idle for `linger` seconds it is released."""
    spool = Spool(tmp_path / "spool")
    made = list(make_instances(tmp_path / "modality", 4).items())

    def queue(index: int) -> None:
        queue_job(spool, index, *made[index])

    archive = FakeArchive()
    with archive.serving() as port:
        parsed = config.parse(node_config(tmp_path, archive_destination(port, associations=1, batch_size=1), JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        deliverer.forwarder.linger = 0.3  # type: ignore[attr-defined]
        for index in range(2):
            queue(index)
            assert deliverer.run_once() == 1
        assert deliverer.run_once() == 0  # idle, but not for long: kept
        assert archive.associations == 1 and archive.concurrent == 1
        time.sleep(0.4)
        assert deliverer.run_once() == 0
        wait_for(lambda: archive.concurrent == 0, 5, "the idle association released")
        queue(2)
        assert deliverer.run_once() == 1
        deliverer.close()
        wait_for(lambda: archive.concurrent == 0, 5, "released by close")
    assert archive.associations == 2
    assert len(archive.uids()) == 3


def test_receiving_is_not_blocked_by_a_slowarchive_destination(tmp_path: Path) -> None:
    """An archive taking 0.5 s per instance does not slow down the modality."""
    made = make_instances(tmp_path / "modality", 20)
    archive = FakeArchive(delay=0.5)
    with archive.serving() as port, running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node:
        started = time.monotonic()
        storescu(node.port, list(made))
        took = time.monotonic() - started
        assert took < 5, f"receiving 20 instances took {took:.1f} s"
        assert len(archive.received) < 20


def test_backoff_doubles_with_jitter_up_to_max_delay(tmp_path: Path) -> None:
    retry = {"initial_delay": 1.0, "max_delay": 10.0}
    parsed = config.parse(node_config(tmp_path, archive_destination(free_port(), retry=retry), JPEG_LS))
    deliverer = Deliverer("archive", parsed.destinations["archive"], Spool(tmp_path / "spool"), "COMPRESS_SCP")
    for attempts, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (500, 10.0)]:
        delays = [deliverer._backoff(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempts, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling / 10, "no jitter"


def test_status_descriptions_for_reason_files() -> None:
    assert status.describe(0xA900) == "0xA900 (Failure: Data Set Does Not Match SOP Class)"
    assert status.describe(0x0000) == "0x0000 (Success)"
    assert status.describe(0x1234) == "0x1234 (Unknown: not a storage status)"


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_an_archive_that_stops_reading_mid_instance_costs_a_retry_not_memory(tmp_path: Path) -> None:
    """The archive stops reading a few PDUs into a 32 MiB instance: the sender neither hangs nor queues the file
    in memory; the association is aborted, the job waits, and is delivered once the archive reads again."""
    spool = Spool(tmp_path / "spool")
    ((path, uid),) = make_instances(tmp_path / "modality", 1, rows=4096).items()
    queue_job(spool, 1, path, uid)
    archive = FakeArchive(freeze_after_pdus=4)
    with archive.serving() as port:
        parsed = config.parse(node_config(tmp_path, archive_destination(port, timeout=2), JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        try:
            before = peak = _rss()
            sending = threading.Thread(target=deliverer.run_once)
            sending.start()
            assert archive.frozen.wait(30), "the archive never got the first PDUs"
            deadline = time.monotonic() + 30
            while sending.is_alive() and time.monotonic() < deadline:
                peak = max(peak, _rss())
                time.sleep(0.01)
            assert not sending.is_alive(), "the sending thread hangs on a peer that stopped reading"
        finally:
            archive.thaw.set()
        assert peak - before < 16 << 20, f"RSS grew by {(peak - before) >> 20} MiB while sending a 32 MiB file"
        assert [job.id for job in spool.jobs()] == ["00000000000000000001-test"]
        assert not spool.quarantined()
        assert archive.uids() == set()
        wait_for(lambda: deliverer.run_once() == 1 and not spool.jobs(), 60, "delivery after the archive woke up")
        deliverer.close()
    assert archive.uids() == {uid}


def test_directory_destination_keeps_apart_uids_sharing_a_long_prefix(tmp_path: Path) -> None:
    """Two UIDs that are not digits and dots, alike in their first 32 characters: two files, each its own."""
    spool = Spool(tmp_path / "spool")
    made = list(make_instances(tmp_path / "modality", 2).items())
    uids = ["1.2.826.0.1.3680043.8.498.12345.A1", "1.2.826.0.1.3680043.8.498.12345.B2"]
    for index, ((path, _), uid) in enumerate(zip(made, uids, strict=True)):
        queue_job(spool, index, path, uid)
    folder = tmp_path / "folder"
    forwarder = DirectoryForwarder(DirectoryDestination(type="directory", path=str(folder)))
    deliveries = list(forwarder.deliver(spool.jobs("archive")))
    assert [d.outcome for d in deliveries] == [Outcome.DELIVERED] * 2, deliveries
    written = sorted(path.read_bytes() for path in folder.iterdir())
    assert written == sorted(path.read_bytes() for path, _ in made)
    assert all(len(path.name) <= 255 and path.name.startswith("invalid-uid-") for path in folder.iterdir())


def test_a_failed_directory_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder on a disk with room for three small instances (simulated) gets a big one first: its write fails
    for want of space and leaves nothing behind, so the small ones after it are written (its partial file had
    filled the disk for every later job)."""
    spool = Spool(tmp_path / "spool")
    big = list(make_instances(tmp_path / "big", 1, rows=256).items())
    small = list(make_instances(tmp_path / "small", 3).items())
    for index, (path, uid) in enumerate(big + small):
        queue_job(spool, index, path, uid)
    folder = tmp_path / "folder"
    capacity = sum(path.stat().st_size for path, _ in small)
    assert big[0][0].stat().st_size > capacity

    def small_disk(src: Path, dst: Path) -> Path:
        data = Path(src).read_bytes()
        room = capacity - sum(path.stat().st_size for path in folder.iterdir())
        Path(dst).write_bytes(data[:room])
        if len(data) > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return dst

    monkeypatch.setattr(shutil, "copyfile", small_disk)
    forwarder = DirectoryForwarder(DirectoryDestination(type="directory", path=str(folder)))
    deliveries = list(forwarder.deliver(spool.jobs("archive")))
    assert [d.outcome for d in deliveries] == [Outcome.TRANSIENT] + [Outcome.DELIVERED] * 3, deliveries
    assert "No space left on device" in deliveries[0].detail
    assert sorted(path.name for path in folder.iterdir()) == sorted(f"{uid}.dcm" for _, uid in small)


def test_a_job_whose_files_cannot_be_read_is_quarantined_and_the_jobs_behind_it_delivered(tmp_path: Path) -> None:
    """A job folder without job.json, with a broken or incomplete one, or without instance.dcm made every batch
    of its destination fail before the jobs behind it were tried."""
    spool = Spool(tmp_path / "spool")
    made = list(make_instances(tmp_path / "modality", 3).items())
    for index, (path, uid) in enumerate(made):
        queue_job(spool, 10 + index, path, uid)
    (path, uid), *_ = made
    broken = {"no job.json": "", "not JSON": "{bad", "not a mapping": "[1]", "incomplete": '{"received_at": 0}'}
    for index, (case, text) in enumerate([*broken.items(), ("no instance.dcm", None)]):
        queue_job(spool, index, path, f"{uid}.{index}")
        job = spool.outgoing_dir / "archive" / f"{index:020d}-test"
        if text is None:
            (job / "instance.dcm").unlink()
        elif case == "no job.json":
            (job / "job.json").unlink()
        else:
            (job / "job.json").write_text(text)
    folder = tmp_path / "folder"
    destination = DirectoryDestination(type="directory", path=str(folder), batch_size=10)
    _drain(Deliverer("archive", destination, spool, "COMPRESS_SCP"))
    assert {p.read_bytes() for p in folder.iterdir()} == {path.read_bytes() for path, _ in made}
    assert not spool.jobs()
    reasons = [job.reason() for job in spool.quarantined("archive")]
    assert len(reasons) == 5 and all("it cannot be sent" in reason for reason in reasons), reasons
    assert sum("its job.json cannot be read" in reason for reason in reasons) == 3, reasons
    assert any("its job.json lacks sop_class_uid" in reason for reason in reasons), reasons
    assert any("its instance.dcm is missing" in reason for reason in reasons), reasons


def test_jobs_behind_an_aborted_association_count_no_attempt(tmp_path: Path) -> None:
    """The archive aborts the association on the first instance of a batch: with max_attempts 1 that one is
    quarantined, the five behind it (never sent) go back to the queue and are delivered."""
    spool = Spool(tmp_path / "spool")
    made = list(make_instances(tmp_path / "modality", 6).items())
    for index, (path, uid) in enumerate(made):
        queue_job(spool, index, path, uid)
    poison = made[0][1]
    archive = FakeArchive(abort_on={poison})
    retry = {"initial_delay": 0.1, "max_delay": 0.2, "max_attempts": 1}
    with archive.serving() as port:
        destinations = archive_destination(port, retry=retry, associations=1, batch_size=10)
        parsed = config.parse(node_config(tmp_path, destinations, JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        _drain(deliverer)
    assert list(_quarantined(spool)) == [poison]
    assert archive.uids() == {uid for _, uid in made}
    assert not spool.jobs()


def _three_jobs(tmp_path: Path) -> tuple[Spool, list[str]]:
    spool = Spool(tmp_path / "spool")
    made = list(make_instances(tmp_path / "modality", 3).items())
    for index, (path, uid) in enumerate(made):
        queue_job(spool, index, path, uid)
    return spool, [uid for _, uid in made]


def _forward_batch(tmp_path: Path, spool: Spool, archive: FakeArchive) -> list[Delivery]:
    """Deliver every job of the archive's queue as one batch, over one association."""
    with archive.serving() as port:
        parsed = config.parse(node_config(tmp_path, archive_destination(port), JPEG_LS))
        destination = parsed.destinations["archive"]
        assert isinstance(destination, DicomDestination)
        forwarder = DicomForwarder(destination, "COMPRESS_SCP", tmp_path)
        deliveries = list(forwarder.deliver(spool.jobs("archive")))
        forwarder.close()
    return deliveries


def test_a_job_the_association_ends_under_is_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive aborts the association between the first job and the second (held here until its abort has
    arrived): nothing went out for the second, and it goes back without an attempt counted, as the one behind it."""
    real = scu.StoreAssociation.store
    archive = FakeArchive()
    calls: list[Path] = []

    def aborted_before_the_second(self: scu.StoreAssociation, path: Path) -> scu.StoreResponse:
        calls.append(path)
        if len(calls) == 2:
            archive.abort_open()
            wait_for(lambda: select.select([self._sock], [], [], 0)[0], 10, "the archive's abort")
        return real(self, path)

    monkeypatch.setattr(scu.StoreAssociation, "store", aborted_before_the_second)
    spool, uids = _three_jobs(tmp_path)
    deliveries = _forward_batch(tmp_path, spool, archive)
    assert [(d.outcome, d.sent) for d in deliveries] == [
        (Outcome.DELIVERED, True),
        (Outcome.TRANSIENT, False),
        (Outcome.TRANSIENT, False),
    ], deliveries
    assert archive.uids() == {uids[0]}
    assert len(calls) == 2


def test_nothing_more_is_sent_after_no_response(tmp_path: Path) -> None:
    """The archive aborts on the first job instead of answering: that job's outcome is unknown (transient, an
    attempt counted) and nothing more is sent; the two behind it count no attempt."""
    spool, uids = _three_jobs(tmp_path)
    archive = FakeArchive(abort_on={uids[0]})
    deliveries = _forward_batch(tmp_path, spool, archive)
    assert [(d.outcome, d.sent) for d in deliveries] == [(Outcome.TRANSIENT, True)] + [(Outcome.TRANSIENT, False)] * 2
    assert "no response: aborted by the peer" in deliveries[0].detail, deliveries
    assert len(archive.received) == 1


def test_a_failed_move_to_quarantine_is_retried_without_sending_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused for good (0xA900) while the disk is full: moving the job to quarantine fails twice; the job is not
    sent again meanwhile, and lands in quarantine once the move succeeds."""
    moves: list[str] = []
    real = Spool.quarantine

    def full_disk_twice(self: Spool, job: Job, reason: str) -> Job:
        moves.append(job.id)
        if len(moves) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, job, reason)

    monkeypatch.setattr(Spool, "quarantine", full_disk_twice)
    made = make_instances(tmp_path / "modality", 1)
    archive = FakeArchive(answer=lambda n: status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    with archive.serving() as port, running_node(node_config(tmp_path, archive_destination(port), JPEG_LS)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: node.spool.quarantined(), 30, "the job in quarantine")
        (reason,) = _quarantined(node.spool).values()
        assert not node.spool.jobs()
    assert len(moves) == 3
    assert len(archive.received) == 1, "a job refused for good was sent again"
    assert "status 0xA900" in reason, reason


def test_a_quarantine_whose_flush_fails_after_the_move_is_not_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move to quarantine happened, the flush after it failed: the job is in quarantine and nothing of it is
    left to retry (a stale retry entry made every delivery thread poll 20 times a second, for good)."""
    real = Spool.quarantine

    def moved_then_failed(self: Spool, job: Job, reason: str) -> Job:
        real(self, job, reason)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Spool, "quarantine", moved_then_failed)
    spool = Spool(tmp_path / "spool")
    (path, uid), *_ = make_instances(tmp_path / "modality", 1).items()
    queue_job(spool, 0, path, uid)
    archive = FakeArchive(answer=lambda n: status.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    with archive.serving() as port:
        parsed = config.parse(node_config(tmp_path, archive_destination(port), JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        _drain(deliverer)
    assert len(spool.quarantined()) == 1 and not spool.jobs()
    assert not deliverer._retries and deliverer.next_wake() == 1.0


def test_a_paused_destination_does_not_list_its_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a destination is paused (unreachable), a claim sends nothing and reads nothing: listing a queue of
    tens of thousands of jobs at every wake cost the service a core during an outage."""
    spool = Spool(tmp_path / "spool")
    parsed = config.parse(node_config(tmp_path, archive_destination(free_port()), JPEG_LS))
    deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
    deliverer._paused_until = time.monotonic() + 60
    listed: list[str | None] = []
    monkeypatch.setattr(spool, "jobs", lambda destination=None: listed.append(destination) or [])
    assert deliverer.run_once() == 0
    assert listed == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), MemoryError()])
def test_a_failed_scratch_copy_is_retried_not_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """The archive takes Implicit VR only; writing that copy fails once (full disk, no memory): the job is
    retried and delivered, not quarantined as if the decoder had failed on the image."""
    calls: list[Path] = []
    real = compress.decompress_file

    def fails_once(src: Path, dst: Path, syntax: UID = ExplicitVRLittleEndian) -> None:
        calls.append(dst)
        if len(calls) == 1:
            raise failure
        real(src, dst, syntax)

    monkeypatch.setattr(compress, "decompress_file", fails_once)
    spool = Spool(tmp_path / "spool")
    ((path, uid),) = make_instances(tmp_path / "modality", 1).items()
    queue_job(spool, 1, path, uid)
    archive = FakeArchive(transfer_syntaxes=[ImplicitVRLittleEndian])
    with archive.serving() as port:
        retry = {"initial_delay": 0.1, "max_delay": 0.2}
        parsed = config.parse(node_config(tmp_path, archive_destination(port, retry=retry), JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        wait_for(lambda: deliverer.run_once() and not spool.jobs(), 30, "delivery after the failed copy")
        deliverer.close()
    assert not spool.quarantined()
    assert len(calls) == 2
    assert archive.received == [(uid, ImplicitVRLittleEndian)]


def test_stall_timeout_is_per_instance_not_per_batch(tmp_path: Path) -> None:
    """12 instances, 0.3 s each at the archive, batches of up to 12 (3.6 s) and stall_timeout 2 s: the node
    stays healthy while it delivers, however long the batch."""
    made = make_instances(tmp_path / "modality", 12)
    archive = FakeArchive(delay=0.3)
    problems: list[str] = []

    def delivered() -> bool:
        problems.extend(node.health())
        return archive.uids() == set(made.values()) and not node.spool.jobs()

    with archive.serving() as port:
        destinations = archive_destination(port, associations=1, batch_size=12)
        data = node_config(tmp_path, destinations, JPEG_LS, node={"stall_timeout": 2})
        with running_node(data) as node:
            storescu(node.port, list(made))
            wait_for(delivered, 60, "12 instances delivered")
    assert not problems, problems
    assert len(archive.received) == 12


def test_a_file_that_cannot_be_sent_as_written_goes_in_the_next_syntax(tmp_path: Path) -> None:
    """A job whose encoded file cannot be sent as written (its file meta names another SOP class than the job,
    which the association negotiated) is sent in the next accepted syntax, the original, rather than quarantined.
    Receiving refuses such data sets (0xA900), so this guards jobs made by earlier versions and any other file
    refused before a byte is sent."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPClassUID = SecondaryCaptureImageStorage  # the file meta still says CT Image Storage
    original = tmp_path / "original.dcm"
    ds.save_as(original)
    encoded = tmp_path / "encoded.dcm"
    assert compress.transcode_file(original, encoded, config.CompressSpec(syntax=JPEGLSLossless)).compressed
    assert pydicom.dcmread(encoded).file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    spool = Spool(tmp_path / "spool")
    info = {
        "sop_class_uid": CTImageStorage,
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "transfer_syntax": JPEGLSLossless,
        "original_transfer_syntax": ds.file_meta.TransferSyntaxUID,
        "received_at": 0,
    }
    spool.commit_job("00000000000000000001-test", "archive", encoded, original, info)
    archive = FakeArchive()
    with archive.serving() as port:
        parsed = config.parse(node_config(tmp_path, archive_destination(port), JPEG_LS))
        deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
        _drain(deliverer)
    assert not spool.quarantined(), _quarantined(spool)
    assert archive.received == [(str(ds.SOPInstanceUID), ds.file_meta.TransferSyntaxUID)]


def test_an_archive_whose_name_does_not_resolve_is_unreachable_not_a_crash(tmp_path: Path) -> None:
    """The host is resolved in the delivery thread: its error is a transient failure that pauses the destination
    (it escaped delivery, which then retried at once with a traceback, never counting an attempt)."""
    spool = Spool(tmp_path / "spool")
    (path, uid), *_ = make_instances(tmp_path / "modality", 1).items()
    queue_job(spool, 0, path, uid)
    destination = DicomDestination(type="dicom", ae_title="ARCHIVE", host="archive.invalid", port=104)
    forwarder = DicomForwarder(destination, "COMPRESS_SCP", tmp_path)
    (delivery,) = forwarder.deliver(spool.jobs("archive"))
    assert delivery.outcome is Outcome.TRANSIENT and not delivery.reached
    assert delivery.detail.startswith("association to ARCHIVE@archive.invalid:104: cannot connect: [Errno -"), delivery


def test_an_unreachable_archive_charges_one_attempt_and_one_retry_per_batch(tmp_path: Path) -> None:
    """Nobody listens: the batch's first job counts an attempt (and a retry in scp_delivery_retries_total), the
    jobs behind it were never sent and count none; the destination pauses as a whole."""
    spool = Spool(tmp_path / "spool")
    for index, (path, uid) in enumerate(make_instances(tmp_path / "modality", 3).items()):
        queue_job(spool, index, path, uid)
    parsed = config.parse(node_config(tmp_path, archive_destination(free_port()), JPEG_LS))
    deliverer = Deliverer("archive", parsed.destinations["archive"], spool, "COMPRESS_SCP")
    retries = metrics.RETRIES.labels("archive")
    before = retries._value.get()
    try:
        assert deliverer.run_once() == 3
        assert deliverer.run_once() == 0, "a paused destination sent again"
    finally:
        deliverer.close()
    assert retries._value.get() - before == 1
    assert [retry.attempts for retry in deliverer._retries.values()] == [1]
    assert len(spool.jobs()) == 3 and not spool.quarantined()


def test_a_job_the_system_cannot_read_for_now_is_retried_not_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too many open files while a job.json is read says nothing about the job: it stays queued and is sent."""
    spool = Spool(tmp_path / "spool")
    (path, uid), *_ = make_instances(tmp_path / "modality", 1).items()
    queue_job(spool, 0, path, uid)
    real_info, failures = Job.info, [OSError(errno.EMFILE, "Too many open files")]

    def info_failing_once(job: Job) -> dict[str, object]:
        if failures:
            raise failures.pop()
        return real_info(job)

    monkeypatch.setattr(Job, "info", info_failing_once)
    folder = tmp_path / "folder"
    deliverer = Deliverer("archive", DirectoryDestination(type="directory", path=str(folder)), spool, "COMPRESS_SCP")
    assert deliverer.run_once() == 0 and len(spool.jobs()) == 1 and not spool.quarantined()
    _drain(deliverer)
    assert [p.name for p in folder.iterdir()] == [f"{uid}.dcm"]
    assert not spool.jobs() and not spool.quarantined()
