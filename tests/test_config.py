"""Configuration: every shipped file is valid; bad files are rejected naming the key path and the value."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from scp import config
from scp.cli import main
from scp.errors import ConfigError
from tests.pki import make_pki

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))

VALID: dict[str, object] = {
    "destinations": {
        "archive": {"type": "dicom", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4242},
        "folder": {"type": "directory", "path": "./archive"},
    },
    "rules": [{"name": "ct", "match": {"modality": "CT"}, "compress": "JPEGLSLossless", "forward": ["archive"]}],
}


def _with(change: dict[str, object]) -> dict[str, object]:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    data.update(change)
    return data


def test_shipped_configs_exist() -> None:
    assert SHIPPED, f"no *.yaml in {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_check_config_accepts_every_shipped_file(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the TLS files they name in place: check-config checks that they make TLS contexts."""
    (tmp_path / "pki").mkdir()
    (key, cert), ca = (made := make_pki(tmp_path / "pki"))["node"], made["ca"][1]
    for name, source in (("node.pem", cert), ("node.key", key), ("hospital-ca.pem", ca)):
        shutil.copy(source, tmp_path / name)
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace("/etc/compressing-scp/tls/", f"{tmp_path}/"))
    assert main(["check-config", str(copy)]) == 0
    told = capsys.readouterr()
    assert f"{copy}: OK" in told.out
    assert "warning" not in told.err


def test_check_config_warns_of_titles_a_rule_never_sees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A calling AE that allowed_calling_aets rejects, or a called AE the node does not answer to, is valid
    (a rule written ahead of a change) but never matches: a warning, not an error."""
    node = {"aliases": ["ALIAS"], "allowed_calling_aets": ["CT1", {"ae_title": "MR1", "hosts": ["10.0.0.0/8"]}]}
    rules = [
        {"name": "r1", "match": {"calling_ae": ["CT1", "CT2", " MR1"], "called_ae": "ALIAS"}, "forward": ["archive"]},
        {"name": "r2", "match": {"called_ae": ["OTHER"], "calling_ae": {"glob": "X*"}}, "forward": ["archive"]},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with({"node": node, "rules": rules})))
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: warning: rules.0: rule 'r1': match.calling_ae: 'CT2' is never seen: node.allowed_calling_aets "
        "rejects it",
        f"{path}: warning: rules.1: rule 'r2': match.called_ae: 'OTHER' is never seen: it is neither "
        "node.ae_title nor one of node.aliases",
    ]


def test_check_config_names_listen_addresses_that_do_not_resolve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run` could not listen on them; a destination's host is not resolved (an archive down is retried)."""
    archive = {"type": "dicom", "ae_title": "PACS", "host": "pacs.invalid", "port": 4242}
    data = _with({"node": {"host": "999.0.0.1"}, "metrics": {"port": 9100, "host": "no-such-host.invalid"}})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**data, "destinations": {"archive": archive}}))
    assert main(["check-config", str(path)]) == 1
    problems = capsys.readouterr().err.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in problems] == ["node.host", "metrics.host"], problems


def test_every_interface_and_a_resolver_not_ready_are_no_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """host "" listens on every interface, as for Python's sockets; a resolver that fails for now (at boot) must
    not make `run` exit 78, which systemd does not restart."""
    import socket

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_with({"node": {"host": ""}})))
    config.check_files(config.load(path), str(path))
    path.write_text(yaml.safe_dump(_with({"node": {"host": "scp.hospital.example"}})))

    def not_ready(*_: object, **__: object) -> None:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", not_ready)
    config.check_files(config.load(path), str(path))


