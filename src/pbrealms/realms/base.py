"""
What every realm strategy shares: the user's L{Greeter}, the L{Realm} that a
portal asks for avatars, the L{Avatar} with C{greet} and C{status}, and the
L{Strategy} that each strategy's module declares for C{--realm}.

A realm only decides which avatar a login gets and what C{status} tells.
Sessions are counted, limited and closed by the L{SessionRegistry}, never here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.spread import pb
from zope.interface import implementer

from pbrealms.errors import dispatch
from pbrealms.protocol import ISessionRealm
from pbrealms.push import ClientReference
from pbrealms.sessions import Session, SessionRegistry
from pbrealms.store import Answer, IUserState, MemoryUserState, then

#: What C{status} answers about a user, when the store has answered.
Describe = Callable[[str], Answer[dict[str, Any]]]

#: The counter of a user's greetings in the L{IUserState} store.
GREETINGS = "greetings"


def extended(status: dict[str, Any], **more: Any) -> dict[str, Any]:
    """
    C{status} with C{more}: what a realm adds to its base's C{status}, once
    that has answered.
    """
    return {**status, **more}


class Greeter:
    """
    A user's persistent state, in the realm's L{IUserState} store: how many
    greetings the user has had.
    """

    __slots__ = ("state", "user")

    def __init__(self, user: str, state: IUserState) -> None:
        self.user = user
        self.state = state

    def greet(self) -> Answer[str]:
        """
        Count a greeting.

        @return: C{"<N>hello USER"}, N being the user's greetings so far,
            this one included, or a L{Deferred} of it.
        """
        return then(self.state.increment(self.user, GREETINGS), self._text)

    def _text(self, greetings: int) -> str:
        return f"<{greetings}>hello {self.user}"

    def greetings(self) -> Answer[int]:
        return self.state.read(self.user, GREETINGS)


class Avatar(pb.Avatar):
    """
    A user's perspective: C{greet} and C{status}.

    Remote calls to a method it lacks, or with arguments that do not fit, get a
    typed L{pb.Error} instead of PB's logged traceback.
    """

    def __init__(self, greeter: Greeter, describe: Describe) -> None:
        """
        @param describe: what C{status} answers about the user (the realm's
            L{Realm.describe}).
        """
        self.greeter = greeter
        self.describe = describe

    def perspectiveMessageReceived(self, broker, message, args, kw):
        return dispatch(broker, self, "perspective_", message, args, kw, self)

    def sessionMessageReceived(self, session: Session, broker, message, args, kw):
        """
        Answer a remote call made in C{session}.  Only avatars shared by
        sessions that need to know which one calls look at it.
        """
        return self.perspectiveMessageReceived(broker, message, args, kw)

    def perspective_greet(self) -> Answer[str]:
        """
        @return: C{"<N>hello USER"}, N being the user's greetings so far.
        """
        return self.greeter.greet()

    def perspective_status(self) -> Answer[dict[str, Any]]:
        """
        @return: the realm's name, the user, the user's greetings, and what
            else the realm tracks.
        """
        return self.describe(self.greeter.user)


def _nothing() -> None:
    pass


@implementer(ISessionRealm)
class Realm:
    """
    The common part: a L{Greeter} per user over the realm's store of per-user
    state, so that greetings count across every session of a user (for the
    life of the process, with the in-memory store).

    @cvar name: the name chosen with C{--realm}.
    """

    name = ""

    def __init__(
        self, registry: SessionRegistry, clock: IReactorTime, state: IUserState | None = None
    ) -> None:
        """
        @param state: where per-user state is kept; in memory by default.
        """
        self.registry = registry
        self.clock = clock
        self.state: IUserState = state if state is not None else MemoryUserState()

    @classmethod
    def build(
        cls, registry: SessionRegistry, clock: IReactorTime, settings: Mapping[str, Any]
    ) -> Realm:
        """
        Make the realm from the command line's C{settings}, of which it reads
        only its L{Strategy}'s options.
        """
        return cls(registry, clock)

    def greeter(self, user: str) -> Greeter:
        return Greeter(user, self.state)

    # Twisted types avatar ids as bytes and minds as anything; ours are user
    # names as text, and the session's client.
    def requestAvatar(  # type: ignore[override]
        self, avatarId: str, mind: ClientReference | None, *interfaces: Any
    ):
        """
        @param mind: the session's client, which the realm pushes to, or
            L{None} if the login passed no mind.
        """
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("pbrealms only serves pb.IPerspective")
        avatar = self.avatarFor(avatarId, mind)
        return pb.IPerspective, avatar, getattr(avatar, "logout", _nothing)

    def avatarFor(self, user: str, client: ClientReference | None) -> Avatar:
        raise NotImplementedError

    def describe(self, user: str) -> Answer[dict[str, Any]]:
        """
        What C{status} answers about C{user}.
        """
        return then(self.greeter(user).greetings(), self._status, user)

    def _status(self, greetings: int, user: str) -> dict[str, Any]:
        return {"realm": self.name, "user": user, "greetings": greetings}


@dataclass(frozen=True)
class Strategy:
    """
    A realm strategy as C{--realm} offers it, declared by its module.

    @ivar realm: its realm, whose C{name} is what C{--realm} takes and whose
        L{Realm.build} makes it.
    @ivar help: what it serves, in a few words, for C{--help}.
    @ivar limits: whether it limits each user's sessions: it takes C{--max}
        and C{--when-full}.
    @ivar defaultMax: its limit without C{--max}; L{None} for no limit.
    @ivar options: the options of C{twistd pbrealms} that only it takes.
    """

    realm: type[Realm]
    help: str
    limits: bool = False
    defaultMax: int | None = None
    options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.realm.name
