"""
The realm strategies of the howto "Managing Clients of Perspectives".

Each realm only decides which avatar a login gets and what C{status} tells.
Sessions are counted, limited and closed by the L{SessionRegistry}, never here.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet.interfaces import IReactorTime
from twisted.spread import pb
from zope.interface import implementer

from pbrealms.avatars import Avatar, ClockAvatar, Greeter, SessionAvatar, SessionsAvatar
from pbrealms.errors import MindRequired
from pbrealms.push import MAX_UNANSWERED, PeriodicPush, PushScheduler, notify, push
from pbrealms.sessions import Session, SessionRegistry


def _nothing() -> None:
    pass


@implementer(IRealm)
class Realm:
    """
    The common part: a cached L{Greeter} per user, so that greetings count
    across every session of a user for the life of the process.

    @cvar name: the name chosen with C{--realm}.
    """

    name = ""

    def __init__(self, registry: SessionRegistry, clock: IReactorTime) -> None:
        self.registry = registry
        self.clock = clock
        self._greeters: dict[str, Greeter] = {}

    def greeter(self, user: str) -> Greeter:
        greeter = self._greeters.get(user)
        if greeter is None:
            greeter = self._greeters[user] = Greeter(user)
        return greeter

    def requestAvatar(self, avatarId: str, mind: object, *interfaces: Any):
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("pbrealms only serves pb.IPerspective")
        avatar = self.avatarFor(avatarId, mind)
        return pb.IPerspective, avatar, getattr(avatar, "logout", _nothing)

    def avatarFor(self, user: str, mind: object) -> Avatar:
        raise NotImplementedError

    def describe(self, user: str) -> dict[str, Any]:
        """
        What C{status} answers about C{user}.
        """
        return {"realm": self.name, "user": user, "greetings": self.greeter(user).greetings}


class CacheRealm(Realm):
    """
    One avatar per user for the life of the process, shared by all of the
    user's sessions.
    """

    name = "cache"

    def __init__(self, registry: SessionRegistry, clock: IReactorTime) -> None:
        super().__init__(registry, clock)
        self._avatars: dict[str, Avatar] = {}

    def avatarFor(self, user: str, mind: object) -> Avatar:
        avatar = self._avatars.get(user)
        if avatar is None:
            avatar = self._avatars[user] = Avatar(self, self.greeter(user))
        return avatar


class SharedStateRealm(Realm):
    """
    A new avatar per session around the user's cached L{Greeter}.
    """

    name = "shared-state"

    def avatarFor(self, user: str, mind: object) -> Avatar:
        return SessionAvatar(self, self.greeter(user))


class TrackingRealm(CacheRealm):
    """
    The cached avatar, and C{status} tells the user's open sessions.
    """

    name = "tracking"

    def describe(self, user: str) -> dict[str, Any]:
        return {**super().describe(user), "sessions": self.registry.countOf(user)}


class LimitedRealm(TrackingRealm):
    """
    Tracking, under the registry's per-user limit, which C{status} tells too.
    """

    name = "limited"

    def describe(self, user: str) -> dict[str, Any]:
        return {**super().describe(user), "max": self.registry.maxPerUser}


class ClockRealm(Realm):
    """
    A new avatar per session that pushes the time to the client's mind.

    Pushes ask for no answer, and one whose connection's buffer is full is
    skipped (see L{notify}); all sessions share one L{PushScheduler}.

    @ivar period: the push period a session starts with.
    """

    name = "clock"

    def __init__(self, registry: SessionRegistry, clock: IReactorTime, period: float) -> None:
        super().__init__(registry, clock)
        self.period = period
        self.scheduler = PushScheduler(clock, registry.metrics.pushLateness.observe)

    def avatarFor(self, user: str, mind: object) -> Avatar:
        if mind is None:
            raise MindRequired(self.name)
        ticker = PeriodicPush(self.scheduler, self.period, partial(self._pushTime, mind))
        avatar = ClockAvatar(self, self.greeter(user), ticker)
        ticker.start()
        return avatar

    def _pushTime(self, mind: pb.RemoteReference) -> bool:
        return self.registry.metrics.notified(notify(mind, "notifyTime", self.clock.seconds()))


class SessionsRealm(LimitedRealm):
    """
    The cached avatar with the set of its user's current sessions: each
    session opening or closing, and each greeting, is pushed to the user's
    other sessions that passed a mind.
    """

    name = "sessions"

    def __init__(self, registry: SessionRegistry, clock: IReactorTime) -> None:
        super().__init__(registry, clock)
        registry.observe(self)

    def avatarFor(self, user: str, mind: object) -> Avatar:
        avatar = self._avatars.get(user)
        if avatar is None:
            avatar = self._avatars[user] = SessionsAvatar(self, self.greeter(user))
        return avatar

    def sessionOpened(self, session: Session) -> None:
        self.tellOthers(session, "notifySessionOpened", session.info())

    def sessionClosed(self, session: Session, reason: str) -> None:
        self.tellOthers(session, "notifySessionClosed", {**session.info(), "reason": reason})

    def tellOthers(self, session: Session, method: str, *args: object) -> None:
        """
        Push C{method(*args)} to every other logged-in session of
        C{session}'s user that has a mind.  A session found gone ends.  A
        session with L{MAX_UNANSWERED} pushes unanswered is skipped, so that
        a client that stops reading never makes the server buffer pushes.
        Nothing is pushed while the server shuts down: every session ends.
        """
        if self.registry.closing:
            return
        metrics = self.registry.metrics
        for other in self.registry.sessionsOf(session.user):
            if other is session or not other.active or other.mind is None:
                continue
            if other.unanswered >= MAX_UNANSWERED:
                metrics.notified(False)
                continue
            other.unanswered += 1
            # Gone means disconnected: end the session now, not only once
            # PB gets round to telling of the disconnect.
            gone = partial(other.close, "disconnected")
            push(other.mind, method, *args, onGone=gone).addCallback(_answered, other, metrics)


def _answered(delivered: bool, session: Session, metrics) -> bool:
    session.unanswered -= 1
    return metrics.pushed(delivered)


REALMS: dict[str, type[Realm]] = {
    realm.name: realm
    for realm in (
        CacheRealm,
        SharedStateRealm,
        TrackingRealm,
        LimitedRealm,
        ClockRealm,
        SessionsRealm,
    )
}
