"""
The queue of logins behind a replacement (--when-full=replace-*): bounded per
user, and released without recursion however many of its logins were
abandoned (issue #10, point 4).
"""

from __future__ import annotations

import os

import pytest_twisted
from conftest import USERS, counted, disconnection, eventually, within
from test_sessions_realm import RecordingMind
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.errors import TooManyConnections, localize
from pbrealms.sessions import MAX_WAITING_PER_USER, ConnectionGone, Session, SessionRegistry
from pbrealms.whenfull import REPLACE_OLDEST, REPLACE_STALE

#: Logins attempted while a replacement waits, then abandoned.
ATTEMPTS = int(os.environ.get("QUEUE_ATTEMPTS", "1000"))


class FakeConnection:
    """
    A connection whose pings the test answers.
    """

    def __init__(self) -> None:
        self.connected = True
        self.pings: list[defer.Deferred[bool]] = []

    def ping(self, timeout: float | None = None) -> defer.Deferred[bool]:
        d: defer.Deferred[bool] = defer.Deferred()
        self.pings.append(d)
        return d

    def drop(self) -> None:
        self.connected = False


def stalled(registry: SessionRegistry) -> tuple[FakeConnection, list]:
    """
    Give alice one logged-in session, then start a login that replaces it
    if it does not answer a ping, which waits for the test to answer.

    @return: the old session's connection, and the replacing login's outcome
        (filled once it has one).
    """
    old = FakeConnection()
    registry.activate(registry.open("alice", "10.0.0.1:1", None, old))
    outcome: list = []
    registry.admit("alice", "10.0.0.2:1", None, FakeConnection()).addBoth(outcome.append)
    assert len(old.pings) == 1 and outcome == []
    return old, outcome


def assertNoTurnKept(registry: SessionRegistry, user: str, connection=FakeConnection) -> list:
    """
    Assert that nothing holds or keeps a turn of C{user}'s: with C{user}'s
    sessions closed, as many logins as the limit allows open at once,
    without taking a turn (one kept would hold the first back until it
    logged in), so that one more, with nothing logged in to replace, is
    refused at once rather than queued behind them.

    @param connection: makes the connection of each login.
    @return: the sessions opened, still logging in.
    """
    for session in registry.sessionsOf(user):
        session.close()
    outcomes: list = []
    for _ in range(registry.maxPerUser):
        registry.admit(user, "10.0.0.9:1", None, connection()).addBoth(outcomes.append)
    assert all(isinstance(o, Session) for o in outcomes), outcomes
    assert len(outcomes) == registry.maxPerUser
    refused: list = []
    registry.admit(user, "10.0.0.9:2", None, connection()).addBoth(refused.append)
    assert len(refused) == 1 and isinstance(refused[0], Failure), refused
    refused[0].trap(TooManyConnections)
    return outcomes


def test_thousands_of_abandoned_waiters_are_released_without_recursion():
    waiters = 5000
    registry = SessionRegistry(
        task.Clock(), maxPerUser=1, whenFull=REPLACE_STALE, maxWaiting=waiters
    )
    old, replacing = stalled(registry)
    connections = [FakeConnection() for _ in range(waiters)]
    outcomes: list = []
    for connection in connections:
        registry.admit("alice", "10.0.0.3:1", None, connection).addBoth(outcomes.append)
    assert outcomes == []
    for connection in connections:
        connection.connected = False  # they all give up

    old.pings[0].callback(False)  # it does not answer: it is replaced
    (session,) = replacing
    registry.activate(session)  # the next login's turn: 5,000 gone, one by one

    assert len(outcomes) == waiters
    assert all(isinstance(o, Failure) and o.check(ConnectionGone) for o in outcomes)
    assert [s.id for s in registry.sessionsOf("alice")] == [session.id]
    # Nothing holds alice's turn: the next login replacing alice's goes at
    # once, pinging the session.
    (session,) = assertNoTurnKept(registry, "alice")
    registry.activate(session)
    holder = session.connection
    later: list = []
    registry.admit("alice", "10.0.0.4:1", None, FakeConnection()).addBoth(later.append)
    assert len(holder.pings) == 1
    holder.pings[0].callback(False)
    assert [s.id for s in registry.sessionsOf("alice")] == [later[0].id]


def test_logins_beyond_the_cap_are_refused_at_once_and_gone_ones_make_room():
    registry = SessionRegistry(task.Clock(), maxPerUser=1, whenFull=REPLACE_STALE, maxWaiting=2)
    assert SessionRegistry(task.Clock()).maxWaiting == MAX_WAITING_PER_USER == 16
    old, replacing = stalled(registry)
    first, second, third, fourth = (FakeConnection() for _ in range(4))
    outcomes: dict[str, list] = {name: [] for name in ("first", "second", "third", "fourth")}
    registry.admit("alice", "p", None, first).addBoth(outcomes["first"].append)
    registry.admit("alice", "p", None, second).addBoth(outcomes["second"].append)
    registry.admit("alice", "p", None, third).addBoth(outcomes["third"].append)
    ((refused,),) = [outcomes["third"]]
    assert refused.check(TooManyConnections)
    assert outcomes["first"] == outcomes["second"] == []

    first.connected = False  # its place goes to the next login
    registry.admit("alice", "p", None, fourth).addBoth(outcomes["fourth"].append)
    (gone,) = outcomes["first"]
    assert gone.check(ConnectionGone)
    assert outcomes["fourth"] == []
    # Two wait, the cap: one more is refused at once.
    beyond: list = []
    registry.admit("alice", "p", None, FakeConnection()).addBoth(beyond.append)
    ((refused,),) = [beyond]
    assert refused.check(TooManyConnections)

    # In order: the replacement, then second and fourth, each replacing the
    # one before once it has logged in and does not answer.
    old.pings[0].callback(False)
    current = replacing[0]
    for name in ("second", "fourth"):
        registry.activate(current)
        current.connection.pings[0].callback(False)
        (current,) = outcomes[name]
        assert registry.sessionsOf("alice") == [current]
    registry.activate(current)
    assertNoTurnKept(registry, "alice")


