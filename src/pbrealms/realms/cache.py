"""
C{--realm=cache}: one avatar per user for the life of the process, shared by
all of the user's sessions.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from pbrealms.push import ClientReference
from pbrealms.realms.base import Avatar, Realm, Strategy
from pbrealms.sessions import SessionRegistry
from pbrealms.store import IUserState


class CacheRealm(Realm):
    """
    One avatar per user, made by L{makeAvatar} at the user's first login.
    """

    name = "cache"

    def __init__(
        self, registry: SessionRegistry, clock: IReactorTime, state: IUserState | None = None
    ) -> None:
        super().__init__(registry, clock, state)
        self._avatars: dict[str, Avatar] = {}

    def avatarFor(self, user: str, client: ClientReference | None) -> Avatar:
        avatar = self._avatars.get(user)
        if avatar is None:
            avatar = self._avatars[user] = self.makeAvatar(user)
        return avatar

    def cachedUsers(self) -> list[str]:
        """
        The users who have an avatar, in the order of their first login.
        """
        return list(self._avatars)

    def makeAvatar(self, user: str) -> Avatar:
        """
        The avatar that every session of C{user} will share.
        """
        return Avatar(self.greeter(user), self.describe)


STRATEGY = Strategy(CacheRealm, "one avatar per user, shared by its sessions")
