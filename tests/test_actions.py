"""drop and quarantine actions, and the default rule, on a node in this process fed by DCMTK storescu."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.peers import TEST_FILES, complete_files, node_config, running_node, storescu, wait_for

pytestmark = pytest.mark.peers


def test_drop_quarantine_and_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    rules = [
        {"name": "drop-sr", "match": {"modality": "SR"}, "drop": True},
        {"name": "hold-rt", "match": {"sop_class": {"glob": "RT*Storage"}}, "quarantine": True},
    ]
    sent = ["CT_small.dcm", "test-SR.dcm", "rtplan.dcm"]
    with running_node(node_config(tmp_path, destinations, rules)) as node:
        output = storescu(node.port, [TEST_FILES / name for name in sent])
        assert output.count("Received Store Response (Success)") == 3, "every instance is acknowledged"
        wait_for(lambda: sum(node._processor.counts.values()) == 3, 30, "three instances processed")
        wait_for(lambda: complete_files(tmp_path / "folder"), 30, "the CT in the folder")
        counts = dict(node._processor.counts)
        held = list(node.spool.quarantined())
        assert not node.spool.incoming()
    assert counts == {"forwarded": 1, "dropped": 1, "quarantined": 1}
    ct_uid = str(pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID)
    assert list(complete_files(tmp_path / "folder")) == [ct_uid], "the built-in default forwards the unmatched CT"
    assert [job.destination for job in held] == ["by-rule"]
    kept = pydicom.dcmread(held[0].instance)
    assert kept.SOPInstanceUID == pydicom.dcmread(TEST_FILES / "rtplan.dcm").SOPInstanceUID
    assert "rule: hold-rt" in (held[0].path / "reason.txt").read_text()
    sr_uid = str(pydicom.dcmread(TEST_FILES / "test-SR.dcm").SOPInstanceUID)
    assert any(f"dropped {sr_uid} by rule drop-sr" in r.getMessage() for r in caplog.records)
