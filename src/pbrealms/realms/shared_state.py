"""
C{--realm=shared-state}: a new avatar per session around the user's cached
greeter.
"""

from __future__ import annotations

from typing import Any

from pbrealms.push import ClientReference
from pbrealms.realms.base import Avatar, Describe, Greeter, Realm, Strategy, extended
from pbrealms.store import Answer, then


class SessionAvatar(Avatar):
    """
    An avatar made for one session around the user's shared L{Greeter}; it
    also counts the greetings of its own session.
    """

    def __init__(self, greeter: Greeter, describe: Describe) -> None:
        super().__init__(greeter, describe)
        self.sessionGreetings = 0

    def perspective_greet(self) -> Answer[str]:
        self.sessionGreetings += 1
        return super().perspective_greet()

    def perspective_status(self) -> Answer[dict[str, Any]]:
        greetings = self.sessionGreetings
        return then(super().perspective_status(), extended, session_greetings=greetings)


class SharedStateRealm(Realm):
    name = "shared-state"

    def avatarFor(self, user: str, client: ClientReference | None) -> Avatar:
        return SessionAvatar(self.greeter(user), self.describe)


STRATEGY = Strategy(SharedStateRealm, "an avatar per session around the user's greeter")
