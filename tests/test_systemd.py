"""The systemd unit: `systemd-analyze verify` and `security`, and the node run as the unit runs it (sd_notify)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from scp import cli
from tests.peers import PROJECT, TEST_FILES, free_port, listening, node_config, running_node, storescu, tool

UNIT = PROJECT / "systemd" / "compressing-scp.service"
KEEP_RULES = [{"name": "all", "compress": "keep", "forward": ["folder"]}]


def _installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's compressing-scp (verify checks the binary exists)."""
    binary = shutil.which("compressing-scp") or sys.executable
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/compressing-scp/bin/compressing-scp", binary))
    return unit


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.peers
def test_unit_verifies_clean(tmp_path: Path) -> None:
    unit = _installed_unit(tmp_path)
    done = subprocess.run(
        [tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.peers
def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    unit = _installed_unit(tmp_path)
    done = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def test_unit_has_what_the_issue_asks_for() -> None:
    found = _directives(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "Restart": ["on-failure"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "NoNewPrivileges": ["yes"],
        "StateDirectory": ["compressing-scp"],
        "User": ["compressing-scp"],
    }
    for key, value in expected.items():
        assert found.get(key) == value, f"{key}={found.get(key)}"
    assert "WatchdogSec" in found
    assert found["RestartPreventExitStatus"] == [str(cli.EXIT_CONFIG)], "an invalid configuration is not retried"
    binary = found["ExecStart"][0].split()[0]
    readme = (PROJECT / "README.md").read_text()
    venv = re.search(r"^python3 -m venv (\S+) && \1/bin/pip install \.", readme, re.MULTILINE)
    assert venv and binary == f"{venv.group(1)}/bin/compressing-scp", "ExecStart runs what the README installs"
    sysusers = (PROJECT / "systemd" / "compressing-scp.sysusers").read_text()
    assert re.search(r"^u compressing-scp ", sysusers, re.MULTILINE)


def test_run_with_an_invalid_configuration_exits_with_ex_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """78, which the unit does not restart: the node would fail the same way every 5 s."""
    path = tmp_path / "node.yaml"
    data = node_config(tmp_path, {"a": {"type": "directory", "path": "a"}}, [{"name": "r", "drop": True}])
    data["node"]["host"] = "not-an-address"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["run", "--config", str(path)]) == cli.EXIT_CONFIG == 78
    assert "node.host: cannot listen on 'not-an-address'" in capsys.readouterr().err


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    try:
        yield sock
    finally:
        sock.close()


def _messages(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    """Every datagram received within `seconds`, with the time it arrived."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append((time.monotonic(), sock.recv(4096).decode()))
        except TimeoutError:
            continue
    return got


def _drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(4096)
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(0.2)


def _wait_for_message(sock: socket.socket, field: str, timeout: float) -> tuple[float, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if field in message.split("\n"):
            return time.monotonic(), message
    raise AssertionError(f"no {field} from the node within {timeout:g} s")


def test_node_notifies_ready_watchdog_and_stopping_like_under_systemd(
    tmp_path: Path, notify_socket: socket.socket
) -> None:
    """`compressing-scp run` as ExecStart runs it: READY=1 once it listens, WATCHDOG=1 every WatchdogSec/2,
    RELOADING=1 then READY=1 on SIGHUP (ExecReload=), STOPPING=1 on SIGTERM, then a clean exit."""
    port = free_port()
    data = node_config(tmp_path, {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}, KEEP_RULES)
    data["node"]["port"] = port
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(data))
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "600000",
    }
    args = [sys.executable, "-m", "scp", "run", "--config", str(tmp_path / "node.yaml")]
    with open(tmp_path / "node.log", "wb") as log:
        proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        _, ready = _wait_for_message(notify_socket, "READY=1", 30)
        assert listening(port), "READY=1 arrived before the node listened"
        assert f"STATUS=listening on port {port}" in ready.split("\n")
        pings = [at for at, message in _messages(notify_socket, 2.0) if message == "WATCHDOG=1"]
        assert len(pings) >= 4, f"{len(pings)} watchdog pings in 2 s (expected one every 0.3 s)"
        proc.send_signal(signal.SIGHUP)  # ExecReload=: RELOADING=1 (with MONOTONIC_USEC), then READY=1 again
        _, reloading = _wait_for_message(notify_socket, "RELOADING=1", 10)
        assert any(field.startswith("MONOTONIC_USEC=") for field in reloading.split("\n")), reloading
        _wait_for_message(notify_socket, "READY=1", 10)
        proc.send_signal(signal.SIGTERM)
        _wait_for_message(notify_socket, "STOPPING=1", 10)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.peers
def test_a_hung_worker_stops_the_watchdog_pings(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A processing thread stuck on one instance longer than node.stall_timeout withholds WATCHDOG=1 (systemd
    then restarts the node) and /health-style `health()` names the thread."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    data = node_config(tmp_path, destinations, KEEP_RULES, node={"stall_timeout": 1.0})
    release = threading.Event()
    with running_node(data) as node:
        assert _messages(notify_socket, 0.7), "no watchdog ping while healthy"
        processor = node._processor
        assert processor is not None
        real_process = processor.process

        def hang(spool_id: str) -> object:
            release.wait(30)
            return real_process(spool_id)

        monkeypatch.setattr(processor, "process", hang)
        storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        time.sleep(1.5)  # past node.stall_timeout
        problems = node.health()
        assert any("processor-0" in problem for problem in problems), problems
        _drain(notify_socket)  # pings sent before the stall was noticed
        assert not _messages(notify_socket, 1.5), "watchdog pings continued while a worker hung"
        release.set()
        assert _messages(notify_socket, 1.0), "watchdog pings did not resume once the worker moved on"
