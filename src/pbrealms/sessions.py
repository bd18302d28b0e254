"""
The session registry: who is logged in, from where, since when.

This is the one place where sessions are counted, admitted and closed.  Realms
read from it and never count for themselves; the login root opens sessions in
it and never knows which realm it serves.  It is in memory; its public methods
are the seam a shared store would sit behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import count

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pbrealms.errors import ShuttingDown, TooManyConnections
from pbrealms.metrics import ServerMetrics


class Session:
    """
    One login of one user, from its admission until it ends.

    @ivar id: a number unique in this process.
    @ivar user: the user name.
    @ivar peer: the client's address, as text.
    @ivar since: when the session was admitted, in seconds since the epoch.
    @ivar mind: what the client passed to login as its client object, or
        L{None}.
    @ivar lastCall: when the client last called its avatar (or logged in).
    """

    __slots__ = (
        "_onClose",
        "_registry",
        "active",
        "closed",
        "id",
        "lastCall",
        "mind",
        "peer",
        "since",
        "user",
    )

    def __init__(
        self, registry: SessionRegistry, id: int, user: str, peer: str, since: float, mind: object
    ) -> None:
        self._registry = registry
        self.id = id
        self.user = user
        self.peer = peer
        self.since = since
        self.mind = mind
        self.lastCall = since
        self.active = False
        self.closed = False
        self._onClose: list[Callable[[], object]] = []

    def onClose(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} when this session ends; at once if it has ended.
        Callbacks run in the reverse order of registration.
        """
        if self.closed:
            callback()
        else:
            self._onClose.append(callback)

    def close(self, reason: str = "logged out") -> None:
        """
        End this session.  Only the first call has an effect, so every path
        that ends a session may call it.
        """
        if self.closed:
            return
        self.closed = True
        self._registry._closed(self, reason)
        callbacks, self._onClose = self._onClose, []
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception:
                self._registry._log.failure(
                    "error while closing session {id} of {user}", id=self.id, user=self.user
                )

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.user} from {self.peer}>"


class SessionRegistry:
    """
    The open sessions of every user, and the per-user limit on them.

    @ivar realm: the realm's name, for the log.
    @ivar maxPerUser: the most sessions one user may have open, or L{None}
        for no limit.
    @ivar metrics: where session counts and durations go.
    @ivar closing: set when the server shuts down: no session is admitted.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        realm: str = "",
        maxPerUser: int | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.clock = clock
        self.realm = realm
        self.maxPerUser = maxPerUser
        self.metrics = metrics or ServerMetrics()
        self.closing = False
        self.metrics.countSessions(realm, self.__len__)
        self._byUser: dict[str, dict[int, Session]] = {}
        self._ids = count(1)

    def open(self, user: str, peer: str, mind: object = None) -> Session:
        """
        Admit a new session of C{user}.

        @raise TooManyConnections: if C{user} has C{maxPerUser} open sessions.
        @raise ShuttingDown: once L{closing} is set.
        """
        if self.closing:
            raise ShuttingDown()
        sessions = self._byUser.setdefault(user, {})
        if self.maxPerUser is not None and len(sessions) >= self.maxPerUser:
            raise TooManyConnections(self.maxPerUser)
        session = Session(self, next(self._ids), user, peer, self.clock.seconds(), mind)
        sessions[session.id] = session
        return session

    def activate(self, session: Session) -> None:
        """
        Mark C{session} as logged in: its client has its avatar.  Only the
        sessions activated are logged; one closed before is a refused login.
        """
        session.active = True
        self._log.info(
            "{user} logged in from {peer} (session {session}, realm {realm})",
            user=session.user,
            peer=session.peer,
            session=session.id,
            realm=self.realm,
        )

    def _closed(self, session: Session, reason: str) -> None:
        sessions = self._byUser[session.user]
        del sessions[session.id]
        if not sessions:
            del self._byUser[session.user]
        if not session.active:
            return
        duration = self.clock.seconds() - session.since
        self.metrics.sessionDuration.observe(duration)
        self._log.info(
            "{user} {reason} from {peer} after {duration:.1f} s (session {session}, realm {realm})",
            user=session.user,
            reason=reason,
            peer=session.peer,
            duration=duration,
            session=session.id,
            realm=self.realm,
        )

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

    def describe(self) -> list[dict]:
        """
        Every open session as a person or a dashboard reads it.
        """
        now = self.clock.seconds()
        return [
            {
                "user": s.user,
                "session": s.id,
                "peer": s.peer,
                "since": s.since,
                "idle": round(now - s.lastCall, 3),
            }
            for s in self
            if s.active
        ]

    def __len__(self) -> int:
        return sum(len(sessions) for sessions in self._byUser.values())

    def __iter__(self) -> Iterator[Session]:
        for sessions in list(self._byUser.values()):
            yield from list(sessions.values())