def test_a_cancelled_waiter_leaves_the_queue():
    registry = SessionRegistry(task.Clock(), maxPerUser=1, whenFull=REPLACE_STALE)
    old, replacing = stalled(registry)
    waiting = registry.admit("alice", "p", None, FakeConnection())
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    waiting.cancel()
    # The cancelled login left the queue: it does not take its turn when
    # the replacement ends.
    old.pings[0].callback(False)
    (session,) = replacing
    registry.activate(session)
    assert [s.id for s in registry.sessionsOf("alice")] == [session.id]
    assertNoTurnKept(registry, "alice")


def attempt(served, reactor, mind) -> tuple[object, list, defer.Deferred[None]]:
    """
    Start a login of alice on a connection of its own.

    @return: its connector, a list that receives the login's outcome, and a
        L{Deferred} firing once it has.
    """
    factory = pb.PBClientFactory()
    connector = reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    served.harness.connectors.append(connector)
    credentials = UsernamePassword(b"alice", USERS["alice"].encode())
    outcome: list = []
    done = factory.login(credentials, client=mind).addErrback(localize).addBoth(outcome.append)
    return connector, outcome, done


class StallingMind(RecordingMind):
    """
    A client object that does not answer notifyKicked until told to.
    """

    def __init__(self) -> None:
        super().__init__()
        self.answer: defer.Deferred[None] = defer.Deferred()

    def remote_notifyKicked(self, reason: str) -> defer.Deferred[None]:
        super().remote_notifyKicked(reason)
        return self.answer


@pytest_twisted.ensureDeferred
async def test_a_thousand_abandoned_logins_behind_a_replacement_leave_the_user_free(
    harness, reactor, log
):
    served = await harness.serve("sessions", maxPerUser=1, whenFull=REPLACE_OLDEST, pingTimeout=60)
    registry = served.registry
    old = StallingMind()
    await served.login("alice", mind=old)
    # A login replacing it waits for its answer to notifyKicked.
    _, replacing, replaced = attempt(served, reactor, RecordingMind())
    await old.waitFor(reactor, "kicked")

    # Count the logins reaching the registry: each waits or is refused at once.
    admitted = 0
    admit = registry.admit

    def counting(*args, **kw):
        nonlocal admitted
        admitted += 1
        return admit(*args, **kw)

    registry.admit = counting
    mind = RecordingMind()
    attempts: list[tuple[object, list, defer.Deferred[None]]] = []
    # In waves smaller than the listen backlog (50): a SYN beyond it waits
    # a second to be sent again.
    for wave in range(0, ATTEMPTS, 40):
        attempts += [attempt(served, reactor, mind) for _ in range(min(40, ATTEMPTS - wave))]
        launched = len(attempts)
        # Logins over many connections: no one event tells they all came.
        await eventually(reactor, lambda n=launched: admitted == n, timeout=20)
    # The clients refused have heard so (so many answers: polled).
    tooMany = counted(registry.metrics, "logins", outcome="too_many")
    await eventually(reactor, lambda: sum(bool(o) for _, o, _ in attempts) == tooMany)
    refused = [o[0] for _, o, _ in attempts if o]
    assert all(isinstance(r, Failure) and r.check(TooManyConnections) for r in refused)

    # Every one of them gives up; then the replacement goes through.
    waiting = served.factory.made[2:]  # after the old session's and the replacing one's
    assert len(waiting) == ATTEMPTS
    for connector, _, _ in attempts:
        connector.disconnect()
    await within(reactor, defer.gatherResults([disconnection(reactor, b) for b in waiting]))
    assert sum(not b.disconnected for b in served.factory.made) == 2
    old.answer.callback(None)
    await within(reactor, replaced)
    (replacer,) = replacing
    assert await replacer.callRemote("greet") == "<1>hello alice"

    # alice logs in at once, and nothing holds her turn.
    started = reactor.seconds()
    latest = await served.login("alice", mind=RecordingMind())
    assert reactor.seconds() - started < 1.0
    assert (await latest.callRemote("greet")).endswith("hello alice")

    # Every attempt is accounted for, in the log as in the metrics.
    messages = log.messages()
    refusals = [m for m in messages if "'alice'" in m and "too many connections" in m]
    abandoned = [m for m in messages if "'alice'" in m and "abandoned" in m]
    assert len(refused) == ATTEMPTS - MAX_WAITING_PER_USER
    assert (len(refusals), len(abandoned)) == (len(refused), MAX_WAITING_PER_USER)
    assert counted(registry.metrics, "logins", outcome="too_many") == len(refused)
    assert counted(registry.metrics, "logins", outcome="abandoned") == MAX_WAITING_PER_USER
    registry.admit = admit
    assertNoTurnKept(registry, "alice", lambda: None)
