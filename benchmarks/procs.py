"""The processes of a benchmark: DCMTK peers, the node, the pass-through receiver, and /proc accounting.

Everything listens on 127.0.0.1 on a free port, every wait is bounded, and everything started is stopped (the
context managers stop their process on any exit, Ctrl-C included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# pynetdicom installs Python scripts named storescu/storescp that shadow DCMTK's on PATH: use Debian's.
TOOL_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"))
# Debian's DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment: every small PDU then
# waits for the peer's delayed ACK (~40 ms per instance). Real deployments should set it; so do we, unless
# dcmtk_nagle(True) asks for DCMTK as packaged (to see how the node copes with such peers).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk_nagle(on: bool) -> None:
    """Run the DCMTK peers started from now on with Nagle's algorithm on (as packaged) or off."""
    DCMTK_ENV["TCP_NODELAY"] = "0" if on else "1"


def tool(name: str) -> str:
    """The absolute path of a DCMTK program; exits naming the Debian package when it is missing."""
    for folder in TOOL_DIRS:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit(f"{name} is not installed: apt-get install dcmtk")


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on and that this process has not handed out before (the benchmarks and
    the tests both take theirs here). The kernel may give the same free port to two calls in a row: a node and
    its archive, or its metrics endpoint, would then fail with EADDRINUSE (the likely cause of one test failure in
    a clean-clone run). A port another process takes in between is still possible."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no loopback port left that this process has not handed out")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll `predicate` until it is true; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def server(args: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """Start a listening program, wait until `port` accepts connections, yield its pid; stop it on exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, 30, f"{Path(args[0]).name} on port {port}")
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited early; see {log}:\n{log.read_text()[-2000:]}")
        yield proc.pid
    finally:
        stop_process(proc)


@contextlib.contextmanager
def storescp(folder: Path, port: int, ae_title: str = "ARCHIVE", extra: Sequence[str] = ()) -> Iterator[int]:
    """DCMTK storescp accepting every syntax, writing into `folder`; yields its pid."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [tool("storescp"), "-aet", ae_title, "-od", str(folder), "+xa", "-pdu", "131072", *extra, str(port)]
    with server(args, port, folder.parent / f"storescp-{ae_title}-{port}.log", env=DCMTK_ENV) as pid:
        yield pid


def python_env() -> dict[str, str]:
    """The environment for Python children: this checkout first on the path."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT), path) if p)}


@contextlib.contextmanager
def node(folder: Path, data: dict[str, Any]) -> Iterator[int]:
    """The node as `python -m scp run --config FILE` (the way systemd runs it); yields its pid."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "node.yaml"
    config_path.write_text(yaml.safe_dump(data))
    args = [sys.executable, "-m", "scp", "run", "--config", str(config_path)]
    with server(args, int(data["node"]["port"]), folder / "node.log", env=python_env()) as pid:
        yield pid


@contextlib.contextmanager
def passthrough(
    folder: Path, port: int, ae_title: str, max_pdu: int, durable: bool = False, archive: Path | None = None
) -> Iterator[int]:
    """The baseline receiver (benchmarks/passthrough.py) as a process; yields its pid.

    With `archive`, it serves as an archive writing there and accepting every transfer syntax.
    """
    target = archive if archive is not None else folder / "received"
    args = [sys.executable, "-m", "benchmarks.passthrough", str(target), str(port), ae_title]
    args += ["--max-pdu", str(max_pdu), *(["--fsync"] if durable else [])]
    args += ["--all-syntaxes"] if archive is not None else []
    with server(args, port, folder / "passthrough.log", env=python_env()) as pid:
        yield pid


@dataclass(frozen=True)
class Sent:
    """What one storescu run did."""

    seconds: float
    cpu_seconds: float
    successes: int
    exit_code: int


def storescu(port: int, files: Sequence[Path], called: str, log: Path, timeout: float = 600) -> Sent:
    """Send `files` with DCMTK storescu over one association; time it until it exits (every response in)."""
    args = [tool("storescu"), "-v", "-aec", called, "-pdu", "131072", "127.0.0.1", str(port), *map(str, files)]
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV)
        try:
            code, rusage = _wait_with_rusage(proc.pid, timeout)
            seconds = time.perf_counter() - start
            proc.returncode = code
        finally:
            stop_process(proc)
    successes = log.read_text(errors="replace").count("Received Store Response (Success)")
    return Sent(seconds, rusage.ru_utime + rusage.ru_stime, successes, code)


def _wait_with_rusage(pid: int, timeout: float) -> tuple[int, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), rusage
        time.sleep(0.002)
    raise TimeoutError(f"storescu did not finish within {timeout:g} s")


# -- /proc accounting ---------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, int] | None:
    """(CPU ticks, RSS in bytes) of one process, or None when it is gone. The ticks are its own user + system time
    and those of the children it has waited for (cutime + cstime): a child that ended between two samples, or
    before its first, is counted in its parent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return sum(int(field) for field in fields[11:15]), int(fields[21]) * PAGE


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree(root: int) -> list[int]:
    """`root` and all its descendants (via /proc/PID/task/TID/children)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(child) for child in (task / "children").read_text().split())
    return found


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) that `root` and its descendants, living or ended, have used so far."""
    return sum(s[0] for s in map(_stat, tree(root)) if s is not None) / CLOCK_TICKS


class TreeMonitor:
    """Samples a process tree in a thread: peak total RSS and PSS, and CPU time used since `start()`.

    RSS summed over processes counts pages shared by forked workers once per process (an upper bound); PSS
    shares them out (what the tree really costs). CPU is the tree's total at the end less its total at the start:
    a process that ended meanwhile is counted in the parent that waited for it (lost only if none in the tree
    did).
    """

    def __init__(self, root: int, interval: float = 0.05, pss: bool = False) -> None:
        self.root = root
        self.interval = interval
        self.pss = pss
        self.peak_rss = 0
        self.peak_pss = 0
        self._baseline = 0
        self._last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-monitor", daemon=True)

    def start(self) -> TreeMonitor:
        self._sample()
        self._baseline = self._last
        self.peak_rss = self.peak_pss = 0
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        return (self._last - self._baseline) / CLOCK_TICKS

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        pids = tree(self.root)
        stats = [stat for stat in map(_stat, pids) if stat is not None]
        if not stats:  # the root has ended: its CPU is as last sampled
            return
        self._last = sum(ticks for ticks, _ in stats)
        rss = sum(rss for _, rss in stats)
        self.peak_rss = max(self.peak_rss, rss)
        if self.pss:
            self.peak_pss = max(self.peak_pss, sum(map(_pss, pids)))

    def __enter__(self) -> TreeMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
