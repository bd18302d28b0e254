"""
systemd's readiness protocol: a datagram to C{$NOTIFY_SOCKET}.

A few lines rather than a dependency: the PyPI C{sdnotify} package is
unmaintained, and the protocol is one C{sendto}.
"""

from __future__ import annotations

import os
import socket


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """
    Tell the service manager C{state} (e.g. C{"READY=1"}).

    @return: whether there was a C{$NOTIFY_SOCKET} to tell; without one
        (not started by systemd), nothing happens.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode("utf-8"), address)
    return True
