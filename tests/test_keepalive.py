"""
Liveness: the keepalive ping, with task.Clock and over real loopback TCP, and
TCP keepalive on every accepted connection.
"""

from __future__ import annotations

import gc
import socket
import weakref

import pytest_twisted
from conftest import counted, disconnection, ending
from test_when_full import Events, silence
from twisted.internet import defer, task

from pbrealms.keepalive import Keepalive
from pbrealms.sessions import SessionRegistry


class FakeConnection:
    """
    A connection whose answers to pings the test gives.
    """

    def __init__(self) -> None:
        self.pings: list[defer.Deferred] = []
        self.drops = 0

    @property
    def connected(self) -> bool:
        return not self.drops

    def ping(self, timeout: float | None = None) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.pings.append(d)
        return d

    def drop(self) -> None:
        self.drops += 1

    def answer(self) -> None:
        for d in self.pings:
            if not d.called:
                d.callback(True)


MIND = object()


def loggedIn(registry: SessionRegistry, user: str, connection, mind=MIND):
    session = registry.open(user, f"{user}-peer", mind, connection)
    registry.activate(session)
    return session


def test_a_silent_connection_is_dropped_one_interval_after_its_ping():
    clock = task.Clock()
    registry = SessionRegistry(clock, realm="sessions")
    healthy, silent = FakeConnection(), FakeConnection()
    fine = loggedIn(registry, "alice", healthy)
    # Two sessions on the silent connection: both end, each once.
    lost = [loggedIn(registry, "alice", silent), loggedIn(registry, "bob", silent, mind=None)]
    logouts = []
    for session in (fine, *lost):
        session.onClose(lambda s=session: logouts.append(s.id))
    keepalive = Keepalive(registry, 60, registry.clock)
    keepalive.startService()
    try:
        clock.advance(59.9)
        assert healthy.pings == silent.pings == []
        clock.advance(0.1)
        assert len(healthy.pings) == len(silent.pings) == 1  # one ping per connection
        healthy.answer()
        clock.advance(59.9)
        assert logouts == []
        clock.advance(0.1)
        assert sorted(logouts) == sorted(s.id for s in lost)
        assert silent.drops >= 1
        assert healthy.drops == 0
        assert not fine.closed
        assert len(healthy.pings) == 2
        # A healthy connection stays as long as it answers.
        for _ in range(5):
            healthy.answer()
            clock.advance(60)
        assert not fine.closed
        assert counted(registry.metrics, "sessions_dropped", why="keepalive") == 2
    finally:
        keepalive.stopService()
    assert clock.getDelayedCalls() == []


def test_sessions_without_a_connection_or_not_logged_in_are_left_alone():
    clock = task.Clock()
    registry = SessionRegistry(clock)
    connection = FakeConnection()
    pending = registry.open("alice", "p", object(), connection)  # still logging in
    unpingable = loggedIn(registry, "bob", None)
    keepalive = Keepalive(registry, 1, registry.clock)
    keepalive.startService()
    clock.advance(1)
    clock.advance(1)
    keepalive.stopService()
    assert connection.pings == []
    assert not pending.closed and not unpingable.closed


def test_a_silent_connection_is_dropped_even_if_its_sessions_come_and_go():
    clock = task.Clock()
    registry = SessionRegistry(clock)
    connection = FakeConnection()
    loggedIn(registry, "alice", connection)
    keepalive = Keepalive(registry, 1, registry.clock)
    keepalive.startService()
    clock.advance(1)
    registry.sessionsOf("alice")[0].close()
    clock.advance(1)  # no session here at this sweep
    late = loggedIn(registry, "alice", connection)
    clock.advance(1)
    keepalive.stopService()
    assert len(connection.pings) == 1
    assert late.closed
    assert connection.drops == 1


def test_an_answered_connection_is_forgotten():
    clock = task.Clock()
    registry = SessionRegistry(clock)
    connection = FakeConnection()
    session = loggedIn(registry, "alice", connection)
    keepalive = Keepalive(registry, 1, registry.clock)
    keepalive.startService()
    clock.advance(1)
    session.close()
    connection.answer()
    keepalive.stopService()
    assert connection.drops == 0
    # The keepalive holds nothing of it: once the test lets go, it is gone.
    gone = weakref.ref(connection)
    del connection, session
    gc.collect()
    assert gone() is None


@pytest_twisted.ensureDeferred
async def test_keepalive_drops_a_client_that_stops_answering(harness, reactor, log):
    served = await harness.serve("sessions")
    events = Events()
    served.registry.observe(events)
    healthy = await served.login("alice")
    stuck = await served.login("alice")
    stuckSession = served.registry.sessionsOf("alice")[1]
    silence(stuck)
    keepalive = Keepalive(served.registry, 0.3, served.registry.clock)
    keepalive.startService()
    try:
        await ending(reactor, stuckSession, 3)
        assert served.registry.countOf("alice") == 1
        reasons = [e[2] for e in events.seen if e[0] == "closed"]
        assert reasons == ["did not answer a keepalive ping within 0.3 s"]
        # The healthy one answers ping after ping, and stays.
        await task.deferLater(reactor, 0.6, lambda: None)
        assert await healthy.callRemote("greet") == "<1>hello alice"
        assert served.registry.countOf("alice") == 1
    finally:
        keepalive.stopService()
    assert any("alice did not answer a keepalive ping within 0.3 s" in m for m in log.messages())
    await disconnection(reactor, served.factory.made[1])
    stuck.perspective.broker.transport.resumeProducing()


@pytest_twisted.ensureDeferred
async def test_every_accepted_connection_has_tcp_keepalive_and_no_delay(harness):
    served = await harness.serve("cache")
    await served.login("alice")
    (broker,) = served.factory.made
    sock = broker.transport.getHandle()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    # And no Nagle delay, which would hold one-way pushes for a delayed ACK.
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
