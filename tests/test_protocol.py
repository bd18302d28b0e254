"""
The push protocol: L{IClient} is what both ends implement, and
L{ClientReference} owns how the server delivers it, with its bounds.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.spread import pb
from zope.interface.verify import verifyClass, verifyObject

from pbrealms.client.mind import ClientMind
from pbrealms.metrics import ServerMetrics
from pbrealms.protocol import IClient
from pbrealms.push import MAX_UNANSWERED, ClientReference


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
