"""
A penalised address is told why, at its first login, and that costs the
server little: one answer, a close, no log line per connection.
"""

import pytest
import pytest_twisted
from conftest import RecordingFactory, Served, disconnection
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error, protocol, task
from twisted.spread import pb

from pbrealms import wire
from pbrealms.errors import SourcePenalised, localize
from pbrealms.guard import SourcePenalties
from pbrealms.login import LoginRoot

ATTACKER, CANARY = "127.0.0.4", "127.0.0.2"
MESSAGE = "too many failed logins from this address: try again in 15 s"
PENALTY_LINE = f"refusing logins from {ATTACKER} for at least 15 s: too many failed logins"


@pytest.fixture
def penalised(harness, monkeypatch):
    """
    A server whose penalties run on their own clock, with ATTACKER's
    three quick failures already counted.
    """
    # Seconds, not the real 5: the test waits for the silent connections.
    monkeypatch.setattr(wire, "CLOSE_TIMEOUT", 0.5)
    clock = task.Clock()
    penalties = SourcePenalties(clock)
    for _ in range(3):
        penalties.failed(ATTACKER)
    assert penalties.penalty(ATTACKER) == 15

    async def serve():
        base = harness.makeRoot("tracking")
        root = LoginRoot(
            base.checker,
            base.realm,
            base.registry,
            base.registry.clock,
            base.registry.metrics,
            maxAuthTries=6,
            loginTimeout=30,
            penalties=penalties,
            maxUnauthenticated=128,
        )
        # The backlog the server's own endpoints get: with Twisted's 50 a
        # burst overflows the kernel's accept queue, and the clients wait
        # for TCP's retransmissions instead of for the server.
        factory = RecordingFactory(root)
        port = harness.reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=1024)
        served = Served(harness, root, factory, port)
        harness.servers.append(served)
        return served

    return serve


def connectFrom(harness, served, source: str) -> pb.PBClientFactory:
    factory = pb.PBClientFactory()
    port = served.port.getHost().port
    harness.connectors.append(
        harness.reactor.connectTCP("127.0.0.1", port, factory, bindAddress=(source, 0))
    )
    return factory


def outcome(d: defer.Deferred) -> defer.Deferred:
    """
    Fire with the failure C{d} fails with (it must fail), in a list: a
    failure returned by an errback would go on failing.
    """
    return d.addCallbacks(lambda result: pytest.fail(f"not refused: {result}"), lambda f: [f])


@pytest_twisted.ensureDeferred
async def test_a_penalised_address_is_told_why_and_what_to_do(penalised, harness, reactor, log):
    served = await penalised()
    factory = connectFrom(harness, served, ATTACKER)
    # Stock PB client code, and the right password: refused all the same.
    (failure,) = await outcome(factory.login(UsernamePassword(b"alice", b"wonderland")))
    assert failure.check(UnauthorizedLogin)
    assert failure.getErrorMessage() == MESSAGE
    assert isinstance(localize(failure).value, SourcePenalised)
    (broker,) = served.factory.made
    await disconnection(reactor, broker)  # then closed
    assert served.registry.countOf("alice") == 0
    assert served.root.unauthenticated == {}
    # The one line of the penalty, when it began; none for the connection.
    assert [m for m in log.messages() if ATTACKER in m] == [PENALTY_LINE]


@pytest_twisted.ensureDeferred
async def test_nothing_after_the_first_call_is_acted_on(penalised, harness, reactor):
    served = await penalised()
    factory = connectFrom(harness, served, ATTACKER)
    root = await factory.getRootObject()
    calls = [
        outcome(root.callRemote("loginPassword", b"alice", b"wonderland", None)),
        outcome(root.callRemote("login", b"alice")),
        outcome(root.callRemote("loginAnonymous", None)),
    ]
    (first,), *rest = await defer.gatherResults(calls)
    assert localize(first).check(SourcePenalised)
    assert all(f.check(pb.PBConnectionLost) for (f,) in rest)
    assert served.registry.countOf("alice") == 0
    (broker,) = served.factory.made
    await disconnection(reactor, broker)
    assert served.root.unauthenticated == {}


@pytest_twisted.ensureDeferred
async def test_a_flood_from_a_penalised_address_costs_little(penalised, harness, reactor, log):
    """
    200 connections from the penalised address, 50 silent and then 150
    logging in: each is answered or closed, none is logged, the silent ones
    go after the short timeout, and another address logs in meanwhile.
    """
    served = await penalised()
    before = len(log)
    silent: list[defer.Deferred] = []

    class Silent(protocol.Protocol):
        def connectionMade(self):
            self.lost = defer.Deferred()
            silent.append(self.lost)

        def connectionLost(self, reason):
            self.lost.callback(reactor.seconds())

    port = served.port.getHost().port
    for _ in range(50):
        await protocol.ClientCreator(reactor, Silent).connectTCP(
            "127.0.0.1", port, bindAddress=(ATTACKER, 0)
        )
    await served.factory.accepted(reactor, 50)
    assert len(served.factory.made) == 50
    accepted = reactor.seconds()
    logins = [
        outcome(connectFrom(harness, served, ATTACKER).login(UsernamePassword(b"alice", b"x")))
        for _ in range(150)
    ]

    started = reactor.seconds()
    canary = connectFrom(harness, served, CANARY)
    perspective = await canary.login(UsernamePassword(b"alice", b"wonderland"))
    assert await perspective.callRemote("greet") == "<1>hello alice"
    assert reactor.seconds() - started < 2

    failures = [f for (f,) in await defer.gatherResults(logins)]
    told = [f for f in failures if f.check(UnauthorizedLogin)]
    # Those beyond the address's 128 connections not logged in are closed
    # as they are accepted, as before.
    closed = [f for f in failures if f.check(pb.PBConnectionLost, error.ConnectionClosed)]
    assert len(told) + len(closed) == 150
    assert len(told) >= 128 - 50
    assert all(f.getErrorMessage() == MESSAGE for f in told)
    # The silent ones: aborted after the short timeout, not the 30 s one.
    closedAt = await defer.gatherResults(silent)
    assert all(0.4 < t - accepted < 3 for t in closedAt), [t - accepted for t in closedAt]
    attackers = [b for b in served.factory.made if b.transport.getPeer().host == ATTACKER]
    await defer.gatherResults([disconnection(reactor, b) for b in attackers])
    assert served.root.unauthenticated == {}
    assert served.registry.countOf("alice") == 1  # the canary's
    # No line for any of the 200: the one line is the penalty's, logged
    # when it began.
    lines = log.messages()[before:]
    assert not [m for m in lines if ATTACKER in m], lines
    assert [m for m in log.messages() if ATTACKER in m] == [PENALTY_LINE]
    perspective.broker.transport.loseConnection()
