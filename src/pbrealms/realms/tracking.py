"""
C{--realm=tracking}: the cached avatar, and C{status} tells the user's open
sessions.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from pbrealms.realms.base import Strategy, extended
from pbrealms.realms.cache import CacheRealm


class TrackingRealm(CacheRealm):
    name = "tracking"

    def describe(self, user: str) -> defer.Deferred[dict[str, Any]]:
        return super().describe(user).addCallback(extended, sessions=self.registry.countOf(user))


STRATEGY = Strategy(TrackingRealm, "cache, and status tells the user's open sessions")
