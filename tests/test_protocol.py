"""
The push protocol: L{IClient} is what both ends implement, and
L{ClientReference} owns how the server delivers it, with its bounds.
"""

from __future__ import annotations

import pytest_twisted
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.spread import pb
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from pbrealms.checkers import PasswordFile
from pbrealms.client.mind import ClientMind
from pbrealms.login import LoginRoot
from pbrealms.metrics import ServerMetrics
from pbrealms.protocol import IClient, ISessionRealm
from pbrealms.push import MAX_UNANSWERED, ClientReference
from pbrealms.realms import REALMS
from pbrealms.sessions import SessionRegistry


class Broker:
    disconnected = False
    writeBlocked = False


class Mind:
    """
    A client's mind as the server holds it: each answered call waits for the
    test.
    """

    def __init__(self) -> None:
        self.broker = Broker()
        self.calls: list[tuple[str, tuple, bool]] = []
        self.answers: list[defer.Deferred[None]] = []

    def callRemote(self, method: str, *args: object, pbanswer: int = 1):
        if self.broker.disconnected:
            raise pb.DeadReferenceError("Calling Stale Broker")
        self.calls.append((method, args, bool(pbanswer)))
        if not pbanswer:
            return None
        d: defer.Deferred[None] = defer.Deferred()
        self.answers.append(d)
        return d


def reference(mind: Mind, onGone=lambda: None) -> tuple[ClientReference, ServerMetrics]:
    metrics = ServerMetrics()
    return ClientReference(mind, metrics, onGone), metrics  # type: ignore[arg-type]


def sent(metrics: ServerMetrics, result: str) -> float:
    value = metrics.registry.get_sample_value("pbrealms_pushes_total", {"result": result})
    return value or 0.0


def test_both_ends_implement_the_one_declaration():
    assert verifyClass(IClient, ClientReference)
    assert verifyObject(IClient, ClientMind())
    assert sorted(IClient.names()) == [
        "notifyGreeting",
        "notifyKicked",
        "notifySessionClosed",
        "notifySessionOpened",
        "notifyShutdown",
        "notifyTime",
    ]


def test_the_client_mind_serves_each_declared_call_to_pb():
    heard = []
    mind = ClientMind(onGreeting=heard.append, onKicked=heard.append)
    for name in IClient.names():
        assert callable(getattr(mind, "remote_" + name))
    mind.remote_notifyGreeting("<1>hello alice")
    mind.remote_notifyKicked("replaced")
    assert heard == ["<1>hello alice", "replaced"]


def test_the_time_asks_for_no_answer_and_is_skipped_while_write_blocked():
    mind = Mind()
    client, metrics = reference(mind)
    assert client.notifyTime(1.0) is True
    mind.broker.writeBlocked = True
    assert client.notifyTime(2.0) is False
    assert mind.calls == [("notifyTime", (1.0,), False)]
    assert mind.answers == []
    assert (sent(metrics, "sent"), sent(metrics, "skipped")) == (1, 1)


def test_at_most_max_unanswered_pushes_wait_for_their_answer():
    mind = Mind()
    client, metrics = reference(mind)
    for n in range(MAX_UNANSWERED + 5):
        client.notifyGreeting(f"<{n}>hello alice")
    assert len(mind.calls) == MAX_UNANSWERED
    assert client.unanswered == MAX_UNANSWERED
    assert sent(metrics, "skipped") == 5
    mind.answers.pop(0).callback(None)
    assert client.unanswered == MAX_UNANSWERED - 1
    assert sent(metrics, "sent") == 1
    client.notifySessionOpened({"id": 2})
    assert mind.calls[-1] == ("notifySessionOpened", ({"id": 2},), True)
    assert client.unanswered == MAX_UNANSWERED


def test_the_last_word_is_sent_whatever_waits():
    mind = Mind()
    client, _ = reference(mind)
    for _ in range(MAX_UNANSWERED):
        client.notifyGreeting("hi")
    told = client.notifyKicked("replaced")
    assert mind.calls[-1] == ("notifyKicked", ("replaced",), True)
    results: list[bool] = []
    told.addCallback(results.append)
    mind.answers[-1].callback(None)
    assert results == [True]
    assert client.unanswered == MAX_UNANSWERED


def test_a_client_found_gone_is_reported_once_per_push_and_nothing_raises():
    mind = Mind()
    gone: list[None] = []
    client, metrics = reference(mind, lambda: gone.append(None))
    mind.broker.disconnected = True
    client.notifyGreeting("hi")
    results: list[bool] = []
    client.notifyShutdown("bye").addCallback(results.append)
    assert gone == [None]
    assert results == [False]
    assert client.unanswered == 0
    assert sent(metrics, "failed") == 2


def test_a_mind_that_is_not_a_reference_fails_as_an_error_answer(log):
    client, metrics = reference("not a reference")  # type: ignore[arg-type]
    client.notifyGreeting("hi")
    assert client.unanswered == 0
    results: list[bool] = []
    client.notifyShutdown("bye").addCallback(results.append)
    client.notifyKicked("replaced").addCallback(results.append)
    assert results == [False, False]
    assert client.notifyTime(1.0) is False
    assert (sent(metrics, "failed"), sent(metrics, "skipped")) == (3, 1)
    # Logged (a str cannot be remembered as a reference is), and no error.
    assert [m for m in log.messages() if "answered" in m]
    assert not log.errors()


def test_a_subclass_of_the_client_mind_may_override_either_name():
    heard = []

    class Mind(ClientMind):
        def notifyKicked(self, reason: str) -> None:
            heard.append(("notifyKicked", reason))
            super().notifyKicked(reason)

        def remote_notifyGreeting(self, text: str) -> None:
            heard.append(("remote_notifyGreeting", text))
            super().remote_notifyGreeting(text)

    mind = Mind(onKicked=lambda r: heard.append(("onKicked", r)), onGreeting=heard.append)
    mind.remote_notifyKicked("replaced")
    mind.remote_notifyGreeting("hi")
    assert heard == [
        ("notifyKicked", "replaced"),
        ("onKicked", "replaced"),
        ("remote_notifyGreeting", "hi"),
        "hi",
    ]


@implementer(IRealm)
class PlainRealm:
    """
    A realm written to Twisted's rules: it pushes with C{mind.callRemote}.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        mind.callRemote("notifyTime", 12.5).addErrback(lambda _: None)
        return pb.IPerspective, pb.Avatar(), lambda: None


@pytest_twisted.ensureDeferred
async def test_any_other_realm_gets_what_the_client_passed_as_under_a_portal(harness, reactor):
    registry = SessionRegistry(reactor)
    root = LoginRoot(
        PasswordFile(str(harness.passwd)), PlainRealm(), registry, registry.clock, registry.metrics
    )
    served = await harness.serve(root=root)
    pushed: defer.Deferred[float] = defer.Deferred()
    await served.login("alice", mind=ClientMind(onTime=pushed.callback))
    assert await pushed.addTimeout(5, reactor) == 12.5
    (session,) = registry.sessionsOf("alice")
    assert isinstance(session.mind, pb.RemoteReference)
    assert not ISessionRealm.providedBy(root.realm)
    assert ISessionRealm.providedBy(REALMS["cache"].realm(registry, reactor))
