"""
C{--realm=tracking}: the cached avatar, and C{status} tells the user's open
sessions.
"""

from __future__ import annotations

from typing import Any

from pbrealms.realms.base import Strategy, extended
from pbrealms.realms.cache import CacheRealm
from pbrealms.store import Answer, then


class TrackingRealm(CacheRealm):
    name = "tracking"

    def describe(self, user: str) -> Answer[dict[str, Any]]:
        return then(super().describe(user), extended, sessions=self.registry.countOf(user))


STRATEGY = Strategy(TrackingRealm, "cache, and status tells the user's open sessions")
