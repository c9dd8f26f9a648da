"""DICOM TLS (PS3.15 B.9, BCP 195) with DCMTK's TLS-enabled storescu and storescp on both sides of the node."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.peers import TEST_FILES, complete_files, node_config, running_node, storescp, tool, wait_for
from tests.pki import make_pki

pytestmark = pytest.mark.peers

SENT = (TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm")
KEEP_RULES = [{"name": "all", "compress": "keep", "forward": ["archive"]}]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """A test CA and certificates it signed for the node, a modality and an archive: name → (key, cert)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def _node_tls(pki: dict[str, tuple[str, str]], **extra: object) -> dict[str, object]:
    key, cert = pki["node"]
    return {"cert": cert, "key": key, "ca": pki["ca"][1], **extra}


def _storescu_tls(port: int, files: tuple[Path, ...], pki: dict[str, tuple[str, str]], *tls: str) -> str:
    args = [tool("storescu"), "-v", "-aec", "COMPRESS_SCP", *tls, "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


def _modality_tls(pki: dict[str, tuple[str, str]]) -> list[str]:
    key, cert = pki["modality"]
    return ["+tls", key, cert, "+cf", pki["ca"][1]]


def _uids(folder: Path) -> set[str]:
    """The instances a peer has finished writing there (storescp's file may be read while it writes it)."""
    return set(complete_files(folder))


def _expected() -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SENT}


