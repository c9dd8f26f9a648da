"""`compressing-scp queue status|list|retry|purge` on the spool of a running node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pynetdicom.sop_class import CTImageStorage

from scp import cli
from scp.spool import Spool
from tests.fake_archive import FakeArchive
from tests.instances import make_instances
from tests.peers import PROJECT, node_config, running_node, storescu, wait_for

pytestmark = pytest.mark.peers

RULES = [{"name": "all", "compress": "keep", "forward": ["archive"]}]


def _queue(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit code and standard output (the node running in this process logs to standard error)."""
    code = cli.main(["queue", *args])
    return code, capsys.readouterr().out


def test_status_list_retry_purge_while_the_node_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three instances refused for good (0xA900) then an archive that accepts: the operator lists them, sends
    one back by UID (delivered), purges one, sends the rest back (delivered)."""
    made = make_instances(tmp_path / "modality", 3)
    uids = sorted(made.values())
    archive = FakeArchive(answer=lambda n: 0xA900 if n < 3 else 0x0000)
    with archive.serving() as port:
        destinations = {"archive": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port}}
        data = node_config(tmp_path, destinations, RULES)
        config_file = tmp_path / "node.yaml"
        config_file.write_text(yaml.safe_dump(data))
        with running_node(data) as node:
            storescu(node.port, list(made))
            wait_for(lambda: len(node.spool.quarantined()) == 3, 30, "three quarantined jobs")

            status = subprocess.run(
                [sys.executable, "-m", "scp", "queue", "status", "--config", str(config_file)],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(PROJECT)},
            )
            assert status.returncode == 0, status.stderr
            rows = {tuple(line.split()[:3]) for line in status.stdout.splitlines()}
            assert ("quarantine", "archive", "3") in rows, status.stdout
            assert ("outgoing", "archive", "0") in rows, status.stdout

            code, listing = _queue(capsys, "list", "--state", "quarantine", "--spool", str(node.spool.root))
            assert code == 0
            assert all(uid in listing for uid in uids), listing
            listed = [line for line in listing.splitlines() if line.startswith("quarantine")]
            assert sum("status 0xA900" in line for line in listed) == 3, listing

            code, out = _queue(capsys, "retry", uids[0], "--spool", str(node.spool.root))
            assert (code, out.strip()) == (0, "1 job(s) sent back to the queue")
            wait_for(lambda: uids[0] in archive.uids() and len(archive.received) == 4, 30, "the retried job")

            code, out = _queue(capsys, "purge", uids[1], "--config", str(config_file))
            assert (code, out.strip()) == (0, "1 job(s) deleted")

            code, out = _queue(capsys, "retry", "--destination", "archive", "--spool", str(node.spool.root))
            assert (code, out.strip()) == (0, "1 job(s) sent back to the queue")
            wait_for(lambda: len(archive.received) == 5, 30, "the last retried job")
            wait_for(lambda: not node.spool.jobs(), 10, "an empty queue")
            assert node.spool.quarantined() == []
    assert [uid for uid, _ in archive.received[3:]] == [uids[0], uids[2]]


def test_purge_needs_uids_or_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "outgoing").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["queue", "purge", "--spool", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "UID --all" in capsys.readouterr().err
    code, out = _queue(capsys, "purge", "--all", "--spool", str(tmp_path))
    assert (code, out.strip()) == (0, "0 job(s) deleted")


def test_queue_on_a_missing_spool_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["queue", "status", "--spool", str(tmp_path / "nowhere")]) == 1
    assert "no spool at" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can be refused for the spool's owner")
@pytest.mark.parametrize("action", ["retry", "purge"])
def test_root_is_sent_to_the_spool_owner(tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str) -> None:
    """As root on a spool the node owns, retry and purge stop before writing: root's files in the spool could not
    be reused by the node. Reading (status, list) is allowed."""
    (tmp_path / "outgoing").mkdir()
    os.chown(tmp_path, 65534, 65534)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [action, "--spool", str(tmp_path)] + (["--all"] if action == "purge" else [])
    assert cli.main(["queue", *args]) == 1
    assert f"run `queue {action}` as that user" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert cli.main(["queue", "status", "--spool", str(tmp_path)]) == 0


def test_retry_leaves_instances_quarantined_by_a_rule_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `quarantine: true` rule's instance has no destination queue: retry must not strand it in outgoing/."""
    destinations = {"archive": {"type": "directory", "path": str(tmp_path / "folder")}}
    rules = [{"name": "hold", "quarantine": True}]
    made = make_instances(tmp_path / "modality", 1)
    with running_node(node_config(tmp_path, destinations, rules)) as node:
        storescu(node.port, list(made))
        wait_for(lambda: len(node.spool.quarantined()) == 1, 30, "the instance quarantined by the rule")
        assert cli.main(["queue", "retry", "--spool", str(node.spool.root)]) == 1
        assert "quarantined by a rule" in capsys.readouterr().err
        assert len(node.spool.quarantined()) == 1
        assert node.spool.jobs() == []


