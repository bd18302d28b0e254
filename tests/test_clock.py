"""
The clock realm's pushes, on a task.Clock.
"""

import math

import pytest
from twisted.internet import defer, task
from twisted.spread import pb

from pbrealms.errors import InvalidPeriod, MindRequired
from pbrealms.push import (
    MAX_PERIOD,
    MIN_PERIOD,
    PeriodicPush,
    PushScheduler,
    push,
    validatePeriod,
)
from pbrealms.realms.clock import ClockRealm
from pbrealms.sessions import SessionRegistry


class FakeBroker:
    """
    The connection of a L{FakeMind}: its write buffer may be full.
    """

    disconnected = False
    writeBlocked = False


class FakeMind:
    """
    A client object that records pushes; each answer (to a push that asks
    for one) waits for the test unless C{answerAtOnce}.
    """

    def __init__(self, answerAtOnce: bool = True) -> None:
        self.answerAtOnce = answerAtOnce
        self.broker = FakeBroker()
        self.pushes: list[tuple[str, tuple]] = []
        self.unanswered: list[defer.Deferred] = []

    @property
    def gone(self) -> bool:
        return self.broker.disconnected

    @gone.setter
    def gone(self, value: bool) -> None:
        self.broker.disconnected = value

    def callRemote(self, method, *args, pbanswer=1):
        if self.gone:
            raise pb.DeadReferenceError("Calling Stale Broker")
        self.pushes.append((method, args))
        if not pbanswer:
            return None
        if self.answerAtOnce:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self.unanswered.append(d)
        return d

    def times(self) -> list[float]:
        return [args[0] for method, args in self.pushes if method == "notifyTime"]


@pytest.fixture
def clock():
    return task.Clock()


def login(clock, mind, period=1.0):
    registry = SessionRegistry(clock, realm="clock")
    realm = ClockRealm(registry, clock, period)
    session = registry.open("alice", "test", mind)
    _, avatar, logout = realm.requestAvatar("alice", session.client, pb.IPerspective)
    session.onClose(logout)
    return session, avatar


def test_ticks_arrive_right_after_login_and_once_per_period(clock):
    clock.advance(1000)
    mind = FakeMind()
    session, _avatar = login(clock, mind, period=2.0)
    assert mind.times() == []  # not before the login answer has gone out
    clock.advance(0)
    assert mind.times() == [1000.0]
    clock.pump([1.0, 1.0, 1.0, 1.0])
    assert mind.times() == [1000.0, 1002.0, 1004.0]
    session.close()


def test_setperiod_changes_the_schedule(clock):
    mind = FakeMind()
    session, avatar = login(clock, mind, period=1.0)
    clock.advance(0)
    clock.advance(0.5)
    assert avatar.perspective_setperiod(3) == 3.0
    clock.advance(2.9)
    assert len(mind.times()) == 1
    clock.advance(0.1)
    assert mind.times() == [0.0, 3.5]
    clock.advance(3.0)
    assert mind.times() == [0.0, 3.5, 6.5]
    assert avatar.perspective_status()["period"] == 3.0
    session.close()


@pytest.mark.parametrize(
    "bad",
    [
        "1",
        b"1",
        None,
        True,
        False,
        [1.0],
        math.nan,
        math.inf,
        -math.inf,
        -1,
        0,
        0.0,
        MIN_PERIOD / 2,
        MAX_PERIOD * 2,
    ],
)
def test_invalid_periods_are_refused_and_change_nothing(clock, bad):
    mind = FakeMind()
    session, avatar = login(clock, mind, period=1.0)
    clock.advance(0)
    with pytest.raises(InvalidPeriod) as refused:
        avatar.perspective_setperiod(bad)
    assert isinstance(refused.value, pb.Error)
    assert avatar.ticker.period == 1.0
    clock.advance(1.0)
    assert mind.times() == [0.0, 1.0]
    session.close()


def test_period_bounds_are_accepted():
    assert validatePeriod(MIN_PERIOD) == MIN_PERIOD
    assert validatePeriod(MAX_PERIOD) == MAX_PERIOD
    assert validatePeriod(1) == 1.0
    assert MIN_PERIOD <= 0.05 and 3600 <= MAX_PERIOD <= 86400


def test_no_push_after_the_session_ends(clock):
    mind = FakeMind()
    session, _avatar = login(clock, mind)
    clock.advance(0)
    session.close()
    clock.advance(10)
    assert mind.times() == [0.0]
    assert clock.getDelayedCalls() == []


def test_no_push_when_the_session_ends_before_the_first(clock):
    mind = FakeMind()
    session, _avatar = login(clock, mind)
    session.close()
    clock.advance(10)
    assert mind.times() == []
    assert clock.getDelayedCalls() == []


def test_pushes_ask_for_no_answer(clock):
    mind = FakeMind(answerAtOnce=False)
    session, _avatar = login(clock, mind)
    clock.advance(0)
    clock.pump([1.0] * 5)
    assert len(mind.times()) == 6
    assert mind.unanswered == []
    session.close()


def test_a_client_that_stops_reading_is_skipped_until_its_buffer_drains(clock):
    mind = FakeMind()
    session, avatar = login(clock, mind)
    clock.advance(0)
    mind.broker.writeBlocked = True  # what the transport says when its buffer is full
    clock.pump([1.0] * 5)
    assert len(mind.pushes) == 1  # the rest were skipped, not buffered
    assert avatar.ticker.skipped == 5
    mind.broker.writeBlocked = False
    clock.advance(1.0)
    assert len(mind.pushes) == 2
    session.close()


