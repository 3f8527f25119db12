"""Telling a service manager (systemd's sd_notify protocol) what the supervisor is doing.

With ``$NOTIFY_SOCKET`` set, each call sends one datagram of ``KEY=value``
lines to it; without, nothing happens.  Plain sockets: no dependency, and a
manager that is gone never stops ltcp (errors are logged once at DEBUG).
"""

import logging
import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "stopping"]

log = logging.getLogger(__name__)


def notify(*fields):
    """Send ``fields`` (``"READY=1"``, ...) to ``$NOTIFY_SOCKET``; whether it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.debug("service manager notification %s not sent: %s", fields, exc)
        return False
    return True


def ready(status):
    """Serving (after start, or once a reload is over, whatever its outcome)."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading():
    """A reload has begun (systemd's Type=notify-reload wants the monotonic clock with it)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", "STATUS=reloading", f"MONOTONIC_USEC={now}")


def stopping(status):
    """Draining, before exit."""
    return notify("STOPPING=1", f"STATUS={status}")
