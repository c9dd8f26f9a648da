"""Receiving in a process of its own.

The service process applies the rules, commits the jobs and forwards: pydicom and the node's own code, Python under
one GIL. Receiving in that process competed for the GIL, and a modality waiting for its C-STORE response waited
for it (measured, 300 CT slices: the node received at 45-55 MB/s with processing and forwarding running and at
81-96 MB/s with them stopped). So the SCP runs in a child process: it commits each instance to the spool exactly
as before (durable before Success) and then tells the service its spool id; counters and log records travel the
same pipe, so metrics and logs look as if it were one process.

The child ends when told to (`stop`), and at once when the service's end of the pipe closes: a service killed
with -9 leaves no listener behind. If the child dies, `problem` says so; the service then reports itself
unhealthy (systemd's watchdog restarts the node). Whatever the child acknowledged is in the spool either way.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from scp import metrics, receive, tls
from scp.acceptor import Acceptor
from scp.config import Config, NodeConfig
from scp.spool import ReceiveBudget, Spool
from scp.workers import skip_value_validation

LOGGER = logging.getLogger(__name__)
_CONTEXT = multiprocessing.get_context("spawn")  # a clean process: no threads or locks copied mid-use
ASSOCIATIONS_REFRESH = 0.5
"""Seconds between two updates of the open-association count the child shares with the service."""
HEARTBEAT_LIMIT = 10.0
"""Seconds without such an update after which the service reports the receiving process stalled."""


class Inbound:
    """The receiving process, seen from the service."""

    def __init__(self, config: Config, on_received: Callable[[str], None]) -> None:
        self.on_received = on_received
        self.port = 0
        self._associations: Synchronized[int] = _CONTEXT.Value("i", 0)
        self._heartbeat: Synchronized[float] = _CONTEXT.Value("d", 0.0)
        """time.monotonic() (system-wide on Linux) of the child's last count of its associations."""
        self._conn, child_conn = _CONTEXT.Pipe()
        wanted = _ChildConfig(
            config.node,
            config.spool.path,
            int(config.spool.min_free_mb * 2**20),
            config.spool.min_free_inodes,
            config.logging.level,
        )
        self._process = _CONTEXT.Process(
            target=_serve, args=(wanted, child_conn, self._associations, self._heartbeat), name="receiver", daemon=True
        )
        self._child_conn = child_conn
        self._started = threading.Event()
        self._listening = False
        self._start_error: str | None = None
        self._stopping = False

    def start(self, timeout: float = 60.0) -> None:
        """Start the child and return once it listens; raise OSError if it cannot (port in use, bad TLS files)."""
        self._process.start()
        self._child_conn.close()  # only the child holds its end now: its death reads as EOF here
        threading.Thread(target=self._read, name="receiver-pipe", daemon=True).start()
        if not self._started.wait(timeout):
            self._kill()
            raise OSError(f"the receiving process did not start listening within {timeout:g} s")
        if not self._listening:
            self._process.join(5)
            raise OSError(self._start_error or f"the receiving process exited (exit code {self._process.exitcode})")

    @property
    def associations(self) -> int:
        """Open associations (refreshed every ASSOCIATIONS_REFRESH seconds)."""
        return int(self._associations.value)

    def set_log_level(self, level: str) -> None:
        """Log at `level` from now on (a reload)."""
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("log_level", level))

    def problem(self) -> str | None:
        """Why receiving is not working, or None."""
        if self._stopping or self._process.is_alive():
            return None
        return f"the receiving process has exited (exit code {self._process.exitcode})"

    def stalled(self) -> str | None:
        """Why the receiving process, alive, seems not to run (stopped, or stuck holding its GIL), or None."""
        beat = self._heartbeat.value
        silent = time.monotonic() - beat
        if self._stopping or not beat or silent < HEARTBEAT_LIMIT or not self._process.is_alive():
            return None
        return f"the receiving process has not run for {silent:.0f} s"

    def stop(self, deadline: float) -> None:
        """Stop accepting; let open associations end until `deadline` (then abort them); wait for the child."""
        self._stopping = True
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(("stop", max(0.0, deadline - time.monotonic())))
        self._process.join(max(0.0, deadline - time.monotonic()) + 5)
        self._kill()

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)

    def _read(self) -> None:
        """Apply what the child reports until its end of the pipe closes."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._started.set()  # a child that died before listening must not keep start() waiting
                return
            self._apply(message)

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind, *args = message
        if kind == "received":
            spool_id, calling_ae, size = args
            label = metrics.calling_ae_label(calling_ae)
            metrics.RECEIVED.labels(label).inc()
            metrics.RECEIVED_BYTES.labels(label).inc(size)
            self.on_received(spool_id)
        elif kind == "refused":
            metrics.REFUSED.labels(f"0x{args[0]:04X}").inc()
        elif kind == "rejected":
            metrics.REJECTED.labels(args[0]).inc()
        elif kind == "log":
            name, level, text, where = args
            record = {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": text}
            logging.getLogger(name).handle(logging.makeLogRecord(record | where))
        elif kind == "listening":
            self.port = int(args[0])
            self._listening = True
            self._started.set()
        elif kind == "failed":
            self._start_error = str(args[0])
            self._started.set()


@dataclass(frozen=True)
class _ChildConfig:
    """What the child needs of the configuration (the rules are not picklable, and not its business)."""

    node: NodeConfig
    spool: Path
    min_free: int
    min_free_inodes: int
    log_level: str


class _PipeReporter:
    """The handler's Reporter in the child: each event is one message to the service."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self.send = send

    def received(self, spool_id: str, calling_ae: str, size: int) -> None:
        self.send(("received", spool_id, calling_ae, size))

    def refused(self, status: int) -> None:
        self.send(("refused", status))

    def rejected(self, reason: str) -> None:
        self.send(("rejected", reason))


