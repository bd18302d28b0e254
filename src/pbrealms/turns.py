"""
L{Turns}: the logins of one user that is replacing a session, let in one at a
time.
"""

from __future__ import annotations

from twisted.internet import defer

from pbrealms.connection import IConnection


class ConnectionGone(Exception):
    """
    The client disconnected before its login completed.
    """


class Turns:
    """
    The logins of one user that is replacing a session, let in one at a time
    in the order they came: a FIFO lock, as L{defer.DeferredLock}.

    Unlike L{defer.DeferredLock} (or C{DeferredSemaphore}, C{DeferredQueue}),
    releasing never recurses.  Those fire the next waiter from inside
    C{release}; a waiter that fails at once (its client has gone) releases in
    turn, one stack level deeper, and a few hundred such waiters hit the
    recursion limit with the lock left held.  Here the lock is handed on in a
    loop: a release made while it runs returns to it.

    @ivar locked: whether a login holds its turn.
    @ivar waiting: the logins waiting, first come first, each with its
        connection.
    """

    def __init__(self) -> None:
        self.locked = False
        self.waiting: list[tuple[defer.Deferred[None], IConnection | None]] = []
        self._handing = False

    @property
    def idle(self) -> bool:
        """
        Nobody holds or waits for a turn, and none is being handed on.
        """
        return not (self.locked or self.waiting or self._handing)

    def acquire(self, connection: IConnection | None) -> defer.Deferred[None]:
        """
        @return: a L{Deferred} firing once it is this login's turn, or
            failing with L{ConnectionGone} if L{prune} finds C{connection}
            closed first.
        """
        if not (self.locked or self.waiting):
            self.locked = True
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self._cancel)
        self.waiting.append((d, connection))
        return d

    def _cancel(self, d: defer.Deferred[None]) -> None:
        self.waiting = [w for w in self.waiting if w[0] is not d]

    def prune(self) -> None:
        """
        Fail at once the waiters whose connection has closed, which would
        fail at their turn anyway.
        """
        kept: list[tuple[defer.Deferred[None], IConnection | None]] = []
        gone: list[defer.Deferred[None]] = []
        for d, connection in self.waiting:
            if connection is not None and not connection.connected:
                gone.append(d)
            else:
                kept.append((d, connection))
        self.waiting = kept
        for d in gone:
            d.errback(ConnectionGone())

    def release(self) -> None:
        """
        End the current turn and hand the next one on, without recursion.
        """
        self.locked = False
        if self._handing:
            return  # called from a waiter the loop below let in: it goes on
        self._handing = True
        try:
            while self.waiting and not self.locked:
                d, _ = self.waiting.pop(0)
                self.locked = True
                d.callback(None)
        finally:
            self._handing = False
