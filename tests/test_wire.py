"""
The wire limits: LimitedBroker decodes what Banana decodes, and refuses an
oversized, too deep or malformed message by closing the connection with one
log line, before building anything from it.
"""

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from conftest import USERS, Arrivals, disconnection, eventually
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import stop
from twisted.internet import defer, protocol, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.spread import banana, pb

from pbrealms.wire import MAX_DEPTH, MAX_MESSAGE_BYTES, LimitedBroker

PEER = IPv4Address("TCP", "192.0.2.7", 4242)


class Recording(LimitedBroker):
    """
    A broker that keeps the expressions it decodes instead of acting on them,
    all at once (the read budget is tested on its own).
    """

    readBudget = 1 << 30

    def __init__(self) -> None:
        super().__init__(isClient=False)
        self.received: list = []

    def callExpressionReceived(self, obj) -> None:
        self.received.append(obj)


def connected(broker=None):
    broker = broker or Recording()
    transport = StringTransport(peerAddress=PEER)
    broker.makeConnection(transport)
    broker.currentDialect = b"pb"  # as if negotiated
    return broker, transport


def encode(obj) -> bytes:
    return banana.encode(obj)


def header(number: int, kind: bytes) -> bytes:
    """
    A Banana item header: C{number} in base 128, then the type byte.
    """
    out: list[bytes] = []
    banana.int2b128(number, out.append)
    return b"".join(out) + kind


def feed(broker, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        broker.dataReceived(data[i : i + chunk])


items = st.recursive(
    st.integers(-(2**200), 2**200) | st.binary(max_size=300) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=6),
    max_leaves=40,
)


@given(st.lists(items, min_size=1, max_size=5), st.integers(1, 64))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_decodes_what_banana_encodes_in_any_chunks(expressions, chunk):
    broker, transport = connected()
    feed(broker, b"".join(encode(e) for e in expressions), chunk)
    assert broker.received == expressions
    assert not transport.disconnected


def refused(data: bytes, chunk: int = 4096) -> list[str]:
    """
    Feed C{data}; the connection must be aborted.  Return what was logged.
    """
    lines: list[str] = []

    def observe(event):
        from twisted.logger import formatEvent

        lines.append(formatEvent(event))
        assert "log_failure" not in event, event

    globalLogPublisher.addObserver(observe)
    try:
        broker, transport = connected()
        feed(broker, data, chunk)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert transport.disconnected, "the connection was not aborted"
    return lines


def test_an_oversized_message_is_refused_before_it_is_whole():
    # Two strings of 600 kB: the second is refused on its header alone.
    big = header(600_000, b"\x82")
    [line] = refused(header(2, b"\x80") + big + b"x" * 600_000 + big + b"x" * 1000)
    assert line == (
        f"closed the connection from 192.0.2.7:4242: a message that would cost more than "
        f"{MAX_MESSAGE_BYTES} bytes of memory once decoded (--max-message-size)"
    )


def test_many_small_items_add_up_to_the_limit():
    count = MAX_MESSAGE_BYTES // 2 + 10
    data = header(count, b"\x80") + b"\x01\x81" * count
    [line] = refused(data)
    assert f"cost more than {MAX_MESSAGE_BYTES} bytes of memory" in line


def test_the_limit_is_per_message():
    broker, transport = connected()
    message = encode([b"x" * 60_000] * 10)  # 600 kB each
    feed(broker, message * 5, 65536)
    assert len(broker.received) == 5
    assert not transport.disconnected


def test_a_deep_message_is_refused_with_a_short_line():
    [line] = refused(b"\x01\x80" * 10_000)
    assert line.endswith(f"a message nested deeper than {MAX_DEPTH} lists")
    assert len(line) < 1024


def test_depth_up_to_the_limit_is_fine():
    nested: list = []
    for _ in range(MAX_DEPTH - 1):
        nested = [nested]
    broker, transport = connected()
    feed(broker, encode(nested), 7)
    assert broker.received == [nested]
    assert not transport.disconnected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01" * 65 + b"\x81", "a number longer than 64 bytes"),
        (b"\x01" * 80, "a number longer than 64 bytes"),
        (b"\x01\x99", "unknown type byte 0x99"),
        (b"\x7f\x7f\x01\x87", "unknown vocabulary word"),
        (header(700 * 1024, b"\x82"), "a string of"),
        (header(700 * 1024, b"\x80"), "a list of"),
    ],
)
def test_malformed_input_is_refused_in_one_line(data, reason):
    [line] = refused(data)
    assert reason in line


