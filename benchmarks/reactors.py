"""Event-driven reactors for pynetdicom's associations.

pynetdicom runs two threads per association that poll: the DUL reactor sleeps 1 ms whenever it found nothing to
do, the association reactor sleeps 1 ms on every turn. On a busy node that is ~2,000 wake-ups a second per
association, each taking the GIL from the threads doing real work (receiving, forwarding, spooling): an idle
association costs ~7.5% of a core, and the node spent more of its GIL time polling than working.

Here both reactors sleep until there is something to do: the DUL reactor in poll() on its socket and a wake-up
socket rung when a primitive is queued for sending; the association reactor on an Event set when a DIMSE message
or a DUL indication (release, abort) is queued for it, or when another thread wants to pause it. Both still wake
every IDLE_CHECK seconds to look at their timers and kill flags, as the originals do every millisecond.

`install()` makes every association created afterwards use them, and makes pynetdicom's check for incoming data
(`AssociationSocket.ready`) use poll() instead of select(): select() fails on a descriptor of 1024 or more, which
pynetdicom takes for a closed connection. The loops mirror pynetdicom 3.0's
(DULServiceProvider.run_reactor, Association._run_reactor) with only the sleeping changed; pyproject pins
pynetdicom to 3.0.x so that they cannot drift apart unnoticed.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import ae as ae_module
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket

from scp.pdu import readable

_FROM_LOCAL_PRIMITIVES = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
"""State machine events that stand for a primitive the local user queued (PS3.8 9.2, DULServiceProvider's
_process_recv_primitive); the state machine's action takes the primitive off the queue."""

IDLE_CHECK = 0.05
"""Seconds an idle reactor sleeps at most before it looks at its timers and kill flag again."""


class WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that rings `wake` after every put, so that its reader need not poll."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: object, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