def _spool_with_jobs(tmp_path: Path, waiting: dict[str, int], quarantined: dict[str, int]) -> tuple[Spool, list[str]]:
    """A spool (no node) with jobs waiting and quarantined, by destination; return it and the UIDs, in order."""
    spool = Spool(tmp_path / "spool")
    wanted = [(d, False) for d, n in waiting.items() for _ in range(n)]
    wanted += [(d, True) for d, n in quarantined.items() for _ in range(n)]
    made = make_instances(tmp_path / "modality", len(wanted))
    for index, ((path, uid), (destination, held)) in enumerate(zip(made.items(), wanted, strict=True)):
        info = {"sop_class_uid": CTImageStorage, "sop_instance_uid": uid, "received_at": 0}
        job = spool.commit_job(f"{index:020d}-test", destination, path, path, info)
        if held:
            spool.quarantine(job, "reason: test")
    return spool, list(made.values())


@pytest.mark.parametrize("name", ["", "..", "../outgoing", "/", "archive/..", ".hidden"])
@pytest.mark.parametrize("action", [["list"], ["retry"], ["purge", "--all"]])
def test_destination_must_be_a_name_not_a_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str], name: str
) -> None:
    """`--destination ../outgoing` purged the waiting jobs and an empty one meant every destination: a name that
    is not a destination's is refused (exit 1) before anything is read or changed."""
    spool, _ = _spool_with_jobs(tmp_path, {"archive": 2}, {"archive": 1, "old": 1})
    code = cli.main(["queue", *action, "--destination", name, "--spool", str(spool.root)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert f"--destination: '{name}' is not a valid destination name" in err, err
    assert len(spool.jobs()) == 2 and len(spool.quarantined()) == 2


@pytest.mark.parametrize("action", ["retry", "purge"])
def test_uids_that_match_nothing_are_named_and_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    """A mistyped UID, or one quarantined for another destination than --destination, is named and the command
    exits 1 ("0 job(s) deleted" and exit 0 passed for done); the UID that matches is still handled."""
    spool, (archive_uid, old_uid) = _spool_with_jobs(tmp_path, {}, {"archive": 1, "old": 1})
    args = [action, "--destination", "archive", archive_uid, "1.2.3.4.5", old_uid, "--spool", str(spool.root)]
    assert cli.main(["queue", *args]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("1 job(s)"), out
    assert f"no quarantined job of 'archive' has the SOP Instance UID 1.2.3.4.5, {old_uid}" in err, err
    assert [job.destination for job in spool.quarantined()] == ["old"]


def test_retry_warns_of_a_destination_the_configuration_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Jobs sent back for a destination the given configuration does not have wait for a deliverer that never
    comes: retry does it (the operator may be about to add it) and says so on standard error."""
    spool, _ = _spool_with_jobs(tmp_path, {}, {"archive": 1, "old": 2})
    config_file = tmp_path / "node.yaml"
    destinations = {"archive": {"type": "directory", "path": str(tmp_path / "folder")}}
    config_file.write_text(yaml.safe_dump(node_config(tmp_path, destinations, RULES)))
    assert cli.main(["queue", "retry", "--destination", "archive", "--config", str(config_file)]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["queue", "retry", "--destination", "old", "--config", str(config_file)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "2 job(s) sent back to the queue"
    assert f"warning: 'old' is not a destination of {config_file}" in err, err
    assert sorted(job.destination for job in spool.jobs()) == ["archive", "old", "old"]


@pytest.mark.parametrize("action", [["list", "--state", "quarantine"], ["retry"], ["purge", "--all"]])
def test_a_quarantined_job_whose_job_json_is_broken_can_be_listed_retried_and_purged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    """The deliverer quarantines a job whose job.json cannot be read: the operator must still be able to act
    on it (a traceback here left that quarantine stuck)."""
    spool, _ = _spool_with_jobs(tmp_path, {}, {"archive": 2})
    broken = spool.quarantined()[0]
    (broken.path / "job.json").write_text("{bad")
    assert cli.main(["queue", *action, "--spool", str(spool.root)]) == 0
    out = capsys.readouterr().out
    if action[0] == "list":
        assert any(line.split()[2:4] == [broken.id, "?"] for line in out.splitlines()), out
    else:
        assert not spool.quarantined()


def test_an_incoming_instance_without_its_sidecar_is_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Processing quarantines it after its attempts; until then `queue list` shows it, with '?' for its UID."""
    spool = Spool(tmp_path / "spool")
    (spool.incoming_dir / "00000000000000000001-test.dcm").write_bytes(b"")
    assert cli.main(["queue", "list", "--spool", str(spool.root)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["incoming", "-", "00000000000000000001-test", "?"] in [row[:4] for row in rows], rows
