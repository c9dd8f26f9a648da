"""The `compressing-scp` command. The only module that configures logging or installs signal handlers."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from scp import __version__, config
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
    _queue_parser(commands)
    return parser


def _queue_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--config", type=Path, help="YAML configuration whose spool.path to use")
    where.add_argument("--spool", type=Path, help="the spool directory (overrides --config)")
    queue = commands.add_parser("queue", help="inspect the spool; send quarantined jobs back or delete them")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("status", parents=[where], help="counts per state and destination, oldest age")
    listing = actions.add_parser("list", parents=[where], help="one line per instance or job")
    listing.add_argument("--state", choices=("incoming", "outgoing", "quarantine"))
    listing.add_argument("--destination", help="only this destination's jobs")
    retry = actions.add_parser("retry", parents=[where], help="move quarantined jobs back into the queue")
    retry.add_argument("--destination", help="only this destination's jobs")
    retry.add_argument("uids", nargs="*", metavar="UID", help="SOP Instance UIDs (default: every quarantined job)")
    purge = actions.add_parser("purge", parents=[where], help="delete quarantined jobs for good")
    purge.add_argument("--destination", help="only this destination's jobs")
    chosen = purge.add_mutually_exclusive_group(required=True)
    chosen.add_argument("uids", nargs="*", default=[], metavar="UID", help="SOP Instance UIDs to delete")
    chosen.add_argument("--all", action="store_true", help="every quarantined job (of --destination)")
    queue.set_defaults(handler=_queue)


def _queue(args: argparse.Namespace) -> int:
    from scp import queue_admin
    from scp.spool import Spool

    path = args.spool if args.spool is not None else config.load(args.config).spool.path
    if not (Path(path) / "outgoing").is_dir():
        raise ScpError(f"no spool at {path} (give --spool DIR or the node's --config FILE)")
    spool = Spool(path)
    if args.action == "status":
        print("\n".join(queue_admin.status(spool)))
    elif args.action == "list":
        print("\n".join(queue_admin.listing(spool, args.state, args.destination)))
    elif args.action == "retry":
        moved, problems = queue_admin.retry(spool, args.destination, args.uids)
        print(f"{moved} job(s) sent back to the queue")
        for problem in problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILURE if problems else EXIT_OK
    else:
        print(f"{queue_admin.purge(spool, args.destination, args.uids)} job(s) deleted")
    return EXIT_OK


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
    try:
        while not stop.wait(1.0):
            pass
    finally:
        LOGGER.info("stopping")
        finished = service.stop()
    if not finished:
        # Threads still in a C-STORE or an encode: leave now, as after a crash; the spool has their work.
        logging.shutdown()
        os._exit(EXIT_OK)
    return EXIT_OK
