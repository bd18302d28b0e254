"""
The session registry: who is logged in, from where, since when.

This is the one place where sessions are counted, admitted and closed.  Realms
read from it and never count for themselves; the login root opens sessions in
it and never knows which realm it serves.  It is in memory; its public methods
are the seam a shared store would sit behind.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator
from itertools import count
from operator import attrgetter

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pbrealms.connection import IConnection
from pbrealms.errors import ShuttingDown, TooManyConnections
from pbrealms.metrics import ServerMetrics
from pbrealms.session import Session, SessionObserver
from pbrealms.sessionlog import SessionLog
from pbrealms.turns import ConnectionGone, Turns
from pbrealms.whenfull import REFUSE, WhenFull, policyNamed

_sessionId = attrgetter("id")

#: How many logins of one user may wait behind the one that is replacing a
#: session; beyond that a login is refused at once (L{TooManyConnections}).
MAX_WAITING_PER_USER = 16


_log = Logger(namespace="pbrealms.sessions.SessionRegistry")


class SessionRegistry:
    """
    The open sessions of every user, the per-user limit on them, and what
    happens to a login beyond it.

    @ivar realm: the realm's name, for the log.
    @ivar maxPerUser: the most sessions one user may have open, or L{None}
        for no limit.
    @ivar policy: what a login beyond C{maxPerUser} does (see
        L{pbrealms.whenfull}), chosen by name with C{whenFull}.
    @ivar metrics: where session counts and durations go.
    @ivar closing: set when the server shuts down: no session is admitted.
    @ivar maxWaiting: how many logins of a user may wait behind one that is
        replacing; more are refused at once.
    """

    def __init__(
        self,
        clock: IReactorTime,
        realm: str = "",
        maxPerUser: int | None = None,
        metrics: ServerMetrics | None = None,
        whenFull: str = REFUSE,
        pingTimeout: float = 10.0,
        maxWaiting: int = MAX_WAITING_PER_USER,
    ) -> None:
        self.policy: WhenFull = policyNamed(whenFull, clock, pingTimeout)
        self.clock = clock
        self.realm = realm
        self.maxPerUser = maxPerUser
        self.maxWaiting = maxWaiting
        self.metrics = metrics or ServerMetrics()
        self.closing = False
        self._byUser: dict[str, dict[int, Session]] = {}
        # Every open session, by id: ids only grow, so open appends.  It lets
        # describe find a page without walking the sessions before it.
        self._byId: list[Session] = []
        self._ids = count(1)
        self._observers: list[SessionObserver] = []
        # Users with a login waiting for a replaced session to go: their
        # logins are admitted one at a time, in order.
        self._replacing: dict[str, Turns] = {}
        # Sessions admitted under that lock, and how to release it once each
        # has logged in or ended.
        self._settling: dict[int, Callable[[], None]] = {}
        # Observer calls not yet made: each is made after the one before has
        # returned, so that a session an observer ends (a push found its
        # client gone) is told of after, never inside, another's.
        self._news: deque[tuple[Callable[..., object], Session, tuple[object, ...]]] = deque()
        self._telling = False
        self.observe(SessionLog(realm, self.__len__, self.metrics, clock))

    @property
    def whenFull(self) -> str:
        """
        The name of the conflict policy.
        """
        return self.policy.name

    def observe(self, observer: SessionObserver) -> None:
        """
        Tell C{observer} of every session activated, and of its end.
        """
        self._observers.append(observer)

    def open(
        self, user: str, peer: str, mind: object = None, connection: IConnection | None = None
    ) -> Session:
        """
        Admit a new session of C{user} if there is room for it.

        @raise TooManyConnections: if C{user} has C{maxPerUser} open sessions.
        @raise ShuttingDown: once L{closing} is set.
        """
        if self.closing:
            raise ShuttingDown()
        if self.full(user):
            raise self.tooMany()
        session = Session(self, next(self._ids), user, peer, self.clock.seconds(), mind, connection)
        self._byUser.setdefault(user, {})[session.id] = session
        self._byId.append(session)
        return session

    def admit(
        self, user: str, peer: str, mind: object = None, connection: IConnection | None = None
    ) -> defer.Deferred[Session]:
        """
        Admit a new session of C{user}, making room for it as C{whenFull}
        says.  The limit holds at every instant: a replaced session has
        closed (and its logout run) before the new one opens.  The logins of
        a user that is replacing are admitted one at a time, each once the
        one before is logged in (L{activate}) or has ended, so that each
        finds the sessions before it replaceable.  At most C{maxWaiting} of
        them wait (not counting those whose connection has closed); one more
        is refused at once.

        @return: a L{Deferred} firing with the session, or failing with
            L{TooManyConnections}, L{ShuttingDown}, or L{ConnectionGone} if
            C{connection} closed while the login waited.
        """
        turns = self._replacing.get(user)
        if turns is None:
            if not self.policy.replaces or not self.full(user):
                return defer.maybeDeferred(self.open, user, peer, mind, connection)
            turns = self._replacing[user] = Turns()
        elif len(turns.waiting) >= self.maxWaiting:
            turns.prune()
            if len(turns.waiting) >= self.maxWaiting:
                return defer.fail(self.tooMany())

        def release(_: object = None) -> None:
            turns.release()
            if turns.idle and self._replacing.get(user) is turns:
                del self._replacing[user]

        def opened(session: Session) -> Session:
            self._settling[session.id] = release
            return session

        def refused(reason: Failure) -> Failure:
            release()
            return reason

        def myTurn(_: None) -> defer.Deferred[Session]:
            d = defer.ensureDeferred(self._replaceAndOpen(user, peer, mind, connection))
            return d.addCallbacks(opened, refused)

        return turns.acquire(connection).addCallback(myTurn)

    async def _replaceAndOpen(
        self, user: str, peer: str, mind: object, connection: IConnection | None
    ) -> Session:
        while True:
            self.stillWanted(connection)
            if not self.full(user):
                return self.open(user, peer, mind, connection)
            # Only a logged-in session is replaced: one still logging in
            # has nobody to tell yet.
            oldest = next((s for s in self.sessionsOf(user) if s.active), None)
            if oldest is None:
                raise self.tooMany()
            await self.policy.makeRoom(self, oldest, peer, connection)

    def stillWanted(self, connection: IConnection | None) -> None:
        """
        @raise ShuttingDown: if the server is shutting down.
        @raise ConnectionGone: if the login's connection has closed.
        """
        if self.closing:
            raise ShuttingDown()
        if connection is not None and not connection.connected:
            raise ConnectionGone()

    def drop(
        self,
        session: Session,
        reason: str,
        why: str,
        keepConnection: bool = False,
        successor: str | None = None,
    ) -> None:
        """
        End C{session} (its logout runs now) and close its connection, unless
        C{keepConnection}: the new login that replaces it came on it.

        @param reason: completes "USER ... from PEER" in the log line.
        @param why: the C{why} label of C{pbrealms_sessions_dropped_total}.
        @param successor: the address of the login replacing C{session}.
        """
        session.droppedFor = why
        session.close(reason, successor)
        if session.connection is not None and not keepConnection:
            session.connection.drop()

    def tooMany(self) -> TooManyConnections:
        """
        The refusal of a login beyond the limit: only a limited registry is
        ever full.
        """
        assert self.maxPerUser is not None
        return TooManyConnections(self.maxPerUser)

    def full(self, user: str) -> bool:
        """
        Whether C{user} has as many sessions as allowed.
        """
        return self.maxPerUser is not None and self.countOf(user) >= self.maxPerUser

    def activate(self, session: Session) -> None:
        """
        Mark C{session} as logged in: its client has its avatar.  Only the
        sessions activated are observed (and so logged); one closed before
        is a refused login.
        """
        session.active = True
        self._tell([(o.sessionOpened, session, ()) for o in self._observers])
        self.settled(session)

    def settled(self, session: Session) -> None:
        """
        C{session} has logged in or ended: the next login of a user that is
        replacing may go.
        """
        release = self._settling.pop(session.id, None)
        if release is not None:
            release()

    def forget(self, session: Session, reason: str) -> None:
        """
        Take C{session}, which has just ended, out of the table, and tell
        the observers if it had logged in.  Called by L{Session.close} only.
        """
        sessions = self._byUser[session.user]
        del sessions[session.id]
        del self._byId[bisect_left(self._byId, session.id, key=_sessionId)]
        if not sessions:
            del self._byUser[session.user]
        if session.active:
            self._tell([(o.sessionClosed, session, (reason,)) for o in self._observers])

    def _tell(self, news: list[tuple[Callable[..., object], Session, tuple[object, ...]]]) -> None:
        self._news.extend(news)
        if self._telling:
            return  # the loop below, further up the stack, makes it next
        self._telling = True
        try:
            while self._news:
                method, session, args = self._news.popleft()
                try:
                    method(session, *args)
                except Exception:
                    _log.failure("error while telling of session {id}", id=session.id)
        finally:
            self._telling = False

    def sessionsOf(self, user: str) -> list[Session]:
        """
        The open sessions of C{user}, oldest first.
        """
        return list(self._byUser.get(user, {}).values())

    def countOf(self, user: str) -> int:
        """
        How many sessions C{user} has open.
        """
        return len(self._byUser.get(user, ()))

    def describe(self, after: int = 0, limit: int | None = None) -> tuple[list[dict], int | None]:
        """
        A page of the open sessions, as a person or a dashboard reads them:
        of the C{limit} open sessions (all if L{None}) with the lowest ids
        above C{after}, those logged in, in id order.  Its cost is that of
        the page, however many sessions there are.

        @return: the page, and the C{after} of the next page, or L{None} if
            no session follows.  A page may hold fewer than C{limit}
            sessions (those still logging in are left out) and yet have one
            after it.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        start = bisect_right(self._byId, after, key=_sessionId)
        end = len(self._byId) if limit is None else start + limit
        chunk = self._byId[start:end]
        now = self.clock.seconds()
        page = [
            {
                "user": s.user,
                "session": s.id,
                "peer": s.peer,
                "since": s.since,
                "idle": round(now - s.lastCall, 3),
            }
            for s in chunk
            if s.active
        ]
        return page, chunk[-1].id if end < len(self._byId) else None

    def __len__(self) -> int:
        # Every open session is in _byId: no walk over the users per scrape.
        return len(self._byId)

    def __iter__(self) -> Iterator[Session]:
        for sessions in list(self._byUser.values()):
            yield from list(sessions.values())