class _PipeLogHandler(logging.Handler):
    """Sends the child's log records to the service, which logs them as its own."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            where = {"pathname": record.pathname, "lineno": record.lineno, "funcName": record.funcName}
            if record.exc_info:  # kept apart from the message: the service's formatter escapes newlines in that
                where["exc_text"] = logging.Formatter().formatException(record.exc_info)
            self.send(("log", record.name, record.levelno, text, where))
        except Exception:
            self.handleError(record)


def _serve(
    config: _ChildConfig, conn: Connection, associations: Synchronized[int], heartbeat: Synchronized[float]
) -> None:
    """The child: listen, report, and end when told to or when the service is gone."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the service decides when receiving stops
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock, contextlib.suppress(OSError, ValueError):  # the service is gone: nothing left to tell
            conn.send(message)

    logging.basicConfig(handlers=[_PipeLogHandler(send)], force=True)
    logging.getLogger().setLevel(config.log_level)
    skip_value_validation()
    spool = Spool(config.spool)
    try:
        server = make_server(config.node, spool, _PipeReporter(send), config.min_free, config.min_free_inodes)
    except Exception as exc:
        send(("failed", f"cannot listen on {config.node.host}:{config.node.port}: {exc}"))
        return
    threading.Thread(target=_accept, args=(server,), name="accept", daemon=True).start()
    threading.Thread(target=_count_associations, args=(server, associations, heartbeat), daemon=True).start()
    send(("listening", server.server_address[1]))
    patience = 0.0
    while True:
        try:
            command, argument = conn.recv()
        except (EOFError, OSError):  # the service died: stop at once
            break
        if command == "log_level":
            logging.getLogger().setLevel(str(argument))
        elif command == "stop":
            patience = float(argument)
            break
    server.shutdown()
    server.end(time.monotonic() + patience)


def _accept(server: Acceptor) -> None:
    """Serve until told to stop. An accept loop that ends otherwise ends the process: the service then sees that
    receiving has stopped (`problem`), instead of a live process that no longer listens."""
    try:
        server.serve_forever()
    except Exception:
        LOGGER.exception("the receiving process stopped accepting connections")
    if not server.stopping:
        LOGGER.critical("the receiving process stopped accepting connections: exiting")
        os._exit(1)


def make_server(
    node: NodeConfig, spool: Spool, reporter: receive.Reporter, min_free: int, min_free_inodes: int = 0
) -> Acceptor:
    """The SCP as configured in `node` (listening, not yet serving), committing to `spool` and telling `reporter`;
    a data set streaming in stops at `node.max_instance_bytes` or at `min_free` bytes (`min_free_inodes` inodes)
    left on the spool's filesystem."""
    return Acceptor(
        node,
        receive.Handler(spool, reporter, node, min_free),
        ReceiveBudget(node.max_instance_bytes, min_free, min_free_inodes),
        reporter.rejected,
        tls.server_context(node.tls) if node.tls else None,
    )


def _count_associations(server: Acceptor, associations: Synchronized[int], heartbeat: Synchronized[float]) -> None:
    while True:
        associations.value = server.associations
        heartbeat.value = time.monotonic()
        time.sleep(ASSOCIATIONS_REFRESH)
