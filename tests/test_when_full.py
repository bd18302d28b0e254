"""
The session-conflict policies (--when-full) over real loopback TCP, and the
per-user limit while logins, replacements and disconnects race.
"""

from __future__ import annotations

import random
import re

import pytest
import pytest_twisted
from conftest import USERS, counted, disconnection, eventually, within
from test_replace_queue import assertNoTurnKept
from test_sessions_realm import RecordingMind
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.spread import pb

from pbrealms.errors import LoginRefused, SessionEnded, ShuttingDown, TooManyConnections, localize
from pbrealms.metrics import DROPPED
from pbrealms.sessions import Session
from pbrealms.whenfull import REFUSE, REPLACE_OLDEST, REPLACE_STALE, WHEN_FULL

LIMITING = ["limited", "sessions"]


class Events:
    """
    Records sessions opening and closing, in order, as the realm sees them.
    """

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def sessionOpened(self, session: Session) -> None:
        self.seen.append(("opened", session.id))

    def sessionClosed(self, session: Session, reason: str) -> None:
        self.seen.append(("closed", session.id, reason))

    def closes(self, id: int) -> list[str]:
        return [e[2] for e in self.seen if e[0] == "closed" and e[1] == id]


def idOf(served, conn) -> int:
    """
    The server's id of the session C{conn} logged in to.
    """
    broker = conn.perspective.broker
    local = served.factory.made
    (session,) = [
        s
        for s in served.registry
        if s.connection is not None
        and s.connection in local
        and s.connection.transport.getPeer().port == broker.transport.getHost().port
    ]
    return session.id


def peerOf(conn) -> str:
    """
    The address the server sees C{conn} come from.
    """
    return f"127.0.0.1:{conn.perspective.broker.transport.getHost().port}"


def silence(conn) -> None:
    """
    Make a client stop answering: it reads nothing more, as behind a dead NAT.
    """
    conn.perspective.broker.transport.pauseProducing()


def replacing(reactor, registry) -> defer.Deferred[Session]:
    """
    A L{Deferred} firing with the session a login sets out to replace, once
    the registry's policy starts making room for it.
    """
    policy = registry.policy
    started: defer.Deferred[Session] = defer.Deferred()

    def makeRoom(registry, oldest, peer, connection):
        del policy.makeRoom  # one replacement watched: the class's method again
        started.callback(oldest)
        return type(policy).makeRoom(policy, registry, oldest, peer, connection)

    policy.makeRoom = makeRoom
    return within(reactor, started)


@pytest.mark.parametrize("realm", LIMITING)
@pytest_twisted.ensureDeferred
async def test_refuse_keeps_the_old_sessions(harness, realm):
    served = await harness.serve(realm, maxPerUser=1, whenFull=REFUSE)
    mind = RecordingMind()
    old = await served.login("alice", mind=mind)
    with pytest.raises(TooManyConnections):
        await served.login("alice")
    assert await old.callRemote("greet") == "<1>hello alice"
    assert mind.of("kicked") == []


@pytest.mark.parametrize("realm", LIMITING)
@pytest_twisted.ensureDeferred
async def test_replace_oldest_tells_and_ends_the_oldest_before_admitting(
    harness, reactor, log, realm
):
    served = await harness.serve(realm, maxPerUser=2, whenFull=REPLACE_OLDEST)
    events = Events()
    served.registry.observe(events)
    oldMind, middleMind = RecordingMind(), RecordingMind()
    old = await served.login("alice", mind=oldMind)
    middle = await served.login("alice", mind=middleMind)
    oldId, oldPeer = idOf(served, old), peerOf(old)
    new = await served.login("alice")
    newId, newPeer = idOf(served, new), peerOf(new)

    # Both addresses, each named for what it is: the kicked session's and
    # the newcomer's.
    assert oldPeer != newPeer
    replaced = (
        f"alice's session {oldId} from {oldPeer} was replaced by a newer login from {newPeer}"
    )
    assert oldMind.of("kicked") == [replaced]
    # The old session ended (its logout ran) before the new one opened.
    assert events.seen.index(("closed", oldId, "was replaced by a newer login")) < (
        events.seen.index(("opened", newId))
    )
    await disconnection(reactor, old.perspective.broker)
    with pytest.raises((pb.PBConnectionLost, pb.DeadReferenceError)):
        await old.callRemote("greet")
    assert await middle.callRemote("greet") == "<1>hello alice"
    assert await new.callRemote("greet") == "<2>hello alice"
    assert middleMind.of("kicked") == []
    assert served.registry.countOf("alice") == 2
    assert events.closes(oldId) == ["was replaced by a newer login"]
    assert counted(served.registry.metrics, "sessions_dropped", why="replaced") == 1
    lines = [m for m in log.messages() if "replaced" in m]
    assert len(lines) == 1
    assert re.fullmatch(re.escape(replaced) + rf" after \d+\.\d s \(realm {realm}\)", lines[0])
    # And as fields, for the JSON lines logger.
    (event,) = [e for e in log if "successor" in e]
    assert (event["peer"], event["successor"], event["session"]) == (oldPeer, newPeer, oldId)


