"""
The sessions realm over real loopback TCP: a cached avatar per user with the
set of the user's current sessions, and the pushes that keep them informed.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from conftest import counted, eventually, within
from twisted.internet import defer, task
from twisted.spread import pb

from pbrealms.errors import BadArguments
from pbrealms.push import MAX_UNANSWERED
from pbrealms.realms.sessions import SessionsRealm
from pbrealms.sessions import SessionRegistry


class RecordingMind(pb.Referenceable):
    """
    A client object that records every push, as C{(method, argument)}.
    """

    def __init__(self) -> None:
        self.pushes: list[tuple[str, object]] = []
        self._waiting: list[tuple[str, int, defer.Deferred[list]]] = []

    def _record(self, method: str, argument: object) -> None:
        self.pushes.append((method, argument))
        waiting, self._waiting = self._waiting, []
        for entry in waiting:
            self._check(*entry)

    def _check(self, method: str, count: int, d: defer.Deferred[list]) -> None:
        if d.called:
            return  # timed out
        seen = self.of(method)
        if len(seen) >= count:
            d.callback(seen)
        else:
            self._waiting.append((method, count, d))

    def waitFor(
        self, reactor, method: str, count: int = 1, timeout: float = 5.0
    ) -> defer.Deferred[list]:
        """
        A L{Deferred} firing with L{of}C{(method)} once it holds C{count}
        pushes (at once if it does), or failing after C{timeout} seconds.
        """
        d: defer.Deferred[list] = defer.Deferred()
        self._check(method, count, d)
        return within(reactor, d, timeout)

    def remote_notifySessionOpened(self, info: dict) -> None:
        self._record("opened", info)

    def remote_notifySessionClosed(self, info: dict) -> None:
        self._record("closed", info)

    def remote_notifyGreeting(self, text: str) -> None:
        self._record("greeting", text)

    def remote_notifyKicked(self, reason: str) -> None:
        self._record("kicked", reason)

    def of(self, method: str) -> list:
        return [argument for name, argument in self.pushes if name == method]


async def idOf(conn) -> int:
    (current,) = [s for s in await conn.callRemote("sessions") if s["current"]]
    return current["id"]


@pytest_twisted.ensureDeferred
async def test_openings_reach_exactly_the_other_sessions_of_the_user(harness, reactor):
    served = await harness.serve("sessions")
    minds = {name: RecordingMind() for name in ("a", "b", "bob")}
    a = await served.login("alice", mind=minds["a"])
    await served.login("bob", mind=minds["bob"])
    b = await served.login("alice", mind=minds["b"])
    bId = await idOf(b)
    (opened,) = await minds["a"].waitFor(reactor, "opened")
    assert opened["id"] == bId
    assert opened["peer"].startswith("127.0.0.1:")
    assert set(opened) == {"id", "peer", "since"}
    # A session without a mind is announced too, and told nothing.
    await served.login("alice")
    await minds["b"].waitFor(reactor, "opened")
    await minds["a"].waitFor(reactor, "opened", 2)

    await b.disconnect()
    (closed,) = await minds["a"].waitFor(reactor, "closed")
    assert closed["id"] == bId
    assert closed["reason"] == "disconnected"
    # A round trip on every connection left: anything pushed has arrived.
    await a.callRemote("status")
    assert minds["bob"].pushes == []
    assert [name for name, _ in minds["b"].pushes] == ["opened"]


@pytest_twisted.ensureDeferred
async def test_a_greeting_is_pushed_to_the_other_sessions(harness, reactor):
    served = await harness.serve("sessions")
    minds = [RecordingMind() for _ in range(3)]
    conns = [await served.login("alice", mind=mind) for mind in minds]
    bobMind = RecordingMind()
    bob = await served.login("bob", mind=bobMind)
    assert await conns[1].callRemote("greet") == "<1>hello alice"
    await minds[0].waitFor(reactor, "greeting")
    await minds[2].waitFor(reactor, "greeting")
    assert minds[0].of("greeting") == minds[2].of("greeting") == ["<1>hello alice"]
    for conn in (*conns, bob):
        await conn.callRemote("status")
    assert minds[1].of("greeting") == []
    assert bobMind.of("greeting") == []
    # greet counts as in cache: across all the user's sessions.
    assert await conns[0].callRemote("greet") == "<2>hello alice"


@pytest_twisted.ensureDeferred
async def test_sessions_lists_the_users_sessions_and_marks_the_callers(harness, reactor):
    served = await harness.serve("sessions")
    first = await served.login("alice", mind=RecordingMind())
    second = await served.login("alice")
    await served.login("bob")
    listed = await second.callRemote("sessions")
    assert [s["current"] for s in listed] == [False, True]
    assert listed[0]["id"] < listed[1]["id"]
    for entry in listed:
        assert set(entry) == {"id", "peer", "since", "idle", "current"}
        assert entry["peer"].startswith("127.0.0.1:")
        assert entry["idle"] >= 0
    assert [s["current"] for s in await first.callRemote("sessions")] == [True, False]
    # One cached avatar for the user, holding those same sessions.
    avatar = served.realm.avatarFor("alice", None)
    assert [s.id for s in avatar.sessions()] == [s["id"] for s in listed]
    status = await first.callRemote("status")
    assert status == {
        "realm": "sessions",
        "user": "alice",
        "greetings": 0,
        "sessions": 2,
        "max": None,
    }
    with pytest.raises(BadArguments):
        await first.callRemote("sessions", 1)


@pytest_twisted.ensureDeferred
async def test_idle_counts_from_the_last_call(harness, reactor):
    served = await harness.serve("sessions")
    quiet = await served.login("alice")
    busy = await served.login("alice")
    observer = await served.login("alice")
    await task.deferLater(reactor, 0.3, lambda: None)
    await busy.callRemote("greet")
    await task.deferLater(reactor, 0.1, lambda: None)
    idle = [s["idle"] for s in await observer.callRemote("sessions")]
    assert idle[0] >= 0.4
    assert 0.1 <= idle[1] < idle[0] - 0.2
    assert quiet is not None


@pytest_twisted.ensureDeferred
async def test_pushes_to_a_client_that_stops_reading_are_bounded(harness, reactor):
    served = await harness.serve("sessions")
    await served.login("alice", mind=RecordingMind())
    stuck = await served.login("alice", mind=RecordingMind())
    greeter = await served.login("alice")
    stuck.perspective.broker.transport.pauseProducing()
    for _ in range(200):
        await greeter.callRemote("greet")
    assert counted(served.registry.metrics, "pushes", result="skipped") >= 200 - MAX_UNANSWERED
    session = served.registry.sessionsOf("alice")[1]
    assert session.client.unanswered == MAX_UNANSWERED
    stuck.perspective.broker.transport.resumeProducing()
    # No event tells of the answers' arrival: the count is polled.
    await eventually(reactor, lambda: session.client.unanswered == 0)


class GoneMind:
    """
    A mind whose client has gone, as PB reports it: synchronously.
    """

    def callRemote(self, method: str, *args: object) -> defer.Deferred:
        raise pb.DeadReferenceError("Calling Stale Broker")


class BrokenMind:
    """
    A mind that fails in a way PB never should, synchronously.
    """

    def callRemote(self, method: str, *args: object) -> defer.Deferred:
        raise RuntimeError("broken")


def test_a_push_to_a_gone_client_ends_its_session_once(log):
    clock = task.Clock()
    registry = SessionRegistry(clock, realm="sessions")
    realm = SessionsRealm(registry, clock)
    logouts = []
    greeter = registry.open("alice", "10.0.0.1:1")
    gone = registry.open("alice", "10.0.0.2:2", GoneMind())
    broken = registry.open("alice", "10.0.0.3:3", BrokenMind())
    for session in (greeter, gone, broken):
        session.onClose(lambda s=session: logouts.append(s.id))
        registry.activate(session)
    realm.avatarFor("alice", None).perspective_greet(greeter)
    assert gone.closed
    assert logouts == [gone.id]
    # The gone session's end was pushed to the others: a second chance to
    # raise, and still nothing did.
    assert not broken.closed
    assert registry.countOf("alice") == 2
    assert not log.errors()
    warnings = [m for m in log.messages() if "answered" in m]
    assert len(warnings) == 1, warnings  # the broken mind, once
