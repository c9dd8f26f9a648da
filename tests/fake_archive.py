"""A pynetdicom storage SCP in the test process that answers what the test says and counts what it sees."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from scp import syntaxes


@dataclass
class FakeArchive:
    """`answer(n)` gives the status of the n-th C-STORE (from 0); `delay` slows every C-STORE down."""

    answer: Callable[[int], int] = lambda n: 0x0000
    transfer_syntaxes: Sequence[str] = syntaxes.ACCEPTED
    sop_classes: Sequence[str] | None = None
    delay: float = 0.0
    require_calling_aet: Sequence[str] = ()
    abort_on: Collection[str] = ()
    """SOP Instance UIDs on which the archive aborts the association instead of answering."""
    freeze_after_pdus: int = 0
    """Stop reading the connection after this many PDUs (0: never) until `thaw` is set: a peer gone silent."""
    frozen: threading.Event = field(default_factory=threading.Event)
    thaw: threading.Event = field(default_factory=threading.Event)
    _pdus: int = 0
    received: list[tuple[str, UID]] = field(default_factory=list)
    associations: int = 0
    max_concurrent: int = 0
    _open: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadedAssociationServer | None = None

    def _store(self, event: Event) -> int:
        with self._lock:
            index = len(self.received)
            self.received.append((str(event.request.AffectedSOPInstanceUID), UID(event.context.transfer_syntax)))
        if self.received[index][0] in self.abort_on:
            event.assoc.abort()
            return 0xC000  # never reaches the sender
        if self.delay:
            time.sleep(self.delay)
        return self.answer(index)

    def _pdu_received(self, event: Event) -> None:
        self._pdus += 1  # only the reactor thread of the one association counts
        if self._pdus == self.freeze_after_pdus:
            self.frozen.set()
            self.thaw.wait(60)  # the reactor reads nothing more meanwhile

    def _accepted(self, event: Event) -> None:
        with self._lock:
            self.associations += 1
            self._open += 1
            self.max_concurrent = max(self.max_concurrent, self._open)

    def _ended(self, event: Event) -> None:
        with self._lock:
            self._open -= 1

    @property
    def concurrent(self) -> int:
        """Associations open right now."""
        with self._lock:
            return self._open

    def abort_open(self) -> None:
        """Abort every association open right now, as an archive restarting would."""
        for assoc in self._server.active_associations if self._server is not None else []:
            assoc.abort()

    def uids(self) -> set[str]:
        with self._lock:
            return {uid for uid, _ in self.received}

    @contextmanager
    def serving(self) -> Iterator[int]:
        """Listen on a free loopback port; yields the port."""
        ae = AE(ae_title="ARCHIVE")
        ae.maximum_associations = 16
        ae.require_calling_aet = list(self.require_calling_aet)
        wanted = set(self.sop_classes) if self.sop_classes is not None else None
        for context in AllStoragePresentationContexts:
            if wanted is None or context.abstract_syntax in wanted:
                ae.add_supported_context(context.abstract_syntax, list(self.transfer_syntaxes))
        handlers = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
            *([(evt.EVT_PDU_RECV, self._pdu_received)] if self.freeze_after_pdus else []),
        ]
        server = self._server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        try:
            yield int(server.server_address[1])
        finally:
            server.shutdown()
