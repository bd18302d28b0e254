"""
C{--realm=clock}: a new avatar per session that pushes the time to the
client's mind, at once and then once per period (C{--period}, C{setperiod}).

Pushes ask for no answer, and one whose connection's buffer is full is
skipped (see L{ClientReference}); all sessions share one L{PushScheduler}.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from twisted.internet.interfaces import IReactorTime

from pbrealms.errors import MindRequired
from pbrealms.push import ClientReference, PeriodicPush, PushScheduler, validatePeriod
from pbrealms.realms.base import Avatar, Describe, Greeter, Realm, Strategy, extended
from pbrealms.realms.shared_state import SessionAvatar
from pbrealms.sessions import SessionRegistry
from pbrealms.store import Answer, IUserState, then


class ClockAvatar(SessionAvatar):
    """
    A session that receives C{notifyTime(seconds since the epoch)} on its
    mind at once and then once per period.
    """

    def __init__(self, greeter: Greeter, describe: Describe, ticker: PeriodicPush) -> None:
        super().__init__(greeter, describe)
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

    def perspective_status(self) -> Answer[dict[str, Any]]:
        return then(super().perspective_status(), extended, period=self.ticker.period)

    def logout(self) -> None:
        self.ticker.stop()


class ClockRealm(Realm):
    """
    @ivar period: the push period a session starts with.
    """

    name = "clock"

    def __init__(
        self,
        registry: SessionRegistry,
        clock: IReactorTime,
        period: float,
        state: IUserState | None = None,
    ) -> None:
        super().__init__(registry, clock, state)
        self.period = period
        self.scheduler = PushScheduler(clock, registry.metrics.pushLateness.observe)

    @classmethod
    def build(
        cls, registry: SessionRegistry, clock: IReactorTime, settings: Mapping[str, Any]
    ) -> Realm:
        return cls(registry, clock, settings["period"])

    def avatarFor(self, user: str, client: ClientReference | None) -> Avatar:
        if client is None:
            raise MindRequired(self.name)
        ticker = PeriodicPush(self.scheduler, self.period, partial(self._pushTime, client))
        avatar = ClockAvatar(self.greeter(user), self.describe, ticker)
        ticker.start()
        return avatar

    def _pushTime(self, client: ClientReference) -> bool:
        return client.notifyTime(self.clock.seconds())


STRATEGY = Strategy(
    ClockRealm, "an avatar per session that pushes the time to the client", options=("period",)
)
