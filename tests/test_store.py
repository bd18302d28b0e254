"""
The store of per-user state: the in-memory one, and the realms over it.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import task
from zope.interface.verify import verifyObject

from pbrealms.realms import REALMS
from pbrealms.sessions import SessionRegistry
from pbrealms.store import IUserState, MemoryUserState


def fired(d):
    results: list = []
    d.addCallback(results.append)
    assert results, "the in-memory store answers at once"
    return results[0]


def test_counters_count_per_user_and_name_from_zero():
    state = MemoryUserState()
    assert verifyObject(IUserState, state)
    assert fired(state.read("alice", "greetings")) == 0
    assert [fired(state.increment("alice", "greetings")) for _ in range(3)] == [1, 2, 3]
    assert fired(state.increment("bob", "greetings")) == 1
    assert fired(state.increment("alice", "other")) == 1
    assert fired(state.read("alice", "greetings")) == 3


class CountingState(MemoryUserState):
    """
    The in-memory store, counting the calls a realm makes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def increment(self, user, counter):
        self.calls.append(("increment", user, counter))
        return super().increment(user, counter)

    def read(self, user, counter):
        self.calls.append(("read", user, counter))
        return super().read(user, counter)


@pytest_twisted.ensureDeferred
async def test_greetings_go_through_the_realm_s_store():
    clock = task.Clock()
    state = CountingState()
    registry = SessionRegistry(clock, realm="cache")
    realm = REALMS["cache"].realm(registry, clock, state)
    assert await realm.avatarFor("alice", None).perspective_greet() == "<1>hello alice"
    assert await realm.avatarFor("alice", None).perspective_greet() == "<2>hello alice"
    assert (await realm.describe("alice"))["greetings"] == 2
    assert state.calls == [
        ("increment", "alice", "greetings"),
        ("increment", "alice", "greetings"),
        ("read", "alice", "greetings"),
    ]
