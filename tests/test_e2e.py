"""End to end with real peers: DCMTK storescu as the modality, DCMTK storescp (or a folder) as the archive."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless

from tests import hostile
from tests.peers import (
    DEFAULT_PORT,
    TEST_FILES,
    complete_files,
    listening,
    node_config,
    node_process,
    running_node,
    storescp,
    storescu,
    tool,
    wait_for,
)

pytestmark = pytest.mark.peers

SENT = ("CT_small.dcm", "MR_small.dcm", "rtdose.dcm", "test-SR.dcm")
COMPRESSED = ("CT_small.dcm", "MR_small.dcm")
# Attributes a lossless transcoding may change (PS3.5 8.2): the encoding itself.
SYNTAX_DICTATED = {"PixelData", "PhotometricInterpretation", "PlanarConfiguration", "DataSetTrailingPadding"}
# Data Set Trailing Padding has no meaning and may be dropped by any application (PS3.10 7.2); DCMTK drops it.
MEANINGLESS = {"DataSetTrailingPadding"}

CT_MR_RULES = [
    {"name": "ct-mr", "match": {"modality": ["CT", "MR"]}, "compress": "JPEGLSLossless", "forward": ["archive"]},
    {"name": "everything-else", "compress": "keep", "forward": ["archive"]},
]


def _by_uid(folder: Path) -> dict[str, Path]:
    """The files a peer has finished writing into `folder`, by SOP Instance UID."""
    return {uid: Path(str(ds.filename)) for uid, ds in complete_files(folder).items()}


def _attributes(ds: Dataset, skip: set[str]) -> dict[str, object]:
    return {elem.keyword or str(elem.tag): elem.value for elem in ds if elem.keyword not in skip}


def _check_arrivals(arrived: dict[str, Path], scratch: Path) -> None:
    """The four instances arrived; CT/MR as bit-exact JPEG-LS (decoded by DCMTK), the rest unchanged."""
    sources = {name: pydicom.dcmread(TEST_FILES / name) for name in SENT}
    assert sorted(arrived) == sorted(str(ds.SOPInstanceUID) for ds in sources.values())
    for name, source in sources.items():
        out_path = arrived[str(source.SOPInstanceUID)]
        out = pydicom.dcmread(out_path)
        if name in COMPRESSED:
            assert out.file_meta.TransferSyntaxUID == JPEGLSLossless, name
            decoded_path = scratch / f"{name}.decoded.dcm"
            subprocess.run([tool("dcmdjpls"), str(out_path), str(decoded_path)], check=True, timeout=60)
            decoded = pydicom.dcmread(decoded_path)
            assert np.array_equal(decoded.pixel_array, source.pixel_array), f"{name}: not bit-exact"
            assert _attributes(out, SYNTAX_DICTATED) == _attributes(source, SYNTAX_DICTATED), name
        else:
            assert _attributes(out, MEANINGLESS) == _attributes(source, MEANINGLESS), f"{name} was changed"


def test_storescu_to_node_to_storescp(tmp_path: Path) -> None:
    with storescp(tmp_path / "archive") as archive_port:
        destinations = {"archive": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive_port}}
        with running_node(node_config(tmp_path, destinations, CT_MR_RULES)) as node:
            output = storescu(node.port, [TEST_FILES / name for name in SENT])
            wait_for(lambda: len(_by_uid(tmp_path / "archive")) == len(SENT), 60, "four instances at storescp")
        assert "Received Store Response (Success)" in output, output
    _check_arrivals(_by_uid(tmp_path / "archive"), tmp_path)


def test_storescu_to_node_to_directory(tmp_path: Path) -> None:
    destinations = {"archive": {"type": "directory", "path": str(tmp_path / "folder")}}
    with running_node(node_config(tmp_path, destinations, CT_MR_RULES)) as node:
        storescu(node.port, [TEST_FILES / name for name in SENT])
        wait_for(lambda: len(_by_uid(tmp_path / "folder")) == len(SENT), 60, "four files in the folder")
    arrived = _by_uid(tmp_path / "folder")
    assert all(path.name == f"{uid}.dcm" for uid, path in arrived.items())
    _check_arrivals(arrived, tmp_path)


def test_built_in_default_config_serves_without_an_archive(tmp_path: Path) -> None:
    """`compressing-scp run` with no --config: port 11112, spool and ./archive under the working directory."""
    if listening(DEFAULT_PORT):
        pytest.skip(f"port {DEFAULT_PORT} of the built-in default is in use on this machine")
    with node_process(tmp_path) as node:
        storescu(node.port, [TEST_FILES / name for name in SENT])
        wait_for(lambda: len(_by_uid(tmp_path / "archive")) == len(SENT), 60, "four files in ./archive")
    assert (tmp_path / "spool" / "incoming").is_dir()
    _check_arrivals(_by_uid(tmp_path / "archive"), tmp_path)


def test_failure_to_spool_answers_out_of_resources(tmp_path: Path) -> None:
    """A spool that cannot be written answers 0xA700, never Success."""
    destinations = {"archive": {"type": "directory", "path": str(tmp_path / "folder")}}
    with running_node(node_config(tmp_path, destinations, CT_MR_RULES)) as node:
        incoming = node.spool.incoming_dir
        incoming.rename(tmp_path / "moved-away")
        incoming.write_text("not a directory")
        try:
            output = storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        finally:
            incoming.unlink()
            (tmp_path / "moved-away").rename(incoming)
    assert "Refused: OutOfResources" in output, output
    assert not (tmp_path / "folder").exists() or not list((tmp_path / "folder").iterdir())


@pytest.mark.parametrize(
    ("sop_class", "rule_match"),
    [
        ("1.3.12.2.1107.5.9.1", "1.3.12.2.1107.5.9.1"),  # Siemens CSA Non-Image Storage: private
        ("1.2.840.10008.5.1.4.1.1.6", "UltrasoundImageStorageRetired"),  # older ultrasound units send it
    ],
)
def test_storage_classes_pynetdicom_does_not_list_are_received_and_routed(
    tmp_path: Path, sop_class: str, rule_match: str
) -> None:
    """An instance of such a class is accepted, its rules see it, and storescp (accepting unknown classes) gets
    it. DCMTK's storescu refuses to send a class it does not know (the private one): pynetdicom sends that."""
    source = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID = sop_class
    sent = tmp_path / "unlisted.dcm"
    source.save_as(sent)
    rules = [
        {"name": "unlisted", "match": {"sop_class": rule_match}, "compress": "JPEGLSLossless", "forward": ["archive"]},
        {"name": "everything-else", "drop": True},
    ]
    with storescp(tmp_path / "archive", extra=["--promiscuous"]) as archive_port:
        destinations = {"archive": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive_port}}
        with running_node(node_config(tmp_path, destinations, rules)) as node:
            if sop_class.startswith("1.2.840.10008."):
                output = storescu(node.port, [sent], extra=["-R"])  # -R: propose the file's class, not DCMTK's list
                assert "Received Store Response (Success)" in output, output
            else:
                assert hostile.store(node.port, sent) == 0x0000
            wait_for(lambda: _by_uid(tmp_path / "archive"), 60, "the instance at storescp")
    arrived = pydicom.dcmread(next(iter(_by_uid(tmp_path / "archive").values())))
    assert arrived.SOPClassUID == sop_class
    assert arrived.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(arrived.pixel_array, source.pixel_array)