@pytest_twisted.ensureDeferred
async def test_replace_oldest_waits_a_bounded_time_for_a_silent_client(harness, reactor):
    served = await harness.serve("sessions", maxPerUser=1, whenFull=REPLACE_OLDEST, pingTimeout=0.3)
    old = await served.login("alice", mind=RecordingMind())
    silence(old)
    started = reactor.seconds()
    new = await served.login("alice")
    assert 0.3 <= reactor.seconds() - started < 2
    assert await new.callRemote("greet") == "<1>hello alice"
    assert [s.id for s in served.registry] == [idOf(served, new)]


@pytest.mark.parametrize("realm", LIMITING)
@pytest_twisted.ensureDeferred
async def test_replace_stale_refuses_while_the_old_session_answers(harness, realm):
    served = await harness.serve(realm, maxPerUser=1, whenFull=REPLACE_STALE, pingTimeout=5)
    mind = RecordingMind()
    old = await served.login("alice", mind=mind)
    with pytest.raises(TooManyConnections):
        await served.login("alice")
    assert await old.callRemote("greet") == "<1>hello alice"
    assert mind.pushes == []


@pytest.mark.parametrize("realm", LIMITING)
@pytest_twisted.ensureDeferred
async def test_replace_stale_replaces_a_session_that_does_not_answer(harness, reactor, log, realm):
    served = await harness.serve(realm, maxPerUser=1, whenFull=REPLACE_STALE, pingTimeout=0.3)
    events = Events()
    served.registry.observe(events)
    old = await served.login("alice", mind=RecordingMind())
    oldId = idOf(served, old)
    silence(old)
    started = reactor.seconds()
    new = await served.login("alice")
    assert 0.3 <= reactor.seconds() - started < 2
    assert await new.callRemote("greet") == "<1>hello alice"
    assert events.closes(oldId) == ["did not answer a ping, and was replaced"]
    assert served.registry.countOf("alice") == 1
    assert counted(served.registry.metrics, "sessions_dropped", why="stale") == 1
    assert any("alice did not answer a ping, and was replaced from" in m for m in log.messages())
    await disconnection(reactor, served.factory.made[0])


async def racer(served, reactor, rng: random.Random, mind) -> object:
    """
    A client that logs in as alice and, at a random moment (before, during
    or after its login, or never), disconnects or stops answering.

    @return: its perspective, L{TooManyConnections}, or L{None} if it went.
    """
    factory = pb.PBClientFactory()
    connector = reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    served.harness.connectors.append(connector)
    login = factory.login(UsernamePassword(b"alice", USERS["alice"].encode()), client=mind)
    # A silenced client never hears the answer.
    login.addErrback(localize).addTimeout(1.0, reactor)
    fate = rng.choice(["stay", "drop", "silence", "silence once in"])
    delay = rng.choice([0, 0.001, 0.005, 0.02, 0.05])
    await task.deferLater(reactor, delay, lambda: None)
    if fate == "drop":
        connector.disconnect()
    elif fate == "silence" and factory._broker is not None:
        factory._broker.transport.pauseProducing()
    try:
        perspective = await login
    except TooManyConnections as e:
        return e
    except Exception:
        return None  # dropped or silenced: the server's count is what matters
    if fate == "silence once in":
        perspective.broker.transport.pauseProducing()
    return perspective


