"""
Answers a client never reads: a connection whose write buffer is full is not
read from, and nothing more it sent is decoded, until the buffer has drained;
and no error message or log line quotes more than a couple of hundred
characters of what a client sent.

The attacks against a real twistd last at least PBREALMS_ATTACK_SECONDS each
(default 4; the issue's acceptance is 40).  Those whose answers are small and
many also last until the attacker has been unable to send for STALL_SECONDS,
and then HOLD_SECONDS more, however long that takes on a loaded machine (up to
STALL_DEADLINE): what they prove is judged on the stall, not on a duration.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from conftest import USERS, Served, eventually
from processes import BIN, environment, stop
from twisted.internet import endpoints, protocol, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.spread import banana, pb

from pbrealms.client import connect
from pbrealms.errors import BadArguments, InvalidPeriod, UnknownMethod, dispatch
from pbrealms.login import _printable
from pbrealms.push import validatePeriod
from pbrealms.wire import LimitedBroker

PEER = IPv4Address("TCP", "192.0.2.7", 4242)
ATTACK_SECONDS = float(os.environ.get("PBREALMS_ATTACK_SECONDS") or 4)
CONNECTIONS = 2
#: How long the attacker's sends must have been refused to count as a stall:
#: longer than a busy server on a loaded 2-core machine stops reading.
STALL_SECONDS = 2.0
#: How long an attack may take to reach its stall before the test fails.
STALL_DEADLINE = 20.0
#: How long the attacker is kept stalled, with the server's RSS sampled.
HOLD_SECONDS = 2.0
#: What the server may grow by while the attacker is stalled: a server that
#: still reads and buffers answers grows by megabytes a second.
HOLD_GROWTH = 1024 * 1024
#: What one attacking connection may grow the server by.
GROWTH_PER_CONNECTION = 20 * 1024 * 1024
#: The most characters of a client's data that a message may quote.
QUOTE_LIMIT = 200


def encode(obj) -> bytes:
    return banana.encode(obj)


def unknownCall(requestID: int = 1) -> bytes:
    return encode([b"message", requestID, b"root", b"nosuchmethod", 1, [b"tuple"], [b"dictionary"]])


# ---------------------------------------------------------------- quoting


def test_printable_cuts_what_a_client_sent():
    from pbrealms.errors import QUOTE_LIMIT as limit
    from pbrealms.errors import printable

    assert limit == QUOTE_LIMIT
    assert printable(b"alice") == "alice"
    assert printable("x" * 600_000) == "x" * QUOTE_LIMIT + "..."
    assert printable(b"x" * 600_000) == "x" * QUOTE_LIMIT + "..."
    assert printable("a\nb\x1b") == "a\\nb\\x1b"
    assert printable(10**5000) == "<an integer of 16610 bits>"  # str() would raise
    assert printable(-(10**100)) == str(-(10**100))
    assert printable(1e300) == "1e+300"
    assert printable([1, 2]) == "<list>"
    assert _printable(b"m" * 1000) == "m" * 64 + "..."  # user names in log lines


class Target:
    def remote_login(self, username):
        return username


class NoBroker:
    def unserialize(self, obj, perspective=None):
        return obj


def test_bad_calls_quote_little_of_what_the_client_sent():
    name = "k" * 600_000
    with pytest.raises(BadArguments) as bad:
        dispatch(NoBroker(), Target(), "remote_", b"login", (), {name: 1})
    assert len(str(bad.value)) < QUOTE_LIMIT + 50
    with pytest.raises(UnknownMethod) as unknown:
        dispatch(NoBroker(), Target(), "remote_", b"m" * 600_000, (), {})
    assert len(str(unknown.value)) < QUOTE_LIMIT + 50


def test_an_enormous_period_is_refused_in_a_short_message():
    with pytest.raises(InvalidPeriod) as refused:
        validatePeriod(10**5000)
    assert len(str(refused.value)) < QUOTE_LIMIT + 50


def test_a_clients_long_error_is_logged_short(log):
    from twisted.python.failure import Failure

    from pbrealms.push import _pushFailed

    class Mind:
        pass

    _pushFailed(Failure(pb.Error("e" * 600_000)), Mind(), "notifyTime", False, None)
    [line] = [m for m in log.messages() if "answered notifyTime" in m]
    assert len(line) < QUOTE_LIMIT + 100


# ---------------------------------------------------- the broker's reading


class Recording(LimitedBroker):
    """
    A broker that keeps the expressions it decodes instead of acting on them.
    """

    def __init__(self) -> None:
        super().__init__(isClient=False)
        self.received: list = []

    def callExpressionReceived(self, obj) -> None:
        self.received.append(obj)


def connected():
    broker = Recording()
    transport = StringTransport(peerAddress=PEER)
    broker.makeConnection(transport)
    broker.currentDialect = b"pb"
    return broker, transport


@pytest_twisted.ensureDeferred
async def test_nothing_is_decoded_or_read_while_the_write_buffer_is_full(reactor):
    broker, transport = connected()
    broker.pauseProducing()  # what the transport says once its buffer is full
    assert broker.writeBlocked
    broker.dataReceived(encode([b"x" * 100]) * 100)  # 10 kB
    assert broker.received == []
    assert transport.producerState == "paused", "reading goes on"
    broker.resumeProducing()  # the buffer has drained
    assert not broker.writeBlocked
    # Reading resumes a budget per reactor turn, telling nothing: polled.
    await eventually(reactor, lambda: len(broker.received) == 100)
    assert transport.producerState == "producing"


@pytest_twisted.ensureDeferred
async def test_decoding_stops_after_the_message_that_fills_the_write_buffer(reactor):
    broker, _ = connected()

    def answer(obj):
        broker.received.append(obj)
        if len(broker.received) == 3:
            broker.pauseProducing()  # this answer filled the buffer

    broker.callExpressionReceived = answer
    broker.dataReceived(encode([b"call"]) * 50)
    assert len(broker.received) == 3
    await task.deferLater(reactor, 0.05, lambda: None)
    assert len(broker.received) == 3  # no turn decodes the rest either
    broker.resumeProducing()
    # Reading resumes a budget per reactor turn, telling nothing: polled.
    await eventually(reactor, lambda: len(broker.received) == 50)


@pytest_twisted.ensureDeferred
async def test_a_gracefully_closed_connection_reads_on_and_decodes_nothing(reactor):
    broker, transport = connected()
    broker.pauseProducing()
    broker.dataReceived(encode([b"x" * 100]) * 100)
    assert transport.producerState == "paused"
    broker.closeGracefully()
    # A TLS close needs the peer's answer: the transport is read again.
    assert transport.producerState == "producing"
    broker.dataReceived(encode([b"more"]))
    await task.deferLater(reactor, 0.01, lambda: None)
    assert broker.received == []


class Silent(protocol.Protocol):
    """
    A client that sends a flood of calls once the server's dialect offer has
    arrived (over TLS: once the handshake is done), and stops reading.
    """

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def connectionMade(self) -> None:
        self.offered = False

    def dataReceived(self, data: bytes) -> None:
        if self.offered:
            return
        self.offered = True
        self.transport.pauseProducing()  # it reads nothing more
        self.transport.write(encode(b"pb") + b"".join(unknownCall(i) for i in range(self.calls)))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_is_not_read_from(harness, reactor, tlsContexts, tls):
    """
    Over real loopback TCP (and TLS): a client sends 5,000 unknown calls and
    reads none of the answers.  Once the server's write buffer is full, it
    stops reading and decoding; the answers it holds stay within twice its
    transport's buffer size; once the client reads again, every call is
    answered and reading resumes.
    """
    from conftest import RecordingFactory

    root = harness.makeRoot("cache")
    factory = RecordingFactory(root)
    serverTLS, clientTLS = tlsContexts
    if tls:
        port = reactor.listenSSL(0, factory, serverTLS, interface="127.0.0.1")
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    harness.servers.append(Served(harness, root, factory, port))
    calls = 5000
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    if tls:
        endpoint = endpoints.wrapClientTLS(clientTLS, endpoint)
    client = await endpoint.connect(protocol.Factory.forProtocol(lambda: Silent(calls)))
    await factory.accepted(reactor, 1)
    (broker,) = factory.made
    tcp = broker.transport.transport if tls else broker.transport
    tcp.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    decoded = []  # the calls
    answer = broker.callExpressionReceived
    broker.callExpressionReceived = lambda obj: (
        decoded.append(1) if isinstance(obj, list) else None,
        answer(obj),
    )
    # Until the kernel's buffers are full too, the server's drains now and
    # then; then decoding stops for good.
    held = -1
    for _ in range(50):
        if held == len(decoded) and broker._paused:
            break
        held = len(decoded)
        await task.deferLater(reactor, 0.3, lambda: None)
    assert held < calls, "the server decoded every call: it never stopped reading"
    assert broker._paused and broker.writeBlocked
    # What it holds for the client, and what it read but did not decode.
    assert len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen < 2 * tcp.bufferSize
    assert len(broker._pending) < broker.readBudget + 2 * tcp.bufferSize
    client.transport.resumeProducing()  # the client reads again
    # Decoding and reading resume over many turns, telling nothing: polled.
    await eventually(reactor, lambda: len(decoded) == calls, timeout=20)
    await eventually(reactor, lambda: not broker._paused and not broker.writeBlocked)
    client.transport.loseConnection()


# ------------------------------------------------------- against twistd

ATTACK = r"""
import json, select, socket, sys, time
from twisted.spread import banana, pb

