"""An instance whose processing keeps failing is retried, then kept for an operator; never lost, never a loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from scp import pipeline, service
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