def test_one_timer_serves_every_session_due_in_a_slot(clock):
    minds = [FakeMind() for _ in range(50)]
    sessions = []
    registry = SessionRegistry(clock, realm="clock")
    realm = ClockRealm(registry, clock, 1.0)
    for mind in minds:
        session = registry.open("alice", "test", mind)
        _, _avatar, logout = realm.requestAvatar("alice", session.client, pb.IPerspective)
        session.onClose(logout)
        sessions.append(session)
        clock.advance(0.001)  # 50 logins within 50 ms: five 10 ms slots
    assert len(clock.getDelayedCalls()) <= 6
    clock.pump([0.01] * 145)  # until 1.5 s: each pushed at login and once more
    assert all(len(mind.times()) == 2 for mind in minds)
    assert len(clock.getDelayedCalls()) <= 6
    for session in sessions:
        session.close()
    assert clock.getDelayedCalls() == []


def test_a_vanished_client_raises_nothing_and_logs_nothing(clock, log):
    mind = FakeMind()
    session, _avatar = login(clock, mind)
    clock.advance(0)
    mind.gone = True
    clock.pump([1.0] * 3)
    assert len(mind.times()) == 1
    session.close()
    assert not log.errors()


def test_push_never_fails():
    results = []
    push(FakeMind(), "notifyTime", 1.0).addCallback(results.append)
    gone = FakeMind()
    gone.gone = True
    push(gone, "notifyTime", 1.0).addCallback(results.append)
    lost = FakeMind(answerAtOnce=False)
    push(lost, "notifyTime", 1.0).addCallback(results.append)
    lost.unanswered[0].errback(pb.PBConnectionLost("gone"))
    assert results == [True, False, False]


def test_a_login_without_mind_is_refused():
    clock = task.Clock()
    realm = ClockRealm(SessionRegistry(clock), clock, 1.0)
    with pytest.raises(MindRequired):
        realm.requestAvatar("alice", None, pb.IPerspective)


def test_periodic_push_stop_is_idempotent(clock):
    ticker = PeriodicPush(PushScheduler(clock), 1.0, lambda: True)
    ticker.start()
    ticker.stop()
    ticker.stop()
    assert clock.getDelayedCalls() == []


class RefusingMind(FakeMind):
    """
    A client object that answers every push with an error.
    """

    def callRemote(self, method, *args):
        self.pushes.append((method, args))
        return defer.fail(pb.Error(f"no {method} here"))


def test_a_client_that_answers_with_errors_is_logged_once(log):
    mind = RefusingMind()
    results = [push(mind, "notifyGreeting", "hi") for _ in range(40)]
    assert [r.result for r in results] == [False] * 40
    warnings = [m for m in log.messages() if "answered notifyGreeting with an error" in m]
    assert len(warnings) == 1
    assert "no notifyGreeting here" in warnings[0]


class Recorder:
    """
    A push function for a L{PeriodicPush}: records when it ran, and runs
    C{then} (once) on its first call.
    """

    def __init__(self, clock, then=None) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.then = then

    def __call__(self) -> bool:
        self.times.append(self.clock.seconds())
        then, self.then = self.then, None
        if then is not None:
            then()
        return True


def test_a_push_stopped_by_another_of_its_slot_is_not_run(clock):
    scheduler = PushScheduler(clock)
    second = Recorder(clock)
    b = PeriodicPush(scheduler, 1.0, second)
    a = PeriodicPush(scheduler, 1.0, Recorder(clock, then=b.stop))
    a.start()
    b.start()
    clock.pump([0.5] * 6)
    assert second.times == []
    a.stop()
    assert clock.getDelayedCalls() == []


def test_a_push_rescheduled_by_another_of_its_slot_runs_on_its_new_schedule(clock):
    scheduler = PushScheduler(clock)
    second = Recorder(clock)
    b = PeriodicPush(scheduler, 1.0, second)
    a = PeriodicPush(scheduler, 1.0, Recorder(clock, then=lambda: b.setPeriod(2.0)))
    a.start()
    b.start()
    clock.advance(0)
    clock.pump([0.5] * 10)
    assert second.times == [2.0, 4.0]
    a.stop()
    b.stop()
    assert clock.getDelayedCalls() == []


def test_a_failing_push_leaves_the_others_of_its_slot_on_schedule(clock, log):
    log.errorsExpected = True
    scheduler = PushScheduler(clock)
    survivor = Recorder(clock)

    def broken() -> bool:
        raise RuntimeError("broken")

    pushes = [PeriodicPush(scheduler, 1.0, broken), PeriodicPush(scheduler, 1.0, survivor)]
    for push_ in pushes:
        push_.start()
    clock.advance(0)
    clock.pump([1.0] * 3)
    assert survivor.times == [0.0, 1.0, 2.0, 3.0]
    assert [e["log_format"] for e in log.errors()][:1] == ["error in a periodic push"]
    for push_ in pushes:
        push_.stop()


def test_after_a_stall_missed_ticks_are_not_made_up(clock):
    recorder = Recorder(clock)
    ticker = PeriodicPush(PushScheduler(clock), 1.0, recorder)
    ticker.start()
    clock.advance(0)
    clock.advance(2.5)  # the reactor was busy for 2.5 s
    clock.advance(0.5)
    clock.advance(1.0)
    assert recorder.times == [0.0, 2.5, 3.0, 4.0]
    ticker.stop()


def test_pushes_keep_their_period_at_epoch_times(clock):
    # Seconds since the epoch carry rounding errors of some 1e-5 slots.
    clock.advance(1795999999.0)
    recorder = Recorder(clock)
    ticker = PeriodicPush(PushScheduler(clock), 0.05, recorder)
    ticker.start()
    clock.advance(0)
    for _ in range(101):
        clock.advance(0.01)
    assert len(recorder.times) == 21  # at once, then every 0.05 s for 1 s
    ticker.stop()
