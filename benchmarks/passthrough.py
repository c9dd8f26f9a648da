"""Baseline receiver: the least a pynetdicom storage SCP can do. Run: python -m benchmarks.passthrough DIR PORT AE.

It accepts every storage SOP class uncompressed, streams each dataset to a file (chunked receive, as the node
does), renames it into DIR and answers Success: no parsing, no compression, no forwarding, and no fsync unless
--fsync is given (then the file and the folder are fsynced before Success, the least a durable receiver does).
TCP_NODELAY is set on every connection, so the comparison with the node is about the node's work, not Nagle's.

With --all-syntaxes it serves as the archive of the HTJ2K and JPEG 2000 scenarios instead; it then uses the
event-driven reactors the node ran on until it had its own SCP (benchmarks/reactors.py): as an archive it is part
of the test bench, and pynetdicom's polling would take ~7.5% of a core per open association from the node on the
same two cores. As the baseline it stays plain pynetdicom.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from pydicom.uid import AllTransferSyntaxes as ALL_TRANSFER_SYNTAXES
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts

from benchmarks import reactors
from scp.spool import fsync_dir, fsync_file


def _store(event: Event, folder: Path, durable: bool) -> int:
    path = event.dataset_path
    if durable:
        fsync_file(path)
    os.replace(path, folder / f"{event.request.AffectedSOPInstanceUID}.dcm")
    if durable:
        fsync_dir(folder)
    return 0x0000


def _nodelay(event: Event) -> None:
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("ae_title")
    parser.add_argument("--max-pdu", type=int, default=262_144)
    parser.add_argument("--fsync", action="store_true", help="fsync file and folder before answering Success")
    parser.add_argument(
        "--all-syntaxes", action="store_true", help="accept every transfer syntax pydicom knows (an archive)"
    )
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    (args.folder / ".tmp").mkdir(exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(args.folder / ".tmp")
    ae = AE(ae_title=args.ae_title)
    ae.maximum_pdu_size = args.max_pdu
    ae.maximum_associations = 32
    if args.all_syntaxes:  # DCMTK 3.6.7's storescp cannot store HTJ2K: this serves as the archive instead
        reactors.install()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    else:
        ae.supported_contexts = AllStoragePresentationContexts
    handlers = [(evt.EVT_C_STORE, _store, [args.folder, args.fsync]), (evt.EVT_CONN_OPEN, _nodelay)]
    server = ae.start_server(("127.0.0.1", args.port), block=False, evt_handlers=handlers)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
