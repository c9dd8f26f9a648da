"""Fan-out to two DICOM archives (DCMTK storescp) that take different syntaxes, one of them down."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE

from tests.peers import TEST_FILES, complete_files, free_port, node_config, running_node, storescp, storescu, wait_for

pytestmark = pytest.mark.peers

SENT = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "test-SR.dcm", "rtplan.dcm")
# What the JPEG-LS archive gets: JPEG-LS where it can be made losslessly; lossy sources and objects without
# pixels as they came.
AS_JPEGLS = {
    "CT_small.dcm": JPEGLSLossless,
    "MR_small.dcm": JPEGLSLossless,
    "JPEG2000.dcm": JPEG2000,
    "test-SR.dcm": ExplicitVRLittleEndian,
    "rtplan.dcm": ImplicitVRLittleEndian,
}
FAST_RETRY = {"initial_delay": 0.2, "max_delay": 1.0}
COMPRESSED_SOURCE = "JPEG2000.dcm"


def _send_as_is(port: int, path: Path) -> int:
    """C-STORE a file in its own (compressed) syntax, which DCMTK's storescu cannot do without a J2K codec."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="COMPRESS_SCP")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _arrived(folder: Path) -> dict[str, pydicom.Dataset]:
    return complete_files(folder, pixels=True)


def _uids() -> dict[str, str]:
    return {name: str(pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).SOPInstanceUID) for name in SENT}


def test_one_archive_down_never_holds_back_the_other(tmp_path: Path) -> None:
    research_dir, jpegls_dir = tmp_path / "research", tmp_path / "jpegls"
    down_port = free_port()  # nothing listens here until the end of the test
    with storescp(research_dir, ae_title="RESEARCH", accept="+xa") as research_port:
        destinations = {
            # storescp here would accept JPEG-LS: only the accept list keeps the node from proposing it.
            "research": {
                "type": "dicom",
                "ae_title": "RESEARCH",
                "host": "127.0.0.1",
                "port": research_port,
                "accept": ["ExplicitVRLittleEndian"],
                "retry": FAST_RETRY,
            },
            "jpegls": {
                "type": "dicom",
                "ae_title": "JPEGLS",
                "host": "127.0.0.1",
                "port": down_port,
                "timeout": 2,
                "retry": FAST_RETRY,
            },
        }
        rules = [{"name": "all", "compress": "JPEGLSLossless", "forward": ["research", "jpegls"]}]
        with running_node(node_config(tmp_path, destinations, rules)) as node:
            plain = [TEST_FILES / name for name in SENT if name != COMPRESSED_SOURCE]
            output = storescu(node.port, plain)
            assert output.count("Received Store Response (Success)") == len(plain), output
            assert _send_as_is(node.port, TEST_FILES / COMPRESSED_SOURCE) == 0
            wait_for(lambda: len(_arrived(research_dir)) == len(SENT), 60, "every instance at the research archive")
            research = _arrived(research_dir)
            waiting = node.spool.jobs("jpegls")
            assert len(waiting) == len(SENT), "the down archive's jobs wait in the spool"
            assert not list(node.spool.quarantined()), "a destination that is down is retried, not quarantined"

            with storescp(jpegls_dir, ae_title="JPEGLS", accept="+xa", port=down_port):
                wait_for(lambda: len(_arrived(jpegls_dir)) == len(SENT), 60, "the backlog at the archive back up")
                jpegls = _arrived(jpegls_dir)
            wait_for(lambda: not node.spool.jobs("jpegls"), 10, "the delivered jobs to leave the spool")

    uids = _uids()
    assert set(research) == set(jpegls) == set(uids.values())
    for name, uid in uids.items():
        source = pydicom.dcmread(TEST_FILES / name)
        assert research[uid].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, f"{name} to research"
        assert jpegls[uid].file_meta.TransferSyntaxUID == AS_JPEGLS[name], f"{name} to the JPEG-LS archive"
        if "PixelData" in source:
            assert np.array_equal(research[uid].pixel_array, source.pixel_array), name
            assert np.array_equal(jpegls[uid].pixel_array, source.pixel_array), name


class _Job:
    def __init__(self, info: dict[str, object]) -> None:
        self._info = info

    def info(self) -> dict[str, object]:
        return self._info


def test_forwarder_proposes_only_what_the_destination_accepts() -> None:
    from scp.forward import _preferred_syntaxes

    job = _Job({"sop_class_uid": "1.2.3", "transfer_syntax": JPEGLSLossless, "original_transfer_syntax": JPEG2000})
    assert _preferred_syntaxes(job)[1] == [JPEGLSLossless, JPEG2000, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    only_uncompressed = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
    assert _preferred_syntaxes(job, only_uncompressed)[1] == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert _preferred_syntaxes(job, [JPEG2000])[1] == [JPEG2000]


def test_an_instance_no_accepted_syntax_can_be_made_for_is_quarantined_not_sent(tmp_path: Path) -> None:
    """A 12-bit lossy JPEG nothing here can decode, for an uncompressed-only archive: quarantined with the reason."""
    with storescp(tmp_path / "research", ae_title="RESEARCH", accept="+xa") as port:
        destinations = {
            "research": {
                "type": "dicom",
                "ae_title": "RESEARCH",
                "host": "127.0.0.1",
                "port": port,
                "accept": ["ExplicitVRLittleEndian"],
                "retry": FAST_RETRY,
            }
        }
        rules = [{"name": "all", "compress": "keep", "forward": ["research"]}]
        with running_node(node_config(tmp_path, destinations, rules)) as node:
            assert _send_as_is(node.port, TEST_FILES / "JPEG-lossy.dcm") == 0
            wait_for(lambda: list(node.spool.quarantined()), 30, "the instance to be quarantined")
            (held,) = node.spool.quarantined()
        assert not complete_files(tmp_path / "research"), "nothing was sent in a syntax the archive did not list"
    assert held.destination == "research"
    assert "cannot convert to Explicit VR Little Endian" in (held.path / "reason.txt").read_text()
