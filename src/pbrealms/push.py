"""
Pushes to clients: L{ClientReference}, the one place that calls a login's
mind, and the clock's periodic push.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.spread import pb
from zope.interface import implementer

from pbrealms.errors import InvalidPeriod, printable
from pbrealms.metrics import ServerMetrics
from pbrealms.protocol import IClient

#: The shortest and longest push periods, in seconds.
MIN_PERIOD = 0.05
MAX_PERIOD = 86400.0
#: The most pushes to one session that may await their answer; more are skipped.
MAX_UNANSWERED = 64

_log = Logger()


def validatePeriod(value: object) -> float:
    """
    Check a push period.

    @return: C{value} as a float.
    @raise InvalidPeriod: unless C{value} is a real number (not a bool) from
        L{MIN_PERIOD} to L{MAX_PERIOD} seconds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidPeriod(f"period must be a number of seconds, not {type(value).__name__}")
    try:
        period = float(value)
    except OverflowError:
        period = math.inf
    if not math.isfinite(period) or not MIN_PERIOD <= period <= MAX_PERIOD:
        raise InvalidPeriod(
            f"period must be from {MIN_PERIOD:g} to {MAX_PERIOD:g} seconds, not {printable(value)}"
        )
    return period


def push(
    mind: pb.RemoteReference,
    method: str,
    *args: object,
    quiet: bool = False,
    onGone: Callable[[], object] | None = None,
) -> defer.Deferred[bool]:
    """
    Call C{method} on a client's mind.

    @param quiet: log nothing when the client answers with an error.
    @param onGone: called if the client has gone, instead of answering.
    @return: a L{Deferred} that fires with C{True} once the client answered,
        C{False} if the client is gone or answered with an error; it never
        fails, and nothing is raised synchronously.  A client that has gone
        needs no log line: its session ends through the disconnect.  A client
        that answers with an error is logged once, not on every push.
    """
    # A client may pass anything as its mind: one that is not a reference
    # fails as an error answer would, and raises nothing here.
    callRemote = getattr(mind, "callRemote", None)
    if callRemote is None:
        d: defer.Deferred[Any] = defer.fail(TypeError("the client's mind is not a reference"))
    else:
        d = defer.maybeDeferred(callRemote, method, *args)
    d.addCallbacks(lambda _: True, _pushFailed, errbackArgs=(mind, method, quiet, onGone))
    return d


# The minds whose errors were logged already, by identity: a
# RemoteReference hashes as its id on its own connection, which every
# client's mind shares, and comparing two of different connections raises.
_complained: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()


def _pushFailed(
    reason, mind: object, method: str, quiet: bool, onGone: Callable[[], object] | None
) -> bool:
    gone = reason.check(pb.DeadReferenceError, pb.PBConnectionLost, defer.CancelledError)
    if gone and onGone is not None:
        onGone()
    if not (gone or quiet or _complained.get(id(mind)) is mind):
        # Only a reference reaches here from a client (see the login code);
        # anything else a caller passed may not take a weak reference.
        with contextlib.suppress(TypeError):
            _complained[id(mind)] = mind
        _log.warn(
            "client answered {method} with an error, and is not logged again: {error}",
            method=method,
            error=printable(reason.getErrorMessage()),
        )
    return False


def notify(mind: pb.RemoteReference, method: str, *args: object) -> bool:
    """
    Call C{method} on a client's mind without asking for an answer, unless
    its connection cannot take more now (see L{wire.LimitedBroker}).  The
    server never waits on a client this way, and a client that stops
    reading costs at most its transport's buffer.

    @return: whether the call was sent; nothing is raised.
    """
    # A client may pass anything as its mind; a reference's broker is the
    # connection it came on (an IConnection).
    broker = getattr(mind, "broker", None)
    if broker is None or broker.disconnected or broker.writeBlocked:
        return False
    try:
        failed = mind.callRemote(method, *args, pbanswer=0)
    except Exception:
        return False
    if isinstance(failed, defer.Deferred):
        # PB returns a failed Deferred when the arguments cannot be sent.
        failed.addErrback(lambda _: None)
        return False
    return True


def _nothing() -> None:
    pass


