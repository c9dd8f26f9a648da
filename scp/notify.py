"""The systemd notification protocol (sd_notify(3)) over a plain AF_UNIX datagram socket; no dependency.

Outside systemd (no $NOTIFY_SOCKET) every call does nothing and returns False.
"""

from __future__ import annotations

import logging
import os
import socket
import time

LOGGER = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send `KEY=value` lines to the service manager; return whether a manager was there to receive them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        LOGGER.warning("cannot notify the service manager at %s: %s", address.replace("\0", "@"), exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """A configuration reload begins; `ready()` ends it (sd_notify(3): MONOTONIC_USEC goes with RELOADING=1)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of `WatchdogSec=`), or None when the watchdog is off for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        return None
