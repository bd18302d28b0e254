"""
The session registry: admission, the per-user limit, exactly-once close.
"""

import gc

import pytest
from twisted.internet import task

from pbrealms.errors import TooManyConnections
from pbrealms.sessions import SessionRegistry
from pbrealms.whenfull import Refuse, ReplaceOldest, ReplaceStale, policyNamed


def test_open_and_close_count_per_user():
    registry = SessionRegistry(task.Clock())
    a1 = registry.open("alice", "p1")
    a2 = registry.open("alice", "p2")
    registry.open("bob", "p3")
    assert (registry.countOf("alice"), registry.countOf("bob"), len(registry)) == (2, 1, 3)
    assert registry.sessionsOf("alice") == [a1, a2]
    a1.close()
    assert registry.sessionsOf("alice") == [a2]
    assert a1.closed


def test_close_runs_callbacks_exactly_once_in_reverse_order():
    registry = SessionRegistry(task.Clock())
    session = registry.open("alice", "p")
    calls = []
    session.onClose(lambda: calls.append("first"))
    session.onClose(lambda: calls.append("second"))
    session.close()
    session.close("disconnected")
    assert calls == ["second", "first"]
    assert registry.countOf("alice") == 0
    late = []
    session.onClose(lambda: late.append(1))
    assert late == [1]


def test_limit_refuses_and_frees():
    registry = SessionRegistry(task.Clock(), maxPerUser=2)
    first = registry.open("alice", "p")
    registry.open("alice", "p")
    with pytest.raises(TooManyConnections) as refused:
        registry.open("alice", "p")
    assert refused.value.limit == 2
    registry.open("bob", "p")
    first.close()
    registry.open("alice", "p")
    assert registry.countOf("alice") == 2


def test_a_failing_close_callback_is_logged_and_the_rest_still_run(log):
    registry = SessionRegistry(task.Clock())
    session = registry.open("alice", "p")
    calls = []
    session.onClose(lambda: calls.append("ran"))
    session.onClose(lambda: 1 / 0)
    session.close()
    assert calls == ["ran"]
    assert registry.countOf("alice") == 0
    assert len(log.errors()) == 1
    log.errorsExpected = True


def test_only_activated_sessions_are_logged(log):
    clock = task.Clock()
    registry = SessionRegistry(clock, realm="tracking")
    refused = registry.open("alice", "10.0.0.1:5")
    refused.close("was refused by the realm")
    session = registry.open("alice", "10.0.0.1:6")
    registry.activate(session)
    clock.advance(2.5)
    session.close("disconnected")
    messages = [m for m in log.messages() if "alice" in m]
    assert messages == [
        f"alice logged in from 10.0.0.1:6 (session {session.id}, realm tracking)",
        f"alice disconnected from 10.0.0.1:6 after 2.5 s (session {session.id}, realm tracking)",
    ]


def test_a_session_an_observer_ends_is_told_of_after_the_one_being_told():
    registry = SessionRegistry(task.Clock())
    first, second = registry.open("alice", "p1"), registry.open("alice", "p2")
    registry.activate(first)
    registry.activate(second)
    heard = []

    class Ending:
        def sessionOpened(self, session):
            pass

        def sessionClosed(self, session, reason):
            heard.append(("ending", session.id, reason))
            if session is first:
                second.close("disconnected")  # as a push that finds its client gone

    class Listening:
        def sessionOpened(self, session):
            pass

        def sessionClosed(self, session, reason):
            heard.append(("listening", session.id, reason))

    registry.observe(Ending())
    registry.observe(Listening())
    first.close()
    assert heard == [
        ("ending", first.id, "logged out"),
        ("listening", first.id, "logged out"),
        ("ending", second.id, "disconnected"),
        ("listening", second.id, "disconnected"),
    ]
    assert len(registry) == 0


def test_conflict_policies_are_objects_chosen_by_name():
    clock = task.Clock()
    for name, policy in [
        ("refuse", Refuse),
        ("replace-oldest", ReplaceOldest),
        ("replace-stale", ReplaceStale),
    ]:
        registry = SessionRegistry(clock, maxPerUser=1, whenFull=name)
        assert isinstance(registry.policy, policy)
        assert registry.whenFull == name
        assert registry.policy.replaces is (name != "refuse")
    with pytest.raises(ValueError, match="whenFull must be one of refuse, replace-oldest"):
        policyNamed("replace-newest", clock, 1.0)


def test_an_ended_session_leaves_no_cycle_for_the_garbage_collector():
    class Mind:
        broker = None

        def callRemote(self, *args, **kw):
            return None

    registry = SessionRegistry(task.Clock())
    gc.collect()
    gc.disable()
    try:
        session = registry.open("alice", "p1", Mind())
        registry.activate(session)
        session.close()
        del session
        # A session and its client referring to each other would survive
        # until the collector runs, holding the client's reference.
        assert gc.collect() == 0
    finally:
        gc.enable()
