"""The `compressing-scp` command. The only module that configures logging or installs signal handlers."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scp import __version__, config, notify, tls
from scp.errors import ConfigError, ScpError

LOGGER = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78
"""`run` with an invalid configuration (sysexits.h EX_CONFIG): the unit's RestartPreventExitStatus= stops systemd
from restarting a node that would fail the same way every time."""


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

    explain = commands.add_parser(
        "explain", help="show which rule each file matches, why, and what would happen to it (changes nothing)"
    )
    explain.add_argument("--config", type=Path, help="YAML configuration (default: the built-in one)")
    explain.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    explain.add_argument(
        "--calling-ae", help="calling AE title to assume (default: EXPLAIN, let through allowed_calling_aets)"
    )
    explain.add_argument("--called-ae", help="called AE title to assume (default: the node's)")
    explain.add_argument("--peer", help="peer IP address to assume (default: 127.0.0.1)")
    explain.add_argument("files", type=Path, nargs="+", metavar="DICOMFILE")
    explain.set_defaults(handler=_explain)

    offline = commands.add_parser("compress", help="re-encode files offline, as a rule's compress: would")
    offline.add_argument("--to", required=True, metavar="SYNTAX", help="target: UID keyword, dotted UID or keep")
    offline.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a compress: option, VALUE in YAML (jls_error=2, j2k_psnr=[50], verify=false)",
    )
    offline.add_argument("--output", required=True, type=Path, metavar="DIR", help="folder for the results")
    offline.add_argument("--jobs", type=_at_least_one, default=os.cpu_count() or 1, help="encoder processes")
    offline.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="files or folders (recursive)")
    offline.set_defaults(handler=_compress)

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
    if args.action in ("retry", "purge"):
        _check_owner(Path(path), args.action)
    spool = Spool(path)
    if args.action == "status":
        print("\n".join(queue_admin.status(spool)))
    elif args.action == "list":
        print("\n".join(queue_admin.listing(spool, args.state, args.destination)))
    elif args.action == "retry":
        moved, problems = queue_admin.retry(spool, args.destination, args.uids)
        if args.config is not None:
            names = [job.destination for job in moved] + ([args.destination] if args.destination else [])
            _to_stderr(queue_admin.unconfigured(names, config.load(args.config).destinations, args.config))
        return _report(f"{len(moved)} job(s) sent back to the queue", problems)
    else:
        deleted, problems = queue_admin.purge(spool, args.destination, args.uids)
        return _report(f"{deleted} job(s) deleted", problems)
    return EXIT_OK


def _to_stderr(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _report(done: str, problems: list[str]) -> int:
    """Print what was done, then the problems; exit 1 if there are any."""
    print(done)
    _to_stderr(problems)
    return EXIT_FAILURE if problems else EXIT_OK


def _check_owner(spool: Path, action: str) -> None:
    """Refuse to change a spool as root when the node runs as another user: the files root leaves there (a
    retry.json) could not be reused or removed by the node."""
    owner = spool.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        import pwd

        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise ScpError(
            f"the spool at {spool} belongs to {name}: run `queue {action}` as that user "
            f"(sudo -u {name} compressing-scp queue {action} ...), so that the node can reuse what it writes"
        )


def _at_least_one(text: str) -> int:
    """A count of processes: 1 or more (argparse names the option and the value otherwise)."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return number


