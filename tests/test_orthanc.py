"""End to end against a real archive: Debian's Orthanc, started with its own configuration on loopback."""

from __future__ import annotations

import contextlib
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless

from tests.instances import acknowledged, make_instances
from tests.peers import TEST_FILES, free_port, node_config, running_node, stop_process, storescu, tool, wait_for

pytestmark = pytest.mark.peers

UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int

    def text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return str(response.read().decode())

    def get(self, path: str) -> Any:
        return json.loads(self.text(path))

    def instances(self) -> dict[str, str]:
        """SOP Instance UID → transfer syntax UID of every instance Orthanc stored."""
        found = {}
        for item in self.get("/instances?expand"):
            syntax = self.text(f"/instances/{item['ID']}/metadata/TransferSyntax")
            found[item["MainDicomTags"]["SOPInstanceUID"]] = syntax
        return found

    def up(self) -> bool:
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False


@contextlib.contextmanager
def orthanc(folder: Path, accepted: list[str]) -> Iterator[Orthanc]:
    """Orthanc with a temporary configuration: loopback only, no authentication, storage under `folder`."""
    folder.mkdir(parents=True)
    peer = Orthanc(free_port(), free_port())
    settings = {
        "Name": "test-archive",
        "DicomAet": "ORTHANC",
        "DicomPort": peer.dicom_port,
        "HttpPort": peer.http_port,
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "AcceptedTransferSyntaxes": accepted,
        "Plugins": [],
    }
    config = folder / "orthanc.json"
    config.write_text(json.dumps(settings))
    with open(folder / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([tool("Orthanc"), str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: peer.up() or proc.poll() is not None, 30, "Orthanc's REST API", interval=0.2)
        assert proc.poll() is None, (folder / "orthanc.log").read_text()[-3000:]
        yield peer
    finally:
        stop_process(proc)


@pytest.mark.parametrize(
    ("accepted", "expected"),
    [(["1.2.840.10008.1.*"], JPEGLSLossless), (UNCOMPRESSED, ExplicitVRLittleEndian)],
    ids=["all-syntaxes", "uncompressed-only"],
)
def test_storescu_to_node_to_orthanc(tmp_path: Path, accepted: list[str], expected: str) -> None:
    """25 CT instances through the node to Orthanc, counted through its REST API: JPEG-LS where Orthanc accepts
    it, decompressed to Explicit VR Little Endian where it accepts only uncompressed syntaxes."""
    made = make_instances(tmp_path / "modality", 24)
    made[TEST_FILES / "CT_small.dcm"] = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    rules = [{"name": "ct", "match": {"modality": "CT"}, "compress": "JPEGLSLossless", "forward": ["orthanc"]}]
    with orthanc(tmp_path / "orthanc", accepted) as peer:
        destinations = {
            "orthanc": {"type": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": peer.dicom_port}
        }
        with running_node(node_config(tmp_path, destinations, rules)) as node:
            output = storescu(node.port, list(made))
            assert len(acknowledged(output)) == 25, output[-2000:]
            wait_for(lambda: len(peer.get("/instances")) == 25, 60, "25 instances in Orthanc", interval=0.2)
            wait_for(lambda: not node.spool.jobs(), 10, "an empty queue")
            assert node.spool.quarantined() == []
        stored = peer.instances()
        statistics = peer.get("/statistics")
    assert sorted(stored) == sorted(made.values())
    assert set(stored.values()) == {expected}, stored
    assert statistics["CountInstances"] == 25