def test_nothing_is_read_after_a_refusal():
    broker, transport = connected()
    broker.dataReceived(b"\x01\x99")
    assert transport.disconnected
    broker.dataReceived(encode(1))
    assert broker.received == []


def clientStream() -> bytes:
    """
    The bytes a real PB client sends to log in and greet, recorded.
    """
    client = pb.Broker(isClient=True)
    client.factory = pb.PBClientFactory()
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(encode([b"pb", b"none"]))  # the server's dialect offer
    root = client.remoteForName("root")
    root.callRemote("login", b"alice").addErrback(lambda _: None)
    client.sendCall(b"message", 2, 1, b"respond", 1, [b"tuple", b"x" * 16, [b"None"]], [])
    client.sendCall(b"message", 3, 2, b"greet", 1, [b"tuple"], [b"dictionary"])
    return transport.value()


CLIENT = clientStream()
mutations = st.lists(
    st.tuples(st.integers(0, len(CLIENT) - 1), st.integers(0, 255), st.sampled_from("rid")),
    min_size=1,
    max_size=8,
)


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for where, value, how in edits:
        where %= max(len(out), 1)
        if how == "r":
            out[where] = value
        elif how == "i":
            out.insert(where, value)
        elif out:
            del out[where]
    return bytes(out)


@pytest_twisted.ensureDeferred
async def test_fuzzed_streams_close_bad_connections_and_the_server_stays_up(harness, log):
    """
    Random and mutated streams go to brokers of a live server's factory; each
    is either still open or closed with one log line, nothing is logged as an
    error, and then a canary logs in and greets over TCP.
    """
    served = await harness.serve("tracking")
    outcomes = {"open": 0, "closed": 0}

    @given(
        st.one_of(st.binary(max_size=400), mutations.map(lambda m: mutate(CLIENT, m))),
        st.integers(1, 50),
    )
    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,  # CI runs the same examples every time
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    def fuzz(data, chunk):
        before = len(log)
        broker = served.factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        broker.makeConnection(transport)
        try:
            feed(broker, data, chunk)
        finally:
            if not transport.disconnected:
                outcomes["open"] += 1
            else:
                outcomes["closed"] += 1
                closes = [m for m in log.messages()[before:] if "closed the connection" in m]
                assert len(closes) == 1, log.messages()[before:]
            broker.connectionLost(protocol.connectionDone)
        assert not log.errors(), log.messages()[-3:]

    fuzz()
    assert outcomes["closed"] > 50 and outcomes["open"] > 0, outcomes
    canary = await served.login("alice", USERS["alice"])
    assert await canary.callRemote("greet") == "<1>hello alice"


