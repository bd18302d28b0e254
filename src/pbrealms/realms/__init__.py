"""
The realm strategies of the howto "Managing Clients of Perspectives": one
module each, holding its realm, its avatar and the L{Strategy} it declares.
Adding one is a module and a line below.
"""

from importlib import import_module

from pbrealms.realms.base import Realm, Strategy

#: The strategies' modules, in the order C{--help} lists them.
MODULES = (
    "cache",
    "shared_state",
    "tracking",
    "limited",
    "clock",
    "sessions",
)


def _strategy(module: str) -> Strategy:
    strategy = import_module(f"{__name__}.{module}").STRATEGY
    assert isinstance(strategy, Strategy), module
    return strategy


#: Every strategy by the name C{--realm} takes.
REALMS: dict[str, Strategy] = {s.name: s for s in map(_strategy, MODULES)}

__all__ = ["REALMS", "Realm", "Strategy"]
