"""
Graceful shutdown: sessions are told, get the grace period to answer, then
their connections close and every session ends exactly once.
"""

import time

import pytest
import pytest_twisted
from conftest import USERS
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, endpoints
from twisted.spread import pb

from pbrealms.client import ClientMind, connect
from pbrealms.errors import ShuttingDown, localize
from pbrealms.tap import Options, makeService


class SilentMind(ClientMind):
    """
    A client that never answers the shutdown notice.
    """

    def remote_notifyShutdown(self, reason):
        self.onShutdown(reason)
        return defer.Deferred()


class Running:
    def __init__(self, server) -> None:
        self.server = server
        self.registry = server.getServiceNamed("graceful-shutdown").registry
        port = server.getServiceNamed("pb-listener").port.getHost().port
        self.endpoint = f"tcp:127.0.0.1:{port}"


@pytest.fixture
def start(reactor, passwd):
    servers = []

    def start(*args: str) -> Running:
        options = Options()
        options.parseOptions(
            ["--passwd", str(passwd), "--port", "tcp:0:interface=127.0.0.1", *args]
        )
        server = makeService(options)
        server.privilegedStartService()
        server.startService()
        servers.append(server)
        return Running(server)

    yield start
    for server in servers:
        if server.running:
            pytest_twisted.blockon(server.stopService())


def closes(log) -> list[str]:
    return [m for m in log.messages() if " disconnected from " in m]


@pytest_twisted.ensureDeferred
async def test_sessions_are_told_then_closed_exactly_once(reactor, start, log):
    running = start("--realm=clock", "--period=0.05")
    told: list[str] = []
    connections = [
        await connect(
            reactor, running.endpoint, user, USERS[user], ClientMind(onShutdown=told.append)
        )
        for user in ("alice", "alice", "bob")
    ]
    ids = sorted(s.id for s in running.registry)
    assert len(ids) == 3

    started = time.monotonic()
    await running.server.stopService()
    assert time.monotonic() - started < 1.0  # every client answered at once
    assert told == ["the server is shutting down"] * 3
    assert len(running.registry) == 0
    # One logout line per session, and the clock of each has stopped (the
    # autouse fixture fails the test on a timer left behind).
    assert sorted(int(m.split("session ")[1].split(",")[0]) for m in closes(log)) == ids
    for conn in connections:
        await conn.disconnect()
    assert not running.server.getServiceNamed("pb-listener").port


@pytest.mark.timing
@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_answer_gets_the_grace_period(reactor, start, log):
    running = start("--shutdown-grace=0.3")
    told: list[str] = []
    conn = await connect(
        reactor, running.endpoint, "alice", USERS["alice"], SilentMind(onShutdown=told.append)
    )
    plain = await connect(reactor, running.endpoint, "bob", USERS["bob"])  # nothing to tell
    started = time.monotonic()
    await running.server.stopService()
    took = time.monotonic() - started
    assert 0.3 <= took < 1.3
    assert told == ["the server is shutting down"]
    assert len(running.registry) == 0
    assert len(closes(log)) == 2
    await conn.disconnect()
    await plain.disconnect()
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_no_login_is_admitted_during_the_grace_period(reactor, start, log):
    running = start("--shutdown-grace=0.5")
    holder = await connect(reactor, running.endpoint, "alice", USERS["alice"], SilentMind())
    # A connection that is open before the shutdown, and logs in during it.
    factory = pb.PBClientFactory()
    await endpoints.clientFromString(reactor, running.endpoint).connect(factory)
    stopping = running.server.stopService()
    with pytest.raises(ShuttingDown):
        await factory.login(UsernamePassword(b"bob", b"builder")).addErrback(localize)
    await stopping
    assert running.registry.countOf("bob") == 0
    await holder.disconnect()
    factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_health_turns_off_when_stopping(start):
    running = start()
    assert running.server.listening
    await running.server.stopService()
    assert running.server.stopping and not running.server.listening