@pytest.mark.parametrize("whenFull", WHEN_FULL)
@pytest_twisted.ensureDeferred
async def test_the_limit_holds_while_logins_replacements_and_disconnects_race(
    harness, reactor, whenFull
):
    n = 2
    served = await harness.serve("sessions", maxPerUser=n, whenFull=whenFull, pingTimeout=0.2)
    registry = served.registry
    events = Events()
    registry.observe(events)
    peak = 0
    open = registry.open

    def peaking(*args, **kw) -> Session:
        nonlocal peak
        session = open(*args, **kw)
        peak = max(peak, registry.countOf("alice"))
        return session

    registry.open = peaking
    rng = random.Random(f"race-{whenFull}")
    outcomes = []
    for _ in range(3):
        clients = [
            defer.ensureDeferred(racer(served, reactor, rng, RecordingMind())) for _ in range(12)
        ]
        outcomes += await defer.gatherResults(clients)
        assert registry.countOf("alice") <= n
    refusals = sum(isinstance(outcome, TooManyConnections) for outcome in outcomes)
    # replace-oldest always makes room; the others refuse some of 36 logins.
    assert (refusals == 0) if whenFull == REPLACE_OLDEST else (refusals > 0)

    # Everyone leaves: every session that opened closes, exactly once.
    for connector in harness.connectors:
        if getattr(connector, "transport", None) is not None:
            connector.transport.resumeProducing()
        connector.disconnect()
    await defer.gatherResults([disconnection(reactor, b) for b in served.factory.made])
    # Sessions of the race end as their logins fail, each its own way: polled.
    await eventually(reactor, lambda: len(registry) == 0)
    assert peak == n
    opened = [e[1] for e in events.seen if e[0] == "opened"]
    closed = [e[1] for e in events.seen if e[0] == "closed"]
    assert sorted(opened) == sorted(closed)
    assert len(set(closed)) == len(closed)
    # The race went through the policy's replacements, not around them.
    dropped = {why for why in DROPPED if counted(registry.metrics, "sessions_dropped", why=why)}
    assert (
        dropped == {REFUSE: set(), REPLACE_OLDEST: {"replaced"}, REPLACE_STALE: {"stale"}}[whenFull]
    )
    registry.open = open
    assertNoTurnKept(registry, "alice", lambda: None)


@pytest_twisted.ensureDeferred
async def test_logins_arriving_together_each_replace_the_one_before(harness):
    served = await harness.serve("sessions", maxPerUser=1, whenFull=REPLACE_OLDEST)
    await served.login("alice", mind=RecordingMind())
    minds = [RecordingMind() for _ in range(4)]
    together = [defer.ensureDeferred(served.login("alice", mind=mind)) for mind in minds]
    conns = await defer.gatherResults(together)
    assert [len(mind.of("kicked")) for mind in minds] == [1, 1, 1, 0]
    assert await conns[-1].callRemote("greet") == "<1>hello alice"
    assert served.registry.countOf("alice") == 1


@pytest_twisted.ensureDeferred
async def test_a_login_replacing_a_session_on_its_own_connection_keeps_it(harness, reactor):
    served = await harness.serve("sessions", maxPerUser=1, whenFull=REPLACE_OLDEST)
    factory = pb.PBClientFactory()
    harness.connectors.append(reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory))
    credentials = UsernamePassword(b"alice", USERS["alice"].encode())
    mind = RecordingMind()
    first = await factory.login(credentials, client=mind)
    second = await factory.login(credentials, client=mind)
    assert mind.of("kicked")
    assert await second.callRemote("greet") == "<1>hello alice"
    with pytest.raises(SessionEnded):
        await first.callRemote("greet").addErrback(localize)
    assert served.registry.countOf("alice") == 1
    assert not first.broker.disconnected


@pytest_twisted.ensureDeferred
async def test_a_shutdown_during_a_replacement_refuses_the_new_login(harness, reactor, log):
    served = await harness.serve("sessions", maxPerUser=1, whenFull=REPLACE_OLDEST, pingTimeout=1)
    events = Events()
    served.registry.observe(events)
    old = await served.login("alice", mind=RecordingMind())
    silence(old)  # it will not answer notifyKicked
    started = replacing(reactor, served.registry)
    login = defer.ensureDeferred(served.login("alice"))
    assert (await started).id == idOf(served, old)
    served.registry.closing = True
    with pytest.raises(ShuttingDown):
        await login
    assert [e[0] for e in events.seen] == ["opened"]  # the old one was not "replaced"
    assert counted(served.registry.metrics, "sessions_dropped", why="replaced") == 0
    old.perspective.broker.transport.resumeProducing()


@pytest_twisted.ensureDeferred
async def test_one_connection_checks_one_login_at_a_time_while_replacing(harness, reactor):
    served = await harness.serve("sessions", maxPerUser=1, whenFull=REPLACE_OLDEST, pingTimeout=5)
    old = await served.login("alice", mind=RecordingMind())
    silence(old)
    factory = pb.PBClientFactory()
    harness.connectors.append(reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory))
    root = await factory.getRootObject()
    credentials = UsernamePassword(b"alice", USERS["alice"].encode())
    started = replacing(reactor, served.registry)
    admitted = 0
    admit = served.registry.admit

    def counting(*args, **kw):
        nonlocal admitted
        admitted += 1
        return admit(*args, **kw)

    served.registry.admit = counting
    first = factory.login(credentials)
    await started
    # A second login on that connection while the first waits is refused.
    challenge, challenger = await root.callRemote("login", b"alice")
    with pytest.raises(LoginRefused, match="one login at a time"):
        await challenger.callRemote(
            "respond", pb.respond(challenge, b"wonderland"), None
        ).addErrback(localize)
    assert admitted == 1  # the second waits for no turn: it never reached the registry
    old.perspective.broker.transport.resumeProducing()
    assert await (await first).callRemote("greet") == "<1>hello alice"