def test_check_config_names_tls_files_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "node.pem").write_text("")
    tls = {"cert": str(tmp_path / "node.pem"), "key": str(tmp_path / "node.key")}
    archive = {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "tls": tls}
    path = tmp_path / "c.yaml"
    node_tls = {**tls, "ca": str(tmp_path)}
    path.write_text(yaml.safe_dump({**_with({"destinations": {"archive": archive}}), "node": {"tls": node_tls}}))
    assert main(["check-config", str(path)]) == 1
    error = capsys.readouterr().err
    assert f"node.tls.key: cannot read {tmp_path / 'node.key'}: No such file or directory" in error
    assert f"node.tls.ca: cannot read {tmp_path}: Is a directory" in error
    assert f"destinations.archive.tls.key: cannot read {tmp_path / 'node.key'}" in error
    assert "tls.cert" not in error


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"node": {"port": "eleven"}}, "node.port: Input should be a valid integer"),
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"ae_title": "A_TITLE_THAT_IS_TOO_LONG"}}, "node.ae_title: 'A_TITLE_THAT_IS_TOO_LONG'"),
        ({"rules": [{"name": "r", "forward": ["nowhere"]}]}, "unknown destination 'nowhere' in rule 'r'"),
        ({"rules": [{"name": "r", "compress": "JPEGLS", "forward": ["archive"]}]}, "rules.0.compress.syntax"),
        ({"rules": [{"name": "r", "compress": "jpeglslossless", "forward": ["archive"]}]}, "'JPEGLSLossless'"),
        ({"colour": "blue"}, "colour: unknown key"),
        ({"node": {"ae_titel": "X"}}, "node.ae_titel: unknown key"),
        ({"destinations": {"a": {"type": "ftp"}}}, "destinations.a"),
        ({"rules": []}, "rules: List should have at least 1 item"),
        (
            {"destinations": {"f": {"type": "directory", "path": "f", "retry": {"initial_delay": 60, "max_delay": 1}}}},
            "destinations.f.directory.retry: max_delay 1 is below initial_delay 60",
        ),
    ],
)
def test_check_config_rejects_with_the_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, object], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(change)))
    assert main(["check-config", str(path)]) == 1
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("..", "'..' is not a valid destination name"),
        (".", "'.' is not a valid destination name"),
        ("a/b", "'a/b' is not a valid destination name"),
        ("-x", "'-x' is not a valid destination name"),
        ("", "'' is not a valid destination name"),
        ("unprocessable", "'unprocessable' is reserved for a spool folder; reserved: by-rule, unprocessable, tmp"),
        ("tmp", "'tmp' is reserved"),
        ("pacs-1.main_2", None),
    ],
)
def test_destination_names_are_safe_folder_names(name: str, expected: str | None) -> None:
    data = {"destinations": {name: {"type": "directory", "path": "x"}}, "rules": [{"name": "r", "forward": [name]}]}
    if expected is None:
        assert list(config.parse(data).destinations) == [name]
        return
    with pytest.raises(ConfigError, match=f"destinations: {re.escape(expected)}"):
        config.parse(data)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"node": {"ae_title": "CTÄ"}}, "node.ae_title"),
        ({"node": {"aliases": ["TELE", "TÉLÉ"]}}, "node.aliases.1"),
        ({"node": {"allowed_calling_aets": ["MRÖ"]}}, "node.allowed_calling_aets.0"),
        ({"node": {"allowed_calling_aets": [{"ae_title": "MRÖ"}]}}, "node.allowed_calling_aets.0"),
        ({"destinations": {"a": {"type": "dicom", "ae_title": "PACS€", "host": "h", "port": 1}}}, "destinations.a"),
        (
            {
                "destinations": {
                    "a": {"type": "dicom", "ae_title": "P", "calling_ae_title": "ÇA", "host": "h", "port": 1}
                }
            },
            "destinations.a",
        ),
    ],
)
def test_ae_titles_are_ascii(change: dict[str, object], where: str) -> None:
    data = _with(change)
    data["rules"] = [{"name": "r", "forward": list(data["destinations"])}]  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match=rf"{re.escape(where)}.*: .*not a valid AE title \(1-16 printable ASCII"):
        config.parse(data)


def test_transfer_syntax_by_dotted_uid_and_keyword_are_the_same() -> None:
    by_keyword = config.parse(VALID).rules[0].compress.syntax
    dotted = _with({"rules": [{"name": "r", "compress": "1.2.840.10008.1.2.4.80", "forward": ["archive"]}]})
    assert config.parse(dotted).rules[0].compress.syntax == by_keyword == "1.2.840.10008.1.2.4.80"


def test_keep_means_no_target_syntax() -> None:
    data = _with({"rules": [{"name": "r", "compress": "keep", "forward": ["archive"]}]})
    assert config.parse(data).rules[0].compress.syntax is None


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(VALID) + "node:\n  port: 104\n  ae_title: A\n  port: 11112\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'port' is given twice, on lines \d+ and \d+; keep one"):
        config.load(path)


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    archive = "{type: dicom, ae_title: A, host: h, port: 1}"
    path.write_text(
        f"destinations:\n  a: &pacs {archive}\n  b: {{<<: *pacs, port: 2}}\nrules: [{{name: r, forward: [a, b]}}]\n"
    )
    assert config.load(path).destinations["b"].port == 2  # type: ignore[union-attr]


