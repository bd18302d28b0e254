"""
The queue of logins behind a replacement (--when-full=replace-*): bounded per
user, and released without recursion however many of its logins were
abandoned (issue #10, point 4).
"""

from __future__ import annotations

import os

import pytest_twisted
from conftest import USERS, eventually
from test_sessions_realm import RecordingMind
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.errors import TooManyConnections, localize
from pbrealms.sessions import MAX_WAITING_PER_USER, ConnectionGone, SessionRegistry
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
    assert not registry._replacing  # nothing holds alice's turn
    # The next login replacing alice's goes at once: it pings the session.
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
    assert [c for _, c in registry._replacing["alice"].waiting] == [second, fourth]

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
    assert not registry._replacing


def test_a_cancelled_waiter_leaves_the_queue():
    registry = SessionRegistry(task.Clock(), maxPerUser=1, whenFull=REPLACE_STALE)
    old, replacing = stalled(registry)
    waiting = registry.admit("alice", "p", None, FakeConnection())
    waiting.addErrback(lambda f: f.trap(defer.CancelledError))
    waiting.cancel()
    assert registry._replacing["alice"].waiting == []
    old.pings[0].callback(False)
    registry.activate(replacing[0])
    assert not registry._replacing


def attempt(served, reactor, mind) -> tuple[object, list]:
    """
    Start a login of alice on a connection of its own.

    @return: its connector, and a list that receives the login's outcome.
    """
    factory = pb.PBClientFactory()
    connector = reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    served.harness.connectors.append(connector)
    credentials = UsernamePassword(b"alice", USERS["alice"].encode())
    outcome: list = []
    factory.login(credentials, client=mind).addErrback(localize).addBoth(outcome.append)
    return connector, outcome


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
    metrics = registry.metrics.logins
    old = StallingMind()
    await served.login("alice", mind=old)
    # A login replacing it waits for its answer to notifyKicked.
    _, replacing = attempt(served, reactor, RecordingMind())
    await eventually(reactor, lambda: old.of("kicked"))

    def seen() -> int:
        turns = registry._replacing.get("alice")
        return metrics.labels("too_many")._value.get() + len(turns.waiting if turns else ())

    mind = RecordingMind()
    attempts: list[tuple[object, list]] = []
    # In waves smaller than the listen backlog (50): a SYN beyond it waits
    # a second to be sent again.
    for wave in range(0, ATTEMPTS, 40):
        attempts += [attempt(served, reactor, mind) for _ in range(min(40, ATTEMPTS - wave))]
        launched = len(attempts)
        await eventually(reactor, lambda n=launched: seen() == n, timeout=20)
    # The clients refused have heard so.
    tooMany = metrics.labels("too_many")._value.get()
    await eventually(reactor, lambda: sum(bool(o) for _, o in attempts) == tooMany)
    refused = [o[0] for _, o in attempts if o]
    assert all(isinstance(r, Failure) and r.check(TooManyConnections) for r in refused)

    # Every one of them gives up; then the replacement goes through.
    for connector, _ in attempts:
        connector.disconnect()
    await eventually(reactor, lambda: sum(not b.disconnected for b in served.factory.made) == 2)
    old.answer.callback(None)
    await eventually(reactor, lambda: replacing)
    (replacer,) = replacing
    assert await replacer.callRemote("greet") == "<1>hello alice"

    # alice logs in at once, and nothing holds her turn.
    started = reactor.seconds()
    latest = await served.login("alice", mind=RecordingMind())
    assert reactor.seconds() - started < 1.0
    assert (await latest.callRemote("greet")).endswith("hello alice")
    assert not registry._replacing

    # Every attempt is accounted for, in the log as in the metrics.
    messages = log.messages()
    refusals = [m for m in messages if "'alice'" in m and "too many connections" in m]
    abandoned = [m for m in messages if "'alice'" in m and "abandoned" in m]
    assert len(refused) == ATTEMPTS - MAX_WAITING_PER_USER
    assert (len(refusals), len(abandoned)) == (len(refused), MAX_WAITING_PER_USER)
    assert metrics.labels("too_many")._value.get() == len(refused)
    assert metrics.labels("abandoned")._value.get() == MAX_WAITING_PER_USER
