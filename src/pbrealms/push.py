"""
Pushes to clients: calls on a login's mind that never raise, and the clock's
periodic push.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.spread import pb

from pbrealms.errors import InvalidPeriod

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
            f"period must be from {MIN_PERIOD:g} to {MAX_PERIOD:g} seconds, not {value!r}"
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
    d = defer.maybeDeferred(mind.callRemote, method, *args)
    d.addCallbacks(lambda _: True, _pushFailed, errbackArgs=(mind, method, quiet, onGone))
    return d


# The minds whose errors were logged already.
_complained: weakref.WeakSet = weakref.WeakSet()


def _pushFailed(
    reason, mind: object, method: str, quiet: bool, onGone: Callable[[], object] | None
) -> bool:
    gone = reason.check(pb.DeadReferenceError, pb.PBConnectionLost, defer.CancelledError)
    if gone and onGone is not None:
        onGone()
    if not (gone or quiet or mind in _complained):
        _complained.add(mind)
        _log.warn(
            "client answered {method} with an error, and is not logged again: {error}",
            method=method,
            error=reason.getErrorMessage(),
        )
    return False


class PeriodicPush:
    """
    Call a push function once per period, starting at once.

    A tick that comes while the previous push is still unanswered is skipped,
    so a client that stops reading never makes the server buffer pushes.

    @ivar period: the current period, in seconds.
    @ivar skipped: how many ticks were skipped.
    """

    def __init__(
        self,
        clock: IReactorTime,
        period: float,
        pushOnce: Callable[[], defer.Deferred],
        lateness: Callable[[float], object] = lambda seconds: None,
    ) -> None:
        """
        @param pushOnce: sends one push; its L{Deferred} fires when answered.
        @param lateness: called with how late each tick came, in seconds.
        """
        self._clock = clock
        self.period = period
        self._pushOnce = pushOnce
        self._lateness = lateness
        self._due = 0.0
        self._next: IDelayedCall | None = None
        self._outstanding = False
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
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def setPeriod(self, period: float) -> None:
        """
        Change the period; the next push comes one new period from now.
        """
        self.period = period
        if self._next is not None:
            self._next.cancel()
            self._schedule(period)

    def _schedule(self, delay: float) -> None:
        self._due = self._clock.seconds() + delay
        self._next = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._lateness(self._clock.seconds() - self._due)
        self._schedule(self.period)
        if self._outstanding:
            self.skipped += 1
            return
        self._outstanding = True
        self._pushOnce().addBoth(self._answered)

    def _answered(self, _: object) -> None:
        self._outstanding = False
