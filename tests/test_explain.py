"""`compressing-scp explain`: the rule each file matches and what would happen to it, on the shipped hospital.yaml."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian

from scp.cli import main
from tests.peers import TEST_FILES, copy_test_file

HOSPITAL = Path(__file__).resolve().parents[1] / "config" / "hospital.yaml"
BOTH = ["archive", "teleradiology"]

# file → (rule, rule's target syntax, destinations): a mixed set over every rule of hospital.yaml.
EXPECTED: dict[str, tuple[str, str, list[str]]] = {
    "CT_small.dcm": ("ct-mr-cr-dx-nm-pt", "JPEGLSLossless", BOTH),
    "MR_small_implicit.dcm": ("ct-mr-cr-dx-nm-pt", "JPEGLSLossless", BOTH),
    "JPEG2000.dcm": ("ct-mr-cr-dx-nm-pt", "JPEGLSLossless", BOTH),
    "examples_ybr_color.dcm": ("us-xa-rf-multiframe-colour", "JPEG2000Lossless", ["archive"]),
    "examples_palette.dcm": ("us-xa-rf-multiframe-colour", "JPEG2000Lossless", ["archive"]),
    "SC_rgb_rle_2frame.dcm": ("us-xa-rf-multiframe-colour", "JPEG2000Lossless", ["archive"]),
    "SC_rgb_small_odd.dcm": ("us-xa-rf-multiframe-colour", "JPEG2000Lossless", ["archive"]),
    "rtdose.dcm": ("non-image-and-rt", "keep", ["archive"]),
    "rtplan.dcm": ("non-image-and-rt", "keep", ["archive"]),
    "test-SR.dcm": ("non-image-and-rt", "keep", ["archive"]),
    "liver_1frame.dcm": ("non-image-and-rt", "keep", ["archive"]),
    "waveform_ecg.dcm": ("non-image-and-rt", "keep", ["archive"]),
    "image_dfl.dcm": ("default", "keep", ["archive"]),
}


def _explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]]]:
    status = main(["explain", "--config", str(HOSPITAL), "--json", *args])
    lines = capsys.readouterr().out.splitlines()
    return status, [json.loads(line) for line in lines]


def test_explain_json_gives_the_right_rule_for_a_mixed_set(capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(TEST_FILES / name) for name in EXPECTED]
    status, reports = _explain(capsys, *files)
    assert status == 0
    assert [r["file"] for r in reports] == files, "one object per file, in order"
    for report in reports:
        name = Path(report["file"]).name
        assert list(report)[:5] == ["file", "rule", "transfer_syntax", "destinations", "reason"]
        assert (report["rule"], report["transfer_syntax"], report["destinations"]) == EXPECTED[name], name
        assert report["reason"], name
    by_name = {Path(r["file"]).name: r for r in reports}
    assert by_name["image_dfl.dcm"]["reason"] == "no rule matched"
    assert by_name["waveform_ecg.dcm"]["reason"] == "any: PixelData (absent) is absent as required"


def test_explain_says_what_happens_to_the_pixels(capsys: pytest.CaptureFixture[str]) -> None:
    names = ["CT_small.dcm", "examples_ybr_color.dcm", "test-SR.dcm", "JPEG2000.dcm"]
    _, reports = _explain(capsys, *(str(TEST_FILES / name) for name in names))
    ct, us, sr, nm = ({d["destination"]: d for d in r["deliveries"]} for r in reports)
    assert ct["archive"]["pixels"] == "compressed" and ct["archive"]["transfer_syntax"] == "JPEGLSLossless"
    assert ct["teleradiology"]["transfer_syntax"] == "JPEG2000", "teleradiology gets lossy JPEG 2000"
    assert us["archive"]["pixels"] == "passed through"
    assert "the source was lossy compressed" in us["archive"]["why"]
    assert sr["archive"] == {
        "destination": "archive",
        "transfer_syntax": "ExplicitVRLittleEndian",
        "pixels": "passed through",
        "why": "the rule keeps the original encoding",
        "deliverable": True,
        "sent_as": ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"],
    }
    assert nm["archive"]["pixels"] == "passed through" and "lossy" in nm["archive"]["why"]
    assert nm["teleradiology"]["transfer_syntax"] == "JPEG2000" and nm["teleradiology"]["pixels"] == "passed through"
    assert nm["teleradiology"]["why"].startswith("already encoded as JPEG 2000 Image Compression")


def test_research_destination_gets_only_uncompressed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The research PACS accepts only uncompressed: a JPEG-LS source is decompressed for it alone."""
    path = copy_test_file("MR_small_jpeg_ls_lossless.dcm", tmp_path)
    ds = pydicom.dcmread(path)
    ds.StudyDescription = "RESEARCH brain protocol"
    ds.save_as(path)
    _, (report,) = _explain(capsys, str(path))
    assert (report["rule"], report["destinations"]) == ("research-protocols", ["archive", "research"])
    deliveries = {d["destination"]: d for d in report["deliveries"]}
    assert deliveries["archive"]["transfer_syntax"] == "JPEGLSLossless"
    assert "already encoded" in deliveries["archive"]["why"]
    assert deliveries["research"]["transfer_syntax"] == ExplicitVRLittleEndian.keyword
    assert deliveries["research"]["pixels"] == "compressed", "re-encoded (decompressed) for research"


