"""Called- and calling-AE access control (calling AEs optionally bound to addresses), and logs that never name the
patient."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pydicom
import pytest

from scp import config, metrics
from scp import tls as tls_contexts
from scp.config import AllowedCaller
from scp.errors import ConfigError
from scp.security import CallerPolicy
from tests.peers import TEST_FILES, node_config, running_node, storescu, wait_for

pytestmark = pytest.mark.peers

KEEP_RULE = {"name": "all", "compress": "keep", "forward": ["folder"]}
KEEP_RULES = [KEEP_RULE]


def _config(tmp_path: Path, allowed: list[object]) -> dict:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    return node_config(tmp_path, destinations, KEEP_RULES, node={"allowed_calling_aets": allowed})


def _stored(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "folder"
    return sorted(folder.glob("*.dcm")) if folder.exists() else []


def test_unknown_calling_ae_is_rejected_and_nothing_is_stored(tmp_path: Path) -> None:
    rejected_before = _rejections("calling AE not recognised")
    with running_node(_config(tmp_path, ["CT_SCANNER", {"ae_title": "MR_SCANNER"}])) as node:
        unknown = storescu(node.port, [TEST_FILES / "CT_small.dcm"], extra=["-aet", "INTRUDER"])
        assert not node.spool.incoming()
        known = storescu(node.port, [TEST_FILES / "CT_small.dcm"], extra=["-aet", "CT_SCANNER"])
        wait_for(lambda: len(_stored(tmp_path)) == 1, 30, "the known AE's instance in the folder")
    assert "Association Rejected" in unknown and "Calling AE Title Not Recognized" in unknown, unknown
    assert _rejections("calling AE not recognised") - rejected_before == 1
    assert "Received Store Response (Success)" in known, known


def _rejections(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("scp_associations_rejected_total", {"reason": reason}) or 0.0


def test_unknown_called_ae_is_rejected_and_aliases_route(tmp_path: Path) -> None:
    """A call to a title the node does not answer to is rejected (reason 7); a call to an alias is served, and a
    rule can route on it."""
    destinations = {
        "folder": {"type": "directory", "path": str(tmp_path / "folder")},
        "telerad": {"type": "directory", "path": str(tmp_path / "telerad")},
    }
    rules = [{"name": "telerad", "match": {"called_ae": "TELERAD_IN"}, "compress": "keep", "forward": ["telerad"]}]
    data = node_config(tmp_path, destinations, [*rules, KEEP_RULE], node={"aliases": ["TELERAD_IN"]})
    before = _rejections("called AE not recognised")
    with running_node(data) as node:
        wrong = storescu(node.port, [TEST_FILES / "CT_small.dcm"], called="ANY-SCP")
        assert not node.spool.incoming()
        alias = storescu(node.port, [TEST_FILES / "CT_small.dcm"], called="TELERAD_IN")
        own = storescu(node.port, [TEST_FILES / "MR_small.dcm"])
        wait_for(lambda: len(_stored(tmp_path)) == 1, 30, "the instance sent to the node's own title")
        wait_for(lambda: len(list((tmp_path / "telerad").glob("*.dcm"))) == 1, 30, "the instance sent to the alias")
    assert "Association Rejected" in wrong and "Called AE Title Not Recognized" in wrong, wrong
    assert _rejections("called AE not recognised") - before == 1
    assert "Received Store Response (Success)" in alias, alias
    assert "Received Store Response (Success)" in own, own
    uid = str(pydicom.dcmread(TEST_FILES / "MR_small.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert _stored(tmp_path)[0].name == f"{uid}.dcm"


def test_any_called_ae_when_configured(tmp_path: Path) -> None:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    with running_node(node_config(tmp_path, destinations, KEEP_RULES, node={"accept_any_called_ae": True})) as node:
        sent = storescu(node.port, [TEST_FILES / "CT_small.dcm"], called="ANY-SCP")
        wait_for(lambda: len(_stored(tmp_path)) == 1, 30, "the instance in the folder")
    assert "Received Store Response (Success)" in sent, sent


def test_calling_ae_bound_to_addresses(tmp_path: Path) -> None:
    """An AE allowed only from another network is rejected from loopback; one allowed from 127.0.0.0/8 is not."""
    allowed = [
        {"ae_title": "WARD_CR", "hosts": ["10.1.2.0/24"]},
        {"ae_title": "LOCAL_CT", "hosts": ["192.0.2.7", "127.0.0.0/8"]},
    ]
    with running_node(_config(tmp_path, allowed)) as node:
        elsewhere = storescu(node.port, [TEST_FILES / "CT_small.dcm"], extra=["-aet", "WARD_CR"])
        local = storescu(node.port, [TEST_FILES / "MR_small.dcm"], extra=["-aet", "LOCAL_CT"])
        wait_for(lambda: len(_stored(tmp_path)) == 1, 30, "LOCAL_CT's instance in the folder")
    assert "Calling AE Title Not Recognized" in elsewhere, elsewhere
    assert "Received Store Response (Success)" in local, local
    uid = str(pydicom.dcmread(TEST_FILES / "MR_small.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert _stored(tmp_path)[0].name == f"{uid}.dcm"


def test_policy_matches_ipv4_mapped_addresses() -> None:
    policy = CallerPolicy.from_config(["ANY"])
    assert policy.permits("ANY", "203.0.113.9") and not policy.permits("OTHER", "127.0.0.1")
    bound = CallerPolicy.from_config([AllowedCaller(ae_title="CT", hosts=["10.0.0.0/8"])])
    assert bound.permits("CT", "::ffff:10.1.1.1") and not bound.permits("CT", "11.0.0.1")
    assert not bound.permits("CT", "not an address")


@pytest.mark.parametrize(
    ("entries", "from_11", "from_12", "from_13"),
    [
        ([{"ae_title": "CT", "hosts": ["10.0.0.11"]}, {"ae_title": "CT", "hosts": ["10.0.0.12"]}], True, True, False),
        ([{"ae_title": "CT", "hosts": ["10.0.0.11"]}, "CT"], True, True, True),
        (["CT", {"ae_title": "CT", "hosts": ["10.0.0.11"]}], True, True, True),
        ([{"ae_title": "CT", "hosts": []}, {"ae_title": "CT", "hosts": ["10.0.0.11"]}], True, True, True),
    ],
)
def test_repeated_callers_add_up(entries: list[Any], from_11: bool, from_12: bool, from_13: bool) -> None:
    node = config.NodeConfig.model_validate({"allowed_calling_aets": entries})
    assert node.allowed_calling_aets is not None
    policy = CallerPolicy.from_config(node.allowed_calling_aets)
    assert [policy.permits("CT", f"10.0.0.{n}") for n in (11, 12, 13)] == [from_11, from_12, from_13]


def test_logs_never_name_the_patient(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every instance event is logged with UIDs and AE titles; the patient's name and ID appear in none."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.PatientName = "Zzyzx^Quintessa"
    ds.PatientID = "PID-8675309"
    source = tmp_path / "named.dcm"
    ds.save_as(source)
    rules = [{"name": "ct", "compress": "JPEGLSLossless", "forward": ["folder"]}]
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    caplog.set_level(logging.DEBUG)
    with running_node(node_config(tmp_path, destinations, rules)) as node:
        storescu(node.port, [source])
        wait_for(lambda: len(_stored(tmp_path)) == 1, 60, "the instance in the folder")
    text = caplog.text
    for event in ("received", "compressed", "forwarded"):
        assert f"{event} {ds.SOPInstanceUID}" in text, f"no '{event}' line"
    for secret in ("Zzyzx", "Quintessa", "8675309"):
        assert secret not in text, f"{secret} was logged"


def test_rules_matching_patient_elements_log_no_values(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A rule's reason quotes the values it matched: it goes to the quarantined job's reason.txt (in the spool,
    with the image), never into a log line."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.PatientName = "Zzyzx^Quintessa"
    ds.PatientID = "PID-8675309"
    source = tmp_path / "named.dcm"
    ds.save_as(source)
    other = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    other.PatientID = "PID-8675309"
    dropped = tmp_path / "dropped.dcm"
    other.save_as(dropped)
    rules = [
        {"name": "test-patients", "match": {"PatientName": {"glob": "Zzyzx*"}}, "quarantine": True},
        {"name": "drop-test-ids", "match": {"PatientID": {"glob": "PID-*"}}, "drop": True},
    ]
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    caplog.set_level(logging.DEBUG)
    with running_node(node_config(tmp_path, destinations, rules)) as node:
        storescu(node.port, [source, dropped])
        wait_for(lambda: node.spool.quarantined(), 30, "the instance quarantined by rule")
        wait_for(lambda: "dropped" in caplog.text, 30, "the other one dropped")
        (job,) = node.spool.quarantined()
    assert "Zzyzx^Quintessa" in job.reason()
    for secret in ("Zzyzx", "Quintessa", "8675309"):
        assert secret not in caplog.text, f"{secret} was logged"


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"tls": {"cert": "c.pem", "key": "k.pem", "require_client_cert": True}}, "require_client_cert needs `ca`"),
        ({"allowed_calling_aets": [{"ae_title": "CT", "hosts": ["10.0.0.300/8"]}]}, "node.allowed_calling_aets.0"),
        ({"allowed_calling_aets": ["A\\B"]}, "node.allowed_calling_aets.0"),
        ({"aliases": ["SEVENTEEN_CHARS_AE"]}, "node.aliases.0"),
    ],
)
def test_bad_security_settings_name_the_key(node: dict, expected: str) -> None:
    data = {
        "node": node,
        "destinations": {"f": {"type": "directory", "path": "x"}},
        "rules": [{**KEEP_RULE, "forward": ["f"]}],
    }
    with pytest.raises(ConfigError) as raised:
        config.parse(data)
    assert expected in str(raised.value), raised.value


def test_unreadable_certificate_fails_at_start_naming_the_files(tmp_path: Path) -> None:
    tls = {"cert": str(tmp_path / "missing.pem"), "key": str(tmp_path / "missing.key")}
    with pytest.raises(ConfigError, match=r"tls: cannot load certificate .*missing\.pem"):
        tls_contexts.server_context(config.TlsConfig(**tls))


@pytest.mark.parametrize(("calling", "level"), [("A\\B", "INFO"), (" " * 16, "INFO"), ("A\\B", "ERROR")])
def test_an_invalid_calling_ae_title_is_rejected_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, calling: str, level: str
) -> None:
    """PS3.5 6.2: an AE title holds no backslash and is not all spaces. Such a request is rejected as "calling AE
    title not recognised" (permanent, service user: PS3.8 9.3.4), counted, and logged in one warning (none at
    logging.level ERROR), with no traceback."""
    import socket

    from tests import hostile

    caplog.set_level(logging.DEBUG)
    folder = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    counter = metrics.REJECTED.labels("calling AE not recognised")
    before = counter._value.get()
    with running_node(node_config(tmp_path, folder, KEEP_RULES, logging={"level": level})) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
            sock.sendall(hostile.associate_rq(calling=calling))
            assert sock.recv(64) == bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3)), "not rejected as PS3.8 says"
        wait_for(lambda: counter._value.get() == before + 1, 10, "the rejection counted")
        assert hostile.echo(node.port) == 0x0000
    told = [r for r in caplog.records if r.name.startswith("scp.acceptor") and r.levelno >= logging.WARNING]
    assert [r.levelname for r in told] == (["WARNING"] if level == "INFO" else []), caplog.text
    assert all("invalid calling AE title" in r.getMessage() for r in told)
    assert "Traceback" not in caplog.text