def test_merged_mappings_may_be_merged_again(tmp_path: Path) -> None:
    """A mapping that merges and overrides, merged in turn by a shallower one (PyYAML constructs the shallower
    first and flattens the deeper in place: checked on the composed nodes, the override is not a second key)."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "destinations:\n"
        "  research: {type: dicom, ae_title: R, host: h, port: 1, tls: &site {cert: c.pem, key: k.pem, ca: ca.pem}}\n"
        "  archive: {type: dicom, ae_title: A, host: h, port: 2, tls: &archive {<<: *site, ca: pacs.pem}}\n"
        "node: {tls: {<<: *archive}}\n"
        "rules: [{name: r, forward: [archive]}]\n"
    )
    loaded = config.load(path)
    assert loaded.node.tls is not None and loaded.node.tls.ca == Path("pacs.pem")
    assert loaded.node.tls.cert == Path("c.pem")


def test_not_yaml_and_not_a_mapping_are_clear_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(listing)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")


def test_built_in_default() -> None:
    default = config.load(None)
    assert default.node.port == 11112
    assert default.spool.path == Path("./spool")
    assert [d.type for d in default.destinations.values()] == ["directory"]
    first, rest = default.rules
    assert first.match == {"modality": ["CT", "MR", "CR", "DX"]}
    assert first.compress.syntax is not None and first.compress.syntax.keyword == "JPEGLSLossless"
    assert rest.match is None and rest.compress.syntax is None


def test_logging_follows_the_current_standard_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A command run in-process logs to the stderr of the moment, even after the one it started with closed."""
    import io
    import logging
    import sys

    from scp.cli import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    first = io.StringIO()
    original, sys.stderr = sys.stderr, first
    try:
        configure_logging("INFO")
        sys.stderr = original
        first.close()
        logging.getLogger("scp.test").warning("written after the first stream closed")
    finally:
        sys.stderr = original
        root.handlers[:], root.level = saved
    err = capsys.readouterr().err
    assert "WARNING scp.test: written after the first stream closed" in err
    assert "Logging error" not in err


@pytest.mark.parametrize(
    "setting, where",
    [
        ("spool:\n  min_free_mb: no\n", "spool: min_free_mb: False"),
        ("node:\n  port: on\n", "node: port: True"),
        ("destinations:\n  a: {type: directory, path: a, batch_size: yes}\n", "destinations.a.directory: batch_size"),
        ("default:\n  forward: [a]\n  compress: {syntax: JPEG2000, j2k_psnr: [true]}\n", "j2k_psnr"),
    ],
)
def test_yes_and_no_are_not_numbers(tmp_path: Path, setting: str, where: str) -> None:
    """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0: `min_free_mb: no`
    would silently turn the disk reserve off. Only a yes/no setting takes them."""
    data = yaml.safe_load(setting)
    base: dict[str, object] = {
        "destinations": {"a": {"type": "directory", "path": "a"}},
        "rules": [{"name": "r", "forward": ["a"]}],
    }
    with pytest.raises(ConfigError, match=re.escape(where)) as refused:
        config.parse({**base, **data})
    assert "yes/no" in str(refused.value)
    assert config.parse({**base, "rules": [{"name": "r", "drop": True}]}).rules[0].drop


def test_two_rules_of_one_name_are_an_error() -> None:
    """Logs, metrics and explain tell rules apart by name."""
    rules = [{"name": "ct", "forward": ["archive"], "match": {"modality": m}} for m in ("CT", "MR")]
    with pytest.raises(ConfigError, match=r"rules.1: rule name 'ct' is also rules.0's"):
        config.parse(_with({"rules": rules}))


@pytest.mark.parametrize("match", [None, {}], ids=["no-match", "empty-match"])
def test_a_rule_that_matches_everything_must_be_the_last(match: dict[str, object] | None) -> None:
    """A `match:` whose conditions were all commented out reads as none: the rule takes every instance and the
    rules after it never apply, which is surely not what was meant."""
    catch_all: dict[str, object] = {"name": "all", "forward": ["archive"]}
    if match is not None:
        catch_all["match"] = match
    ct = {"name": "ct", "match": {"modality": "CT"}, "forward": ["folder"]}
    with pytest.raises(ConfigError, match=r"rules.0: rule 'all' matches every instance, so rule 'ct' after it"):
        config.parse(_with({"rules": [catch_all, ct]}))
    assert config.parse(_with({"rules": [ct, catch_all]})).rules[1].name == "all"


def test_a_log_line_is_one_line_whatever_a_peer_put_in_it(capsys: pytest.CaptureFixture[str]) -> None:
    """A UID or AE title off the wire may hold a newline: it must not forge a second log line. A traceback, which
    is ours, keeps its lines."""
    import logging

    from scp.cli import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        logger = logging.getLogger("scp.test")
        logger.info("received %s from %s", "1.2.3\n2026-11-22 INFO scp.pipeline: forwarded 9.9", "CT\r1\x00")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
    finally:
        root.handlers[:], root.level = saved
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(r"received 1.2.3\n2026-11-22 INFO scp.pipeline: forwarded 9.9 from CT\r1\x00")
    assert lines[1].endswith("it failed") and lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
