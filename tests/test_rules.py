"""The rules engine: every kind of condition on pydicom's bundled files, load-time validation, decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)

from scp import config, rules
from scp.errors import ConfigError
from scp.pipeline import read_facts
from tests.peers import TEST_FILES

DESTINATIONS = {
    "archive": {"type": "directory", "path": "./archive"},
    "research": {"type": "directory", "path": "./research", "accept": ["ExplicitVRLittleEndian"]},
}


def _facts(name: str, calling: str = "MODALITY1", called: str = "COMPRESS_SCP", peer: str = "10.1.2.3") -> rules.Facts:
    return read_facts(TEST_FILES / name, calling, called, peer)


def _config(rule_list: list[dict[str, Any]], **extra: Any) -> config.Config:
    return config.parse({"destinations": DESTINATIONS, "rules": rule_list, **extra})


def _holds(match: dict[str, Any], facts: rules.Facts) -> bool:
    rule = _config([{"name": "r", "match": match, "forward": ["archive"]}]).rules[0]
    held, why = rule.condition.evaluate(facts)
    assert why, "every evaluation says why"
    return held


# (match, file, association facts, expected): each kind of condition, holding and failing.
CASES: list[tuple[str, dict[str, Any], str, dict[str, str], bool]] = [
    ("sop-class-keyword", {"sop_class": "CTImageStorage"}, "CT_small.dcm", {}, True),
    ("sop-class-keyword-other", {"sop_class": "MRImageStorage"}, "CT_small.dcm", {}, False),
    ("sop-class-dotted", {"sop_class": "1.2.840.10008.5.1.4.1.1.4"}, "MR_small.dcm", {}, True),
    ("sop-class-list", {"sop_class": ["RTDoseStorage", "RTPlanStorage"]}, "rtplan.dcm", {}, True),
    ("sop-class-glob-uid", {"sop_class": {"glob": "1.2.840.10008.5.1.4.1.1.88.*"}}, "test-SR.dcm", {}, True),
    ("sop-class-glob-keyword", {"sop_class": {"glob": "*SRStorage"}}, "test-SR.dcm", {}, True),
    ("sop-class-glob-miss", {"sop_class": {"glob": "*SRStorage"}}, "CT_small.dcm", {}, False),
    ("sop-class-regex", {"sop_class": {"regex": "^Ultrasound(MultiFrame)?Image"}}, "examples_ybr_color.dcm", {}, True),
    ("modality", {"modality": "CT"}, "CT_small.dcm", {}, True),
    ("modality-miss", {"modality": "CT"}, "MR_small.dcm", {}, False),
    ("modality-list", {"modality": ["CT", "MR", "NM"]}, "JPEG2000.dcm", {}, True),
    ("keyword-absent-never-equals", {"StudyDescription": "e+1"}, "MR_small.dcm", {}, False),
    ("calling-ae", {"calling_ae": "CT_SCANNER"}, "CT_small.dcm", {"calling": "CT_SCANNER"}, True),
    ("calling-ae-miss", {"calling_ae": "CT_SCANNER"}, "CT_small.dcm", {"calling": "MR_SCANNER"}, False),
    ("calling-ae-glob", {"calling_ae": {"glob": "US_*"}}, "examples_palette.dcm", {"calling": "US_ROOM3"}, True),
    ("calling-ae-padded", {"calling_ae": " CT_SCANNER "}, "CT_small.dcm", {"calling": "CT_SCANNER"}, True),
    ("calling-ae-glob-long", {"calling_ae": {"glob": "[CM][TR]_*_ROOM_[0-9]*"}}, "CT_small.dcm",
     {"calling": "CT_HEAD_ROOM_3"}, True),
    ("calling-ae-regex", {"calling_ae": {"regex": "^(CT|MR)_"}}, "MR_small.dcm", {"calling": "MR_3T"}, True),
    ("called-ae", {"called_ae": "TELERAD_IN"}, "CT_small.dcm", {"called": "TELERAD_IN"}, True),
    ("called-ae-padded", {"called_ae": ["TELERAD_IN ", "OTHER"]}, "CT_small.dcm", {"called": "TELERAD_IN"}, True),
    ("called-ae-miss", {"called_ae": "TELERAD_IN"}, "CT_small.dcm", {}, False),
    ("syntax-keyword", {"transfer_syntax": "JPEGLSLossless"}, "MR_small_jpeg_ls_lossless.dcm", {}, True),
    ("syntax-uid", {"transfer_syntax": "1.2.840.10008.1.2"}, "MR_small_implicit.dcm", {}, True),
    ("syntax-miss", {"transfer_syntax": "ImplicitVRLittleEndian"}, "MR_small.dcm", {}, False),
    ("syntax-glob", {"transfer_syntax": {"glob": "JPEG2000*"}}, "JPEG2000.dcm", {}, True),
    ("peer-cidr", {"peer_address": "10.1.0.0/16"}, "CT_small.dcm", {}, True),
    ("peer-cidr-miss", {"peer_address": "10.2.0.0/16"}, "CT_small.dcm", {}, False),
    ("peer-cidr-list", {"peer_address": ["192.168.0.0/16", "10.1.2.3"]}, "CT_small.dcm", {}, True),
    ("peer-ipv6", {"peer_address": "fd00::/8"}, "CT_small.dcm", {"peer": "fd00::5"}, True),
    ("peer-v4-mapped", {"peer_address": "127.0.0.0/8"}, "CT_small.dcm", {"peer": "::ffff:127.0.0.1"}, True),
    ("keyword-equals", {"PhotometricInterpretation": "RGB"}, "SC_rgb_rle_2frame.dcm", {}, True),
    ("keyword-equals-miss", {"PhotometricInterpretation": "RGB"}, "CT_small.dcm", {}, False),
    ("keyword-list", {"Manufacturer": ["TOSHIBA_MEC", "GE MEDICAL SYSTEMS"]}, "CT_small.dcm", {}, True),
    ("keyword-number", {"SamplesPerPixel": 3}, "examples_ybr_color.dcm", {}, True),
    ("keyword-number-text", {"SamplesPerPixel": "3"}, "examples_ybr_color.dcm", {}, True),
    ("keyword-regex", {"InstitutionName": {"regex": "(?i)imaging"}}, "CT_small.dcm", {}, True),
    ("keyword-regex-miss", {"InstitutionName": {"regex": "(?i)imaging"}}, "MR_small.dcm", {}, False),
    ("keyword-glob", {"StudyDescription": {"glob": "Whole Body*"}}, "JPEG2000.dcm", {}, True),
    ("multi-valued-any-value", {"ImageType": "DERIVED"}, "MR_small.dcm", {}, True),
    ("multi-valued-miss", {"ImageType": "DERIVED"}, "CT_small.dcm", {}, False),
    ("range-min", {"BitsStored": {"min": 9}}, "CT_small.dcm", {}, True),
    ("range-min-miss", {"BitsStored": {"min": 9}}, "examples_palette.dcm", {}, False),
    ("range-both", {"NumberOfFrames": {"min": 2, "max": 40}}, "examples_ybr_color.dcm", {}, True),
    ("range-max-miss", {"NumberOfFrames": {"max": 1}}, "rtdose.dcm", {}, False),
    ("range-absent", {"NumberOfFrames": {"min": 2}}, "CT_small.dcm", {}, False),
    ("present", {"PixelData": {"present": True}}, "CT_small.dcm", {}, True),
    ("present-miss", {"PixelData": {"present": True}}, "test-SR.dcm", {}, False),
    ("absent", {"PixelData": {"present": False}}, "rtplan.dcm", {}, True),
    ("absent-miss", {"PixelData": {"present": False}}, "MR_small.dcm", {}, False),
    ("absent-text", {"StudyDescription": {"present": False}}, "MR_small.dcm", {}, True),
    ("present-sequence", {"ContentSequence": {"present": True}}, "test-SR.dcm", {}, True),
    ("nested-only-reads-absent", {"ReferencedSOPClassUID": {"present": False}}, "rtplan.dcm", {}, True),
    ("all-keys-hold", {"modality": "CT", "BitsStored": {"min": 12}, "calling_ae": "MODALITY1"}, "CT_small.dcm", {},
     True),
    ("all-keys-one-fails", {"modality": "CT", "BitsStored": {"max": 8}}, "CT_small.dcm", {}, False),
    ("any", {"any": [{"modality": "US"}, {"SamplesPerPixel": 3}]}, "SC_rgb_rle_2frame.dcm", {}, True),
    ("any-miss", {"any": [{"modality": "US"}, {"SamplesPerPixel": 3}]}, "CT_small.dcm", {}, False),
    ("not", {"not": {"ImageType": "DERIVED"}}, "CT_small.dcm", {}, True),
    ("not-miss", {"not": {"ImageType": "DERIVED"}}, "MR_small.dcm", {}, False),
    ("nested", {"modality": "MR", "not": {"any": [{"calling_ae": "X"}, {"peer_address": "10.0.0.0/8"}]}},
     "MR_small.dcm", {}, False),
]  # fmt: skip


@pytest.mark.parametrize(("match", "name", "facts", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_condition(match: dict[str, Any], name: str, facts: dict[str, str], expected: bool) -> None:
    assert _holds(match, _facts(name, **facts)) is expected


def test_every_operator_is_covered_by_the_table() -> None:
    from scp.matching import FACT_FIELDS, OPERATORS

    written = repr([c[1] for c in CASES])
    for key in [*FACT_FIELDS, "any", "not"]:
        assert f"'{key}'" in written, key
    for operator in OPERATORS:
        assert any(f"'{k}'" in written for k in operator.keys), operator.keys


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CTImageStorage", True),
        ("1.2.840.10008.5.1.4.1.1.2", True),
        (["MRImageStorage", "CTImageStorage"], True),
        ("MRImageStorage", False),
        ({"glob": "CT*"}, True),
        ({"regex": "^1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.2$"}, True),
    ],
)
def test_a_ui_element_takes_uid_keywords_like_sop_class(value: Any, expected: bool) -> None:
    """SOPClassUID: CTImageStorage compares as the UID it names (it was compared with the dotted UID as text)."""
    assert _holds({"SOPClassUID": value}, _facts("CT_small.dcm")) is expected


def test_pixel_data_is_not_loaded_to_evaluate_a_rule() -> None:
    facts = _facts("CT_small.dcm")
    assert _holds({"PixelData": {"present": True}}, facts)
    element = facts.dataset.get_item("PixelData", keep_deferred=True)
    assert element is not None and element.value is None, "a present test must not read the pixel data"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_an_empty_sequence_or_binary_element_is_not_present(tmp_path: Path, syntax: str) -> None:
    """`present: false` means absent or empty: zero-length pixel data and sequences without items, of defined
    and of undefined length (pydicom parses the latter, keeps the former raw), are told by length alone."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = syntax
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.PixelData = b""
    ds.ReferencedImageSequence = []  # defined length 0
    ds.DerivationCodeSequence = []
    ds["DerivationCodeSequence"].is_undefined_length = True
    ds.SourceImageSequence = [item]
    ds.ReferencedStudySequence = [item]
    ds["ReferencedStudySequence"].is_undefined_length = True
    path = tmp_path / "empty.dcm"
    ds.save_as(path)
    facts = read_facts(path, "MODALITY1", "COMPRESS_SCP", "10.1.2.3")
    for keyword in ("PixelData", "ReferencedImageSequence", "DerivationCodeSequence"):
        assert _holds({keyword: {"present": False}}, facts), keyword
        assert not _holds({keyword: {"present": True}}, facts), keyword
    for keyword in ("SourceImageSequence", "ReferencedStudySequence"):
        assert _holds({keyword: {"present": True}}, facts), keyword