def _check_config(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            loaded = config.load(path)
            config.check_files(loaded, str(path))
            tls.check_tls(loaded, str(path))
        except ScpError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: OK ({len(loaded.rules)} rules, {len(loaded.destinations)} destinations)")
        for warning in [*loaded.unseen_titles(), *tls.certificate_warnings(loaded)]:
            print(f"{path}: warning: {warning}", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK


def _compress(args: argparse.Namespace) -> int:
    from scp import offline  # imported here: the other commands need no pixel stack

    configure_logging("WARNING")
    spec = offline.parse_spec(args.to, args.options)
    report = offline.compress_tree(args.inputs, args.output, spec, jobs=args.jobs, progress=sys.stderr.isatty())
    offline.print_summary(report)
    return EXIT_OK


class _StandardErrorHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stderr` is when a record is emitted, not when logging was configured: a command
    run in-process (tests, embedding) may have replaced and closed the stream it started with."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _OneLineFormatter(logging.Formatter):
    """Writes control characters of a message escaped (`\\n`, `\\x00`): a UID or AE title off the wire may hold a
    newline, which would forge a log line. Tracebacks, which are ours, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(lambda found: found[0].encode("unicode_escape").decode(), record.message)
        return super().formatMessage(record)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def configure_logging(level: str) -> None:
    """One line per event on standard error, which journald keeps under systemd."""
    handler = _StandardErrorHandler()
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _run(args: argparse.Namespace) -> int:
    from scp.service import Service  # imported here: check-config must not need the network stack
    from scp.workers import skip_value_validation

    try:
        loaded = config.load(args.config)
        config.check_files(loaded, str(args.config or "<built-in default>"))
        tls.check_tls(loaded, str(args.config or "<built-in default>"))
    except ConfigError as exc:
        print(f"compressing-scp: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(loaded.logging.level)
    _warn(loaded)
    skip_value_validation()
    service = Service(loaded)
    stop = threading.Event()
    hangup = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hangup.set())
    try:
        service.start()
    except OSError as exc:  # the port is taken, the TLS files are unreadable...
        service.stop(timeout=5)
        print(f"compressing-scp: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    notify.ready(f"listening on port {service.port}")
    outcome = EXIT_OK
    try:
        while not stop.wait(0.2):
            if hangup.is_set():
                hangup.clear()
                _reload(service, args.config)
            if stopped := service.stopped_parts():
                # Not only under systemd's watchdog: any service manager restarts a node that exits with a failure.
                LOGGER.error("%s; stopping, for the service manager to start the node again", "; ".join(stopped))
                outcome = EXIT_FAILURE
                break
    finally:
        LOGGER.info("stopping")
        notify.stopping()
        finished = service.stop()
    if not finished:
        # Threads still in a C-STORE or an encode: leave now, as after a crash; the spool has their work.
        logging.shutdown()
        os._exit(outcome)
    return outcome


def _reload(service: Any, path: Path | None) -> None:
    """SIGHUP: re-read the configuration with check-config's validation; keep the old one if it is invalid.

    What needs a restart (node, spool, workers, metrics) is for `Service.reload` to keep and warn about."""
    if path is None:
        LOGGER.warning("SIGHUP: running on the built-in configuration, there is no file to re-read")
        return
    LOGGER.info("SIGHUP: re-reading %s", path)
    notify.reloading()
    try:
        loaded = config.load(path)
        config.check_files(loaded, str(path))
        tls.check_tls(loaded, str(path))
        service.reload(loaded)
    except ScpError as exc:
        LOGGER.error("reload rejected, the running configuration stays in force: %s", exc)
    except Exception:  # a bug in reading or applying it: the node, running fine until now, goes on
        LOGGER.exception("reload failed unexpectedly; the node goes on running (check its configuration)")
    else:
        _warn(loaded)
        configure_logging(loaded.logging.level)
    notify.ready(f"listening on port {service.port}")


def _warn(loaded: config.Config) -> None:
    """Log the warnings of a configuration the node runs on, and publish its certificates' expiry dates."""
    from scp import metrics  # imported here: check-config must not need the metrics stack

    for warning in [*loaded.unseen_titles(), *tls.certificate_warnings(loaded)]:
        LOGGER.warning("configuration: %s", warning)
    metrics.CERTIFICATE_EXPIRY.clear()
    for where, certificate in tls.certificates(loaded):
        subject, expiry = certificate.subject.rfc4514_string(), certificate.not_valid_after_utc.timestamp()
        metrics.CERTIFICATE_EXPIRY.labels(where, subject).set(expiry)


def _explain(args: argparse.Namespace) -> int:
    import pydicom

    from scp import compress, pipeline, rules, security

    loaded = config.load(args.config)
    called_ae = (args.called_ae or loaded.node.ae_title).strip()
    # The calling AE and address are checked against allowed_calling_aets only when given: the defaults stand
    # for no modality in particular.
    asserted = args.calling_ae is not None or args.peer is not None
    calling_ae, peer = (args.calling_ae or "EXPLAIN").strip(), args.peer or "127.0.0.1"  # as the SCP strips
    callers = security.caller_policy(loaded.node) if asserted else None
    refusal = security.refused(loaded.node, callers, called_ae, calling_ae, peer)
    if refusal is not None:
        why = {
            security.CALLED_AE_NOT_RECOGNISED: f"calling '{called_ae}': it is neither node.ae_title nor one of "
            "node.aliases, and node.accept_any_called_ae is false",
            security.CALLING_AE_NOT_RECOGNISED: f"from '{calling_ae}' at {peer}: not permitted by "
            "node.allowed_calling_aets (give --calling-ae and --peer of a modality it allows)",
        }[refusal[1]]
        print(f"the node rejects associations {why}", file=sys.stderr)
        return EXIT_FAILURE
    failed = 0
    for path in args.files:
        try:
            facts = pipeline.read_facts(path, calling_ae, called_ae, peer)
        except (OSError, pydicom.errors.InvalidDicomError, ValueError, AttributeError, KeyError) as exc:
            failed += 1
            error = {"file": str(path), "error": f"cannot be read as DICOM: {exc}"}
            print(json.dumps(error) if args.json else f"{path}: {error['error']}", file=sys.stdout)
            continue
        decision = rules.decide(loaded.rules, loaded.default_rule, facts)
        with tempfile.TemporaryDirectory(prefix="explain-") as scratch:
            names = (Path(scratch) / f"{n}.dcm" for n in itertools.count())
            outputs, _ = pipeline.produce(
                path, facts.transfer_syntax, decision, loaded.destinations, compress.transcode_file, names.__next__
            )
        sendable = {o.destination: _sendable(o, facts, loaded) for o in outputs}
        report = _explanation(path, decision, outputs, sendable)
        print(json.dumps(report) if args.json else _explanation_text(report))
    return EXIT_FAILURE if failed else EXIT_OK


def _syntax_name(uid: str | None) -> str:
    from pydicom.uid import UID

    return config.KEEP if uid is None else (UID(uid).keyword or str(uid))


def _sendable(output: Any, facts: Any, loaded: config.Config) -> list[str]:
    """The syntaxes the running node would deliver `output` in, best first; empty: it would be quarantined.

    A directory writes the output as it is; the DICOM forwarder also offers the original and the uncompressed
    syntaxes it can convert to (its own `sendable_syntaxes`)."""
    from scp import forward

    destination = loaded.destinations[output.destination]
    if isinstance(destination, config.DirectoryDestination):
        accepted = destination.accept is None or output.transfer_syntax in destination.accept
        return [output.transfer_syntax] if accepted else []
    return forward.sendable_syntaxes(output.transfer_syntax, facts.transfer_syntax, destination.accept)


def _explanation(path: Path, decision: Any, outputs: Sequence[Any], sendable: dict[str, list[str]]) -> dict[str, Any]:
    """What explain reports for one file; the keys file, rule, transfer_syntax, destinations, reason first."""
    return {
        "file": str(path),
        "rule": decision.rule,
        "transfer_syntax": _syntax_name(decision.compress.syntax),
        "destinations": list(decision.destinations),
        "reason": decision.reason,
        "action": decision.action,
        "deliveries": [
            {
                "destination": output.destination,
                "transfer_syntax": _syntax_name(output.transfer_syntax),
                "pixels": "compressed" if output.compressed else "passed through",
                "why": output.detail,
                "deliverable": bool(sendable[output.destination]),
                "sent_as": [_syntax_name(uid) for uid in sendable[output.destination]],
            }
            for output in outputs
        ],
        "skipped": [{"rule": name, "reason": why} for name, why in decision.skipped],
    }


def _explanation_text(report: dict[str, Any]) -> str:
    lines = [
        f"{report['file']}:",
        f"  rule:      {report['rule']} ({report['action']})",
        f"  because:   {report['reason']}",
    ]
    lines += [f"  skipped:   {s['rule']}: {s['reason']}" for s in report["skipped"]]
    if report["action"] == "forward":
        lines.append(f"  target:    {report['transfer_syntax']}")
        for d in report["deliveries"]:
            if not d["deliverable"]:
                fate = "; NOT in its accept list: it will be quarantined"
            elif d["transfer_syntax"] not in d["sent_as"]:
                fate = f"; not in its accept list: the forwarder converts it to {' or '.join(d['sent_as'])}"
            else:
                fate = ""
            lines.append(f"  -> {d['destination']}: {d['transfer_syntax']}, {d['pixels']} ({d['why']}){fate}")
    return "\n".join(lines)
