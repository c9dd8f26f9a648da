"""An instance whose processing keeps failing is retried, then kept for an operator; never lost, never a loop."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from scp import pipeline, service
from scp.config import QUARANTINE_UNPROCESSABLE
from scp.spool import Received, Spool, arrival, new_id
from tests.peers import TEST_FILES, node_config, running_node, storescu, wait_for

pytestmark = pytest.mark.peers

RULES = [{"name": "all", "compress": "keep", "forward": ["folder"]}]


def _destinations(tmp_path: Path) -> dict[str, object]:
    return {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}


def test_processing_that_keeps_failing_ends_in_quarantine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []

    def broken(self: pipeline.Processor, spool_id: str) -> list[object]:
        attempts.append(spool_id)
        raise RuntimeError("the rules cannot read this header")

    monkeypatch.setattr(pipeline.Processor, "process", broken)
    with running_node(node_config(tmp_path, _destinations(tmp_path), RULES)) as node:
        node.processing_retry_delay = 0.05
        assert "Success" in storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        # the quarantine copy is committed before the incoming one is removed: wait for both steps
        wait_for(lambda: node.spool.quarantined() and not node.spool.incoming(), 30, "the instance in quarantine")
        (held,) = node.spool.quarantined()
        assert held.destination == "unprocessable"
        assert len(attempts) == service.PROCESSING_ATTEMPTS
    reason = (held.path / "reason.txt").read_text()
    assert f"processing failed {service.PROCESSING_ATTEMPTS} times" in reason
    assert "RuntimeError: the rules cannot read this header" in reason
    assert held.info()["sop_instance_uid"] == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert held.instance.read_bytes()[128:132] == b"DICM"


def test_a_passing_failure_is_retried_and_delivered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure that goes away (a full disk freed, say) costs a retry, not the instance."""
    real = pipeline.Processor.process
    failures = iter([OSError(28, "No space left on device")])

    def once_broken(self: pipeline.Processor, spool_id: str) -> list[object]:
        for exc in failures:
            raise exc
        return real(self, spool_id)

    monkeypatch.setattr(pipeline.Processor, "process", once_broken)
    with running_node(node_config(tmp_path, _destinations(tmp_path), RULES)) as node:
        node.processing_retry_delay = 0.05
        storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        wait_for(lambda: list((tmp_path / "folder").glob("*.dcm")), 30, "the instance in the folder")
        assert node.spool.quarantined() == []


def test_an_instance_whose_sidecar_is_lost_or_broken_is_quarantined_by_its_header(tmp_path: Path) -> None:
    """A missing, empty, invalid or incomplete `<id>.json` used to fail the move to quarantine as well: the
    instance was tried again every 5 s for ever. A file without a readable header is kept as 'unknown'."""
    spool = Spool(tmp_path / "spool")
    ct = (TEST_FILES / "CT_small.dcm").read_bytes()
    complete = json.dumps(asdict(Received("MOD", "COMPRESS_SCP", "127.0.0.1", "1.2", "1.2.3", "1.2.840.10008.1.2", 0)))
    incomplete = json.dumps({k: v for k, v in json.loads(complete).items() if k != "called_ae"})
    sidecars = {"missing": None, "empty": "", "invalid": "{garbage", "incomplete": incomplete, "no header": None}
    ids = {}
    for case, sidecar in sidecars.items():
        ids[case] = spool_id = new_id()
        spool.received_path(spool_id).write_bytes(b"not DICOM" if case == "no header" else ct)
        if sidecar is not None:
            spool.received_path(spool_id).with_suffix(".json").write_text(sidecar)
    data = node_config(tmp_path, _destinations(tmp_path), RULES)
    data["spool"] = {"path": str(spool.root)}
    with running_node(data) as node:
        node.processing_retry_delay = 0.05
        wait_for(lambda: len(node.spool.quarantined()) == len(ids), 30, "every instance in quarantine")
        wait_for(lambda: not node.spool.incoming(), 10, "incoming/ emptied")
    held = {job.id: job for job in spool.quarantined(QUARANTINE_UNPROCESSABLE)}
    for case, spool_id in ids.items():
        job = held[spool_id]
        assert "sidecar: cannot read the sidecar" in job.reason(), case
        info = job.info()
        expected = "unknown" if case == "no header" else "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
        assert (info["sop_instance_uid"], info["calling_ae"]) == (expected, "unknown"), case
        assert info["received_at"] == arrival(spool_id), case


def test_an_instance_damaged_on_disk_after_it_was_received_is_quarantined_not_forwarded(tmp_path: Path) -> None:
    """A filesystem check after a crash can leave a committed instance empty or cut short: it is kept for an
    operator at once, never forwarded (a pass-through rule would have sent it as it was). One whose sidecar was
    written before the node recorded sizes is still caught when it is empty."""
    spool = Spool(tmp_path / "spool")
    ct = (TEST_FILES / "CT_small.dcm").read_bytes()
    sidecar = Received("MOD", "COMPRESS_SCP", "127.0.0.1", "1.2", "1.2.3", "1.2.840.10008.1.2", 0, len(ct))
    older = {k: v for k, v in asdict(sidecar).items() if k != "size"}
    cases = {"whole": (ct, asdict(sidecar)), "cut short": (ct[:-100], asdict(sidecar)), "empty": (b"", older)}
    ids = {}
    for case, (content, info) in cases.items():
        ids[case] = spool_id = new_id()
        spool.received_path(spool_id).write_bytes(content)
        spool.received_path(spool_id).with_suffix(".json").write_text(json.dumps(info))
    data = node_config(tmp_path, _destinations(tmp_path), RULES)
    data["spool"] = {"path": str(spool.root)}
    with running_node(data) as node:
        wait_for(lambda: not node.spool.incoming(), 30, "incoming/ emptied")
        wait_for(lambda: len(node.spool.quarantined()) == 2, 10, "the damaged instances in quarantine")
        wait_for(lambda: list((tmp_path / "folder").glob("*.dcm")), 10, "the whole instance in the folder")
    (forwarded,) = (tmp_path / "folder").glob("*.dcm")
    assert forwarded.read_bytes() == ct
    held = {job.id: job for job in spool.quarantined(QUARANTINE_UNPROCESSABLE)}
    assert set(held) == {ids["cut short"], ids["empty"]}
    assert f"holds {len(ct) - 100} bytes, not the {len(ct)} received" in held[ids["cut short"]].reason()
    assert "the instance file is empty" in held[ids["empty"]].reason()