def _written(tmp_path: Path, *elements: tuple[int, str, Any]) -> rules.Facts:
    """The facts of a Part 10 file holding `elements` (tag, VR, value as written) and nothing else."""
    ds = pydicom.Dataset()
    for tag, vr, value in elements:
        ds.add(pydicom.DataElement(tag, vr, value))
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, "1.2.3"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "written.dcm"
    ds.save_as(path, enforce_file_format=True)
    return read_facts(path, "MODALITY1", "COMPRESS_SCP", "10.1.2.3")


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"SliceThickness": {"glob": "5.0"}}, True),
        ({"SliceThickness": {"glob": "5"}}, False),
        ({"SliceThickness": {"regex": "^5\\.0$"}}, True),
        ({"PixelSpacing": {"glob": "0.00001"}}, True),
        ({"PixelSpacing": {"regex": "e-05"}}, False),
        ({"SeriesNumber": {"glob": "00*"}}, True),
        ({"SliceThickness": 5}, True),
        ({"SeriesNumber": "7"}, True),
        ({"PixelSpacing": {"min": 0.000005, "max": 0.00002}}, True),
        ({"SeriesNumber": {"min": 7, "max": 7}}, True),
    ],
    ids=str,
)
def test_patterns_see_a_number_as_written_and_values_compare_as_numbers(
    tmp_path: Path, match: dict[str, Any], expected: bool
) -> None:
    """DS `5.0` was tried as `5`, DS `0.00001` as `1e-05`, IS `007` as `7`: glob and regex see the value as sent."""
    facts = _written(
        tmp_path, (0x00180050, "DS", "5.0"), (0x00280030, "DS", "0.00001\\0.00001"), (0x00200011, "IS", "007")
    )
    assert _holds(match, facts) is expected


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"modality": "CT"}, True),
        ({"Modality": ["MR", "CT "]}, True),
        ({"StationName": "CT_ROOM1"}, True),
        ({"StationName": {"glob": "CT_*"}}, True),
        ({"StationName": {"regex": "^CT_ROOM1$"}}, True),
        ({"ImageType": "ORIGINAL"}, True),
        ({"ImageType": {"glob": "PRIMARY"}}, True),
        ({"StudyDescription": "Head"}, True),
        ({"ReferringPhysicianName": "Doe^John"}, True),
        ({"ImageComments": "  leading spaces count"}, True),
        ({"ImageComments": "leading spaces count"}, False),
        ({"ImageComments": "  leading spaces count  "}, True),
    ],
    ids=str,
)
def test_spaces_that_do_not_count_do_not_break_a_match(tmp_path: Path, match: dict[str, Any], expected: bool) -> None:
    """PS3.5 6.2: leading and trailing spaces of AE, CS, LO, PN and SH are not significant, of ST, LT, UT only
    trailing ones; pydicom keeps leading spaces and the trailing spaces of all but the last value."""
    facts = _written(
        tmp_path,
        (0x00080008, "CS", " ORIGINAL \\ PRIMARY "),
        (0x00080060, "CS", " CT"),
        (0x00080090, "PN", " Doe^John "),
        (0x00081010, "SH", "  CT_ROOM1"),
        (0x00081030, "LO", " Head "),
        (0x00204000, "LT", "  leading spaces count "),
    )
    assert _holds(match, facts) is expected


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"OverlayData": {"present": True}}, True),
        ({"OverlayRows": 512}, True),
        ({"OverlayRows": {"max": 256}}, True),
        ({"OverlayType": "R"}, True),
        ({"OverlayType": "G"}, True),
        ({"OverlayType": "X"}, False),
        ({"CurveData": {"present": True}}, False),
        ({"OverlayDescription": {"present": True}}, False),
    ],
    ids=str,
)
def test_a_repeating_group_keyword_matches_any_of_its_groups(
    tmp_path: Path, match: dict[str, Any], expected: bool
) -> None:
    """OverlayData (60xx,3000) was refused with "did you mean 'OverlayDate'": it is in pydicom's dictionary of
    repeating groups, and matches in every even group (the overlays 6000-601E); an odd group is private."""
    facts = _written(
        tmp_path,
        (0x60000010, "US", 256),
        (0x60000040, "CS", "G"),
        (0x60013000, "OW", b"\0\0"),
        (0x60010022, "LO", "private"),
        (0x60020010, "US", 512),
        (0x60020040, "CS", "R"),
        (0x60023000, "OW", b"\1\0"),
    )
    assert _holds(match, facts) is expected


