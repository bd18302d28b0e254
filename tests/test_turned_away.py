"""
What an outside attacker found in the login's refusals, over real loopback
TCP and TLS: connections opened before a penalty keep no tries, a closing
connection reads and lives for a bounded time and logs once, a penalised
connection logs nothing, and a penalty that drained lets the login through.
"""

import pytest
import pytest_twisted
from conftest import RecordingFactory, Served, disconnection, eventually
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, endpoints, interfaces, protocol, task
from twisted.spread import banana, pb
from zope.interface import implementer

from pbrealms import wire
from pbrealms.errors import BadCredentials, SourcePenalised, localize
from pbrealms.guard import SourcePenalties
from pbrealms.login import LoginRoot
from pbrealms.realms.tracking import TrackingRealm
from pbrealms.sessions import SessionRegistry
from pbrealms.tap import Options

ATTACKER = "127.0.0.6"
HELLO = banana.encode(b"pb") + banana.encode([b"version", 6])


def call(requestID: int, method: bytes, *args) -> bytes:
    return banana.encode(
        [b"message", requestID, b"root", method, 1, [b"tuple", *args], [b"dictionary"]]
    )


class Counting:
    """
    The harness's checker, counting the passwords it is asked to check.
    """

    def __init__(self, checker) -> None:
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self.checked = 0

    def requestAvatarId(self, credentials):
        self.checked += 1
        return self.checker.requestAvatarId(credentials)


def serveOn(harness, clock=None, penalties=None, tls=None, **limits) -> Served:
    """
    A server whose registry (and so its login and close timers) runs on
    C{clock}, over TLS if given the server's context.
    """
    base = harness.makeRoot("tracking")
    registry, realm = base.registry, base.realm
    if clock is not None:
        registry = SessionRegistry(clock, realm="tracking")
        realm = TrackingRealm(registry, harness.reactor)
    root = LoginRoot(
        Counting(base.checker),
        realm,
        registry,
        registry.clock,
        registry.metrics,
        penalties=penalties,
        **limits,
    )
    factory = RecordingFactory(root)
    reactor = harness.reactor
    if tls is not None:
        port = reactor.listenSSL(0, factory, tls, interface="127.0.0.1")
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    served = Served(harness, root, factory, port)
    harness.servers.append(served)
    return served


def connectFrom(harness, served, source: str = ATTACKER) -> pb.PBClientFactory:
    factory = pb.PBClientFactory()
    harness.connectors.append(
        harness.reactor.connectTCP(
            "127.0.0.1", served.port.getHost().port, factory, bindAddress=(source, 0)
        )
    )
    return factory


async def refused(d: defer.Deferred):
    """
    The pbrealms error C{d} fails with (it must fail).
    """
    failures: list = []
    await d.addCallbacks(lambda r: pytest.fail(f"not refused: {r}"), failures.append)
    return localize(failures[0]).value


# ------------------------------------------ connections opened before a penalty


@pytest_twisted.ensureDeferred
async def test_connections_opened_before_a_penalty_are_turned_away_at_their_next_login(
    harness, reactor, log
):
    penalties = SourcePenalties(task.Clock())
    served = serveOn(harness, penalties=penalties, maxAuthTries=6)
    factories = [connectFrom(harness, served) for _ in range(6)]
    roots = [await f.getRootObject() for f in factories]
    # One holds a challenge handed out before the penalty began.
    _, challenger = await roots[5].callRemote("login", b"alice")
    for _ in range(3):
        error = await refused(factories[0].login(UsernamePassword(b"alice", b"guess")))
        assert isinstance(error, BadCredentials)
    assert penalties.penalty(ATTACKER) == 15
    checker = served.root.checker
    assert checker.checked == 3
    # Each other connection's next login, however it asks, is turned away
    # before any password is checked.
    assert isinstance(
        await refused(factories[0].login(UsernamePassword(b"a", b"b"))), SourcePenalised
    )
    assert isinstance(
        await refused(factories[1].login(UsernamePassword(b"a", b"b"))), SourcePenalised
    )
    for root, name, args in [
        (roots[2], "loginPassword", (b"alice", b"guess", None)),
        (roots[3], "loginAnonymous", (None,)),
        (roots[4], "login", (b"alice",)),
    ]:
        assert isinstance(await refused(root.callRemote(name, *args)), SourcePenalised)
    response = pb.respond(b"0" * 32, b"guess")
    assert isinstance(
        await refused(challenger.callRemote("respond", response, None)), SourcePenalised
    )
    assert checker.checked == 3
    await defer.gatherResults([disconnection(reactor, b) for b in served.factory.made])
    # The penalty's line, and none for the connections turned away.
    lines = [m for m in log.messages() if ATTACKER in m]
    penalty = f"refusing logins from {ATTACKER} for at least 15 s: too many failed logins"
    assert [m for m in lines if "login refused" not in m] == [penalty]
    assert len(lines) == 4, lines  # and the three failures that led to it


