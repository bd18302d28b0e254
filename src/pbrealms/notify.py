"""
systemd's readiness protocol: a datagram to C{$NOTIFY_SOCKET}.

A few lines rather than a dependency: the PyPI C{sdnotify} package is
unmaintained, and the protocol is one C{sendto}.
"""

from __future__ import annotations

import os
import socket

from twisted.logger import Logger

_log = Logger()


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """
    Tell the service manager C{state} (e.g. C{"READY=1"}).

    @return: whether it was told: without C{$NOTIFY_SOCKET} (not started
        by systemd) nothing happens; a socket that cannot be reached is
        logged as a warning.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address  # "@": abstract
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), target)
    except OSError as e:
        # The service manager is gone or misconfigured: serving matters more.
        _log.warn(
            "cannot tell the service manager {state} at {address}: {error}",
            state=state,
            address=address,
            error=e.strerror or str(e),
        )
        return False
    return True