BAD: list[tuple[dict[str, Any], str]] = [
    ({"Modalty": "CT"}, "rule 'bad': match.Modalty: 'Modalty' is neither a match key"),
    ({"Modalty": "CT"}, "did you mean 'Modality'"),
    ({"OverlyData": {"present": True}}, "did you mean 'OverlayData'"),
    ({"OverlayRows": {"glob": "5*"}, "OverlayData": "yes"}, "match.OverlayData: OverlayData holds a sequence or"),
    ({"InstitutionName": {"regex": "(unclosed"}}, "rule 'bad': match.InstitutionName: bad regular expression"),
    ({"PatientName": {"min": 3}}, "rule 'bad': match.PatientName: min does not apply to text values"),
    ({"BitsStored": {"min": 12, "max": 8}}, "min 12 is greater than max 8"),
    ({"BitsStored": "twelve"}, "match.BitsStored: 'twelve' is not a number"),
    ({"SliceThickness": {"min": float("nan")}}, "match.SliceThickness: nan is not a number: NaN equals nothing"),
    ({"SliceThickness": {"min": 1, "max": "NaN"}}, "match.SliceThickness: 'NaN' is not a number"),
    ({"SliceThickness": ["nan", 5]}, "match.SliceThickness: 'nan' is not a number"),
    ({"PixelData": "yes"}, "match.PixelData: PixelData holds a sequence or binary data"),
    ({"PixelData": {"present": "yes"}}, "present takes true or false"),
    ({"Modality": {"startswith": "C"}}, "match.Modality: unknown operator startswith"),
    ({"sop_class": "CTImageStorag"}, "did you mean 'CTImageStorage'"),
    ({"transfer_syntax": "JPEGLS"}, "match.transfer_syntax: 'JPEGLS' is not a transfer syntax"),
    ({"peer_address": "10.0.0.0/33"}, "match.peer_address: '10.0.0.0/33' is not an IP address"),
    ({"peer_address": {"glob": "10.*"}}, "glob does not apply to address values"),
    ({"modality": True}, "match.modality: True is read by YAML as bool, not text: quote the value"),
    ({"StationName": 7}, "match.StationName: 7 is read by YAML as int, not text: quote the value as written"),
    ({"SoftwareVersions": [1.1]}, "match.SoftwareVersions: 1.1 is read by YAML as float"),
    ({"calling_ae": 104}, "match.calling_ae: 104 is read by YAML as int"),
    ({"calling_ae": "THIS_TITLE_IS_TOO_LONG"}, "match.calling_ae: 'THIS_TITLE_IS_TOO_LONG' is not a valid AE title"),
    ({"calling_ae": ["CT1", "  "]}, "match.calling_ae: '  ' is not a valid AE title (1-16 printable ASCII"),
    ({"called_ae": "CT\\1"}, "match.called_ae: 'CT\\1' is not a valid AE title"),
    ({"called_ae": "CT\t1"}, "is not a valid AE title"),
    ({"called_ae": ""}, "match.called_ae: '' is not a valid AE title"),
    ({"StudyDescription": {"regex": 7}}, "match.StudyDescription: 7 is read by YAML as int"),
    ({"modality": []}, "an empty list never matches"),
    ({"any": {"modality": "CT"}}, "match.any: must be a non-empty list"),
    ({"not": {}}, "match.not: an empty match always holds; give at least one key"),
    ({"not": None}, "match.not: an empty match always holds"),
    ({"any": [{"modality": "CT"}, {}]}, "match.any.1: an empty match always holds"),
    ({"not": {"any": [{"Modalty": "CT"}]}}, "match.not.any.0.Modalty"),
    (
        {"SOPClassUID": "CTImageStorag"},
        "match.SOPClassUID: 'CTImageStorag' is not a UID keyword pydicom knows nor a "
        "dotted UID - did you mean 'CTImageStorage'?",
    ),
    (
        {"TransferSyntaxUID": "1.2.840.10008.1.2.1"},
        "match.TransferSyntaxUID: 'TransferSyntaxUID' is a file meta element",
    ),
    (
        {"ImplementationVersionName": {"present": True}},
        "group 0002), not part of the dataset rules look at: match the "
        "syntax the instance arrived in with transfer_syntax, its SOP class with sop_class",
    ),
]


