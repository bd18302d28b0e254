"""
The store of per-user state: the in-memory one, and the realms over it.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from pbrealms.realms import REALMS
from pbrealms.sessions import SessionRegistry
from pbrealms.store import IUserState, MemoryUserState, then


def test_counters_count_per_user_and_name_from_zero():
    state = MemoryUserState()
    assert verifyObject(IUserState, state)
    assert state.read("alice", "greetings") == 0
    assert [state.increment("alice", "greetings") for _ in range(3)] == [1, 2, 3]
    assert state.increment("bob", "greetings") == 1
    assert state.increment("alice", "other") == 1
    assert state.read("alice", "greetings") == 3


def test_then_takes_a_value_now_and_a_deferred_once_it_fires():
    assert then(2, lambda n, m, k: n * m + k, 3, k=1) == 7
    d: defer.Deferred[int] = defer.Deferred()
    later = then(d, lambda n, m: n * m, 3)
    assert isinstance(later, defer.Deferred) and not later.called
    d.callback(2)
    assert later.result == 6


class CountingState(MemoryUserState):
    """
    The in-memory store, counting the calls a realm makes, and answering
    with Deferreds, as a shared store would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def increment(self, user, counter):
        self.calls.append(("increment", user, counter))
        return defer.succeed(super().increment(user, counter))

    def read(self, user, counter):
        self.calls.append(("read", user, counter))
        return defer.succeed(super().read(user, counter))


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


@pytest_twisted.ensureDeferred
async def test_every_realm_answers_status_through_a_store_of_deferreds():
    clock = task.Clock()
    for name, strategy in REALMS.items():
        registry = SessionRegistry(clock, realm=name, maxPerUser=2 if strategy.limits else None)
        realm = strategy.realm.build(registry, clock, {"period": 1.0})
        realm.state = CountingState()
        assert (await realm.describe("alice"))["greetings"] == 0, name
