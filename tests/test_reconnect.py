"""
The reconnecting session: its backoff on a task.Clock with a fake server,
then against real servers on loopback that restart, kick, refuse and fill up.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from conftest import Arrivals, RecordingFactory, Served, eventually
from twisted.internet import defer, endpoints, error, task
from twisted.python.failure import Failure

from pbrealms.client import (
    ClientMind,
    ClosedBeforeLogin,
    Kicked,
    ReconnectingSession,
    TLSFailed,
    penaltySeconds,
    retryable,
)
from pbrealms.errors import (
    BadCredentials,
    InsecureLogin,
    LoginFailed,
    MindRequired,
    ShuttingDown,
    SourcePenalised,
    TooManyConnections,
)
from pbrealms.guard import SourcePenalties
from pbrealms.login import LoginRoot

# A fake server, for the schedule.


class FakeConnection:
    """
    What the session uses of a L{pbrealms.client.Connection}.
    """

    def __init__(self) -> None:
        self.connected = True
        self.kicked: str | None = None
        self._onDisconnect: list = []

    def notifyOnDisconnect(self, callback) -> None:
        if self.connected:
            self._onDisconnect.append(callback)
        else:
            callback()

    def disconnect(self) -> defer.Deferred[None]:
        self.lose()
        return defer.succeed(None)

    def lose(self) -> None:
        if self.connected:
            self.connected = False
            for callback in self._onDisconnect:
                callback()


class FakeServer:
    """
    A C{connect} function whose attempts the test answers, one at a time.
    """

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []
        self.pending: defer.Deferred | None = None

    def connect(self, reactor, endpoint, user, password, mind, timeout, sendPassword=None):
        assert self.pending is None, "one attempt at a time"
        assert reactor is self.clock
        self.attempts.append(self.clock.seconds())
        self.pending = defer.Deferred()
        return self.pending

    def refuse(self, exception: Exception | None = None) -> None:
        pending, self.pending = self.pending, None
        pending.errback(exception or error.ConnectionRefusedError())

    def accept(self) -> FakeConnection:
        pending, self.pending = self.pending, None
        conn = FakeConnection()
        pending.callback(conn)
        return conn


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def server(clock) -> FakeServer:
    return FakeServer(clock)


def fakeSession(clock, server, lost=None, **kw) -> ReconnectingSession:
    kw.setdefault("jitter", lambda: 1.0)  # every delay at its full length
    return ReconnectingSession(
        clock,
        "tcp:127.0.0.1:1",
        "alice",
        "wonderland",
        connect=server.connect,
        onLost=None if lost is None else lambda reason, delay: lost.append((reason, delay)),
        initialDelay=1.0,
        maxDelay=8.0,
        **kw,
    )


def result(d: defer.Deferred) -> object:
    """
    What C{d} has fired with; a failure is raised.
    """
    assert d.called
    outcome: list = []
    d.addBoth(outcome.append)
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def test_delays_double_up_to_the_cap(clock, server):
    lost: list = []
    session = fakeSession(clock, server, lost)
    stopped = session.start()
    assert server.attempts == [0.0]
    for _ in range(6):
        server.refuse()
        clock.advance(lost[-1][1])
    assert [delay for _, delay in lost] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert server.attempts == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0]
    assert all(reason.check(error.ConnectionRefusedError) for reason, _ in lost)
    assert session.connection is None
    result(session.stop())
    assert result(stopped) is None
    assert server.pending is None or server.pending.called
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("seed", range(5))
def test_jitter_waits_between_half_and_all_of_each_delay(clock, server, seed):
    lost: list = []
    session = fakeSession(clock, server, lost, jitter=random.Random(seed).random)
    session.start()
    for _ in range(10):
        server.refuse()
        clock.advance(lost[-1][1])
    bases = [1.0, 2.0, 4.0] + [8.0] * 7
    for (_, delay), base in zip(lost, bases, strict=True):
        assert base / 2 <= delay <= base
    assert len({delay for _, delay in lost}) == len(lost)  # jittered indeed
    result(session.stop())
    assert clock.getDelayedCalls() == []


def test_jitter_bounds(clock, server):
    lost: list = []
    jitters = iter([0.0, 1.0, -5.0, 7.0])
    session = fakeSession(clock, server, lost, jitter=lambda: next(jitters))
    session.start()
    for _ in range(4):
        server.refuse()
        clock.advance(lost[-1][1])
    assert [delay for _, delay in lost] == [0.5, 2.0, 2.0, 8.0]
    result(session.stop())


def test_a_login_resets_the_delay_and_runs_onLogin_each_time(clock, server):
    lost: list = []
    logins: list = []
    session = fakeSession(clock, server, lost, onLogin=logins.append)
    stopped = session.start()
    for _ in range(3):
        server.refuse()
        clock.advance(lost[-1][1])
    first = server.accept()
    assert session.connection is first
    assert logins == [first]
    first.lose()
    assert session.connection is None
    reason, delay = lost[-1]
    assert reason.check(error.ConnectionLost)
    assert delay == 1.0
    clock.advance(delay)
    second = server.accept()
    assert logins == [first, second]
    assert session.connection is second
    assert not stopped.called
    result(session.stop())
    assert not second.connected
    assert result(stopped) is None
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "refusal",
    [BadCredentials(), MindRequired("clock"), InsecureLogin(), ValueError("a bug")],
)
def test_a_refusal_for_good_stops_at_once(clock, server, refusal):
    lost: list = []
    session = fakeSession(clock, server, lost)
    stopped = session.start()
    server.refuse(refusal)
    with pytest.raises(type(refusal)):
        result(stopped)
    assert lost == []
    assert server.attempts == [0.0]
    assert clock.getDelayedCalls() == []
    # Told after it stopped, as before: the reason it gave up.
    with pytest.raises(type(refusal)):
        result(session.whenStopped())
    assert result(session.stop()) is None


@pytest.mark.parametrize(
    ("exception", "again"),
    [
        (error.ConnectionRefusedError(), True),
        (error.ConnectError(string="the server closed the connection"), True),
        (error.DNSLookupError(), True),
        (error.ConnectionLost(), True),
        (defer.TimeoutError(), True),
        (TooManyConnections(1), True),
        (ShuttingDown(), True),
        (LoginFailed(), True),
        (SourcePenalised(15), True),
        (ClosedBeforeLogin(), True),
        (BadCredentials(), False),
        (TLSFailed("untrusted", "certificate verify failed"), False),
        (TLSFailed("name", "localhost"), False),
        (MindRequired("clock"), False),
        (InsecureLogin(), False),
        (defer.CancelledError(), False),
        (ValueError(), False),
    ],
)
def test_what_is_tried_again(exception, again):
    assert retryable(Failure(exception)) is again


def received(exception: Exception) -> Exception:
    """
    C{exception} as the client has it once L{pbrealms.errors.localize} made
    it again from what crossed the wire: its class and message, nothing else.
    """
    copy = type(exception).__new__(type(exception))
    Exception.__init__(copy, str(exception))
    return copy


def test_the_penalty_the_server_gave():
    assert penaltySeconds(Failure(SourcePenalised(14.2))) == 15.0
    assert penaltySeconds(Failure(received(SourcePenalised(600)))) == 600.0
    assert penaltySeconds(Failure(BadCredentials())) is None
    assert penaltySeconds(Failure(received(SourcePenalised(1)))) == 1.0


def test_a_penalised_address_waits_as_long_as_the_server_said(clock, server):
    lost: list = []
    session = fakeSession(clock, server, lost)
    stopped = session.start()
    server.refuse(received(SourcePenalised(20)))
    # Not after the usual 1 s: it would only be refused again.
    assert [delay for _, delay in lost] == [20.0]
    clock.advance(19.9)
    assert server.attempts == [0.0]
    clock.advance(0.1)
    assert server.attempts == [0.0, 20.0]
    # A short penalty does not shorten the backoff.
    server.refuse(received(SourcePenalised(1)))
    assert lost[-1][1] == 2.0
    clock.advance(2.0)
    server.accept()
    assert session.connection is not None
    result(session.stop())
    assert result(stopped) is None
    assert clock.getDelayedCalls() == []


def test_kicked_stops_instead_of_coming_back(clock, server):
    lost: list = []
    session = fakeSession(clock, server, lost)
    stopped = session.start()
    conn = server.accept()
    conn.kicked = "replaced by a newer login"
    conn.lose()
    with pytest.raises(Kicked) as kicked:
        result(stopped)
    assert kicked.value.reason == "replaced by a newer login"
    assert str(kicked.value) == "replaced by a newer login"
    assert lost == []
    assert server.attempts == [0.0]
    assert clock.getDelayedCalls() == []


def test_stop_while_waiting_cancels_the_timer(clock, server):
    session = fakeSession(clock, server, [])
    stopped = session.start()
    server.refuse()
    assert len(clock.getDelayedCalls()) == 1
    assert result(session.stop()) is None
    assert result(stopped) is None
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert server.attempts == [0.0]
    assert result(session.stop()) is None  # again: nothing to do
    with pytest.raises(RuntimeError):
        session.start()


def test_stop_while_connecting_cancels_the_attempt(clock, server):
    session = fakeSession(clock, server, [])
    stopped = session.start()
    attempt = server.pending
    assert result(session.stop()) is None
    assert attempt.called  # cancelled, and the cancellation swallowed
    assert result(stopped) is None
    assert clock.getDelayedCalls() == []


def test_stop_while_onLogin_runs_cancels_it(clock, server):
    hooks: list[defer.Deferred] = []

    def onLogin(conn):
        hooks.append(defer.Deferred())
        return hooks[-1]

    session = fakeSession(clock, server, [], onLogin=onLogin)
    stopped = session.start()
    conn = server.accept()
    assert result(session.stop()) is None
    assert hooks[0].called
    assert not conn.connected
    assert result(stopped) is None


def test_onLogin_failing_while_connected_stops_the_session(clock, server):
    session = fakeSession(clock, server, [], onLogin=lambda conn: 1 / 0)
    stopped = session.start()
    conn = server.accept()
    with pytest.raises(ZeroDivisionError):
        result(stopped)
    assert not conn.connected
    assert session.connection is None
    assert clock.getDelayedCalls() == []


def test_onLogin_failing_as_the_connection_goes_is_a_lost_connection(clock, server):
    lost: list = []
    hooks: list[defer.Deferred] = []

    def onLogin(conn):
        hooks.append(defer.Deferred())
        return hooks[-1]

    session = fakeSession(clock, server, lost, onLogin=onLogin)
    stopped = session.start()
    conn = server.accept()
    conn.lose()
    hooks[0].errback(error.ConnectionLost())
    assert [reason.check(error.ConnectionLost) for reason, _ in lost] == [error.ConnectionLost]
    clock.advance(lost[-1][1])
    server.accept()
    assert len(hooks) == 2
    assert not stopped.called
    result(session.stop())


def test_is_twisteds_ClientService(clock, server):
    from twisted.application.internet import ClientService

    session = fakeSession(clock, server, [])
    assert isinstance(session._service, ClientService)


def answeredAtOnce(answers: list):
    """
    A C{connect} function that answers each attempt before it returns: with
    the next of C{answers}, an exception or a L{FakeConnection}.
    """

    def connect(*args, **kw):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    return connect


def test_a_refusal_for_good_at_once_stops_on_the_next_turn(clock):
    lost: list = []
    session = ReconnectingSession(
        clock, object(), "a", "p", connect=answeredAtOnce([BadCredentials()]),
        onLost=lambda reason, delay: lost.append(delay),
    )  # fmt: skip
    stopped = session.start()
    assert not stopped.called
    clock.advance(0)
    with pytest.raises(BadCredentials):
        result(stopped)
    assert lost == []
    assert clock.getDelayedCalls() == []


def test_answers_at_once_are_tried_again_and_logged_in(clock):
    lost: list = []
    logins: list = []
    conn = FakeConnection()
    session = ReconnectingSession(
        clock, object(), "a", "p", connect=answeredAtOnce([error.ConnectionRefusedError(), conn]),
        onLost=lambda reason, delay: lost.append(delay), onLogin=logins.append,
        initialDelay=1.0, jitter=lambda: 1.0,
    )  # fmt: skip
    stopped = session.start()
    clock.advance(0)
    assert lost == [1.0]
    clock.advance(1.0)
    clock.advance(0)
    assert session.connection is conn
    assert logins == [conn]
    assert result(session.stop()) is None
    assert not conn.connected
    assert result(stopped) is None
    assert clock.getDelayedCalls() == []


def test_stop_before_an_answer_at_once_is_settled_closes_it(clock):
    conn = FakeConnection()
    session = ReconnectingSession(clock, object(), "a", "p", connect=answeredAtOnce([conn]))
    stopped = session.start()
    assert result(session.stop()) is None
    assert not conn.connected
    assert session.connection is None
    assert result(stopped) is None
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("lose", ["refused", "lost"])
def test_onLost_may_stop_the_session(clock, server, lose):
    session = ReconnectingSession(
        clock, object(), "a", "p", connect=server.connect,
        onLost=lambda reason, delay: session.stop(),
    )  # fmt: skip
    stopped = session.start()
    if lose == "refused":
        server.refuse()
    else:
        server.accept().lose()
    assert result(stopped) is None
    assert session.connection is None
    assert clock.getDelayedCalls() == []


def test_bad_delays_are_refused(clock, server):
    with pytest.raises(ValueError):
        ReconnectingSession(clock, "tcp:127.0.0.1:1", "a", "p", initialDelay=0)
    with pytest.raises(ValueError):
        ReconnectingSession(clock, "tcp:127.0.0.1:1", "a", "p", initialDelay=5, maxDelay=1)
    with pytest.raises(ValueError):
        ReconnectingSession(clock, "tcp:127.0.0.1:1", "a", "p", factor=0.5)


# Real servers, on loopback.


def realSession(reactor, served, password="wonderland", mind=None, **kw) -> ReconnectingSession:
    return ReconnectingSession(
        reactor,
        served.endpoint,
        "alice",
        password,
        mind,
        timeout=5.0,
        initialDelay=0.05,
        maxDelay=0.2,
        jitter=lambda: 0.5,
        **kw,
    )


@pytest_twisted.ensureDeferred
async def test_comes_back_after_the_server_restarts_and_subscribes_again(reactor, harness):
    served = await harness.serve("clock", period=60.0)
    number = served.port.getHost().port
    ticks = Arrivals()
    logins: list = []
    lost: list[Failure] = []

    async def subscribe(conn) -> None:
        logins.append(conn)
        # The server starts each session at its own period: ask again.
        await conn.callRemote("setperiod", 0.05)

    session = realSession(
        reactor,
        served,
        mind=ClientMind(onTime=ticks),
        onLogin=subscribe,
        onLost=lambda reason, delay: lost.append(reason),
    )
    stopped = session.start()
    try:
        await ticks.waitFor(reactor, 3)
        assert len(logins) == 1

        # The server goes away, and nothing listens for a while.
        await served.port.stopListening()
        for broker in served.factory.made:
            broker.transport.abortConnection()
        await defer.gatherResults(served.factory.closed)
        harness.servers.remove(served)
        # The condition is which failure follows the loss: polled.
        await eventually(reactor, lambda: any(r.check(error.ConnectionRefusedError) for r in lost))
        assert lost[0].check(error.ConnectionLost)
        assert session.connection is None

        # It comes back on the same port.
        root = harness.makeRoot("clock", period=60.0)
        factory = RecordingFactory(root)
        port = reactor.listenTCP(number, factory, interface="127.0.0.1")
        harness.servers.append(Served(harness, root, factory, port))
        ticks.clear()
        # Three ticks need the new period, which the second login asks for.
        await ticks.waitFor(reactor, 3)
        assert len(logins) == 2
        assert session.connection is logins[1]
        assert session.connection.connected
        assert not stopped.called
    finally:
        await session.stop()
    assert await stopped is None
    assert session.connection is None


@pytest_twisted.ensureDeferred
async def test_kicked_by_a_newer_login_stops_with_the_reason(reactor, harness):
    served = await harness.serve("sessions", maxPerUser=1, whenFull="replace-oldest")
    kicks: list[str] = []
    lost: list = []
    logins = Arrivals()
    session = realSession(
        reactor,
        served,
        mind=ClientMind(onKicked=kicks.append),
        onLogin=logins,
        onLost=lambda reason, delay: lost.append(reason),
    )
    stopped = session.start()
    try:
        (first,) = await logins.waitFor(reactor)
        assert session.connection is first
        newer = await served.login("alice", mind=ClientMind())
        with pytest.raises(Kicked) as kicked:
            await stopped
    finally:
        await session.stop()
    assert kicked.value.reason == kicks[0] == first.kicked
    assert "replaced by a newer login" in kicked.value.reason
    assert session.connection is None
    assert lost == []
    # It does not come back to kick the newer session in turn.
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(served.factory.made) == 2
    assert newer.connected
    assert newer.kicked is None
    assert served.registry.countOf("alice") == 1


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_stops_without_trying_again(reactor, harness):
    served = await harness.serve("sessions")
    lost: list = []
    session = realSession(
        reactor, served, password="wrong", onLost=lambda reason, delay: lost.append(reason)
    )
    with pytest.raises(BadCredentials):
        await session.start()
    assert lost == []
    assert session.connection is None
    await task.deferLater(reactor, 0.3, lambda: None)
    assert len(served.factory.made) == 1
    await served.settled()


@pytest_twisted.ensureDeferred
async def test_too_many_connections_tries_again_until_the_slot_frees(reactor, harness):
    served = await harness.serve("sessions", maxPerUser=1)
    holder = await served.login("alice")
    refusals = Arrivals()
    logins = Arrivals()
    session = realSession(
        reactor,
        served,
        onLogin=logins,
        onLost=lambda reason, delay: refusals(reason),
    )
    stopped = session.start()
    try:
        await refusals.waitFor(reactor, 3)
        assert all(r.check(TooManyConnections) for r in refusals)
        assert session.connection is None
        await holder.disconnect()
        await logins.waitFor(reactor)
        assert session.connection is not None
        assert logins == [session.connection]
        status = await session.connection.callRemote("status")
        assert (status["user"], status["sessions"]) == ("alice", 1)
    finally:
        await session.stop()
    assert await stopped is None
    await served.settled()


@pytest_twisted.ensureDeferred
async def test_a_penalised_address_comes_back_once_the_penalty_drained(reactor, harness):
    # The penalty and the session's delays run on one task.Clock, so that
    # 15 s of penalty take no time; the connections are real.
    clock = task.Clock()
    penalties = SourcePenalties(clock)
    for _ in range(3):
        penalties.failed("127.0.0.1")
    base = harness.makeRoot("tracking")
    root = LoginRoot(
        base.checker,
        base.realm,
        base.registry,
        base.registry.clock,
        base.registry.metrics,
        penalties=penalties,
    )
    served = await harness.serve(root=root)
    lost = Arrivals()
    logins = Arrivals()
    session = ReconnectingSession(
        clock,
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", served.port.getHost().port),
        "alice",
        "wonderland",
        timeout=5.0,
        onLogin=logins,
        onLost=lambda reason, delay: lost((reason, delay)),
        jitter=lambda: 1.0,
    )
    stopped = session.start()
    try:
        ((reason, delay),) = await lost.waitFor(reactor)
        assert reason.check(SourcePenalised)
        assert str(reason.value) == "too many failed logins from this address: try again in 15 s"
        assert delay == 15.0
        clock.advance(14.9)
        await task.deferLater(reactor, 0.1, lambda: None)
        assert len(served.factory.made) == 1  # no attempt before its time
        clock.advance(0.1)
        await logins.waitFor(reactor)
        assert session.connection is not None
        assert logins == [session.connection]
        assert len(served.factory.made) == 2
        assert served.registry.countOf("alice") == 1
        assert not stopped.called
    finally:
        await session.stop()
    assert clock.getDelayedCalls() == []