@implementer(IClient)
class ClientReference:
    """
    A login's mind as L{IClient}: the one place that pushes to a client,
    owning both ways of delivery and their bounds.

      - C{notifyTime} is one-way: it asks for no answer, and it is skipped
        while the connection cannot take more (see L{notify}), so a client
        that stops reading costs at most its transport's buffer.
      - C{notifyGreeting}, C{notifySessionOpened} and C{notifySessionClosed}
        ask for an answer, and at most L{MAX_UNANSWERED} of them wait for
        theirs: more are skipped, so the server never queues pushes for a
        client that does not answer.  A client found gone meanwhile is
        reported to C{onGone} at once, not only once PB tells of the
        disconnect.
      - C{notifyKicked} and C{notifyShutdown} are the last word: they ask for
        an answer whatever the count, log no error the client answers with,
        and return a L{Deferred} of whether the client answered.

    Every push is counted in C{metrics}; none raises.

    @ivar mind: what the client passed at login.
    @ivar unanswered: how many capped pushes await their answer.
    """

    __slots__ = ("_metrics", "_onGone", "mind", "unanswered")

    def __init__(
        self,
        mind: pb.RemoteReference,
        metrics: ServerMetrics,
        onGone: Callable[[], object] = _nothing,
    ) -> None:
        self.mind = mind
        self._metrics = metrics
        self._onGone = onGone
        self.unanswered = 0

    def notifyTime(self, seconds: float) -> bool:
        """
        @return: whether the push was sent.
        """
        return self._metrics.notified(notify(self.mind, "notifyTime", seconds))

    def notifyGreeting(self, text: str) -> None:
        self._capped("notifyGreeting", text)

    def notifySessionOpened(self, info: dict) -> None:
        self._capped("notifySessionOpened", info)

    def notifySessionClosed(self, info: dict) -> None:
        self._capped("notifySessionClosed", info)

    def notifyKicked(self, reason: str) -> defer.Deferred[bool]:
        return self._lastWord("notifyKicked", reason)

    def notifyShutdown(self, reason: str) -> defer.Deferred[bool]:
        return self._lastWord("notifyShutdown", reason)

    def _capped(self, method: str, *args: object) -> None:
        if self.unanswered >= MAX_UNANSWERED:
            self._metrics.notified(False)
            return
        self.unanswered += 1
        push(self.mind, method, *args, onGone=self._onGone).addCallback(self._answered)

    def _answered(self, delivered: bool) -> bool:
        self.unanswered -= 1
        return self._metrics.pushed(delivered)

    def forget(self) -> None:
        """
        Report a gone client to nobody any more: its session has ended.  This
        breaks the cycle of a session and its client, which would otherwise
        keep both, and the client's reference, until the garbage collector
        runs.
        """
        self._onGone = _nothing

    def _lastWord(self, method: str, reason: str) -> defer.Deferred[bool]:
        d = push(self.mind, method, reason, quiet=True)
        return d.addCallback(self._metrics.pushed)


class PushScheduler:
    """
    Runs any number of L{PeriodicPush}es on one timer per slot of
    1/C{slotsPerSecond} seconds, not one per push: with thousands of
    sessions the reactor's timer heap stays small, and each timer serves
    every session due in its slot.  A push is due at most one slot late.
    """

    def __init__(
        self,
        clock: IReactorTime,
        lateness: Callable[[float], object] = lambda seconds: None,
        slotsPerSecond: int = 100,
    ) -> None:
        """
        @param lateness: called with how late each slot's timer ran, in
            seconds.
        """
        self.clock = clock
        self._lateness = lateness
        self._rate = slotsPerSecond
        self._slots: dict[int, dict[PeriodicPush, None]] = {}
        self._timers: dict[int, IDelayedCall] = {}

    def add(self, ticker: PeriodicPush, due: float) -> int:
        """
        Run C{ticker} once at C{due}, seconds since the epoch.

        @return: the slot, for L{remove}.
        """
        # A due time a rounding error (under a thousandth of a slot) past a
        # slot's start is in that slot; seconds since the epoch have errors
        # of some 1e-5 slots.
        slot = math.ceil(due * self._rate - 1e-3)
        tickers = self._slots.get(slot)
        if tickers is None:
            tickers = self._slots[slot] = {}
            delay = max(0.0, slot / self._rate - self.clock.seconds())
            self._timers[slot] = self.clock.callLater(delay, self._run, slot)
        tickers[ticker] = None
        return slot

    def remove(self, ticker: PeriodicPush, slot: int) -> None:
        tickers = self._slots.get(slot)
        if tickers is None or tickers.pop(ticker, False) is False:
            return
        if not tickers:
            del self._slots[slot]
            self._timers.pop(slot).cancel()

    def _run(self, slot: int) -> None:
        del self._timers[slot]
        tickers = self._slots.pop(slot)
        self._lateness(self.clock.seconds() - slot / self._rate)
        for ticker in tickers:
            # One stopped or rescheduled by an earlier push of this slot is
            # no longer due here.
            if ticker._slot != slot:
                continue
            try:
                ticker._tick()
            except Exception:
                _log.failure("error in a periodic push")


class PeriodicPush:
    """
    Call a push function once per period, starting at once, on a
    L{PushScheduler}.

    @ivar period: the current period, in seconds.
    @ivar skipped: how many ticks the push function did not send.
    """

    def __init__(
        self, scheduler: PushScheduler, period: float, pushOnce: Callable[[], bool]
    ) -> None:
        """
        @param pushOnce: sends one push, if it can; returns whether it did.
        """
        self._scheduler = scheduler
        self.period = period
        self._pushOnce = pushOnce
        self._slot: int | None = None
        self._due = 0.0
        self.skipped = 0

    def start(self) -> None:
        """
        Push now (on the next turn of the reactor), then once per period.
        """
        self._schedule(0)

    def stop(self) -> None:
        """
        Push no more.  Safe to call more than once.
        """
        if self._slot is not None:
            self._scheduler.remove(self, self._slot)
            self._slot = None

    def setPeriod(self, period: float) -> None:
        """
        Change the period; the next push comes one new period from now.
        """
        self.period = period
        if self._slot is not None:
            self.stop()
            self._schedule(period)

    def _schedule(self, delay: float) -> None:
        self._due = self._scheduler.clock.seconds() + delay
        self._slot = self._scheduler.add(self, self._due)

    def _tick(self) -> None:
        # Due one period after the last due time, not after now: lateness
        # must not add up into fewer pushes.  Ticks missed are not made up:
        # after a stall, the next is the schedule's first one after now.
        now = self._scheduler.clock.seconds()
        due = self._due + self.period
        if due <= now:
            due += self.period * (math.floor((now - due) / self.period) + 1)
        self._due = due
        self._slot = self._scheduler.add(self, due)
        if not self._pushOnce():
            self.skipped += 1
