"""The send window: pynetdicom's PDU queue with back-pressure, so sending a huge file keeps memory flat."""

from __future__ import annotations

import threading
import time

import pytest
from pynetdicom.pdu_primitives import A_ABORT, P_DATA

from scp.forward import SendStalled, SendWindow


def test_the_sender_waits_while_the_window_is_full() -> None:
    window = SendWindow(limit=4, patience=10)
    deepest = 0
    sent = threading.Thread(target=lambda: [window.put(P_DATA()) for _ in range(40)])
    sent.start()
    received = 0
    deadline = time.monotonic() + 10
    while received < 40 and time.monotonic() < deadline:
        deepest = max(deepest, window.qsize())
        if not window.empty():
            window.get(False)  # the way pynetdicom's reactor takes PDUs
            received += 1
        time.sleep(0.001)
    sent.join(5)
    assert received == 40
    assert deepest <= 4


def test_a_window_nobody_drains_raises_after_its_patience() -> None:
    """A peer that stopped reading must not hang the sending thread, nor let the file pile up in memory."""
    window = SendWindow(limit=2, patience=0.2)
    window.put(P_DATA())
    window.put(P_DATA())
    start = time.monotonic()
    with pytest.raises(SendStalled):
        window.put(P_DATA())
    assert 0.15 < time.monotonic() - start < 1.5
    assert window.qsize() == 2


def test_abort_and_release_never_wait() -> None:
    window = SendWindow(limit=1, patience=30)
    window.put(P_DATA())
    start = time.monotonic()
    window.put(A_ABORT())
    assert time.monotonic() - start < 1
    assert window.qsize() == 2


def test_every_put_rings_the_reactor() -> None:
    """The event-driven DUL reactor sleeps until a PDU is queued: the window must wake it for each one."""
    rings = []
    window = SendWindow(limit=4, patience=1, wake=lambda: rings.append(1))
    window.put(P_DATA())
    window.put(A_ABORT())
    assert len(rings) == 2
