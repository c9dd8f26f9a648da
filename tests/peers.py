"""Real peers for tests: DCMTK programs, the node in-process or as a process, free ports, bounded waits.

Everything listens on 127.0.0.1 on a free port, every wait is bounded, and everything started is stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from benchmarks.procs import free_port
from scp import config
from scp.service import Service

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PROJECT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 11112

# pynetdicom installs Python scripts named storescu/storescp that shadow DCMTK's on PATH: use Debian's.
TOOL_DIRS = (Path("/usr/bin"), Path("/usr/sbin"), Path("/usr/local/bin"))


def tool(name: str) -> str:
    """The absolute path of an external program from Debian's packages; skip (or fail under CI) if missing."""
    for folder in TOOL_DIRS:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    message = f"{name} is not installed (Debian packages dcmtk, libgdcm-tools, dicom3tools, orthanc)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def storescp(
    folder: Path, ae_title: str = "ARCHIVE", accept: str = "+xa", extra: Sequence[str] = (), port: int | None = None
) -> Iterator[int]:
    """DCMTK storescp as an archive writing into `folder`; yields its port (a free one unless `port` is given).

    `accept` is storescp's transfer-syntax option: `+xa` accepts every syntax DCMTK knows, "" only uncompressed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [tool("storescp"), "-aet", ae_title, "-od", str(folder), *([accept] if accept else []), *extra, str(port)]
    with _process(args, folder.parent / f"storescp-{port}.log") as proc:
        wait_for(lambda: listening(port) or proc.poll() is not None, 10, f"storescp on port {port}")
        assert proc.poll() is None, f"storescp exited early: {args}"
        yield port


def storescu(port: int, files: Sequence[Path], called: str = "COMPRESS_SCP", extra: Sequence[str] = ()) -> str:
    """Send files with DCMTK storescu (proposing each file's own syntax); returns its output."""
    args = [tool("storescu"), "-v", "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    return done.stdout + done.stderr


@contextlib.contextmanager
def _process(args: Sequence[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        try:
            yield proc
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def node_config(tmp_path: Path, destinations: dict[str, Any], rules: list[dict[str, Any]], **extra: Any) -> dict:
    """A node configuration on loopback, spool under `tmp_path`, port 0 (the OS picks)."""
    data: dict[str, Any] = {
        "node": {"ae_title": "COMPRESS_SCP", "host": "127.0.0.1", "port": 0},
        "spool": {"path": str(tmp_path / "spool")},
        "workers": {"processes": 1},
        "destinations": destinations,
        "rules": rules,
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def archive_destination(port: int, retry: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """`destinations` with one DICOM archive on loopback (AE ARCHIVE, 10 s timeout) and fast retries."""
    return {
        "archive": {
            "type": "dicom",
            "ae_title": "ARCHIVE",
            "host": "127.0.0.1",
            "port": port,
            "timeout": 10,
            "retry": retry or {"initial_delay": 0.2, "max_delay": 0.5},
            **extra,
        }
    }


@contextlib.contextmanager
def running_node(data: dict[str, Any]) -> Iterator[Service]:
    """The node in this process; yields the started Service (its `.port` is the bound port)."""
    service = Service(config.parse(data))
    try:
        service.start()  # a start that fails halfway has started the receiving process: stop it too
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def node_process(folder: Path, data: dict[str, Any] | None = None) -> Iterator[NodeProcess]:
    """The node as `python -m scp run`, the way systemd runs it, in `folder` (see NodeProcess)."""
    handle = NodeProcess(folder, data)
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()


class NodeProcess:
    """The node as a separate process: can be killed with SIGKILL and started again on the same spool.

    With `data` it runs `--config` on a file made from it (give it a fixed port: free_port()); without, it runs
    the built-in default configuration (port 11112, ./spool and ./archive under `folder`).
    """

    def __init__(self, folder: Path, data: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.args = [sys.executable, "-m", "scp", "run"]
        self.port = DEFAULT_PORT
        if data is not None:
            self.port = int(data["node"]["port"])
            assert self.port, "a node process needs a fixed port (use free_port())"
            config_path = folder / "node.yaml"
            config_path.write_text(yaml.safe_dump(data))
            self.args += ["--config", str(config_path)]
        self.log = folder / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder, env=env)
        proc = self.proc
        wait_for(lambda: listening(self.port) or proc.poll() is not None, timeout, "the node to listen")
        assert proc.poll() is None, f"the node exited early:\n{self.log.read_text()[-3000:]}"

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as after a power cut of the process."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def copy_test_file(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(TEST_FILES / name, folder / name))


def complete_files(folder: Path, pixels: bool = False) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID → dataset of the files a peer has finished writing into `folder` (a file still being
    written, or a hidden partial one, is left out until it reads in full)."""
    found: dict[str, pydicom.Dataset] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
            if pixels and "PixelData" in ds:
                ds.pixel_array  # noqa: B018 - a truncated file fails here
        except Exception:
            continue
        found[str(ds.SOPInstanceUID)] = ds
    return found