@pytest.mark.parametrize(("match", "expected"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_match_is_a_config_error_naming_the_rule(match: dict[str, Any], expected: str) -> None:
    good = {"name": "good", "match": {"modality": "CT"}, "forward": ["archive"]}
    with pytest.raises(ConfigError) as raised:
        _config([good, {"name": "bad", "match": match, "forward": ["archive"]}])
    assert "rules.1" in str(raised.value)
    assert expected in str(raised.value)


def test_every_problem_of_a_match_is_reported_with_its_path() -> None:
    """check-config lists all the mistakes of a match, in `any:` and `not:` too, not only the first."""
    match = {
        "modality": {"glob": 5},
        "NoSuchKeyword": 3,
        "any": [{"Rows": {"min": 5, "max": 2}}, {}],
        "not": {"sop_class": "NotAClass", "calling_ae": "A\\B"},
    }
    with pytest.raises(ConfigError) as raised:
        _config([{"name": "bad", "match": match, "forward": ["archive"]}])
    lines = str(raised.value).splitlines()[1:]
    paths = [line.split(": ")[2] for line in lines]
    assert paths == [
        "match.modality",
        "match.NoSuchKeyword",
        "match.any.0.Rows",
        "match.any.1",
        "match.not.sop_class",
        "match.not.calling_ae",
    ], lines
    assert all(line.startswith("  rules.0: rule 'bad': ") for line in lines), lines


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"name": "r"}, "give exactly one action"),
        ({"name": "r", "forward": ["archive"], "drop": True}, "(got forward, drop)"),
        ({"name": "r", "forward": ["archive", "archive"]}, "a destination is listed twice"),
        ({"name": "r", "forward": [{"destination": "nowhere"}]}, "unknown destination 'nowhere' in rule 'r'"),
    ],
)
def test_actions_are_validated(rule: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _config([rule])


def test_default_takes_no_match_and_reserved_name() -> None:
    with pytest.raises(ConfigError, match="it takes no match"):
        _config([{"name": "r", "forward": ["archive"]}], default={"match": {"modality": "CT"}, "drop": True})
    with pytest.raises(ConfigError, match="destinations: 'by-rule' is reserved for a spool folder"):
        config.parse(
            {
                "destinations": {"by-rule": {"type": "directory", "path": "x"}},
                "rules": [{"name": "r", "forward": ["by-rule"]}],
            }
        )


def test_first_matching_rule_decides_and_says_why_the_others_did_not() -> None:
    loaded = _config(
        [
            {"name": "sr", "match": {"modality": "SR"}, "compress": "keep", "forward": ["archive"]},
            {"name": "mr", "match": {"modality": "MR"}, "compress": "JPEGLSLossless", "forward": ["archive"]},
            {"name": "also-mr", "match": {"sop_class": "MRImageStorage"}, "drop": True},
        ]
    )
    decision = rules.decide(loaded.rules, loaded.default_rule, _facts("MR_small.dcm"))
    assert (decision.rule, decision.action, decision.destinations) == ("mr", "forward", ("archive",))
    assert decision.compress.syntax == JPEGLSLossless
    assert decision.reason == "modality 'MR' is 'MR'"
    assert decision.skipped == (("sr", "modality 'MR' is not 'SR'"),)


def test_unmatched_goes_to_the_built_in_default_keep_and_forward_everywhere() -> None:
    loaded = _config([{"name": "ct", "match": {"modality": "CT"}, "drop": True}])
    decision = rules.decide(loaded.rules, loaded.default_rule, _facts("MR_small.dcm"))
    assert decision.rule == "built-in default" and decision.action == "forward"
    assert decision.destinations == ("archive", "research")
    assert decision.compress.syntax is None
    assert decision.reason == "no rule matched"


def test_configured_default_and_actions() -> None:
    loaded = _config(
        [
            {"name": "drop-sr", "match": {"modality": "SR"}, "drop": True},
            {"name": "hold-rt", "match": {"modality": {"glob": "RT*"}}, "quarantine": True},
        ],
        default={"compress": "JPEG2000Lossless", "forward": ["archive"]},
    )
    decide = lambda name: rules.decide(loaded.rules, loaded.default_rule, _facts(name))  # noqa: E731
    assert (decide("test-SR.dcm").action, decide("test-SR.dcm").destinations) == ("drop", ())
    assert decide("rtplan.dcm").action == "quarantine"
    fallback = decide("CT_small.dcm")
    assert (fallback.rule, fallback.compress.syntax) == ("default", JPEG2000Lossless)
    assert fallback.destinations == ("archive",)


def test_per_destination_target_overrides_the_rule() -> None:
    loaded = _config(
        [
            {
                "name": "ct",
                "compress": "JPEGLSLossless",
                "forward": ["archive", {"destination": "research", "compress": {"syntax": "JPEG2000", "j2k_cr": [20]}}],
            }
        ]
    )
    decision = rules.decide(loaded.rules, loaded.default_rule, _facts("CT_small.dcm"))
    targets = {d.destination: (d.compress.syntax.keyword, d.compress.j2k_cr) for d in decision.deliveries}
    assert targets == {"archive": ("JPEGLSLossless", None), "research": ("JPEG2000", [20.0])}


@pytest.mark.parametrize(
    ("target", "source", "accept", "expected"),
    [
        ("JPEGLSLossless", ExplicitVRLittleEndian, None, ["JPEGLSLossless"]),
        ("JPEGLSLossless", ExplicitVRLittleEndian, ["JPEGLSLossless", "ExplicitVRLittleEndian"],
         ["JPEGLSLossless", "keep"]),
        ("JPEG2000Lossless", JPEG2000, ["JPEG2000Lossless", "ExplicitVRLittleEndian"],
         ["JPEG2000Lossless", "ExplicitVRLittleEndian"]),
        ("JPEGLSLossless", JPEGLSLossless, ["JPEGLSLossless", "ExplicitVRLittleEndian"],
         ["JPEGLSLossless", "keep", "ExplicitVRLittleEndian"]),
        ("JPEGLSLossless", ExplicitVRLittleEndian, ["ImplicitVRLittleEndian", "ExplicitVRLittleEndian"],
         ["ImplicitVRLittleEndian", "keep"]),
        ("keep", ImplicitVRLittleEndian, ["ExplicitVRLittleEndian"], ["ExplicitVRLittleEndian"]),
        ("keep", JPEGLSLossless, ["JPEG2000Lossless", "JPEGLSLossless"], ["keep"]),
        ("JPEGLSLossless", ExplicitVRLittleEndian, ["JPEG2000", "JPEG2000Lossless"], ["JPEG2000Lossless"]),
        ("JPEGLSLossless", ExplicitVRLittleEndian, ["JPEGBaseline8Bit"], []),
    ],
)  # fmt: skip
def test_candidates_follow_the_accept_list_and_never_choose_lossy(
    target: str, source: str, accept: list[str] | None, expected: list[str]
) -> None:
    spec = config.CompressSpec.model_validate({"syntax": target})
    uids = None if accept is None else [config.syntaxes.resolve(a) for a in accept]
    found = rules.candidates(spec, source, uids)
    assert [c.syntax.keyword if c.syntax else "keep" for c in found] == expected


def test_each_distinct_target_is_encoded_once_and_shared(tmp_path: Path) -> None:
    from scp import compress
    from scp.pipeline import produce

    loaded = config.parse(
        {
            "destinations": {
                "plain": {"type": "directory", "path": "p"},
                "jls-or-explicit": {
                    "type": "directory",
                    "path": "j",
                    "accept": ["JPEGLSLossless", "ExplicitVRLittleEndian"],
                },
                "explicit-only": {"type": "directory", "path": "e", "accept": ["ExplicitVRLittleEndian"]},
            },
            "rules": [
                {"name": "all", "compress": "JPEGLSLossless", "forward": ["plain", "jls-or-explicit", "explicit-only"]}
            ],
        }
    )
    calls: list[str] = []

    def encode(src: Path, dst: Path, spec: config.CompressSpec) -> compress.Result:
        calls.append(str(spec.syntax))
        return compress.transcode_file(src, dst, spec)

    source = TEST_FILES / "MR_small_implicit.dcm"
    decision = rules.decide(loaded.rules, loaded.default_rule, _facts("MR_small_implicit.dcm"))
    names = iter(range(10))
    outputs, made = produce(
        source, ImplicitVRLittleEndian, decision, loaded.destinations, encode, lambda: tmp_path / f"{next(names)}.dcm"
    )
    assert calls == [JPEGLSLossless, ExplicitVRLittleEndian], "one encode per distinct target"
    by_name = {o.destination: o for o in outputs}
    assert by_name["plain"].path == by_name["jls-or-explicit"].path and by_name["plain"].compressed
    assert by_name["explicit-only"].transfer_syntax == ExplicitVRLittleEndian
    assert pydicom.dcmread(by_name["explicit-only"].path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sorted(path for _, path in made) == sorted({o.path for o in outputs})


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "rtplan.dcm"], ids=["lossy-source", "no-pixels-implicit"])
def test_an_accepted_target_that_cannot_be_made_falls_back_to_the_next_accepted(tmp_path: Path, name: str) -> None:
    """A directory accepting [JPEG2000Lossless, ExplicitVRLittleEndian] gets Explicit VR LE written for an instance
    JPEG 2000 Lossless cannot be made from (it got the source as it came, and quarantined it)."""
    from scp import compress
    from scp.pipeline import produce

    accept = ["JPEG2000Lossless", "ExplicitVRLittleEndian"]
    loaded = config.parse(
        {
            "destinations": {"dir": {"type": "directory", "path": "d", "accept": accept}},
            "rules": [{"name": "j2k", "compress": "JPEG2000Lossless", "forward": ["dir"]}],
        }
    )
    facts = _facts(name)
    decision = rules.decide(loaded.rules, loaded.default_rule, facts)
    names = iter(range(10))
    (output,), _ = produce(
        TEST_FILES / name,
        facts.transfer_syntax,
        decision,
        loaded.destinations,
        compress.transcode_file,
        lambda: tmp_path / f"{next(names)}.dcm",
    )
    assert output.transfer_syntax == ExplicitVRLittleEndian
    assert pydicom.dcmread(output.path).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize(
    ("match", "header_reads", "forwarded"),
    [({"calling_ae": "MODALITY1"}, 0, True), ({"modality": "CT"}, 1, True), ({"modality": "MR"}, 1, False)],
    ids=["association-only", "element-holds", "element-fails"],
)
def test_processing_reads_the_header_only_for_a_rule_that_looks_at_an_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, match: dict[str, Any], header_reads: int, forwarded: bool
) -> None:
    """The service parses a received header only when a rule matches on one of its elements, and then once."""
    from pynetdicom.sop_class import CTImageStorage

    from scp import pipeline
    from scp.spool import Received, Spool
    from scp.workers import Encoder

    reads: list[Path] = []
    real_read_header = pipeline.read_header

    def counting_read_header(path: Path) -> pydicom.Dataset:
        reads.append(path)
        return real_read_header(path)

    monkeypatch.setattr(pipeline, "read_header", counting_read_header)
    spool = Spool(tmp_path / "spool")
    written = spool.tmp / "received.dcm"
    written.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    received = Received("MODALITY1", "COMPRESS_SCP", "10.1.2.3", CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian, 0)
    spool_id = spool.commit_received(written, received)
    loaded = config.parse(
        {
            "destinations": {"folder": {"type": "directory", "path": str(tmp_path / "folder")}},
            "rules": [{"name": "matched", "match": match, "forward": ["folder"]}],
            "default": {"drop": True},
        }
    )
    encoder = Encoder(1)
    try:
        jobs = pipeline.Processor(loaded, spool, encoder).process(spool_id)
    finally:
        encoder.close()
    assert len(reads) == header_reads
    assert [job.destination for job in jobs] == (["folder"] if forwarded else [])
