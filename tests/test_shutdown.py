"""
Graceful shutdown: sessions are told, get the grace period to answer, then
their connections close and every session ends exactly once.
"""

import time

import pytest_twisted
from conftest import USERS
from twisted.internet import defer

from pbrealms.client import ClientMind, connect
from pbrealms.tap import Options, makeService


class SilentMind(ClientMind):
    """
    A client that never answers the shutdown notice.
    """

    def remote_notifyShutdown(self, reason):
        self.onShutdown(reason)
        return defer.Deferred()


async def startServer(passwd, *args):
    options = Options()
    options.parseOptions(["--passwd", str(passwd), "--port", "tcp:0:interface=127.0.0.1", *args])
    server = makeService(options)
    server.privilegedStartService()
    server.startService()
    port = server.getServiceNamed("pb-listener").port.getHost().port
    registry = server.getServiceNamed("graceful-shutdown").registry
    return server, f"tcp:127.0.0.1:{port}", registry


@pytest_twisted.ensureDeferred
async def test_sessions_are_told_then_closed_exactly_once(reactor, passwd):
    server, endpoint, registry = await startServer(passwd, "--realm=clock", "--period=0.05")
    told: list[str] = []
    connections = [
        await connect(reactor, endpoint, user, USERS[user], ClientMind(onShutdown=told.append))
        for user in ("alice", "alice", "bob")
    ]
    closes = []
    for session in registry:
        session.onClose(lambda s=session: closes.append(s.id))
    assert len(registry) == 3

    started = time.monotonic()
    await server.stopService()
    assert time.monotonic() - started < 1.0  # every client answered at once
    assert told == ["the server is shutting down"] * 3
    assert len(registry) == 0
    assert sorted(closes) == sorted(set(closes)) and len(closes) == 3
    for conn in connections:
        await conn.disconnect()
    assert not server.getServiceNamed("pb-listener").port


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_answer_gets_the_grace_period(reactor, passwd, log):
    server, endpoint, registry = await startServer(passwd, "--shutdown-grace=0.3")
    told: list[str] = []
    conn = await connect(
        reactor, endpoint, "alice", USERS["alice"], SilentMind(onShutdown=told.append)
    )
    plain = await connect(reactor, endpoint, "bob", USERS["bob"])  # no mind: nothing to tell
    started = time.monotonic()
    await server.stopService()
    took = time.monotonic() - started
    assert 0.3 <= took < 1.3
    assert told == ["the server is shutting down"]
    assert len(registry) == 0
    await conn.disconnect()
    await plain.disconnect()
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_health_turns_off_when_stopping(passwd):
    server, _, _ = await startServer(passwd)
    assert server.listening
    await server.stopService()
    assert server.stopping and not server.listening
