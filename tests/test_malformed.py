"""
Malformed PB messages over real loopback TCP: each closes its connection with
one log line, never a traceback or an unraisable exception; errors the server
sends carry no stack frame, path or Python version; and a client object with
an id of the wrong type cannot make the sessions realm leak its count of
unanswered pushes.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import pytest_twisted
from conftest import USERS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.spread import banana, jelly, pb

from pbrealms.client import connect
from pbrealms.errors import BadCredentials, localize

#: The request id of the call that tells a test the server has read
#: everything sent before it: a call to an object that does not exist,
#: answered with an error.
SENTINEL = 987654321
NO_ARGS = [b"tuple"]
NO_KW = [b"dictionary"]
#: Seconds a test waits for the server before it fails.
TIMEOUT = 5.0
#: How PB tags a failure on the wire.
FAILURE = b"twisted.spread.pb.CopyableFailure"


class RawClient(banana.Banana):
    """
    A PB peer that speaks only Banana: it sends whatever a test builds, and
    keeps everything the server sends, undecoded by jelly.
    """

    def __init__(self) -> None:
        super().__init__(isClient=True)
        self.received: list = []
        self.ready: defer.Deferred = defer.Deferred()
        self.isClosed = False
        self._closing: list[defer.Deferred] = []
        self.waiting: dict[int, defer.Deferred] = {}
        self.nextID = 0
        #: Called with each call the server makes; what it returns is sent.
        self.onCall = lambda call: None

    def connectionMade(self) -> None:
        host = self.transport.getHost()
        #: How the server names this client in its log.
        self.peer = f"{host.host}:{host.port}"
        super().connectionMade()

    def connectionReady(self) -> None:
        self.ready.callback(self)

    def expressionReceived(self, sexp) -> None:
        self.received.append(sexp)
        if sexp[0] in (b"answer", b"error"):
            d = self.waiting.pop(sexp[1], None)
            if d is not None:
                d.callback(sexp)
        elif sexp[0] == b"message":
            reply = self.onCall(sexp)
            if reply is not None:
                self.sendEncoded(reply)

    def connectionLost(self, reason) -> None:
        self.isClosed = True
        for d in self.waiting.values():
            d.callback(None)
        self.waiting = {}
        for d in self._closing:
            d.callback(None)

    def closed(self) -> defer.Deferred:
        """
        @return: a Deferred that fires once the connection has closed; it
            fails after L{TIMEOUT} seconds.
        """
        if self.isClosed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._closing.append(d)
        return _within(d)

    def send(self, *command) -> None:
        self.sendEncoded(list(command))

    def call(self, objectID, method: bytes, *args, kw=NO_KW) -> defer.Deferred:
        """
        Call C{method} on the server's object C{objectID} with jelly
        expressions C{args} and C{kw}.

        @return: a Deferred firing with the server's C{answer} or C{error}
            expression, or L{None} if the connection closed first.
        """
        self.nextID += 1
        return self.request(self.nextID, [b"message", self.nextID, objectID, method, 1,
                                          [b"tuple", *args], kw])  # fmt: skip

    def request(self, requestID: int, command: list) -> defer.Deferred:
        d = self.waiting[requestID] = defer.Deferred()
        self.sendEncoded(command)
        return _within(d)

    def sentinel(self) -> defer.Deferred:
        """
        @return: a Deferred that fires once the server has acted on all that
            was sent before (with its error), or the connection has closed.
        """
        return self.request(SENTINEL, [b"message", SENTINEL, b"nothing", b"x", 1, NO_ARGS, NO_KW])

    async def login(self, user: str = "alice", password: str | None = None, mind=None):
        """
        Log in with PB's challenge, sending C{mind} (a jelly expression) as
        the client object.

        @return: the server's answer or error expression to C{respond}.
        """
        answer = await self.call(b"root", b"login", user.encode())
        _, _, (_, challenge, (_, challenger)) = answer
        response = pb.respond(challenge, (password or USERS[user]).encode())
        return await self.call(challenger, b"respond", response, mind or [b"None"])


def _within(d: defer.Deferred) -> defer.Deferred:
    from twisted.internet import reactor

    return d.addTimeout(TIMEOUT, reactor)


class RawFactory(protocol.ClientFactory):
    noisy = False
    protocol = RawClient


async def rawClient(reactor, served, clients: list | None = None) -> RawClient:
    """
    Connect a L{RawClient} to C{served} and wait until it speaks PB.
    """
    factory = RawFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    client = await _built(factory)
    if clients is not None:
        clients.append(client)
    await client.ready
    return client


def _built(factory) -> defer.Deferred:
    built: defer.Deferred = defer.Deferred()
    buildProtocol = factory.buildProtocol

    def build(addr):
        client = buildProtocol(addr)
        built.callback(client)
        return client

    factory.buildProtocol = build
    return built


@pytest.fixture
def unraisable(monkeypatch) -> list:
    """
    The unraisable exceptions (C{Exception ignored in ...}) during a test.
    """
    caught: list = []
    monkeypatch.setattr(sys, "unraisablehook", caught.append)
    return caught


@pytest_twisted.async_yield_fixture()
async def raw(harness):
    """
    The raw clients a test made; those still open are closed at its end.
    """
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        if not client.isClosed:
            client.transport.abortConnection()
        await client.closed()


def messages(log, start: int = 0) -> list[str]:
    return [formatEvent(event) for event in log[start:]]


def closes(log, start: int = 0) -> list[str]:
    return [m for m in messages(log, start) if "closed the connection" in m]


def noTracebacks(log, unraisable, start: int = 0, collect: int = 2) -> None:
    """
    Check that nothing logged since C{start} is an error or a traceback, and
    that no exception was unraisable, after a collection of C{collect}
    generations (a finaliser runs at once when no cycle holds its object).
    """
    gc.collect(collect)
    assert not log.errors(), messages(log, start)
    assert not [m for m in messages(log, start) if "Traceback" in m]
    assert not unraisable, [u.exc_value for u in unraisable]


# Point 3: floods of tracebacks before login.


@pytest_twisted.ensureDeferred
async def test_an_object_id_that_is_a_list_closes_the_connection_in_one_line(
    harness, reactor, raw, log, unraisable
):
    served = await harness.serve("cache")
    client = await rawClient(reactor, served, raw)
    for i in range(100):
        client.send(b"message", i + 1, [1], b"login", 1, [b"tuple", b"alice"], NO_KW)
    assert await client.sentinel() is None
    await client.closed()
    assert closes(log) == [
        f"closed the connection from {client.peer}: a message to an object id of type list"
    ]
    assert not [e for e in client.received if e[0] == b"error"]
    noTracebacks(log, unraisable)
    canary = await served.login("alice")
    assert await canary.callRemote("greet") == "<1>hello alice"


@pytest.mark.parametrize(
    "mind",
    [
        [b"remote"],
        [b"remote", b"x"],
        [b"remote", 1.5],
        [b"remote", [1]],
        [b"remote", 1, 2],
        [b"local"],
        [b"local", [b"root"]],
        [b"tuple", [b"dictionary", [b"key", [b"remote", -0.0]]]],
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_reference_without_a_proper_id_closes_the_connection_in_one_line(
    harness, reactor, raw, log, unraisable, mind
):
    served = await harness.serve("cache")
    client = await rawClient(reactor, served, raw)
    for _ in range(50):
        client.call(b"root", b"login", mind)
    assert await client.sentinel() is None
    await client.closed()
    (line,) = closes(log)
    assert "a reference" in line
    assert len(line) < 200
    assert not [e for e in client.received if e[0] in (b"answer", b"error")]
    noTracebacks(log, unraisable)


def unicode(text: str) -> list:
    return [b"unicode", text.encode()]


def unicode_(data: bytes) -> list:
    return [b"unicode", data]


def failure(*pairs) -> list:
    """
    The jelly of a PB failure whose state has C{pairs}, as a client sends it.
    """
    return [FAILURE, [b"dictionary", *(list(pair) for pair in pairs)]]


PY3_FAILURE = failure(
    (unicode("type"), b"builtins.ValueError"),
    (unicode("value"), unicode("no")),
    (unicode("parents"), [b"list", unicode("builtins.ValueError"), unicode("builtins.Exception")]),
    (unicode("traceback"), unicode("Traceback unavailable\n")),
    (unicode("frames"), [b"list"]),
)
# A Python 2 client's: byte strings throughout.
PY2_FAILURE = failure(
    (b"type", b"exceptions.ValueError"),
    (b"value", b"no"),
    (b"parents", [b"list", b"exceptions.ValueError", b"exceptions.Exception"]),
    (b"traceback", b"Traceback unavailable\n"),
)


MALFORMED = [
        ([b"answer", 5, [b"None"]], "an answer to no question"),
        ([b"answer", [5], [b"None"]], "an answer to no question"),
        ([b"error", 5, PY3_FAILURE], "an error to no question"),
        ([b"error", SENTINEL + 1, b"boom"], "an error to no question"),
        ([b"decref", 99], "a decref of no reference"),
        ([b"decref", b"root"], "a decref of no reference"),
        ([b"decref", [1]], "a decref of no reference"),
        ([b"decache", 1], "a decache of a cached object"),
        ([b"uncache", [1]], "an uncache of a cached object"),
        ([b"version", 7], "a PB version other than 6"),
        ([b"version", [6]], "a PB version other than 6"),
        ([b"cachemessage", 1, 1, b"x", 1, NO_ARGS, NO_KW], "a message to a cached object"),
        ([b"message", 1.5, b"root", b"login", 1, NO_ARGS, NO_KW],
         "a message with a request id of type float"),
        ([b"message", 1, 2.0, b"login", 1, NO_ARGS, NO_KW],
         "a message to an object id of type float"),
        ([b"message", 1, b"root", 7, 1, NO_ARGS, NO_KW],
         "a message with a method name of type int"),
        ([b"message", 1, b"root", [b"login"], 1, NO_ARGS, NO_KW],
         "a message with a method name of type list"),
        ([b"message", 1, b"root", b"\xfflogin", 1, NO_ARGS, NO_KW],
         "a message with a method name that is not UTF-8"),
        ([b"message", 1, b"root", b"login", b"yes", NO_ARGS, NO_KW],
         "a message with an answer flag of type bytes"),
        ([b"message", 1, b"root", b"login", 1, b"alice", NO_KW],
         "a message whose arguments are not a tuple"),
        ([b"message", 1, b"root", b"login", 1, [b"dictionary"], NO_KW],
         "a message whose arguments are not a tuple"),
        ([b"message", 1, b"root", b"login", 1, NO_ARGS, [b"tuple"]],
         "a message whose keyword arguments are not a dictionary"),
        ([b"message", 1, b"root", b"login", 1, NO_ARGS, [b"dictionary", [5, b"alice"]]],
         "a keyword argument whose name is not a string"),
        ([b"message", 1, b"root", b"login", 1, NO_ARGS, [b"dictionary", [b"\xff", 1]]],
         "a keyword argument whose name is not UTF-8"),
        ([b"message", 1, b"root", b"login", 1, NO_ARGS, [b"dictionary", [b"a"]]],
         "a dictionary entry that is not a pair"),
        ([b"message", 1, b"root", b"login", 1, [b"tuple", []], NO_KW],
         "a jelly expression without a type"),
        ([b"message", 1, b"root", b"login", 1, [b"tuple", [[b"remote", 1]]], NO_KW],
         "a jelly expression without a type"),
        ([b"message", 1, b"root", b"login", 1, [b"tuple", [b"reference", b"k", 1]], NO_KW],
         "a malformed back reference"),
        ([b"message", 1, b"root", b"login", 1, [b"tuple", [b"dereference", 1.0]], NO_KW],
         "a malformed back reference"),
        ([b"message", 1, b"root", b"login", 1, NO_ARGS],
         "a command 'message' with 5 fields, not 6"),
        ([b"answer", 1, 2, 3], "a command 'answer' with 3 fields, not 2"),
        ([b"frobnicate", 1], "an unknown command"),
        ([7, 1], "an unknown command"),
        ([], "a command that is not a list"),
        (b"message", "a command that is not a list"),
]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_each_kind_of_malformed_command_closes_its_connection_in_one_line(
    harness, reactor, raw, log, unraisable
):
    """
    Each of L{MALFORMED}, sent 20 times on a connection of its own, closes it
    with one line that says what was wrong, and nothing is answered.
    """
    served = await harness.serve("cache")
    for command, reason in MALFORMED:
        start = len(log)
        client = await rawClient(reactor, served, raw)
        for _ in range(20):
            client.sendEncoded(command)
        assert await client.sentinel() is None, command
        await client.closed()
        assert closes(log, start) == [f"closed the connection from {client.peer}: {reason}"]
        assert not [e for e in client.received if e[0] in (b"answer", b"error")], command
    noTracebacks(log, unraisable)


@pytest_twisted.ensureDeferred
async def test_python_2_names_and_large_ids_keep_working(harness, reactor, raw, log):
    """
    A Python 2 client sends keyword names as byte strings; request ids may
    be any integer.
    """
    served = await harness.serve("cache")
    client = await rawClient(reactor, served, raw)
    big = 2**70
    answer = await client.request(
        big,
        [b"message", big, b"root", b"login", 1, NO_ARGS, [b"dictionary", [b"username", b"bob"]]],
    )
    assert answer[:2] == [b"answer", big]
    _, _, (_, challenge, (_, challenger)) = answer
    response = pb.respond(challenge, USERS["bob"].encode())
    kw = [b"dictionary", [b"response", response], [unicode("mind"), [b"None"]]]
    answer = await client.call(challenger, b"respond", kw=kw)
    assert answer[0] == b"answer" and answer[2][0] == b"remote"
    greeting = await client.call(answer[2][1], b"greet")
    assert greeting[2] == unicode("<1>hello bob")
    assert not closes(log)


# The fuzzer: commands from PB's vocabulary, built as PB builds them, with a
# value of any type in any field, references in any position, and fields
# missing or added.

_words = st.sampled_from(
    [b"root", b"login", b"respond", b"loginPassword", b"greet", b"remote", b"local", b"tuple",
     b"list", b"dictionary", b"unicode", b"None", b"reference", b"dereference", b"module",
     b"alice", FAILURE, b"", b"\xff"]
)  # fmt: skip
_atoms = st.one_of(
    st.integers(-3, 3), st.integers(-(2**80), 2**80), st.floats(), _words, st.binary(max_size=6)
)
_references = st.tuples(
    st.sampled_from([b"remote", b"local"]),
    st.lists(st.one_of(_atoms, st.lists(_atoms, max_size=2)), max_size=3),
).map(lambda t: [t[0], *t[1]])


def _containers(children):
    return st.one_of(
        st.lists(children, max_size=3).map(lambda xs: [b"tuple", *xs]),
        st.lists(children, max_size=3).map(lambda xs: [b"list", *xs]),
        st.lists(st.one_of(st.lists(children, min_size=2, max_size=2), children), max_size=3).map(
            lambda xs: [b"dictionary", *xs]
        ),
        st.tuples(_atoms, children).map(lambda t: [b"reference", *t]),
        _atoms.map(lambda key: [b"dereference", key]),
        children.map(lambda state: [FAILURE, state]),
        st.lists(children, max_size=3),
    )


jellies = st.recursive(
    st.one_of(_atoms, _references, st.just([b"None"]), st.binary(max_size=4).map(unicode_)),
    _containers,
    max_leaves=8,
)


_kwNames = st.sampled_from([b"mind", unicode("mind"), b"username", unicode("password")])
# Commands as a client would send them, with any jelly in their arguments.
_messages = st.tuples(
    st.sampled_from([b"message", b"message", b"message", b"cachemessage"]),
    st.one_of(st.integers(1, 1000), st.just(2**70)),
    st.sampled_from([b"root", 1, 2, b"nothing"]),
    st.sampled_from([b"login", b"respond", b"loginPassword", b"greet", b"nothing"]),
    st.sampled_from([0, 1]),
    st.lists(jellies, max_size=3).map(lambda xs: [b"tuple", *xs]),
    st.lists(st.tuples(_kwNames, jellies).map(list), max_size=2).map(
        lambda kvs: [b"dictionary", *kvs]
    ),
)
# A login, to the root or to a challenge (object 1, if asked for first),
# with a client object that is any reference, or anything.
_minds = st.one_of(_references, _references, st.just([b"None"]), st.just([b"remote", 1]), jellies)
_logins = st.one_of(
    st.tuples(
        st.just(b"message"), st.integers(1, 1000), st.just(1), st.just(b"respond"), st.just(1),
        st.tuples(st.binary(max_size=16), _minds).map(lambda t: [b"tuple", *t]),
        st.just(NO_KW),
    ),
    st.tuples(
        st.just(b"message"), st.integers(1, 1000), st.just(b"root"), st.just(b"loginPassword"),
        st.sampled_from([0, 1]),
        st.tuples(st.sampled_from([b"alice", b"eve"]), st.binary(max_size=8), _minds).map(
            lambda t: [b"tuple", *t]
        ),
        st.just(NO_KW),
    ),
    st.tuples(
        st.just(b"message"), st.integers(1, 1000), st.just(b"root"), st.just(b"login"),
        st.just(1), st.one_of(_minds, _words).map(lambda x: [b"tuple", x]), st.just(NO_KW),
    ),
)  # fmt: skip
_replies = st.tuples(
    st.sampled_from([b"answer", b"error"]),
    st.integers(0, 3),
    st.one_of(jellies, st.just(PY3_FAILURE), st.just(PY2_FAILURE)),
)
_singles = st.tuples(
    st.sampled_from([b"decref", b"decache", b"uncache", b"version", b"didNotUnderstand"]),
    st.one_of(st.integers(0, 7), _words),
)


def _spoil(commands):
    """
    Commands, most with one field (the command's name included) replaced
    by anything, or one missing or one too many.
    """

    def spoil(drawn):
        (command, where, value, change) = drawn
        command = list(command)
        if where is not None and where < len(command):
            command[where] = value
        if change == "drop":
            command.pop()
        elif change == "add":
            command.append(value)
        return command

    return st.tuples(
        commands,
        st.sampled_from([None] * 6 + [0, 1, 2, 3, 4, 5, 6]),
        jellies,
        st.sampled_from(["keep"] * 8 + ["drop", "add"]),
    ).map(spoil)


fuzzedCommands = st.one_of(
    _spoil(_logins), _spoil(_logins), _spoil(_messages), _spoil(_replies), _spoil(_singles), jellies
)


@pytest_twisted.async_fixture()
async def fuzzed(harness):
    """
    One server for all the fuzzer's examples.
    """
    return await harness.serve("cache")


@settings(
    max_examples=int(os.environ.get("PBREALMS_TEST_FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=True,  # CI runs the same examples every time
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(challenge=st.booleans(), sent=st.lists(fuzzedCommands, min_size=1, max_size=2))
@pytest_twisted.ensureDeferred
async def test_fuzzed_commands_close_their_connection_in_one_line(
    reactor, fuzzed, raw, log, unraisable, challenge, sent
):
    """
    Each example, on a TCP connection of its own, perhaps after asking for a
    login challenge (so that there is an object 1): no traceback, no
    unraisable exception, at most two log lines (a refused login and a
    close), exactly one if the server closed it, and then a user logs in.
    """
    start = len(log)
    client = await rawClient(reactor, fuzzed, raw)
    if challenge:
        client.call(b"root", b"login", b"alice")
    for command in sent:
        client.sendEncoded(command)
    closedByServer = await client.sentinel() is None
    if not closedByServer:
        client.transport.loseConnection()
    await client.closed()
    await fuzzed.factory.closed[-1]
    lines = messages(log, start)
    assert len(lines) <= 2, lines
    assert len(closes(log, start)) == closedByServer, lines
    noTracebacks(log, unraisable, start, collect=0)
    canary = await connect(reactor, fuzzed.endpoint, "bob", USERS["bob"], None, TIMEOUT)
    try:
        assert (await canary.callRemote("greet")).endswith("hello bob")
    finally:
        # Its session's last line is logged as the server sees it close.
        closed = fuzzed.factory.closed[-1]
        await canary.disconnect()
        await closed


# Point 9: no stack frames on the wire.


def strings(expression) -> list[str]:
    """
    Every string in a jelly expression, byte strings decoded.
    """
    if isinstance(expression, list):
        return [s for item in expression for s in strings(item)]
    if isinstance(expression, bytes):
        return [expression.decode("utf-8", "replace")]
    return [expression] if isinstance(expression, str) else []


@pytest_twisted.ensureDeferred
async def test_errors_carry_no_frames_paths_or_python_version(harness, reactor, raw, log):
    """
    Errors raised at once, from a Deferred, by PB itself, and by a login
    whose realm fails: none holds more than its type, parents and message.
    """
    served = await harness.serve("limited", maxPerUser=1)
    client = await rawClient(reactor, served, raw)
    errors = [
        await client.login("alice", "not her password"),
        await client.call(b"root", b"nothingHere"),  # raised at once
        await client.call(b"root", b"login", b"alice", b"extra"),
        await client.call(b"nothing", b"login"),  # PB's own error
    ]
    await served.login("alice")
    errors.append(await client.login("alice"))  # from a Deferred, after a wait
    # A realm that fails: the server's fault, logged, and nothing of it sent.
    log.errorsExpected = True
    served.realm.avatarFor = lambda user, mind: 1 / 0
    errors.append(await client.login("bob"))
    assert [error[0] for error in errors] == [b"error"] * len(errors)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for text in strings(errors):
        assert ".py" not in text and "/" not in text and version not in text, text
    states = {}
    for error in errors:
        tag, state = error[2]
        assert tag == FAILURE
        state = jelly.unjelly(state)
        assert set(state) <= {
            "type", "value", "parents", "traceback", "tb", "frames", "stack", "captureVars"
        }  # fmt: skip
        assert state["traceback"] == "Traceback unavailable\n"
        assert not (state.get("tb") or state.get("frames") or state.get("stack"))
        states[state["type"].decode()] = state
    messages = {kind: state["value"] for kind, state in states.items()}
    assert messages.pop("pbrealms.errors.BadArguments").startswith("login takes ")
    assert messages == {
        "pbrealms.errors.BadCredentials": "wrong user name or password",
        "pbrealms.errors.UnknownMethod": "no such method: 'nothingHere'",
        "twisted.spread.pb.Error": "Invalid Object ID",
        "pbrealms.errors.TooManyConnections": "too many connections: at most 1 session per user",
        "pbrealms.errors.LoginFailed": "login failed: internal server error (see the server log)",
    }
    assert (
        "twisted.cred.error.UnauthorizedLogin"
        in states["pbrealms.errors.BadCredentials"]["parents"]
    )


def test_an_error_that_is_not_a_pb_error_tells_only_its_type():
    from pbrealms import commands

    def internal():
        open("/nonexistent/pbrealms")

    try:
        internal()
    except OSError:
        state = commands.failureState(Failure())
    assert state["type"] == b"builtins.FileNotFoundError"
    assert state["value"] == "internal server error (see the server log)"
    assert "builtins.OSError" in state["parents"]
    assert not state["frames"] and state["tb"] is None


@pytest_twisted.ensureDeferred
async def test_clients_still_tell_errors_by_type(harness, reactor):
    """
    Stock PB's client sees a refusal as an L{UnauthorizedLogin}, with the
    server's message, and pbrealms' raises its own class.
    """
    served = await harness.serve("cache")
    factory = pb.PBClientFactory()
    connector = reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    harness.connectors.append(connector)
    credentials = UsernamePassword(b"alice", b"not her password")
    (reason,) = await factory.login(credentials).addCallbacks(lambda _: [None], lambda f: [f])
    assert reason.check(UnauthorizedLogin)
    assert reason.getErrorMessage() == "wrong user name or password"
    assert reason.getTraceback() == (
        "Traceback from remote host -- pbrealms.errors.BadCredentials: "
        "wrong user name or password\n"
    )
    reason.cleanFailure()  # what Failure code may do with it
    assert isinstance(localize(reason).value, BadCredentials)
    with pytest.raises(BadCredentials):
        await served.login("alice", "not her password")


# Point 11: a client object whose id is not an integer (the sessions realm).


class Mind(pb.Referenceable):
    def __init__(self) -> None:
        self.greetings: list[str] = []

    def remote_notifyGreeting(self, text: str) -> None:
        self.greetings.append(text)

    def remote_notifySessionOpened(self, info: dict) -> None:
        pass

    def remote_notifySessionClosed(self, info: dict) -> None:
        pass


def sessionOf(served, user: str, connection) -> object:
    """
    The session of C{user} whose connection is the raw client C{connection}.
    """
    (session,) = [
        s
        for s in served.registry.sessionsOf(user)
        if s.mind is not None
        and s.mind.broker.transport.getPeer().port == connection.transport.getHost().port
    ]
    return session


@pytest.mark.parametrize("mindID", [b"x", 1.5, [b"unicode", b"x"]])
@pytest_twisted.ensureDeferred
async def test_a_client_object_whose_id_is_not_an_integer_is_refused(
    harness, reactor, raw, log, unraisable, mindID
):
    """
    A PB client object's id is an integer; one of any other type cannot be
    hashed, which made every push to it fail.  The login that sends it is
    malformed: the connection closes in one line, and no session is left.
    """
    served = await harness.serve("sessions")
    other = await served.login("alice", mind=Mind())
    hostile = await rawClient(reactor, served, raw)
    # As PB answers a call to an object it does not have.
    hostile.onCall = lambda call: [b"error", call[1], PY3_FAILURE]
    assert await hostile.login("alice", mind=[b"remote", mindID]) is None
    for _ in range(3):
        await other.callRemote("greet")
    assert closes(log) == [
        f"closed the connection from {hostile.peer}: a reference with an id of type "
        f"{type(mindID).__name__}"
    ]
    await hostile.closed()
    assert len(list(served.registry)) == 1
    noTracebacks(log, unraisable)


@pytest.mark.parametrize(
    ("answer", "complaint"),
    [
        (lambda call: [b"answer", call[1], [b"None"]], None),
        (lambda call: [b"error", call[1], PY3_FAILURE], "no"),
        (lambda call: [b"error", call[1], PY2_FAILURE], "no"),
        # The server cannot decode these: each fails its own push, with a
        # typed error, and the connection stays.
        (lambda call: [b"answer", call[1], [b"module", b"os"]],
         "an answer of a type the server refuses (module)"),
        (lambda call: [b"answer", call[1], [b"unicode", b"\xff"]],
         "an answer that cannot be decoded (UnicodeDecodeError: "),
        (lambda call: [b"error", call[1], failure((unicode("type"), b"x"))],
         "an error that is not a failure"),
        (lambda call: [b"error", call[1], failure((unicode("parents"), [b"remote", 1]))],
         "an error that is not a failure"),
        (lambda call: [b"error", call[1], [b"None"]], "an error that is not a failure"),
        # Stock PB sends a Copyable error as itself.
        (lambda call: [b"error", call[1], [b"mod.Error", [b"dictionary"]]],
         "an error of a type the server refuses (Module mod not allowed (in type mod.Error).)"),
        (lambda call: [b"answer", call[1], [b"mod.Thing", [b"dictionary"]]],
         "an answer of a type the server refuses (Module mod not allowed (in type mod.Thing).)"),
    ],
)  # fmt: skip
@pytest_twisted.ensureDeferred
async def test_the_count_of_unanswered_pushes_comes_down_whatever_the_answer(
    harness, reactor, raw, log, unraisable, answer, complaint
):
    """
    A session answering each push in its own way: the count of its pushes
    awaiting an answer is back to 0 once each is answered, so that it is
    told everything, past the cap of unanswered ones; its connection stays,
    and an error, or an answer that does not decode, is logged once.
    """
    from pbrealms.push import MAX_UNANSWERED

    served = await harness.serve("sessions")
    hostile = await rawClient(reactor, served, raw)
    hostile.onCall = answer
    assert (await hostile.login("alice", mind=[b"remote", 1]))[0] == b"answer"
    session = sessionOf(served, "alice", hostile)
    other = await served.login("alice", mind=Mind())
    greetings = MAX_UNANSWERED + 6
    for _ in range(greetings):
        await other.callRemote("greet")
    await hostile.sentinel()
    pushes = [call for call in hostile.received if call[0] == b"message"]
    # Told of the other's opening, then of each greeting.
    assert len(pushes) == 1 + greetings
    assert not closes(log)
    assert not hostile.isClosed and session.active
    assert session.client.unanswered == 0
    complaints = [m for m in messages(log) if "client answered" in m]
    if complaint is None:
        assert not complaints
    else:
        [line] = complaints
        assert line.startswith(
            "client answered notifySessionOpened with an error, and is not logged again: "
        )
        assert complaint in line, line
    noTracebacks(log, unraisable)


@pytest_twisted.ensureDeferred
async def test_a_message_with_many_references_closes_the_connection_in_one_line(
    harness, reactor, raw, log, unraisable
):
    # Each reference costs a RemoteReference and a decref written back: an
    # attacker packed thousands into one call to make the server work.
    from pbrealms.commands import MAX_REFERENCES

    served = await harness.serve("cache")
    few = await rawClient(reactor, served, raw)
    few.call(b"root", b"login", *([b"remote", n] for n in range(MAX_REFERENCES)))
    assert await few.sentinel() is not None  # still served
    many = await rawClient(reactor, served, raw)
    many.call(b"root", b"login", *([b"remote", n] for n in range(4000)))
    assert await many.sentinel() is None
    await many.closed()
    assert closes(log) == [
        f"closed the connection from {many.peer}: "
        f"more than {MAX_REFERENCES} references in one expression"
    ]
    noTracebacks(log, unraisable)
    few.transport.loseConnection()
    await few.closed()
