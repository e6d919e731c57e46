"""systemd's readiness protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``.

The agent says ``READY=1`` once it takes jobs and ``STOPPING=1`` when SIGTERM arrives.
Without ``$NOTIFY_SOCKET`` (not started by systemd) nothing is sent.
"""

from __future__ import annotations

import os
import socket

from agent.core.logs import get_logger

log = get_logger("sdnotify")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True if there was a socket to send it to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a datagram to a local socket: never waits
            sock.connect(address)
            sock.send(state.encode())
    except OSError as exc:
        log.warning("could not notify the service manager", state=state, error=str(exc))
        return False
    return True
