"""
What clients can call: the C{perspective_*} methods of each kind of avatar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.spread import pb

from pbrealms.errors import dispatch
from pbrealms.push import PeriodicPush, validatePeriod

if TYPE_CHECKING:
    from pbrealms.realms import Realm


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