class _Checkpoint(threading.Event):
    """The association reactor's pause checkpoint: clearing it (a pause request) wakes the reactor so that it
    reaches the checkpoint at once instead of at its next turn."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def clear(self) -> None:
        super().clear()
        self._wake()


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL provider, sleeping in poll() on its socket and a wake-up socket instead of polling."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._bell, self._bell_rope = socket.socketpair()
        self._bell.setblocking(False)
        self._bell_rope.setblocking(False)
        self.to_provider_queue = WakingQueue(self.wake)
        self.finished = threading.Event()
        """Set when the reactor has ended: nothing queued for sending after that will ever be sent."""
        self._finishing = threading.Lock()

    def wake(self) -> None:
        """Wake the reactor if it sleeps (safe from any thread, and after the reactor has ended)."""
        with contextlib.suppress(OSError):  # BlockingIOError: rung already; closed: the reactor has ended
            self._bell_rope.send(b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def _sleep_until_work(self) -> None:
        """Sleep until the peer sends data, a primitive is queued, or IDLE_CHECK (or the ARTIM timer) runs out."""
        timeout = max(0.001, min(IDLE_CHECK, self.artim_timer.remaining))
        poller = select.poll()  # not select(): it fails on descriptors from 1024 on
        poller.register(self._bell, select.POLLIN)
        transport = self.socket.socket if self.socket is not None else None
        with contextlib.suppress(OSError, ValueError):  # the socket closed under us: the next turn sees it
            if transport is not None and transport.fileno() >= 0:
                poller.register(transport, select.POLLIN)
            poller.poll(timeout * 1000)
        with contextlib.suppress(BlockingIOError):
            while self._bell.recv(4096):
                pass

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive for sending; once the reactor has ended, tell the sender the association is gone
        instead (pynetdicom would queue it for nobody, and a release would wait for its ACSE timeout)."""
        with self._finishing:
            if not self.finished.is_set():
                super().send_pdu(primitive)
                return
        self._tell_gone()

    def run_reactor(self) -> None:
        try:
            self._run_reactor()
        finally:
            with self._finishing:
                self.finished.set()
                unsent = not self.to_provider_queue.empty()
            if unsent:
                self._tell_gone()
            if self.assoc.is_acceptor and self.assoc.requestor.primitive is None:
                # The connection ended before its A-ASSOCIATE-RQ (a port probe): pynetdicom's association thread
                # waits for one until acse_timeout, holding a slot of max_associations; None is what it gets when
                # that wait times out, and it then closes at once.
                self.to_user_queue.put(None)  # type: ignore[arg-type]  # what pynetdicom's timed-out wait gives
            self._bell.close()
            self._bell_rope.close()
            if isinstance(self.assoc, EventDrivenAssociation):
                self.assoc.wake()  # so that it ends now, not at its next check

    def _tell_gone(self) -> None:
        gone = A_P_ABORT()
        gone.provider_reason = 0x00
        self.to_user_queue.put(gone)

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's DULServiceProvider.run_reactor, sleeping in _sleep_until_work."""
        self._idle_timer.start()
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._sleep_until_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # either encode and send one primitive or receive and decode one PDU per turn
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                self._abort_at_once(exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            try:
                self.state_machine.do_action(event)
            except InvalidEventError as exc:
                self._drop_late_primitive(event, exc)
            sleep = False

    def _drop_late_primitive(self, event: str, exc: InvalidEventError) -> None:
        """A local primitive the state can no longer take, such as a release requested while our abort is
        closing the connection (Evt11 in Sta13). pynetdicom lets the exception end this thread, and the thread
        that asked then waits for its ACSE timeout. Here the primitive is dropped and its sender told that the
        association is gone (an A-P-ABORT indication), while the state machine finishes closing."""
        if event not in _FROM_LOCAL_PRIMITIVES:
            raise exc
        dul_module.LOGGER.info("%s: the association has ended, dropping the request", exc)
        with contextlib.suppress(queue.Empty):
            self.to_provider_queue.get(block=False)
        self._tell_gone()

    def _abort_at_once(self, exc: Exception) -> None:
        """As pynetdicom does on an error in its reactor: send an A-ABORT bypassing the state machine, and stop
        both reactors."""
        dul_module.LOGGER.error("Exception in DUL.run(), aborting association")
        dul_module.LOGGER.exception(exc)
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        if self.socket is not None:
            self.socket.send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class EventDrivenAssociation(Association):
    """pynetdicom's Association, whose reactor sleeps on an Event instead of polling every millisecond."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._wake = threading.Event()
        self._reactor_checkpoint = _Checkpoint(self._wake.set)
        self._reactor_checkpoint.set()
        self.dimse.msg_queue = WakingQueue(self._wake.set)
        self.dul.to_user_queue = WakingQueue(self._wake.set)

    def wake(self) -> None:
        """Wake the reactor to look at its queues and its DUL now."""
        self._wake.set()

    def kill(self) -> None:
        self._kill = True
        self._wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's Association._run_reactor, sleeping on `_wake` instead of 1 ms on every turn."""
        self._is_paused = False
        busy = False
        while not self._kill:
            if not busy:
                self._wake.wait(IDLE_CHECK)
            self._wake.clear()  # before looking: whatever is queued from now on rings again

            # another thread about to send DIMSE or ACSE messages itself pauses the reactor here
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():
                # Paused again before this thread ran on: the sender saw _is_paused still True and is already
                # waiting for its response, which get_msg would steal (pynetdicom's race: its send_* then wait
                # for the DIMSE timeout, "Received unexpected ... service message"). Go round and wait.
                continue

            context_id, msg = self._next_message()
            busy = msg is not None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self._ended():
                return

    def _serve_request(self, msg: Any, context_id: int) -> None:
        """pynetdicom serves a request by the service of the SOP class it names. A C-STORE naming a class that is
        not a storage class got no answer (the association was aborted), or a C-ECHO response for Verification.
        Here an accepted C-STORE is served by the storage service whatever class it names, whose handler answers
        one naming another class than its presentation context's with 0x0122 (SOP class not supported)."""
        context = self._accepted_cx.get(context_id)
        named = str(getattr(msg, "AffectedSOPClassUID", None) or "")
        storage = issubclass(uid_to_service_class(named), StorageServiceClass)
        if not isinstance(msg, C_STORE) or not msg.is_valid_request or context is None or storage or self._sent_release:
            super()._serve_request(msg, context_id)
            return
        self.dimse.cancel_req = {}
        self._is_paused = True  # as pynetdicom: in case the handler sends a message itself
        try:
            StorageServiceClass(self).SCP(msg, context)
        except Exception as exc:  # as pynetdicom: a failing service aborts the association
            association_module.LOGGER.exception(exc)
            self.abort()
            return
        self._is_paused = False
        self.dimse.cancel_req = {}

    def _next_message(self) -> tuple[int | None, Any]:
        """The next DIMSE message to serve, as pynetdicom's get_msg(block=False) gives it, except that the
        (None, None) a peer's abort or a closed connection queues to wake a sender waiting for its response is
        left there: taken by this thread while a sender was about to pause it, that sender then waited for the
        whole DIMSE timeout (the end of the association is seen by `_ended` anyway)."""
        messages = self.dimse.msg_queue
        with messages.mutex:
            if not messages.queue or messages.queue[0] == (None, None):
                return None, None
        try:
            return cast(tuple[int, Any], messages.get_nowait())
        except queue.Empty:  # a sender pausing this thread took it in between
            return None, None

    def _ended(self) -> bool:
        """pynetdicom's end-of-turn checks: release or abort by the peer, a dead DUL, the network timeout."""
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            association_module.LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            message = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                message += " (A-P-ABORT)"
            association_module.LOGGER.info(message)
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        if cast(EventDrivenDUL, self.dul).finished.is_set() or not self.dul.is_alive():
            self.kill()
            return True
        if self.dul.idle_timer_expired():
            association_module.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return True
        return False


def _ready(transport: AssociationSocket) -> bool:
    """pynetdicom 3.0's AssociationSocket.ready, asking poll() instead of select()."""
    if transport.socket is None or transport._is_connected is False:
        return False
    try:
        return readable(transport.socket)
    except (OSError, ValueError):  # Evt17: transport connection closed
        transport.event_queue.put("Evt17")
        return False


def install() -> None:
    """Make every association created from now on (requested or accepted) use the event-driven reactors, and
    every association socket check for data with poll()."""
    association_module.DULServiceProvider = EventDrivenDUL  # type: ignore[misc]
    association_module.Association = EventDrivenAssociation  # type: ignore[misc]  # accepted: transport imports it
    ae_module.Association = EventDrivenAssociation  # type: ignore[misc]  # requested
    AssociationSocket.ready = property(_ready)  # type: ignore[method-assign,assignment]
