"""
C{--realm=sessions}: the cached avatar with the set of its user's current
sessions, as the howto ends: each session opening or closing, and each
greeting, is pushed to the user's other sessions that passed a mind.
Optionally under C{--max}.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet.interfaces import IReactorTime

from pbrealms.errors import dispatch
from pbrealms.protocol import IClient
from pbrealms.realms.base import Avatar, Describe, Greeter, Strategy
from pbrealms.realms.limited import LimitedRealm
from pbrealms.sessions import Session, SessionRegistry
from pbrealms.store import Answer, IUserState, then

#: Pushes to the other sessions of a session's user: called with the
#: session and what to call on each other session's L{IClient}.
TellOthers = Callable[[Session, Callable[[IClient], object]], None]


class SessionsAvatar(Avatar):
    """
    A user's one avatar, shared by all the user's sessions, and aware of
    which one calls: its methods get the caller's L{Session} first.
    """

    def __init__(
        self,
        greeter: Greeter,
        describe: Describe,
        sessions: Callable[[], list[Session]],
        tellOthers: TellOthers,
        clock: IReactorTime,
    ) -> None:
        """
        @param sessions: the user's current sessions, oldest first.
        @param tellOthers: called with a session and a push (a function of
            an L{IClient}), makes it to the user's other sessions.
        """
        super().__init__(greeter, describe)
        self.sessions = sessions
        self.tellOthers = tellOthers
        self.clock = clock

    def sessionMessageReceived(self, session: Session, broker, message, args, kw):
        return dispatch(broker, self, "perspective_", message, args, kw, self, bound=(session,))

    # Called with the caller bound first (see sessionMessageReceived): the
    # remote signature is the base's, without it.
    def perspective_greet(self, caller: Session) -> Answer[str]:  # type: ignore[override]
        """
        Greet, as in C{cache}, and push C{notifyGreeting(text)} to the user's
        other sessions.
        """
        return then(self.greeter.greet(), self._told, caller)

    def _told(self, text: str, caller: Session) -> str:
        self.tellOthers(caller, lambda client: client.notifyGreeting(text))
        return text

    def perspective_status(  # type: ignore[override]
        self, caller: Session
    ) -> Answer[dict[str, Any]]:
        return self.describe(self.greeter.user)

    def perspective_sessions(self, caller: Session) -> list[dict[str, Any]]:
        """
        @return: the user's sessions, oldest first: C{id}, C{peer}, C{since}
            (seconds since the epoch), C{idle} (seconds since its last call)
            and C{current} (whether it is the caller's).
        """
        now = self.clock.seconds()
        return [
            {**s.info(), "idle": round(now - s.lastCall, 3), "current": s is caller}
            for s in self.sessions()
        ]


class SessionsRealm(LimitedRealm):
    name = "sessions"

    def __init__(
        self, registry: SessionRegistry, clock: IReactorTime, state: IUserState | None = None
    ) -> None:
        super().__init__(registry, clock, state)
        registry.observe(self)

    def makeAvatar(self, user: str) -> Avatar:
        sessions = partial(self.activeSessionsOf, user)
        greeter = self.greeter(user)
        return SessionsAvatar(greeter, self.describe, sessions, self.tellOthers, self.clock)

    def activeSessionsOf(self, user: str) -> list[Session]:
        """
        C{user}'s logged-in sessions, oldest first.
        """
        return [s for s in self.registry.sessionsOf(user) if s.active]

    def sessionOpened(self, session: Session) -> None:
        info = session.info()
        self.tellOthers(session, lambda client: client.notifySessionOpened(info))

    def sessionClosed(self, session: Session, reason: str) -> None:
        info = {**session.info(), "reason": reason}
        self.tellOthers(session, lambda client: client.notifySessionClosed(info))

    def tellOthers(self, session: Session, push: Callable[[IClient], object]) -> None:
        """
        Call C{push(client)} with the client of every other logged-in
        session of C{session}'s user that has a mind; each client bounds what
        it holds (see L{ClientReference}).  Nothing is pushed while the
        server shuts down: every session ends.
        """
        if self.registry.closing:
            return
        for other in self.registry.sessionsOf(session.user):
            if other is not session and other.active and other.client is not None:
                push(other.client)


STRATEGY = Strategy(
    SessionsRealm,
    "one avatar per user that knows its sessions and tells them of each other",
    limits=True,
)
