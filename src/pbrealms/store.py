"""
Per-user state that outlives sessions, behind a store: today the greeting
counter of each user.

Every operation answers with a L{Deferred}, so that a store shared by several
nodes (a cluster's Redis) fits behind the same interface, or with its value
when it has it at once, as a cred checker may: the in-memory store does,
since a Deferred per greeting costs some 12 % of the greetings a server
answers (measured with C{pbrealms-bench --only greet}).  L{then} takes
either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from twisted.internet import defer
from zope.interface import Interface, implementer

_T = TypeVar("_T")
_U = TypeVar("_U")

#: What a store operation answers: the value, or a Deferred of it.
Answer: TypeAlias = _T | defer.Deferred[_T]


def then(answer: Answer[_T], f: Callable[..., _U], *args: Any, **kw: Any) -> Answer[_U]:
    """
    C{f(value, *args, **kw)}: now if C{answer} is the value, once it fires if
    it is a L{Deferred}.
    """
    if isinstance(answer, defer.Deferred):
        return answer.addCallback(f, *args, **kw)
    return f(answer, *args, **kw)


class IUserState(Interface):
    """
    Named counters per user.
    """

    def increment(user: str, counter: str) -> Answer[int]:
        """
        Add one to C{user}'s C{counter}, in one step however many callers
        increment it at once.

        @return: the new value, or a L{Deferred} of it.
        """

    def read(user: str, counter: str) -> Answer[int]:
        """
        @return: C{user}'s C{counter}, 0 if it was never incremented, or a
            L{Deferred} of it.
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

    def increment(self, user: str, counter: str) -> int:
        key = (user, counter)
        value = self._counters[key] = self._counters.get(key, 0) + 1
        return value

    def read(self, user: str, counter: str) -> int:
        return self._counters.get((user, counter), 0)