port, mode, seconds, count = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
password = sys.argv[5].encode()
# stall: seconds of refused sends that count as a stall (0: run `seconds` only);
# then hold that stall `hold` seconds more, sampling the server's RSS.
server, stall, hold, stallDeadline = int(sys.argv[6]), *map(float, sys.argv[7:10])


def rss():
    for line in open(f"/proc/{server}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024


def call(requestID, objectID, method, args=(), kw=()):
    return banana.encode(
        [b"message", requestID, objectID, method, 1, [b"tuple", *args], [b"dictionary", *kw]]
    )


class Reader(banana.Banana):
    def __init__(self):
        super().__init__(isClient=False)
        self.setPrefixLimit(64)
        self.currentDialect = b"pb"
        self.got = []

    def callExpressionReceived(self, obj):
        self.got.append(obj)


def expect(sock, reader, kind=None):
    while True:
        while not reader.got:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the server closed the connection")
            reader.dataReceived(data)
        got = reader.got.pop(0)
        if kind is None or got[0] == kind:  # PB says its version first
            return got


def attacker():
    sock = socket.socket()
    # A small receive buffer: the server's answers fill its own buffers.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    reader = Reader()
    expect(sock, reader)  # the dialect offer
    sock.sendall(banana.encode(b"pb"))
    if mode == "status":
        sock.sendall(call(1, b"root", b"login", [b"alice"]))
        _, _, (_, challenge, (_, challenger)) = expect(sock, reader, b"answer")
        response = pb.respond(challenge, password)
        sock.sendall(call(2, challenger, b"respond", [response, [b"None"]]))
        _, _, (_, avatar) = expect(sock, reader, b"answer")
        message = call(3, avatar, b"status")
    elif mode == "unknown":
        message = call(1, b"root", b"nosuchmethod")
    else:  # a keyword argument with a 600 kB name
        message = call(1, b"root", b"login", kw=[[[b"unicode", b"k" * 600_000], 1]])
    return sock, message


socks, payload = [], b""
for _ in range(count):
    sock, message = attacker()
    sock.setblocking(False)
    socks.append(sock)
    payload = message * max(1, 65536 // len(message))
view = memoryview(payload)
offsets = dict.fromkeys(socks, 0)
sent = closed = heldSent = 0
start = last = time.monotonic()
deadline = start + (stallDeadline if stall else seconds)
stalledAt = stalledRSS = peakRSS = None
print("attacking", flush=True)
while socks and (now := time.monotonic()) < deadline:
    if stall and stalledAt is None and now - last >= stall:
        # Stalled: now it must stay so, and the server must not grow.
        stalledAt, stalledRSS, heldSent = now - start, rss(), sent
        peakRSS = stalledRSS
        deadline = max(now + hold, start + seconds)
    elif stalledAt is not None:
        peakRSS = max(peakRSS, rss())
    _, writable, _ = select.select([], socks, [], min(0.1, deadline - now))
    for sock in writable:
        try:
            n = sock.send(view[offsets[sock]:])
        except BlockingIOError:
            continue
        except OSError:
            socks.remove(sock)
            closed += 1
            continue
        sent += n
        last = time.monotonic()
        offsets[sock] = (offsets[sock] + n) % len(payload)
end = time.monotonic()
print(json.dumps({
    "sent": sent, "stalled": end - last, "closed": closed, "seconds": end - start,
    "stalledAt": stalledAt, "heldSent": sent - heldSent,
    "heldGrowth": None if stalledAt is None else peakRSS - stalledRSS,
}))
"""


def memory(pid: int) -> dict[str, int]:
    """
    A process's resident memory now (VmRSS) and at its peak (VmHWM), in bytes.
    """
    found = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def startServer(tmp_path: Path, passwd: Path, *extra: str):
    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        server = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "pbrealms", "--passwd", str(passwd),
             "--port", "tcp:0:interface=127.0.0.1", *extra],
            stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path, env=environment(),
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while not (found := re.search(r"pbrealms listening on 127.0.0.1:(\d+)", output.read_text())):
        if time.monotonic() > deadline or server.poll() is not None:
            stop(server)
            raise AssertionError(output.read_text())
        time.sleep(0.05)
    return server, int(found.group(1)), output


async def canary(reactor, port: int) -> float:
    """
    Log in from another address (127.0.0.2), greet, and log out.

    @return: the seconds that connecting and logging in took.
    """
    endpoint = f"tcp:host=127.0.0.1:port={port}:bindAddress=127.0.0.2"
    started = time.monotonic()
    conn = await connect(reactor, endpoint, "alice", USERS["alice"], None, 5.0)
    took = time.monotonic() - started
    try:
        assert (await conn.callRemote("greet")).endswith("hello alice")
    finally:
        await conn.disconnect()
    return took


@pytest.mark.timing
@pytest.mark.parametrize("attack", ["keyword", "unknown", "status"])
@pytest_twisted.ensureDeferred
async def test_attackers_that_never_read_cost_the_server_little(reactor, tmp_path, passwd, attack):
    """
    Two connections send as fast as the kernel lets them and never read:
    root.login with a 600 kB keyword name (whose BadArguments once quoted it
    whole), unknown methods on the root, or status after logging in (with no
    keepalive to end it).  The server grows by less than 20 MB per
    connection; a canary from another address logs in within 300 ms
    typically and a second throughout (but one outlier); and where the answers are small and many,
    the attacker ends up unable to send for STALL_SECONDS (the server has
    stopped reading) and, kept so for HOLD_SECONDS more, the server does not
    grow.  No login timeout ends the attack.  (Each 600 kB keyword call has a
    small answer: it takes gigabytes to fill the buffers, so that attack is
    judged on its growth in ATTACK_SECONDS, where quoting it whole grew
    hundreds of MiB.)
    """
    stall = 0.0 if attack == "keyword" else STALL_SECONDS
    server, port, output = startServer(
        tmp_path, passwd, "--keepalive", "0", "--login-timeout", "3600"
    )
    attacker = None
    try:
        await canary(reactor, port)  # what a login loads is not the attack's
        before = memory(server.pid)["VmRSS"]
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACK, str(port), attack, str(ATTACK_SECONDS),
             str(CONNECTIONS), USERS["alice"], str(server.pid), str(stall), str(HOLD_SECONDS),
             str(STALL_DEADLINE)],
            stdout=subprocess.PIPE, text=True, env=environment(),
        )  # fmt: skip
        assert attacker.stdout.readline() == "attacking\n"
        logins: list[float] = []
        while attacker.poll() is None:
            logins.append(await canary(reactor, port))
            await task.deferLater(reactor, 0.2, lambda: None)
        peak = memory(server.pid)["VmHWM"]
        report = json.loads(attacker.stdout.read())
    finally:
        if attacker is not None:
            stop(attacker)
        server.terminate()
        server.wait(10)
    grown = peak - before
    logins.sort()
    # Judged by the typical login, with room for outliers: the attacker, the
    # server and this canary already keep both cores of a 2-core machine
    # busy, and any of them can lose the CPU for a few hundred ms (medians
    # of 20 to 130 ms seen here).  A server that the attack starves is slow
    # on every login, by seconds, not on one.
    typical = logins[len(logins) // 2]
    slow = logins[-2] if len(logins) > 1 else logins[-1]
    figures = (
        f"{attack} for {report['seconds']:.1f} s: grew {grown / 2**20:.1f} MiB, canary logins "
        f"{len(logins)}, median {typical * 1000:.0f} ms, slowest {logins[-1] * 1000:.0f} ms, "
        f"then {slow * 1000:.0f} ms, sent "
        f"{report['sent'] / 2**20:.1f} MiB, sending stalled for the last "
        f"{report['stalled']:.1f} s"
    )
    if report["stalledAt"] is not None:
        figures += (
            f" (stalled {stall:g} s after {report['stalledAt']:.1f} s; then grew "
            f"{report['heldGrowth'] / 2**10:.0f} KiB, sent {report['heldSent']} bytes)"
        )
    print(figures)
    assert report["closed"] == 0, figures
    if stall:
        assert report["stalledAt"] is not None, (
            f"the attacker's sends were never refused for {stall:g} s in "
            f"{STALL_DEADLINE:g} s: the server never stopped reading; {figures}"
        )
        assert report["heldGrowth"] < HOLD_GROWTH, figures
    assert grown < CONNECTIONS * GROWTH_PER_CONNECTION, figures
    assert typical < 0.3 and slow < 1.0, figures
    log = output.read_text()
    assert "Traceback" not in log
    assert max(len(line) for line in log.splitlines()) < 1000