@pytest_twisted.ensureDeferred
async def test_a_penalty_that_drained_since_the_connection_came_lets_it_log_in(harness):
    clock = task.Clock()
    penalties = SourcePenalties(clock)
    for _ in range(3):
        penalties.failed(ATTACKER)
    served = serveOn(harness, penalties=penalties, loginTimeout=30)
    factory = connectFrom(harness, served)
    await factory.getRootObject()
    assert served.factory.made[0].localObjectForID(b"root").penalised == ATTACKER
    clock.advance(15)  # drained
    perspective = await factory.login(UsernamePassword(b"alice", b"wonderland"))
    assert await perspective.callRemote("greet") == "<1>hello alice"


# ------------------------------------------------ a penalised connection's noise


class Raw(protocol.Protocol):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


@pytest.mark.parametrize(
    "data",
    [
        HELLO + banana.encode([b"decref", 999]),
        HELLO + banana.encode([b"message", 1, b"root", b"login", 1, [b"tuple", b"x" * 60000]]),
    ],
    ids=["malformed", "oversized"],
)
@pytest_twisted.ensureDeferred
async def test_a_penalised_connection_logs_nothing_for_bad_input(harness, reactor, log, data):
    penalties = SourcePenalties(task.Clock())
    for _ in range(3):
        penalties.failed(ATTACKER)
    served = serveOn(harness, penalties=penalties)
    served.factory.maxMessageBytes = 20_000
    before = len(log)
    clients = []
    for _ in range(20):
        client = await protocol.ClientCreator(reactor, Raw, data).connectTCP(
            "127.0.0.1", served.port.getHost().port, bindAddress=(ATTACKER, 0)
        )
        clients.append(client.lost)
    await defer.gatherResults(clients)  # each aborted at once
    assert [m for m in log.messages()[before:] if ATTACKER in m] == []


# ----------------------------------------------------- closing, over TLS


@implementer(interfaces.IHandshakeListener)
class Hostile(protocol.Protocol):
    """
    Sends C{data}, then never reads, and never says goodbye (no
    close_notify); with C{junk}, sends that as fast as the server reads it,
    up to 64 MB.
    """

    def __init__(self, data: bytes, junk: bool) -> None:
        self.data = data
        self.junk = junk
        self.left = 64 << 20
        self.next = None
        self.lost: defer.Deferred = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.transport.pauseProducing()  # it reads nothing more
        self.transport.write(self.data)
        if self.junk:
            self.pump()

    def pump(self) -> None:
        from twisted.internet import reactor

        self.next = None
        # What the kernel's buffers and TCP's take: more waits a turn.
        tcp = self.transport.transport
        if len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen < 1 << 20:
            self.transport.write(b"\x01\x82" * 32768)
            self.left -= 65536
        if self.left > 0:
            self.next = reactor.callLater(0, self.pump)

    def connectionLost(self, reason) -> None:
        if self.next is not None:
            self.next.cancel()
            self.next = None
        self.lost.callback(None)


async def hostileTLS(harness, served, clientTLS, data: bytes, junk: bool) -> Hostile:
    endpoint = endpoints.wrapClientTLS(
        clientTLS,
        endpoints.TCP4ClientEndpoint(harness.reactor, "127.0.0.1", served.port.getHost().port),
    )
    client = await endpoint.connect(protocol.Factory.forProtocol(lambda: Hostile(data, junk)))
    # The harness's cleanup aborts the server's side, which ends this one.
    return client


