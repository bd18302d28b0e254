"""
Checking passwords against bcrypt hashes in a thread pool of their own,
with a bound on the checks waiting and a fair share of them per source.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from pbrealms.errors import ServerBusy, ShuttingDown


def shareOf(source: str | None) -> str:
    """
    Whose share of the waiting hash checks a check from the address
    C{source} takes: the address itself, or for IPv6 its /64, which one
    subscriber usually holds whole; C{""} for no source.
    """
    if not source:
        return ""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return source


#: Seconds between two log lines about checks answered busy.
BUSY_LOG_INTERVAL = 10.0


class _DaemonThread(threading.Thread):
    # A hash of cost 16 takes seconds, and nobody waits for its answer once
    # the server stops: the process may exit without waiting for it.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


class _DaemonThreadPool(ThreadPool):
    threadFactory = _DaemonThread


class _Check:
    __slots__ = ("deferred", "hashed", "password")

    def __init__(self, password: bytes, hashed: bytes) -> None:
        self.password = password
        self.hashed = hashed
        self.deferred: defer.Deferred[bool] = defer.Deferred()


class PasswordHasher(service.Service):
    """
    Checks passwords against bcrypt hashes in C{threads} threads, so that
    the reactor stays responsive while hashes are computed, with at most
    C{maxPending} checks hashing or waiting for a thread, so that a burst of
    logins cannot queue up hours of hashing.

    Waiting checks are kept by source and started round-robin across
    sources, so that the checks of one source delay its own more than
    another's.  When C{maxPending} is reached, a check from a source that
    would still hold fewer waiting checks than the source holding the most
    takes the place of that one's newest, which fails with L{ServerBusy};
    any other check fails with L{ServerBusy} at once.  So no source holds
    more than a fair share of the waiting checks while others want some.

    In a service tree, it stops with it: see L{stopService}.  Outside one,
    its threads stop when the reactor shuts down.

    @ivar hashing: how many checks are hashing in a thread.
    @ivar waiting: how many checks wait for a thread.
    @ivar closing: set once stopping: every check fails with L{ShuttingDown}.
    """

    _log = Logger()

    def __init__(
        self,
        threads: int = 4,
        maxPending: int = 32,
        run: Callable[[bytes, bytes], defer.Deferred[bool]] | None = None,
    ) -> None:
        """
        @param run: hashes one check (for tests); by default C{bcrypt} in
            this hasher's threads.
        """
        if not 1 <= threads <= maxPending:
            raise ValueError("need 1 <= threads <= maxPending")
        self.threads = threads
        self.maxPending = maxPending
        self.hashing = 0
        self.waiting = 0
        self.closing = False
        # Insertion-ordered: the first source is served next, then goes last.
        self._queues: dict[str, deque[_Check]] = {}
        self._idle: list[defer.Deferred[None]] = []
        self._pool: ThreadPool | None = None
        self._run = run or self._inThread
        self._busyCount = 0
        self._busyLogged: float | None = None

    def _busy(self) -> ServerBusy:
        """
        A refusal, counted: those that cost nothing to ask for are logged at
        most once per L{BUSY_LOG_INTERVAL}, not once each.
        """
        self._busyCount += 1
        now = time.monotonic()
        if self._busyLogged is None or now - self._busyLogged >= BUSY_LOG_INTERVAL:
            self._log.info(
                "password checks: {count} answered busy since the last such line; "
                "{pending} of {limit} hashing or waiting",
                count=self._busyCount,
                pending=self.pending,
                limit=self.maxPending,
            )
            self._busyLogged, self._busyCount = now, 0
        return ServerBusy()

    @property
    def pending(self) -> int:
        """
        How many checks are hashing or waiting.
        """
        return self.hashing + self.waiting

    def check(
        self, password: bytes, hashed: bytes, source: str | None = None
    ) -> defer.Deferred[bool]:
        """
        Check C{password} against the bcrypt hash C{hashed}, for a login
        from the address C{source} (L{None}: one anonymous source).

        @return: a L{Deferred} firing with whether C{password} matches;
            failing with L{ServerBusy} if there is no room for it or it lost
            its place to a source holding fewer, with L{ShuttingDown} once
            the hasher stops.
        """
        if self.closing:
            return defer.fail(ShuttingDown())
        share = shareOf(source)
        if self.pending >= self.maxPending and not self._makeRoom(share):
            return defer.fail(self._busy())
        check = _Check(password, hashed)
        self._queues.setdefault(share, deque()).append(check)
        self.waiting += 1
        self._startWaiting()
        return check.deferred

    def _makeRoom(self, share: str) -> bool:
        """
        Fail the newest waiting check of the source holding the most, if
        C{share} would still hold fewer with one more.
        """
        if not self._queues:
            return False
        biggest = max(self._queues.values(), key=len)
        if len(self._queues.get(share, ())) + 1 >= len(biggest):
            return False
        evicted = biggest.pop()  # it held 2 or more: never left empty
        self.waiting -= 1
        evicted.deferred.errback(self._busy())
        return True

    def _startWaiting(self) -> None:
        while self.hashing < self.threads and self._queues:
            share = next(iter(self._queues))
            queue = self._queues.pop(share)
            check = queue.popleft()
            if queue:
                self._queues[share] = queue  # to the back of the round
            self.waiting -= 1
            self.hashing += 1
            d = defer.maybeDeferred(self._run, check.password, check.hashed)
            d.addBoth(self._finished, check)

    def _finished(self, result: bool | Failure, check: _Check) -> None:
        self.hashing -= 1
        self._startWaiting()
        if isinstance(result, Failure):
            check.deferred.errback(result)
        else:
            check.deferred.callback(result)
        if not self.hashing:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _inThread(self, password: bytes, hashed: bytes) -> defer.Deferred[bool]:
        from twisted.internet import reactor

        if self._pool is None:
            self._pool = _DaemonThreadPool(0, self.threads, name="pbrealms-bcrypt")
            self._pool.start()
            if not self.running:
                reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        # Adapted: the reactor module's type does not name IReactorFromThreads,
        # which every reactor provides.
        return threads.deferToThreadPool(
            IReactorFromThreads(reactor), self._pool, _checkpw, password, hashed
        )

    def close(self) -> None:
        """
        Refuse new checks, and fail those that wait with L{ShuttingDown};
        those hashing go on.  Called as the server begins to shut down, so
        that only the checks already hashing go on, during the grace.
        """
        self.closing = True
        queues, self._queues = self._queues, {}
        self.waiting = 0
        for queue in queues.values():
            for check in queue:
                check.deferred.errback(ShuttingDown())

    def whenIdle(self) -> defer.Deferred[None]:
        """
        @return: a L{Deferred} that fires once no check is hashing.
        """
        if not self.hashing:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self.closing = False

    def stopService(self) -> None:
        """
        L{close}, and stop the threads once the checks hashing are done,
        without waiting for them: the server stops its hasher after the
        grace, when the connections those checks answer have closed.  (The
        threads are daemons: a process that exits does not wait for them.)
        """
        super().stopService()
        self.close()
        self.whenIdle().addCallback(lambda _: self.stop())

    def stop(self) -> None:
        """
        Stop the threads (they start again on the next check).
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # bcrypt reads at most 72 bytes, and bcrypt 5 refuses more: such a
    # password never matches, after the same work as any other.
    if len(password) > 72:
        bcrypt.checkpw(password[:72], hashed)
        return False
    return bcrypt.checkpw(password, hashed)
