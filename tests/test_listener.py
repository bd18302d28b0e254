"""
The listener, Twisted's endpoint service: a port that cannot be listened on
raises L{ListenFailed} with the one line for a person, and only twistd's
entry point turns it into an exit; a listen that fails later is one line in
the log; a stop cancels a listen still pending, and stops a port.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.application import internet
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from pbrealms.service import Listener, ListenFailed
from pbrealms.servicetree import TwistdService


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


@implementer(IStreamServerEndpoint)
class PendingEndpoint:
    """
    An endpoint whose listen is answered by the test, and which counts the
    cancellations of it.
    """

    def __init__(self) -> None:
        self.cancelled = 0
        self.listening: defer.Deferred | None = None

    def listen(self, factory: protocol.Factory) -> defer.Deferred:
        def cancel(d: defer.Deferred) -> None:
            self.cancelled += 1

        self.listening = defer.Deferred(cancel)
        return self.listening


def test_is_twisteds_endpoint_service():
    assert isinstance(listenerOn(0), internet.StreamServerEndpointService)


@pytest_twisted.ensureDeferred
async def test_stopping_cancels_a_pending_listen(log):
    endpoint = PendingEndpoint()
    listener = Listener(endpoint, protocol.Factory(), "pending:")
    listener.privilegedStartService()
    listener.startService()
    assert listener.port is None
    stopped = listener.stopService()
    assert endpoint.cancelled == 1
    await stopped
    assert not listener.running
    assert listener.port is None
    # A cancelled listen is no error (the log fixture fails on one).
    assert not [m for m in log.messages() if "cannot listen" in m]


def test_a_listen_that_fails_later_is_one_line_in_the_log(log):
    endpoint = PendingEndpoint()
    listener = Listener(endpoint, protocol.Factory(), "pending:", label="metrics", option="--x")
    listener.privilegedStartService()
    log.errorsExpected = True
    endpoint.listening.errback(CannotListenError("", 1, OSError(98, "Address already in use")))
    assert [e["log_format"] for e in log.errors()] == [
        "{label}: cannot listen on {where} ({option}): {error}"
    ]
    assert log.messages()[-1] == (
        "metrics: cannot listen on pending: (--x): address already in use"
    )
    assert listener.port is None
    listener.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_stops_the_port():
    listener = listenerOn(0)
    listener.privilegedStartService()
    listener.startService()
    port = listener.port
    assert port is not None
    number = port.getHost().port
    await listener.stopService()
    assert listener.port is None
    # The port is free again.
    held = socket.socket()
    with held:
        held.bind(("127.0.0.1", number))