ANONYMOUS = HELLO + b"".join(call(n, b"loginAnonymous") for n in range(1, 4))
OVERSIZED = HELLO + banana.encode(
    [b"message", 1, b"root", b"login", 1, [b"tuple", *([b"x" * 20000] * 4)], [b"dictionary"]]
)


@pytest.mark.parametrize("data", [ANONYMOUS, OVERSIZED], ids=["anonymous", "oversized"])
@pytest_twisted.ensureDeferred
async def test_a_closing_tls_connection_reads_a_bounded_amount(
    harness, reactor, log, tlsContexts, data
):
    """
    After its refusal, a client sends junk at full speed and no
    close_notify: the server reads at most one message's worth more, then
    aborts, without waiting for any timer, and logs what it logs once.
    """
    clock = task.Clock()  # never advanced: no timer may be what ends it
    serverTLS, clientTLS = tlsContexts
    served = serveOn(harness, clock=clock, tls=serverTLS, maxAuthTries=3, loginTimeout=30)
    served.factory.maxMessageBytes = 50_000
    before = len(log)
    client = await hostileTLS(harness, served, clientTLS, data, junk=True)
    await served.factory.accepted(reactor, 1)
    (broker,) = served.factory.made
    # The broker tells nothing when it refuses: polled.
    await eventually(reactor, lambda: broker._refused)
    clock.advance(0)  # the close, once the refusal is written
    await disconnection(reactor, broker)
    assert broker._discarded < broker.maxMessageBytes + 2 * 65536
    await client.lost
    lines = [m for m in log.messages()[before:] if "127.0.0.1:" in m]
    assert len(lines) == (2 if data is ANONYMOUS else 1), lines


@pytest.mark.parametrize("data", [ANONYMOUS, OVERSIZED], ids=["anonymous", "oversized"])
@pytest_twisted.ensureDeferred
async def test_a_closing_tls_connection_is_aborted_after_the_close_timeout(
    harness, reactor, log, tlsContexts, data
):
    """
    After its refusal, a client neither reads nor says goodbye: the
    connection is aborted CLOSE_TIMEOUT after the close began, by the
    registry's clock, and no "no login" line follows the refusal's.
    """
    clock = task.Clock()
    serverTLS, clientTLS = tlsContexts
    served = serveOn(harness, clock=clock, tls=serverTLS, maxAuthTries=3, loginTimeout=30)
    served.factory.maxMessageBytes = 50_000
    before = len(log)
    client = await hostileTLS(harness, served, clientTLS, data, junk=False)
    await served.factory.accepted(reactor, 1)
    (broker,) = served.factory.made
    # The broker tells nothing when it refuses: polled.
    await eventually(reactor, lambda: broker._refused)
    clock.advance(0)
    await task.deferLater(reactor, 0.1, lambda: None)
    assert not broker.disconnected  # waiting for the client's goodbye
    clock.advance(wire.CLOSE_TIMEOUT - 0.1)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert not broker.disconnected
    clock.advance(0.2)
    # At once: the timer is the registry's clock's, not the reactor's.
    await disconnection(reactor, broker, 1.0)
    client.transport.resumeProducing()  # only a reading client sees the end
    await client.lost
    clock.advance(60)  # the login timeout, long past: nothing more
    lines = [m for m in log.messages()[before:] if "127.0.0.1:" in m]
    assert len(lines) == (2 if data is ANONYMOUS else 1), lines
    assert not [m for m in lines if "no login" in m]


def test_a_bad_unix_endpoint_suggests_a_unix_one(capsys):
    with pytest.raises(SystemExit):
        Options().parseOptions(["--port", "unix:/tmp/x.sock:mode=abc"])
    assert capsys.readouterr().err.endswith(
        "bad --port 'unix:/tmp/x.sock:mode=abc': 'abc' is not an octal number; "
        "expected e.g. unix:/run/pbrealms/pb.sock (see Twisted's endpoint syntax)\n"
    )