@pytest.mark.parametrize(
    ("option", "rule", "action"),
    [
        (["--calling-ae", "SERVICE_QA"], "service-test-images", "drop"),
        (["--calling-ae", "CT_ROOM1", "--peer", "203.0.113.7"], "outside-the-hospital-networks", "quarantine"),
        (["--calling-ae", "WARD_CR", "--peer", "10.20.30.40"], "ct-mr-cr-dx-nm-pt", "forward"),
        (["--called-ae", "COMPRESS_RSRCH"], "research-by-title", "forward"),
        (["--called-ae", "COMPRESS_RSRCH  "], "research-by-title", "forward"),  # padded, as on the wire
    ],
)
def test_explain_uses_the_association_facts(
    capsys: pytest.CaptureFixture[str], option: list[str], rule: str, action: str
) -> None:
    _, (report,) = _explain(capsys, *option, str(TEST_FILES / "CT_small.dcm"))
    assert (report["rule"], report["action"]) == (rule, action)
    assert report["deliveries"] == [] if action != "forward" else report["deliveries"]


def test_explain_text_and_an_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    status = main(["explain", "--config", str(HOSPITAL), str(TEST_FILES / "CT_small.dcm"), str(junk)])
    out = capsys.readouterr().out
    assert status == 1
    assert "rule:      ct-mr-cr-dx-nm-pt (forward)" in out
    assert "-> teleradiology: JPEG2000, compressed" in out
    assert f"{junk}: cannot be read as DICOM" in out


def test_explain_refuses_a_title_the_node_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["explain", "--config", str(HOSPITAL), "--called-ae", "ANY-SCP", str(TEST_FILES / "CT_small.dcm")])
    captured = capsys.readouterr()
    assert status == 1 and not captured.out
    assert "the node rejects associations calling 'ANY-SCP'" in captured.err


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "rtplan.dcm"], ids=["lossy-source", "no-pixels-implicit"])
def test_an_accepted_target_that_cannot_be_made_falls_back_through_the_accept_list(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    """JPEG 2000 lossless is accepted but cannot be made from a lossy source or an object without pixels: both
    destinations get the next accepted syntax, Explicit VR LE, made by the node (a directory was quarantined)."""
    accept = ["JPEG2000Lossless", "ExplicitVRLittleEndian"]
    pacs = {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "accept": accept}
    data = {
        "destinations": {"dir": {"type": "directory", "path": str(tmp_path), "accept": accept}, "pacs": pacs},
        "rules": [{"name": "j2k", "compress": "JPEG2000Lossless", "forward": ["dir", "pacs"]}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    source = str(TEST_FILES / name)
    assert main(["explain", "--config", str(path), "--json", source]) == 0
    deliveries = {d["destination"]: d for d in json.loads(capsys.readouterr().out)["deliveries"]}
    for destination in ("dir", "pacs"):
        delivery = deliveries[destination]
        assert delivery["transfer_syntax"] == "ExplicitVRLittleEndian", destination
        assert (delivery["deliverable"], delivery["sent_as"][0]) == (True, "ExplicitVRLittleEndian"), destination
        why = "the source was lossy compressed" if name == "JPEG2000.dcm" else "no pixel data"
        assert delivery["why"].startswith(why) and "; re-encoded as Explicit VR Little Endian" in delivery["why"]
    assert main(["explain", "--config", str(path), source]) == 0
    assert "quarantined" not in capsys.readouterr().out


def test_explain_routes_on_the_data_sets_sop_class_as_the_node_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The node routes on the C-STORE request's SOP class, which must be the data set's (it refuses others): a
    file meta naming another SOP class must not change explain's answer."""
    from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

    source = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    source.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    mislabelled = tmp_path / "ct.dcm"
    source.save_as(mislabelled)
    data = {
        "destinations": {"a": {"type": "directory", "path": str(tmp_path / "a")}},
        "rules": [
            {"name": "sc", "match": {"sop_class": SecondaryCaptureImageStorage.keyword}, "forward": ["a"]},
            {"name": "ct", "match": {"sop_class": CTImageStorage.keyword}, "forward": ["a"]},
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["explain", "--config", str(path), "--json", str(mislabelled)]) == 0
    assert json.loads(capsys.readouterr().out)["rule"] == "ct"


@pytest.mark.parametrize(
    "calling, peer, allowed",
    [("CT_ROOM1", "10.1.2.3", True), ("INTRUDER", "10.1.2.3", False), ("CT_ROOM1", "192.168.0.9", False)],
)
def test_explain_refuses_a_caller_the_node_rejects(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, calling: str, peer: str, allowed: bool
) -> None:
    data = {
        "node": {"allowed_calling_aets": [{"ae_title": "CT_ROOM1", "hosts": ["10.1.0.0/16"]}]},
        "destinations": {"a": {"type": "directory", "path": str(tmp_path / "a")}},
        "rules": [{"name": "all", "forward": ["a"]}],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    args = ["explain", "--config", str(path), "--calling-ae", calling, "--peer", peer, str(TEST_FILES / "CT_small.dcm")]
    status = main(args)
    captured = capsys.readouterr()
    assert (status == 0) == allowed and bool(captured.out) == allowed
    if not allowed:
        assert f"the node rejects associations from '{calling}' at {peer}" in captured.err
        assert "allowed_calling_aets" in captured.err