@pytest_twisted.ensureDeferred
async def test_a_deep_message_over_tcp_closes_only_that_connection(harness, reactor, log):
    served = await harness.serve("cache")
    closed: defer.Deferred = defer.Deferred()

    class Deep(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(encode(b"pb") + b"\x01\x80" * 10_000)

        def connectionLost(self, reason):
            closed.callback(None)

    await protocol.ClientCreator(reactor, Deep).connectTCP("127.0.0.1", served.port.getHost().port)
    await closed
    lines = [m for m in log.messages() if "closed the connection" in m]
    assert len(lines) == 1 and len(lines[0]) < 1024
    canary = await served.login("alice")
    assert await canary.callRemote("greet") == "<1>hello alice"
    await task.deferLater(reactor, 0, lambda: None)


def rss(pid: int) -> int:
    """
    A process's resident memory, in bytes.
    """
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_never_ending_message_costs_the_server_no_memory(tmp_path, passwd):
    """
    A client streams one list that never ends (up to 200 MiB): the server
    cuts it off at the message limit, its memory does not grow by 20 MB, and
    it goes on serving.
    """
    twistd = Path(sys.executable).parent / "twistd"
    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        server = subprocess.Popen(
            [str(twistd), "-n", "--pidfile=", "pbrealms", "--passwd", str(passwd),
             "--port", "tcp:0:interface=127.0.0.1"],
            stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not (
            found := re.search(r"pbrealms listening on 127.0.0.1:(\d+)", output.read_text())
        ):
            assert time.monotonic() < deadline and server.poll() is None, output.read_text()
            time.sleep(0.05)
        port = int(found.group(1))
        before = rss(server.pid)
        sent = 0
        chunk = b"\x01\x81" * (512 * 1024)  # 1 MiB of small integers
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.recv(64)  # the server's dialect offer
            sock.sendall(encode(b"pb") + header(640 * 1024 - 1, b"\x80"))
            try:
                while sent < 200 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass  # the server closed the connection
        grown = rss(server.pid) - before
        assert sent < 200 * 1024 * 1024, "the server never closed the connection"
        assert grown < 20 * 1024 * 1024, f"the server grew by {grown} bytes"
        log = output.read_text()
        assert log.count("closed the connection from 127.0.0.1") == 1
        assert f"a message that would cost more than {MAX_MESSAGE_BYTES} bytes" in log
        assert "Traceback" not in log
        client = subprocess.run(
            [str(Path(sys.executable).parent / "pbrealms-client"), "--connect",
             f"tcp:127.0.0.1:{port}", "--user", "alice", "greet"],
            capture_output=True, text=True, timeout=30,
            env={"PBREALMS_PASSWORD": USERS["alice"], "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
        assert client.stdout == "<1>hello alice\n", client.stderr
    finally:
        server.terminate()
        server.wait(10)


@pytest_twisted.ensureDeferred
async def test_reading_pauses_once_a_turn_has_used_its_budget(reactor):
    broker, transport = connected(Recording())
    broker.readBudget = 16 * 1024
    message = encode([b"x" * 100])
    broker.dataReceived(message * 1000)  # 105 kB
    assert 0 < len(broker.received) < 200
    assert transport.producerState == "paused"
    # Reading resumes a budget per reactor turn, telling nothing: polled.
    await eventually(reactor, lambda: len(broker.received) == 1000)
    assert transport.producerState == "producing"


FLOOD = """
import socket, sys
from twisted.spread import banana
call = banana.encode([b"message", 1, b"root", b"ping", 0, [b"tuple"], [b"dictionary"]])
flood = call * (4 * 1024 * 1024 // len(call))
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as sock:
    sock.recv(64)  # the server's dialect offer
    sock.sendall(banana.encode(b"pb"))
    print("flooding", flush=True)
    sock.sendall(flood)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):  # until the server has read it all and closed
        pass
"""


@pytest.mark.timing
@pytest_twisted.ensureDeferred
async def test_a_flood_does_not_starve_a_canary(harness, reactor):
    """
    While one client sends 4 MB of small calls (about 100,000, which take
    the server seconds), another logs in within 200 ms.
    """
    served = await harness.serve("cache")
    flooder = subprocess.Popen(
        [sys.executable, "-c", FLOOD, str(served.port.getHost().port)],
        stdout=subprocess.PIPE,
    )
    try:
        await served.factory.accepted(reactor, 1, 15)
        (broker,) = served.factory.made
        # Wait until the server is busy with the flood.
        await eventually(reactor, lambda: broker._paused, timeout=15)
        started = time.monotonic()
        canary = await served.login("alice")
        took = time.monotonic() - started
        flooding = not broker.disconnected
        assert await canary.callRemote("greet") == "<1>hello alice"
        assert took < 0.2, f"the canary took {took * 1000:.0f} ms to log in"
        assert flooding, "the flood was over before the canary logged in"
        await disconnection(reactor, broker, 30)
    finally:
        stop(flooder)


def test_the_factory_sets_each_brokers_limits(harness, log):
    from pbrealms.service import PBServerFactory
    from pbrealms.servicetree import wireSecurity

    factory = PBServerFactory(
        harness.makeRoot("cache"), wireSecurity(), maxMessageBytes=1000, maxDepth=3
    )
    for data in (encode([[[[1]]]]), encode([b"x" * 1000])):
        broker = factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        broker.makeConnection(transport)
        broker.dataReceived(encode(b"pb") + data)
        assert transport.disconnected
        broker.connectionLost(protocol.connectionDone)
    closes = [m for m in log.messages() if "closed the connection" in m]
    assert closes[0].endswith("a message nested deeper than 3 lists")
    assert closes[1].endswith(
        "a message that would cost more than 1000 bytes of memory once decoded (--max-message-size)"
    )


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (encode(b"pb") + encode([b"cachemessage", 1, 99, b"x", 1, [b"tuple"], [b"dictionary"]]),
         "a message to a cached object"),
        (encode(b"klingon") * 50, "no dialect that PB speaks"),
    ],
)  # fmt: skip
def test_pb_messages_that_would_log_tracebacks_close_the_connection(harness, log, stream, reason):
    from pbrealms.service import PBServerFactory
    from pbrealms.servicetree import wireSecurity

    broker = PBServerFactory(harness.makeRoot("cache"), wireSecurity()).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    broker.makeConnection(transport)
    broker.dataReceived(stream)
    assert transport.disconnected
    broker.connectionLost(protocol.connectionDone)
    assert [m for m in log.messages() if "closed the connection" in m] == [
        f"closed the connection from 192.0.2.7:4242: {reason}"
    ]
    assert not log.errors()


def test_did_not_understand_is_not_logged(harness, log):
    from pbrealms.service import PBServerFactory
    from pbrealms.servicetree import wireSecurity

    broker = PBServerFactory(harness.makeRoot("cache"), wireSecurity()).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    broker.makeConnection(transport)
    before = len(log)
    broker.dataReceived(encode(b"pb") + encode([b"didNotUnderstand", b"x" * 1000]) * 20)
    assert not transport.disconnected
    assert len(log) == before
    broker.connectionLost(protocol.connectionDone)


def test_small_items_count_what_they_cost_in_memory():
    # An unfinished list of empty lists: one byte each on the wire, some
    # sixty in memory. It is cut off long before 1 MiB of them arrive.
    broker, transport = connected()
    broker.dataReceived(header(600_000, b"\x80"))
    sent = 0
    for _ in range(20):
        broker.dataReceived(b"\x00\x80" * 4096)
        sent += 4096
        if transport.disconnected:
            break
    assert transport.disconnected
    # Refused within the chunk that passed the limit, however it is charged.
    assert sent - 4096 < MAX_MESSAGE_BYTES // 60
    # And the refused connection holds on to none of it.
    assert broker.listStack == []


class TimeMind(pb.Referenceable):
    """
    A clock client that counts the times pushed to it.
    """

    def __init__(self) -> None:
        self.pushed = Arrivals()

    @property
    def times(self) -> int:
        return len(self.pushed)

    def remote_notifyTime(self, seconds: float) -> None:
        self.pushed.append(seconds)


@pytest_twisted.ensureDeferred
async def test_one_way_pushes_stop_at_a_full_write_buffer_and_resume(harness, reactor):
    from pbrealms.push import notify

    served = await harness.serve("clock", period=3600)
    mind = TimeMind()
    conn = await served.login("alice", mind=mind)
    (session,) = served.registry
    (broker,) = served.factory.made
    # Small kernel buffers, so that Twisted's own buffer is what fills.
    broker.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client = conn.perspective.broker.transport
    client.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await mind.pushed.waitFor(reactor)  # the push at login
    assert mind.times == 1
    client.pauseProducing()  # the client stops reading
    sent = 0
    while notify(session.mind, "notifyTime", 1.0):
        sent += 1
        assert sent < 50_000, "the transport never said its buffer was full"
    assert broker.writeBlocked
    # What the server holds for the client is bounded by the transport's buffer.
    buffered = len(broker.transport.dataBuffer) + broker.transport._tempDataLen
    assert buffered < 2 * broker.transport.bufferSize
    client.resumeProducing()
    await mind.pushed.waitFor(reactor, 1 + sent)
    assert mind.times == 1 + sent
    assert not broker.writeBlocked
    assert notify(session.mind, "notifyTime", 1.0)