def test_tls_store_works_and_plain_tcp_fails(tmp_path: Path, pki: dict[str, tuple[str, str]]) -> None:
    """storescu +tls with a client certificate is stored; plain storescu, or TLS without a certificate, is not."""
    destinations = {"archive": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(tmp_path, destinations, KEEP_RULES, node={"tls": _node_tls(pki, require_client_cert=True)})
    with running_node(data) as node:
        plain = _storescu_tls(node.port, SENT, pki)
        no_cert = _storescu_tls(node.port, SENT, pki, "+tla", "+cf", pki["ca"][1])
        assert not node.spool.incoming() and not (tmp_path / "folder").exists(), "something was stored"
        output = _storescu_tls(node.port, SENT, pki, *_modality_tls(pki))
        wait_for(lambda: _uids(tmp_path / "folder") == _expected(), 30, "both instances in the folder")
    assert output.count("Received Store Response (Success)") == len(SENT), output
    assert "Received Store Response" not in plain and "Association Request Failed" in plain, plain
    assert "Received Store Response" not in no_cert, no_cert


def test_idle_connection_does_not_stall_tls_associations(tmp_path: Path, pki: dict[str, tuple[str, str]]) -> None:
    """A TCP connection that never sends a ClientHello (pynetdicom's accept loop would wait on it forever) neither
    delays a real TLS store nor stays open past node.tls_handshake_timeout."""
    destinations = {"archive": {"type": "directory", "path": str(tmp_path / "folder")}}
    node_settings = {"tls": _node_tls(pki), "tls_handshake_timeout": 3}
    with running_node(node_config(tmp_path, destinations, KEEP_RULES, node=node_settings)) as node:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as idle:
            time.sleep(0.2)  # let the accept loop take the idle connection first
            started = time.monotonic()
            output = _storescu_tls(node.port, SENT, pki, *_modality_tls(pki))
            elapsed = time.monotonic() - started
            assert output.count("Received Store Response (Success)") == len(SENT), output
            assert elapsed < 2.5, f"the TLS store took {elapsed:.1f} s behind an idle connection"
            assert idle.recv(1) == b"", "the node did not close the idle connection"
            waited = time.monotonic() - started
        wait_for(lambda: _uids(tmp_path / "folder") == _expected(), 30, "both instances in the folder")
    assert waited < 8, f"the idle connection was closed only after {waited:.1f} s"


def _tls_destination(port: int, pki: dict[str, tuple[str, str]], ca: str) -> dict[str, object]:
    """The archive storescp on `port` as a destination reached over TLS with the node's key, trusting `ca`."""
    node_key, node_cert = pki["node"]
    tls = {"cert": node_cert, "key": node_key, "ca": ca}
    return {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": port, "tls": tls}


def test_forwarding_over_tls_to_dcmtk_storescp(tmp_path: Path, pki: dict[str, tuple[str, str]]) -> None:
    """A destination with `tls` is reached over TLS: storescp +tls requires and verifies our certificate."""
    key, cert = pki["archive"]
    archive_tls = ["+tls", key, cert, "+cf", pki["ca"][1], "-rc"]
    with storescp(tmp_path / "archive", extra=archive_tls) as archive_port:
        destination = _tls_destination(archive_port, pki, pki["ca"][1])
        with running_node(node_config(tmp_path, {"archive": destination}, KEEP_RULES)) as node:
            _storescu_tls(node.port, SENT, pki)
            wait_for(lambda: _uids(tmp_path / "archive") == _expected(), 60, "both instances at storescp +tls")


def test_an_archive_certificate_the_ca_does_not_sign_is_named_in_the_reason(
    tmp_path: Path, pki: dict[str, tuple[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong `ca` must not look like a busy archive: the reason names the TLS error, and the log carries no
    traceback of pynetdicom's for it."""
    key, cert = pki["archive"]
    with storescp(tmp_path / "archive", extra=["+tls", key, cert, "+cf", pki["ca"][1]]) as archive_port:
        destination = _tls_destination(archive_port, pki, pki["node"][1])  # the node's certificate: no CA of it
        destination["retry"] = {"initial_delay": 0.1, "max_delay": 0.2, "max_attempts": 1}
        with running_node(node_config(tmp_path, {"archive": destination}, KEEP_RULES)) as node:
            _storescu_tls(node.port, SENT[:1], pki)
            wait_for(lambda: node.spool.quarantined(), 60, "the job in quarantine")
            (job,) = node.spool.quarantined()
            reason = (job.path / "reason.txt").read_text()
    assert "cannot connect: [SSL: CERTIFICATE_VERIFY_FAILED]" in reason, reason
    assert "Traceback" not in caplog.text


def test_a_certificate_that_does_not_match_its_key_is_a_configuration_error(
    tmp_path: Path, pki: dict[str, tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config said OK, then `run` failed (exit 1, restarted every 5 s by systemd): now both name it, and
    `run` exits 78."""
    import yaml

    from scp import cli

    mismatched = {"cert": pki["node"][1], "key": pki["archive"][0], "ca": pki["ca"][1]}
    destination = {**_tls_destination(104, pki, pki["ca"][1]), "tls": mismatched}
    data = node_config(tmp_path, {"archive": destination}, KEEP_RULES, node={"tls": mismatched})
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["check-config", str(path)]) == 1
    problems = [line.split(":")[0].strip() for line in capsys.readouterr().err.splitlines()[1:]]
    assert problems == ["node.tls", "destinations.archive.tls"], problems
    assert cli.main(["run", "--config", str(path)]) == cli.EXIT_CONFIG
    assert "KEY_VALUES_MISMATCH" in capsys.readouterr().err


def test_expired_and_expiring_certificates_are_warned_about_and_their_expiry_published(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An expired certificate loads (Python does not check dates), and every handshake with it then fails: check-
    config and `run` warn about it, and about one expiring within 30 days; /metrics publishes every expiry."""
    import datetime

    import yaml

    from scp import cli, config, metrics

    (tmp_path / "expired").mkdir()
    (tmp_path / "expiring").mkdir()
    expired = make_pki(tmp_path / "expired", datetime.timedelta(days=-2))
    expiring = make_pki(tmp_path / "expiring", datetime.timedelta(days=10, hours=1))
    destination = _tls_destination(104, expiring, expiring["ca"][1])
    data = node_config(tmp_path, {"archive": destination}, KEEP_RULES, node={"tls": _node_tls(expired)})
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["check-config", str(path)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2, warnings
    assert "node.tls.cert: certificate 'CN=node' expired on " in warnings[0]
    assert "destinations.archive.tls.cert: certificate 'CN=node' expires on " in warnings[1]
    assert warnings[1].endswith(", in 10 days")

    cli._warn(config.load(path))
    assert "node.tls.cert: certificate 'CN=node' expired on" in caplog.text
    published = metrics.REGISTRY.get_sample_value(
        "scp_tls_certificate_expiry_timestamp_seconds", {"where": "node.tls.cert", "subject": "CN=node"}
    )
    assert published is not None and published < time.time() - 86400
    ca = metrics.REGISTRY.get_sample_value(
        "scp_tls_certificate_expiry_timestamp_seconds", {"where": "node.tls.ca", "subject": "CN=test CA"}
    )
    assert ca is not None and ca > time.time() + 300 * 86400


def test_a_reload_reads_a_destinations_renewed_certificate(tmp_path: Path, pki: dict[str, tuple[str, str]]) -> None:
    """Certificates are renewed in place (same paths): a reload makes the TLS destination's forwarder again, so
    that its next association presents the new one; a destination without TLS keeps its forwarder."""
    from scp import config

    destinations = {
        "archive": _tls_destination(104, pki, pki["ca"][1]),
        "folder": {"type": "directory", "path": str(tmp_path / "folder")},
    }
    data = node_config(tmp_path, destinations, KEEP_RULES)
    with running_node(data) as node:
        before = {name: state.deliverer.forwarder for name, state in node._destinations.items()}
        node.reload(config.parse(data))
        after = {name: state.deliverer.forwarder for name, state in node._destinations.items()}
    assert after["archive"] is not before["archive"]
    assert after["folder"] is before["folder"]
