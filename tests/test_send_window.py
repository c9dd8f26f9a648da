"""The send window: pynetdicom's PDU queue with back-pressure, so sending a huge file keeps memory flat."""

from __future__ import annotations

import threading
import time

from pynetdicom.pdu_primitives import A_ABORT, P_DATA

from scp.forward import SendWindow


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


def test_a_window_nobody_drains_stops_waiting_after_its_patience() -> None:
    window = SendWindow(limit=2, patience=0.2)
    start = time.monotonic()
    for _ in range(10):
        window.put(P_DATA())
    # one wait of `patience`, then never again: a dead reactor must not hang the sending thread per PDU
    assert time.monotonic() - start < 1.5
    assert window.qsize() == 10


def test_abort_and_release_never_wait() -> None:
    window = SendWindow(limit=1, patience=30)
    window.put(P_DATA())
    start = time.monotonic()
    window.put(A_ABORT())
    assert time.monotonic() - start < 1
    assert window.qsize() == 2
