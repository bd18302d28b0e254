"""
C{--realm=limited}: tracking, under the registry's per-user limit (C{--max},
1 unless given), which C{status} tells too.
"""

from __future__ import annotations

from typing import Any

from pbrealms.realms.base import Strategy, extended
from pbrealms.realms.tracking import TrackingRealm
from pbrealms.store import Answer, then


class LimitedRealm(TrackingRealm):
    name = "limited"

    def describe(self, user: str) -> Answer[dict[str, Any]]:
        return then(super().describe(user), extended, max=self.registry.maxPerUser)


STRATEGY = Strategy(
    LimitedRealm, "tracking, under --max sessions per user", limits=True, defaultMax=1
)
