"""The `compressing-scp` command. The only module that configures logging or installs signal handlers."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from scp import __version__, config, notify
from scp.errors import ScpError

LOGGER = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ScpError as exc:
        print(f"compressing-scp: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compressing-scp", description="A DICOM node that compresses images on their way to the archive."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the node")
    run.add_argument("--config", type=Path, help="YAML configuration (default: the built-in one)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate configuration files")
    check.add_argument("files", type=Path, nargs="+", metavar="FILE")
    check.set_defaults(handler=_check_config)
    return parser


def _check_config(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            loaded = config.load(path)
        except ScpError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: OK ({len(loaded.rules)} rules, {len(loaded.destinations)} destinations)")
    return EXIT_FAILURE if failed else EXIT_OK


def configure_logging(level: str) -> None:
    """One line per event on standard error, which journald keeps under systemd."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _run(args: argparse.Namespace) -> int:
    from scp.service import Service  # imported here: check-config must not need the network stack

    loaded = config.load(args.config)
    configure_logging(loaded.logging.level)
    service = Service(loaded)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    notify.ready(f"listening on port {service.port}")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        LOGGER.info("stopping")
        notify.stopping()
        service.stop()
    return EXIT_OK
