"""SIGHUP on a running node (a real process): a valid config applies to new instances over an association that
stays open; an invalid one is refused, logged, and the old rules stay in force."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.association import Association

from scp import cli, config
from scp.errors import ConfigError
from tests.peers import TEST_FILES, complete_files, free_port, node_config, node_process, storescu, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def _syntaxes(folder: Path) -> dict[str, str]:
    """SOP Instance UID → transfer syntax of the files delivered into `folder`."""
    return {uid: str(ds.file_meta.TransferSyntaxUID) for uid, ds in complete_files(folder).items()}


def _uid(name: str) -> str:
    return str(pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).SOPInstanceUID)


def _open_association(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ae.add_requested_context(pydicom.dcmread(TEST_FILES / name).SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="COMPRESS_SCP")
    assert assoc.is_established
    return assoc


def _store(assoc: Association, name: str) -> int:
    return int(assoc.send_c_store(pydicom.dcmread(TEST_FILES / name)).Status)


def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(tmp_path: Path) -> None:
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    destination_a = {"type": "directory", "path": str(folder_a)}
    first = node_config(
        tmp_path,
        {"a": destination_a},
        [{"name": "keep-all", "compress": "keep", "forward": ["a"]}],
        node={"port": free_port()},
    )
    second: dict[str, Any] = {
        **first,
        "destinations": {"a": destination_a, "b": {"type": "directory", "path": str(folder_b)}},
        "rules": [
            {"name": "mr-to-b", "match": {"modality": "MR"}, "compress": "JPEGLSLossless", "forward": ["b"]},
            {"name": "rest-to-a", "compress": "keep", "forward": ["a"]},
        ],
    }
    invalid = {**second, "rules": [{"name": "typo", "match": {"Modalty": "MR"}, "forward": ["a"]}]}
    config_file = tmp_path / "node.yaml"

    with node_process(tmp_path, first) as node:
        assert node.proc is not None
        log = node.log.read_text
        assoc = _open_association(node.port)
        try:
            assert _store(assoc, "CT_small.dcm") == 0
            wait_for(lambda: _uid("CT_small.dcm") in _syntaxes(folder_a), 30, "CT in folder a under the first rules")

            config_file.write_text(yaml.safe_dump(second))
            node.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reloaded the configuration: 2 rules, 2 destinations" in log(), 20, "the reload")
            # The association opened before the reload still works, and its next instance follows the new rules.
            assert assoc.is_established
            assert _store(assoc, "MR_small.dcm") == 0
            wait_for(lambda: _uid("MR_small.dcm") in _syntaxes(folder_b), 30, "MR in the new destination b")
        finally:
            assoc.release()
        assert _syntaxes(folder_b)[_uid("MR_small.dcm")] == JPEGLSLossless
        assert _uid("MR_small.dcm") not in _syntaxes(folder_a)

        config_file.write_text(yaml.safe_dump(invalid))
        node.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload rejected" in log(), 20, "the invalid config to be refused")
        assert node.proc.poll() is None, "the node keeps running"
        rejected = next(line for line in log().splitlines() if "reload rejected" in line)
        assert "ERROR" in rejected and "the running configuration stays in force" in rejected
        assert "rule 'typo'" in log() and "did you mean 'Modality'" in log()

        # Still the second rules: another MR goes to b as JPEG-LS (the invalid file would have sent it to a).
        output = storescu(node.port, [TEST_FILES / "examples_overlay.dcm"])
        assert "Received Store Response (Success)" in output, output
        wait_for(lambda: _uid("examples_overlay.dcm") in _syntaxes(folder_b), 30, "the next MR in b")
        assert _syntaxes(folder_b)[_uid("examples_overlay.dcm")] == JPEGLSLossless
        assert node.proc.poll() is None


def test_reload_drains_a_removed_destination_and_keeps_restart_only_settings(tmp_path: Path) -> None:
    """Jobs queued for a destination that a reload removes are still delivered (nothing acknowledged is lost), and
    its threads then end without making the node unhealthy; node, spool and workers keep their running values
    until a restart."""
    from tests.peers import running_node, storescp

    down_port = free_port()
    folder = {"type": "directory", "path": str(tmp_path / "a")}
    removed = {
        "type": "dicom",
        "ae_title": "OLD",
        "host": "127.0.0.1",
        "port": down_port,
        "timeout": 2,
        "retry": {"initial_delay": 0.2, "max_delay": 0.5},
    }
    first = node_config(tmp_path, {"a": folder, "old": removed}, [{"name": "r", "forward": ["a", "old"]}])
    second = {**first, "destinations": {"a": folder}, "rules": [{"name": "r", "forward": ["a"]}]}
    second["node"] = {**first["node"], "ae_title": "RENAMED"}
    with running_node(first) as node:
        output = storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        assert "Received Store Response (Success)" in output, output
        wait_for(lambda: len(node.spool.jobs("old")) == 1, 20, "a job queued for the unreachable destination")
        node.reload(config.parse(second))
        assert node.config.node.ae_title == "COMPRESS_SCP", "node settings need a restart"
        assert [r.name for r in node.config.rules] == ["r"] and list(node.config.destinations) == ["a"]
        assert len(node.spool.jobs("old")) == 1, "the removed destination's queue is kept"
        depth = {
            tuple(sample.labels.values()): sample.value
            for family in node._state_collector().collect()
            if family.name == "scp_queue_depth"
            for sample in family.samples
        }
        assert set(depth) == {("a",), ("old",)} and depth[("old",)] == 1, "a draining destination stays in them"
        with storescp(tmp_path / "old", ae_title="OLD", port=down_port):
            wait_for(lambda: not node.spool.jobs("old"), 30, "the removed destination's queue to drain")
            wait_for(lambda: not node._destinations["old"].threads, 10, "its delivery threads to stop")
            wait_for(lambda: not node.health(), 10, "health to count the retired threads as ended, not dead")
        assert _uid("CT_small.dcm") in _syntaxes(tmp_path / "old")
        output = storescu(node.port, [TEST_FILES / "MR_small.dcm"])
        wait_for(lambda: _uid("MR_small.dcm") in _syntaxes(tmp_path / "a"), 20, "MR in a")
        assert not node.spool.jobs("old"), "new instances are no longer routed to a removed destination"


class _Service:
    """A running service that records the configurations offered to its reload; a refusing one refuses them, as
    make_forwarder does a bad certificate."""

    port = 0

    def __init__(self, refusing: bool = True) -> None:
        self.offered: list[object] = []
        self.refusing = refusing

    def reload(self, new: object) -> None:
        self.offered.append(new)
        if self.refusing:
            raise ConfigError("tls: cannot load certificate")


@pytest.mark.parametrize("cert", ["missing.pem", "present.pem"])
def test_a_reload_the_service_or_the_files_refuse_keeps_the_node_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cert: str
) -> None:
    (tmp_path / "present.pem").write_text("")
    tls = {"cert": str(tmp_path / cert), "key": str(tmp_path / "present.pem")}
    pacs = {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "tls": tls}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"destinations": {"pacs": pacs}, "rules": [{"name": "r", "forward": ["pacs"]}]}))
    service = _Service()
    cli._reload(service, path)  # returns: the node goes on with its running configuration
    assert "reload rejected, the running configuration stays in force" in caplog.text
    assert not service.offered, "files that cannot make a TLS context are refused before the service sees them"
    if cert == "missing.pem":
        assert f"destinations.pacs.tls.cert: cannot read {tmp_path / cert}" in caplog.text
    else:
        assert f"destinations.pacs.tls: cannot load certificate {tmp_path / cert}" in caplog.text


def test_a_reload_warns_of_titles_a_rule_never_sees(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = {"type": "directory", "path": str(tmp_path / "a")}
    rules = [{"name": "ct2", "match": {"calling_ae": "CT2"}, "forward": ["a"]}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(node_config(tmp_path, {"a": folder}, rules, node={"allowed_calling_aets": ["CT1"]})))
    service = _Service(refusing=False)
    cli._reload(service, path)
    assert len(service.offered) == 1, "a warning does not refuse the file"
    assert "configuration: rules.0: rule 'ct2': match.calling_ae: 'CT2' is never seen" in caplog.text


@pytest.mark.parametrize("port", [None, 9101])
def test_a_reload_changing_metrics_warns_that_it_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, port: int | None
) -> None:
    """The service decides what needs a restart, metrics among node, spool and workers, and keeps it running."""
    from tests.peers import running_node

    folder = {"type": "directory", "path": str(tmp_path / "a")}
    first = node_config(tmp_path, {"a": folder}, [{"name": "r", "forward": ["a"]}])
    data = {**first, **({"metrics": {"port": port}} if port else {})}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with running_node(first) as node:
        cli._reload(node, path)
        assert node.config.metrics is None, "the running endpoint's settings stay"
    warned = "reload: metrics changed; that needs a restart" in caplog.text
    assert warned == (port is not None)


def test_a_refused_reload_changes_no_destination(tmp_path: Path) -> None:
    """Every new forwarder is made before any is applied: a certificate that will not load (the last destination)
    leaves the earlier changed and added destinations as they were."""
    from tests.peers import running_node

    (tmp_path / "empty.pem").write_text("")
    pacs = {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
    folder = {"type": "directory", "path": str(tmp_path / "a")}
    first = node_config(tmp_path, {"a": folder, "pacs": pacs}, [{"name": "r", "forward": ["a"]}])
    tls = {"cert": str(tmp_path / "empty.pem"), "key": str(tmp_path / "empty.pem")}
    second = {
        **first,
        "destinations": {
            "a": {"type": "directory", "path": str(tmp_path / "a2")},
            "new": {"type": "directory", "path": str(tmp_path / "new")},
            "pacs": {**pacs, "tls": tls},
        },
    }
    with running_node(first) as node:
        running = node.config
        with pytest.raises(ConfigError, match="tls: cannot load certificate"):
            node.reload(config.parse(second))
        assert node.config is running
        assert set(node._destinations) == {"a", "pacs"}, "no destination added"
        assert node._destinations["a"].deliverer.destination == running.destinations["a"], "none changed"
        assert not any(thread.name.startswith("deliver-new") for thread in node._threads)


def test_a_job_committed_after_its_removed_destination_drained_is_still_delivered(tmp_path: Path) -> None:
    """An instance processed under the old rules while a reload removes its destination is committed after that
    destination's threads saw an empty queue and stopped: they start again for it (nothing acknowledged is lost)."""
    import threading

    from tests.peers import running_node

    first = node_config(
        tmp_path,
        {"x": {"type": "directory", "path": str(tmp_path / "x")}},
        [{"name": "to-x", "compress": "JPEGLSLossless", "forward": ["x"]}],
    )
    second = {
        **first,
        "destinations": {"y": {"type": "directory", "path": str(tmp_path / "y")}},
        "rules": [{"name": "to-y", "forward": ["y"]}],
    }
    encoding, reloaded = threading.Event(), threading.Event()
    with running_node(first) as node:
        assert node._encoder is not None
        transcode = node._encoder.transcode

        def after_the_reload(*args: Any, **kwargs: Any) -> Any:
            encoding.set()
            assert reloaded.wait(30)
            return transcode(*args, **kwargs)

        node._encoder.transcode = after_the_reload  # type: ignore[method-assign]
        output = storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        assert "Received Store Response (Success)" in output, output
        assert encoding.wait(30), "processing under the old rules started"
        node.reload(config.parse(second))
        wait_for(lambda: not node._destinations["x"].threads, 10, "x's threads to find its queue empty and stop")
        reloaded.set()
        wait_for(lambda: _uid("CT_small.dcm") in _syntaxes(tmp_path / "x"), 30, "the late job delivered to x")
        assert _syntaxes(tmp_path / "x")[_uid("CT_small.dcm")] == JPEGLSLossless
        wait_for(lambda: not node._destinations["x"].threads, 10, "x's threads to stop again")
        assert not node.spool.jobs("x") and not node.health()


@pytest.mark.parametrize(
    "text, problem",
    [
        ("# Radiologie Z\xfcrich\nrules: []\n".encode("latin-1"), "not UTF-8"),
        (
            b"destinations: {a: {type: directory, path: a}}\n"
            b"rules: [{name: r, match: {StationName: {regex: 'CT{4294967296}'}}, forward: [a]}]\n",
            "bad regular expression",
        ),
    ],
    ids=["latin-1", "regex-overflow"],
)
def test_a_file_that_fails_otherwise_than_validation_is_refused_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: bytes, problem: str
) -> None:
    """Bytes that are not UTF-8, or a regex too big for Python's compiler, are a ConfigError naming the file, as
    any invalid file: check-config says so, and a reload is refused with the node still running."""
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=problem) as refused:
        config.load(path)
    assert str(path) in str(refused.value)
    service = _Service()
    cli._reload(service, path)
    assert not service.offered and "reload rejected, the running configuration stays in force" in caplog.text
