"""The receiving process: it lives and dies with the service, and the service notices when it is gone."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scp import config
from tests.peers import (
    PROJECT,
    TEST_FILES,
    free_port,
    listening,
    node_config,
    node_process,
    running_node,
    storescu,
    wait_for,
)

RULES = [{"name": "all", "compress": "keep", "forward": ["folder"]}]


def _config(tmp_path: Path, port: int = 0) -> dict[str, object]:
    destinations = {"folder": {"type": "directory", "path": str(tmp_path / "folder")}}
    return node_config(tmp_path, destinations, RULES, node={"port": port})


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on TCP `port` (from /proc/net/tcp and its fds)."""
    inodes = {
        fields[9]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split())[3] == "0A" and int(fields[1].split(":")[1], 16) == port
    }
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link == f"socket:[{inode}]" for link in links for inode in inodes)


def test_the_receiving_process_dies_with_the_service(tmp_path: Path) -> None:
    """kill -9 of the service must not leave a listener behind that acknowledges what nobody will process."""
    port = free_port()
    with node_process(tmp_path, _config(tmp_path, port)) as node:
        assert node.proc is not None
        children = _children(node.proc.pid)
        assert children, "the node started no child process"
        node.kill()
        wait_for(lambda: not any(_alive(pid) for pid in children), 10, "the node's children to end")
        assert not listening(port)


def test_a_dead_receiving_process_makes_the_node_unhealthy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """health() (for /health and the watchdog) names it, and the log says so without a watchdog too."""
    with running_node(_config(tmp_path)) as node:
        assert node.health() == []
        output = storescu(node.port, [TEST_FILES / "CT_small.dcm"])
        assert "Received Store Response (Success)" in output, output
        (receiver,) = [p for p in multiprocessing.active_children() if p.name == "receiver"]
        assert receiver.pid is not None
        os.kill(receiver.pid, signal.SIGKILL)
        wait_for(lambda: node.health(), 10, "the node to notice")
        assert any("receiving process has exited" in problem for problem in node.health())
        wait_for(lambda: "unhealthy: the receiving process has exited" in caplog.text, 15, "the log line")


def test_a_node_whose_receiving_process_died_exits_with_a_failure(tmp_path: Path) -> None:
    """Without systemd's watchdog too: a node that can no longer receive says why and exits 1, so that any
    service manager (Restart=on-failure) starts it again instead of leaving it running deaf."""
    port = free_port()
    with node_process(tmp_path, _config(tmp_path, port)) as node:
        assert node.proc is not None
        (receiver,) = [pid for pid in _children(node.proc.pid) if _listens(pid, port)]
        os.kill(receiver, signal.SIGKILL)
        assert node.proc.wait(30) == 1
    log = node.log.read_text()
    assert "the receiving process has exited (exit code -9); stopping, for the service manager" in log, log


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config_path = tmp_path / "node.yaml"
        config_path.write_text(yaml.safe_dump(_config(tmp_path, port)))
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        done = subprocess.run(
            [sys.executable, "-m", "scp", "run", "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
    assert done.returncode == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def _receive_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "scp.receive"]


def test_a_reload_changes_what_the_receiving_process_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # this process passes on whatever the child sends
    quiet = _config(tmp_path)
    quiet["logging"] = {"level": "WARNING"}
    made = [TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"]
    with running_node(quiet) as node:
        storescu(node.port, made[:1])
        wait_for(lambda: not node.spool.incoming() and not node.spool.jobs(), 30, "the first instance delivered")
        assert not _receive_lines(caplog)
        node.reload(config.parse({**quiet, "logging": {"level": "INFO"}}))
        storescu(node.port, made[1:])
        wait_for(
            lambda: [r for r in caplog.records if r.name == "scp.receive"], 30, "the receiving process's INFO line"
        )
    (line,) = [r for r in caplog.records if r.name == "scp.receive"]
    assert line.levelno == logging.INFO and "received" in line.getMessage()
    assert line.pathname.endswith("receive.py") and line.lineno > 0  # where the child logged it


def test_a_stall_is_the_same_problem_while_its_seconds_grow() -> None:
    """Without a watchdog, health problems are logged when they change: not every 5 s as a stall lasts."""
    from scp.service import _kinds

    def stall(seconds: int) -> str:
        return f"thread processor-0 busy with one item for {seconds} s (node.stall_timeout 900 s)"

    assert _kinds([stall(905)]) == _kinds([stall(1210)])
    assert _kinds([stall(905)]) != _kinds([stall(905), "the receiving process has exited (exit code -9)"])


def test_a_receiving_process_that_does_not_run_makes_the_node_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alive but not running (SIGSTOP, or stuck holding its GIL): it accepts nothing, which health() must say
    (/health for a load balancer, the watchdog for systemd); it recovers once the process runs again."""
    from scp import inbound

    monkeypatch.setattr(inbound, "HEARTBEAT_LIMIT", 1.5)
    with running_node(_config(tmp_path)) as node:
        (receiver,) = [p for p in multiprocessing.active_children() if p.name == "receiver"]
        assert receiver.pid is not None
        os.kill(receiver.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: any("has not run for" in p for p in node.health()), 10, "the node to notice")
        finally:
            os.kill(receiver.pid, signal.SIGCONT)
        wait_for(lambda: node.health() == [], 10, "health once it runs again")
