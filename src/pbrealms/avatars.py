"""
What clients can call: the C{perspective_*} methods of each kind of avatar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.spread import pb

from pbrealms.errors import dispatch
from pbrealms.push import PeriodicPush, validatePeriod

if TYPE_CHECKING:
    from pbrealms.realms import Realm, SessionsRealm
    from pbrealms.sessions import Session


class Greeter:
    """
    A user's persistent state: how many greetings the user has had.
    """

    __slots__ = ("greetings", "user")

    def __init__(self, user: str) -> None:
        self.user = user
        self.greetings = 0

    def greet(self) -> str:
        self.greetings += 1
        return f"<{self.greetings}>hello {self.user}"


class Avatar(pb.Avatar):
    """
    A user's perspective: C{greet} and C{status}.

    Remote calls to a method it lacks, or with arguments that do not fit, get a
    typed L{pb.Error} instead of PB's logged traceback.
    """

    def __init__(self, realm: Realm, greeter: Greeter) -> None:
        self.realm = realm
        self.greeter = greeter

    def perspectiveMessageReceived(self, broker, message, args, kw):
        return dispatch(broker, self, "perspective_", message, args, kw, self)

    def sessionMessageReceived(self, session: Session, broker, message, args, kw):
        """
        Answer a remote call made in C{session}.  Only avatars shared by
        sessions that need to know which one calls look at it.
        """
        return self.perspectiveMessageReceived(broker, message, args, kw)

    def perspective_greet(self) -> str:
        """
        @return: C{"<N>hello USER"}, N being the user's greetings so far.
        """
        return self.greeter.greet()

    def perspective_status(self) -> dict[str, Any]:
        """
        @return: the realm's name, the user, the user's greetings, and what
            else the realm tracks.
        """
        return self.realm.describe(self.greeter.user)


class SessionAvatar(Avatar):
    """
    An avatar made for one session around the user's shared L{Greeter}; it
    also counts the greetings of its own session.
    """

    def __init__(self, realm: Realm, greeter: Greeter) -> None:
        super().__init__(realm, greeter)
        self.sessionGreetings = 0

    def perspective_greet(self) -> str:
        self.sessionGreetings += 1
        return super().perspective_greet()

    def perspective_status(self) -> dict[str, Any]:
        return {**super().perspective_status(), "session_greetings": self.sessionGreetings}


class ClockAvatar(SessionAvatar):
    """
    A session that receives C{notifyTime(seconds since the epoch)} on its
    mind at once and then once per period.
    """

    def __init__(self, realm: Realm, greeter: Greeter, ticker: PeriodicPush) -> None:
        super().__init__(realm, greeter)
        self.ticker = ticker

    def perspective_setperiod(self, seconds: float) -> float:
        """
        Change this session's push period.

        @return: the new period.
        @raise InvalidPeriod: if C{seconds} is out of range; the period stays.
        """
        period = validatePeriod(seconds)
        self.ticker.setPeriod(period)
        return period

    def perspective_status(self) -> dict[str, Any]:
        return {**super().perspective_status(), "period": self.ticker.period}

    def logout(self) -> None:
        self.ticker.stop()


class SessionsAvatar(Avatar):
    """
    A user's one avatar in the sessions realm, shared by all the user's
    sessions, and aware of which one calls: its methods get the caller's
    L{Session} first.
    """

    realm: SessionsRealm

    def sessionMessageReceived(self, session: Session, broker, message, args, kw):
        return dispatch(broker, self, "perspective_", message, args, kw, self, bound=(session,))

    @property
    def sessions(self) -> list[Session]:
        """
        The user's current sessions, oldest first.
        """
        return [s for s in self.realm.registry.sessionsOf(self.greeter.user) if s.active]

    def perspective_greet(self, caller: Session) -> str:
        """
        Greet, as in C{cache}, and push C{notifyGreeting(text)} to the user's
        other sessions.
        """
        text = self.greeter.greet()
        self.realm.tellOthers(caller, "notifyGreeting", text)
        return text

    def perspective_status(self, caller: Session) -> dict[str, Any]:
        return self.realm.describe(self.greeter.user)

    def perspective_sessions(self, caller: Session) -> list[dict[str, Any]]:
        """
        @return: the user's sessions, oldest first: C{id}, C{peer}, C{since}
            (seconds since the epoch), C{idle} (seconds since its last call)
            and C{current} (whether it is the caller's).
        """
        now = self.realm.clock.seconds()
        return [
            {**s.info(), "idle": round(now - s.lastCall, 3), "current": s is caller}
            for s in self.sessions
        ]
