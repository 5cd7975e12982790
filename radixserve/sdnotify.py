"""systemd's sd_notify protocol with the standard library (no libsystemd).

Under a `Type=notify` unit systemd sets $NOTIFY_SOCKET (a path, or an abstract socket name starting with
'@'); the service sends newline-separated `KEY=VALUE` states as one datagram. Outside systemd every call
is a no-op returning False, so callers need no checks of their own.

    sdnotify.ready()                   # once the model is loaded and the server answers
    interval = sdnotify.watchdog_interval()
    if interval: ping sdnotify.watchdog() every interval / 2 while the scheduler loop is alive
    sdnotify.stopping()                # on SIGTERM, before draining
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to $NOTIFY_SOCKET; True if it was sent."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        address = "\0" + path[1:]  # Linux abstract namespace
    elif path.startswith("/"):
        address = path
    else:  # unset, or a transport this module does not speak (vsock:)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """The service is up: systemd finishes `start` (and starts the watchdog) on this."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    """A free-form line shown by `systemctl status`."""
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    """Keep-alive ping: must arrive within WatchdogSec= or systemd kills and restarts the service."""
    return notify("WATCHDOG=1")


def stopping() -> bool:
    """The service is shutting down (draining)."""
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """WatchdogSec= in seconds, or None when no watchdog is set for this process; ping at half of it."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):  # meant for another process (e.g. our parent)
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
