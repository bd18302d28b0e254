"""
The realm strategies of the howto "Managing Clients of Perspectives": one
module each, holding its realm, its avatar and the L{Strategy} it declares.
Adding one is a module and a line below.
"""

from pbrealms.realms import cache, clock, limited, sessions, shared_state, tracking
from pbrealms.realms.base import Realm, Strategy

#: Every strategy by the name C{--realm} takes, in the order C{--help} lists them.
REALMS: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        cache.STRATEGY,
        shared_state.STRATEGY,
        tracking.STRATEGY,
        limited.STRATEGY,
        clock.STRATEGY,
        sessions.STRATEGY,
    )
}

__all__ = ["REALMS", "Realm", "Strategy"]
