"""The event-driven reactors: idle associations sleep, yet answer, end and time out as promptly as pynetdicom's."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_P_ABORT, A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from benchmarks import reactors
from tests.peers import free_port, wait_for

IDLE_PROBE_S = 1.0


@dataclass
class Server:
    port: int
    ae: AE
    server: ThreadedAssociationServer
    aborted: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def server() -> Iterator[Server]:
    reactors.install()
    ae = AE("SERVER")
    ae.add_supported_context(Verification)
    port = free_port()
    aborted, released = threading.Event(), threading.Event()
    handlers = [(evt.EVT_ABORTED, lambda _: aborted.set()), (evt.EVT_RELEASED, lambda _: released.set())]
    running = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    assert running is not None
    yield Server(port, ae, running, aborted, released)
    running.shutdown()


def _associate(port: int) -> Association:
    ae = AE("CLIENT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SERVER")
    assert assoc.is_established
    return assoc


def _threads_of(assoc: Association) -> list[threading.Thread]:
    return [assoc, assoc.dul]


def test_associations_use_the_event_driven_reactors(server: Server) -> None:
    assoc = _associate(server.port)
    try:
        assert isinstance(assoc, reactors.EventDrivenAssociation)
        assert isinstance(assoc.dul, reactors.EventDrivenDUL)
        wait_for(lambda: server.server.active_associations, 5, "the accepted association")
        accepted = server.server.active_associations[0]
        assert isinstance(accepted, reactors.EventDrivenAssociation)
    finally:
        assoc.release()


def test_idle_associations_cost_almost_no_cpu(server: Server) -> None:
    """Both ends of an idle association live in this process: four reactor threads. pynetdicom's own poll
    every millisecond (~0.15 s of CPU per second here); ours wake every IDLE_CHECK."""
    assoc = _associate(server.port)
    try:
        time.sleep(0.2)
        start = time.process_time()
        time.sleep(IDLE_PROBE_S)
        spent = time.process_time() - start
        assert spent < 0.03 * IDLE_PROBE_S, f"{spent:.3f} s of CPU in {IDLE_PROBE_S} s of idling"
        assert assoc.send_c_echo().Status == 0x0000  # and it still answers after sleeping
    finally:
        assoc.release()


def test_a_pause_request_wakes_the_reactor(server: Server) -> None:
    """Each C-ECHO first pauses the requestor's reactor, which is asleep after a moment of quiet; were it left
    sleeping until its next check, each echo would wait for up to IDLE_CHECK."""
    assoc = _associate(server.port)
    waited = 0.0
    statuses = []
    try:
        for _ in range(20):
            time.sleep(reactors.IDLE_CHECK / 5)  # the reactor goes back to sleep
            start = time.monotonic()
            statuses.append(assoc.send_c_echo().Status)
            waited += time.monotonic() - start
    finally:
        assoc.release()
    assert statuses == [0x0000] * 20
    assert waited < 20 * reactors.IDLE_CHECK / 5, f"20 echoes took {waited:.2f} s"


def test_release_and_abort_by_the_peer_end_the_association_at_once(server: Server) -> None:
    released = _associate(server.port)
    released.release()
    assert server.released.wait(2)
    for thread in _threads_of(released):
        thread.join(2)
        assert not thread.is_alive()

    aborted = _associate(server.port)
    aborted.abort()
    assert server.aborted.wait(2)


def test_the_network_timeout_still_ends_an_idle_association(server: Server) -> None:
    server.ae.network_timeout = 0.3
    assoc = _associate(server.port)
    wait_for(lambda: assoc.is_aborted or not assoc.is_established, 5, "the acceptor to abort on its network timeout")
    assert server.aborted.wait(2)


def test_ended_associations_leave_no_file_descriptors_behind(server: Server) -> None:
    """Each DUL reactor owns a pair of wake-up sockets; they close when its thread ends."""
    _associate(server.port).release()  # whatever pynetdicom opens once is open before counting
    before = len(os.listdir("/proc/self/fd"))
    ended = []  # kept referenced: garbage collection must not be what closes them
    for _ in range(20):
        assoc = _associate(server.port)
        assoc.release()
        for thread in _threads_of(assoc):
            thread.join(2)
        ended.append(assoc)
    wait_for(lambda: not server.server.active_associations, 5, "the server's associations to end")
    time.sleep(0.2)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


def test_a_late_reactor_does_not_steal_the_response_its_sender_waits_for(server: Server) -> None:
    """pynetdicom's race (its issues #435, #875): the sender releases the paused reactor, and before that thread
    has run on it pauses it again for its next request, sees `_is_paused` still True and sends. The reactor,
    running on late, must not take that request's response off the queue: the sender would wait for its DIMSE
    timeout and abort. Here the reactor thread is made late on purpose, then runs on just as a response lands."""
    ae = AE("CLIENT")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SERVER")
    checkpoint = assoc._reactor_checkpoint
    on_time = checkpoint.wait

    def late(timeout: float | None = None) -> bool:
        passed = on_time(timeout)
        if threading.current_thread() is assoc:
            deadline = time.monotonic() + 0.2
            while checkpoint.is_set() and time.monotonic() < deadline:
                pass  # late: the sender pauses the reactor again for its next request meanwhile
            while not checkpoint.is_set() and assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
                pass  # and its response lands
        return passed

    checkpoint.wait = late  # type: ignore[method-assign]
    statuses = []
    try:
        for _ in range(10):
            if not assoc.is_established:
                break
            statuses.append(assoc.send_c_echo().get("Status"))
    finally:
        if assoc.is_established:
            assoc.release()
    assert statuses == [0x0000] * 10, f"{len(statuses)} echoes answered {statuses}"


def _closing_association(port: int) -> Association:
    """An association whose DUL we put in Sta13 (our abort is closing the connection), as the user sees it still
    established."""
    ae = AE("CLIENT")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="SERVER")
    assert assoc.is_established
    time.sleep(0.1)  # the DUL thread sleeps: it takes the state below together with what comes next
    assoc.dul.state_machine.current_state = "Sta13"
    return assoc


def test_a_release_arriving_as_the_connection_closes_ends_at_once(server: Server) -> None:
    """Evt11 (a local A-RELEASE request) in Sta13 made pynetdicom's DUL thread die with InvalidEventError while
    the releasing thread waited for its ACSE timeout."""
    for _ in range(5):
        assoc = _closing_association(server.port)
        start = time.monotonic()
        assoc.release()
        assert time.monotonic() - start < 2, "the release waited for the ACSE timeout"
        assert assoc.is_aborted and not assoc.is_established
        assoc.dul.join(2)
        assert not assoc.dul.is_alive()


def test_a_request_after_the_dul_has_ended_is_answered_at_once(server: Server) -> None:
    """Queued for a DUL thread that has ended, a request would wait for nobody; its sender is told the
    association is gone instead."""
    assoc = _closing_association(server.port)
    dul = assoc.dul
    assert isinstance(dul, reactors.EventDrivenDUL)
    assert dul.finished.wait(2), "the DUL did not end after closing the connection"
    wait_for(lambda: not assoc.is_established, 2, "the association to notice")
    dul.send_pdu(A_RELEASE())
    assert isinstance(dul.receive_pdu(wait=True, timeout=2), A_P_ABORT)


def test_a_peer_abort_just_before_a_request_does_not_wait_for_the_dimse_timeout(server: Server) -> None:
    """The peer aborts after the sender saw the association established and before it paused the reactor. The
    reactor, running on, took the (None, None) pynetdicom queues on an abort to wake a sender waiting for its
    response, and the sender then waited the whole DIMSE timeout (a destination's `timeout` per such abort). Here
    the abort lands in that gap and the reactor reads the DIMSE queue only once the wake-up is in it."""
    ae = AE("CLIENT")
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", server.port, ae_title="SERVER")
    assert assoc.is_established
    wait_for(lambda: server.server.active_associations, 5, "the accepted association")
    accepted = server.server.active_associations[0]
    messages = assoc.dimse.msg_queue
    take, pause = messages.get, assoc._reactor_checkpoint.clear
    aborting = threading.Event()

    def late_get(block: bool = True, timeout: float | None = None) -> Any:
        if aborting.is_set() and threading.current_thread() is assoc:
            wait_for(lambda: not messages.empty(), 5, "the abort's wake-up in the DIMSE queue")
        return take(block, timeout)

    def aborted_first() -> None:
        if threading.current_thread() is not assoc:  # the sender, past its is_established check
            aborting.set()
            accepted.abort()
            assoc.join(5)
            assert not assoc.is_alive(), "the reactor did not end on the abort"
        pause()

    messages.get = late_get  # type: ignore[method-assign]
    assoc._reactor_checkpoint.clear = aborted_first  # type: ignore[method-assign]
    start = time.monotonic()
    response = assoc.send_c_echo()
    waited = time.monotonic() - start
    assert "Status" not in response and assoc.is_aborted
    assert waited < 2, f"the request waited {waited:.1f} s for a response after the abort"


@pytest.fixture
def descriptors_from_1024_on() -> Iterator[None]:
    """Fill the descriptors below 1100, so that every socket opened afterwards gets one above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit of open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for filler in fillers:
            os.close(filler)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_associations_work_on_descriptors_from_1024_on(descriptors_from_1024_on: None, server: Server) -> None:
    """select() fails on a descriptor of 1024 or more, and pynetdicom took that for a closed connection."""
    assoc = _associate(server.port)
    try:
        transport = assoc.dul.socket
        assert transport is not None and transport.socket is not None
        assert transport.socket.fileno() >= 1024
        assert [assoc.send_c_echo().Status for _ in range(3)] == [0x0000] * 3
        start = time.process_time()
        time.sleep(IDLE_PROBE_S)
        assert time.process_time() - start < 0.1 * IDLE_PROBE_S, "an idle reactor spins"
    finally:
        assoc.release()
    assert server.released.wait(2)
