"""
Per-user state that outlives sessions, behind a store: today the greeting
counter of each user.

Every operation returns a L{Deferred}, so that a store shared by several
nodes (a cluster's Redis) fits behind the same interface; the in-memory
store answers at once.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import Interface, implementer


class IUserState(Interface):
    """
    Named counters per user.
    """

    def increment(user: str, counter: str) -> defer.Deferred[int]:
        """
        Add one to C{user}'s C{counter}, in one step however many callers
        increment it at once.

        @return: a L{Deferred} firing with the new value.
        """

    def read(user: str, counter: str) -> defer.Deferred[int]:
        """
        @return: a L{Deferred} firing with C{user}'s C{counter}, 0 if it was
            never incremented.
        """


@implementer(IUserState)
class MemoryUserState:
    """
    Counters in this process, for its life.  It holds one number per user
    and counter used; the users are those the checker logs in (the password
    file's), so its size is bounded by them.
    """

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], int] = {}

    def increment(self, user: str, counter: str) -> defer.Deferred[int]:
        key = (user, counter)
        value = self._counters[key] = self._counters.get(key, 0) + 1
        return defer.succeed(value)

    def read(self, user: str, counter: str) -> defer.Deferred[int]:
        return defer.succeed(self._counters.get((user, counter), 0))
