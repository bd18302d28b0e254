"""
The listener: a port that cannot be listened on raises L{ListenFailed} with
the one line for a person, and only twistd's entry point turns it into an
exit.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import endpoints, protocol, reactor

from pbrealms.service import Listener, ListenFailed
from pbrealms.tap import TwistdService


def heldPort() -> tuple[socket.socket, int]:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held, held.getsockname()[1]


def listenerOn(port: int) -> Listener:
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    return Listener(endpoint, protocol.Factory(), f"tcp:{port}", option="--port")


def test_a_port_in_use_raises_ListenFailed_with_one_line():
    held, port = heldPort()
    with held:
        with pytest.raises(ListenFailed) as failed:
            listenerOn(port).privilegedStartService()
    assert str(failed.value) == f"cannot listen on tcp:{port} (--port): address already in use"


def test_twistd_service_exits_1_with_the_line_on_stderr(capfd):
    held, port = heldPort()
    server = TwistdService()
    listenerOn(port).setServiceParent(server)
    with held:
        with pytest.raises(SystemExit) as exited:
            server.privilegedStartService()
    assert exited.value.code == 1
    assert capfd.readouterr().err == (
        f"twistd pbrealms: error: cannot listen on tcp:{port} (--port): address already in use\n"
    )
