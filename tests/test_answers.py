"""
What the server makes of what clients answer and send, over real loopback
TCP: answers and errors that do not decode fail only their own call, a
message over the size limit gets a typed error before its connection
closes, paging is refused with a typed error, and arity errors count the
arguments as the client passes them.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from conftest import Arrivals, eventually
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.spread import pb, util

from pbrealms.errors import BadArguments, MessageTooLarge, PagingRefused, UndecodableAnswer
from pbrealms.realms.base import Avatar
from pbrealms.wire import MAX_MESSAGE_BYTES


class Thing(pb.Copyable):
    """
    A value the server's jelly options refuse.
    """

    def __init__(self) -> None:
        self.size = 3


class CopyableError(pb.Error, pb.Copyable):
    """
    An error that stock PB sends as itself, not as a failure.
    """


class Ticked(pb.Referenceable):
    """
    A mind for any realm: the clock realm pushes the time to it.
    """

    def remote_notifyTime(self, now):
        pass


class PickyMind(pb.Referenceable):
    """
    A client object that answers every push with something the server
    refuses: a Copyable, or a Copyable error.
    """

    def __init__(self) -> None:
        self.calls = Arrivals()

    def remote_notifyGreeting(self, text: str) -> Thing:
        self.calls.append(text)
        return Thing()

    def remote_notifySessionOpened(self, info: dict) -> None:
        self.calls.append("opened")
        raise CopyableError("no thanks")

    def remote_notifySessionClosed(self, info: dict) -> None:
        self.calls.append("closed")

    def remote_echo(self, value: object) -> object:
        return Thing() if value == "thing" else value


def closes(log) -> list[str]:
    return [m for m in log.messages() if "closed the connection" in m]


@pytest_twisted.ensureDeferred
async def test_pushes_answered_with_what_the_server_refuses_keep_the_connection(harness, log):
    """
    A client object that answers its pushes with a Copyable (a value, an
    error): each answer is dropped, the client is logged once, and its
    session stays, told of everything that follows.
    """
    served = await harness.serve("sessions")
    picky = PickyMind()
    first = await served.login("alice", mind=picky)
    other = await served.login("alice")
    for _ in range(3):
        await other.callRemote("greet")
    await picky.calls.waitFor(harness.reactor, 4)
    (session,) = [s for s in served.registry.sessionsOf("alice") if s.mind is not None]
    # The answers' arrival fires nothing on the server: polled.
    await eventually(harness.reactor, lambda: session.client.unanswered == 0)
    assert first.connected and session.active
    assert picky.calls == ["opened", "<1>hello alice", "<2>hello alice", "<3>hello alice"]
    assert not closes(log)
    complaints = [m for m in log.messages() if "client answered" in m]
    assert complaints == [
        "client answered notifySessionOpened with an error, and is not logged again: "
        "an error of a type the server refuses (Module test_answers not allowed "
        "(in type test_answers.CopyableError).)"
    ]
    assert await first.callRemote("greet") == "<4>hello alice"

    # Once per client, not once per server: a second such client is logged too.
    second = PickyMind()
    await served.login("alice", mind=second)
    await served.login("alice")
    await second.calls.waitFor(harness.reactor)
    assert "opened" in second.calls
    # A log line, after the answer: polled.
    await eventually(
        harness.reactor, lambda: len([m for m in log.messages() if "client answered" in m]) == 2
    )
    assert picky.calls.count("opened") == 3 and not closes(log)


@pytest_twisted.ensureDeferred
async def test_an_answer_that_does_not_decode_fails_its_call_at_once(harness, log):
    """
    The server's own call on a client object: an answer of a refused type
    fails that call with L{UndecodableAnswer}, without waiting, and the
    next call on the same connection is answered.
    """
    served = await harness.serve("sessions")
    conn = await served.login("alice", mind=PickyMind())
    (session,) = served.registry.sessionsOf("alice")
    with pytest.raises(UndecodableAnswer) as refused:
        await session.mind.callRemote("echo", "thing")
    assert str(refused.value) == (
        "an answer of a type the server refuses "
        "(Module test_answers not allowed (in type test_answers.Thing).)"
    )
    assert await session.mind.callRemote("echo", "fine") == "fine"
    assert conn.connected
    assert not closes(log)


@pytest_twisted.ensureDeferred
async def test_an_oversized_call_gets_a_typed_error_before_the_close(harness, reactor, log):
    """
    A dict of 11,000 ints is 87 KB on the wire and costs more than 1 MiB
    decoded: the caller is told so with L{MessageTooLarge}, a stock PB
    client by the error's type name, and the server's one line says what
    it counted.
    """
    served = await harness.serve("cache")
    conn = await served.login("alice")
    lost: defer.Deferred = defer.Deferred()
    conn.notifyOnDisconnect(lambda: lost.callback(None))
    big = {n: n for n in range(1000, 12_000)}
    with pytest.raises(MessageTooLarge) as refused:
        await conn.callRemote("greet", big)
    assert str(refused.value) == (
        f"the message would cost more than {MAX_MESSAGE_BYTES} bytes of the server's memory "
        "once decoded (its --max-message-size); the server closes the connection"
    )
    await lost
    [line] = closes(log)
    assert line.endswith(
        f"a message that would cost more than {MAX_MESSAGE_BYTES} bytes of memory once "
        "decoded (--max-message-size)"
    )
    # A stock PB client is told the same.
    factory = pb.PBClientFactory()
    harness.connectors.append(reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory))
    perspective = await factory.login(UsernamePassword(b"bob", b"builder"))
    (reason,) = await perspective.callRemote("greet", big).addCallbacks(
        lambda _: [None], lambda f: [f]
    )
    assert reason.check("pbrealms.errors.MessageTooLarge")
    assert "--max-message-size" in reason.getErrorMessage()
    # And the server serves on.
    again = await served.login("alice")
    assert (await again.callRemote("greet")).endswith("hello alice")


class PagingAvatar(Avatar):
    """
    An avatar that pages its answer, as Twisted's C{util.StringPager} does.
    """

    def perspective_download(self, collector: pb.RemoteReference) -> None:
        util.StringPager(collector, b"x" * 100_000, chunkSize=8192)


@pytest_twisted.ensureDeferred
async def test_paging_is_refused_with_a_typed_error(harness, log):
    """
    A remote method that starts PB paging (L{util.Pager}) to a collector the
    client passed: the client gets L{PagingRefused}, nothing is logged, and
    the session serves on.
    """
    served = await harness.serve("cache")
    realm = served.realm
    realm.makeAvatar = lambda user: PagingAvatar(realm.greeter(user), realm.describe)
    conn = await served.login("alice")
    pages: list = []
    with pytest.raises(PagingRefused):
        await conn.callRemote("download", util.CallbackPageCollector(pages.append))
    assert not pages
    assert not [m for m in log.messages() if "Traceback" in m or "paging" in m.lower()]
    assert (await conn.callRemote("greet")).endswith("hello alice")


@pytest.mark.parametrize(
    ("realm", "method", "args", "text"),
    [
        ("cache", "greet", (1,), "greet takes no arguments but 1 was given"),
        ("cache", "status", (1, 2), "status takes no arguments but 2 were given"),
        ("clock", "setperiod", (1, 2), "setperiod takes 1 positional argument but 2 were given"),
        ("clock", "setperiod", (), "setperiod is missing 1 required argument: 'seconds'"),
        ("sessions", "greet", (1,), "greet takes no arguments but 1 was given"),
        ("sessions", "sessions", (1, 2, 3), "sessions takes no arguments but 3 were given"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_arity_errors_count_what_the_client_passes(harness, log, realm, method, args, text):
    served = await harness.serve(realm)
    conn = await served.login("alice", mind=Ticked())
    with pytest.raises(BadArguments) as bad:
        await conn.callRemote(method, *args)
    assert str(bad.value) == text


@pytest_twisted.ensureDeferred
async def test_a_keyword_the_method_lacks_is_named(harness, log):
    served = await harness.serve("clock")
    conn = await served.login("alice", mind=Ticked())
    with pytest.raises(BadArguments) as bad:
        await conn.callRemote("setperiod", secs=2)
    assert str(bad.value) == "setperiod got an unexpected keyword argument 'secs'"
    assert await conn.callRemote("setperiod", seconds=2) == 2.0
