"""
Unfinished messages: each decoded item is charged what it costs in memory,
not its size on the wire, and all connections together hold at most
--max-unfinished-bytes in messages not yet whole; beyond it the connection
holding the most is closed.
"""

from __future__ import annotations

import gc
import re
import subprocess
import sys
import time
import tracemalloc

import pytest
import pytest_twisted
from conftest import eventually
from processes import BIN, environment, stop
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.spread import banana

from pbrealms.decoder import _SLOT, _STRING_BASE
from pbrealms.wire import MAX_MESSAGE_BYTES, LimitedBroker

PEER = IPv4Address("TCP", "192.0.2.7", 4242)
LOOPBACK = "tcp:0:interface=127.0.0.1"


def header(number: int, kind: bytes) -> bytes:
    out: list[bytes] = []
    banana.int2b128(number, out.append)
    return b"".join(out) + kind


def unfinished(items: list) -> bytes:
    """
    A list announcing one item more than C{items}: it never ends.
    """
    return header(len(items) + 1, b"\x80") + b"".join(banana.encode(i) for i in items)


class Holding(LimitedBroker):
    """
    A broker that decodes everything at once, and has no limit of its own.
    """

    readBudget = 1 << 30
    maxMessageBytes = 1 << 30

    def __init__(self) -> None:
        super().__init__(isClient=False)

    def callExpressionReceived(self, obj) -> None:
        raise AssertionError("the message was never to end")


def allocated(snapshot: tracemalloc.Snapshot) -> int:
    """
    The bytes of every block traced, as the allocator rounds them: pymalloc
    to 16 bytes up to 512, malloc with its 8-byte header above.
    """
    total = 0
    for trace in snapshot.traces:
        size = trace.size
        total += (size + 15) & -16 if size <= 512 else (size + 8 + 15) & -16
    return total


SHAPES = {
    "2-byte strings": [b"ab"] * 20_000,
    "15-byte strings": [b"x" * 15] * 20_000,
    "16-byte strings": [b"x" * 16] * 20_000,
    "100-byte strings": [b"x" * 100] * 2_000,
    "600-byte strings": [b"x" * 600] * 2_000,
    "60 kB strings": [b"x" * 60_000] * 10,
    "small ints": [7] * 20_000,
    "ints": [1000] * 20_000,
    "negative ints": [-1000] * 20_000,
    "64-bit ints": [2**63 + 1] * 20_000,
    "long ints": [2**200 + 7] * 20_000,
    "floats": [1.5] * 20_000,
    "empty lists": [[]] * 20_000,
    "pairs": [[b"a", b"b"]] * 20_000,
    "lists of 9": [[1000] * 9] * 5_000,
    "lists of 17": [[1000] * 17] * 3_000,
    "dictionaries": [[b"dictionary", [[b"unicode", b"k"], 1000]]] * 5_000,
    "nested": [[[[[b"deep"]]]]] * 5_000,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_items_are_charged_what_they_cost_in_memory(shape):
    """
    What an unfinished message is charged is what its decoded items cost,
    as tracemalloc sees the blocks (rounded as allocated): at least 97 % of
    it (malloc's header on strings over 512 bytes is not charged), and not
    twice as much.
    """
    broker = Holding()
    transport = StringTransport(peerAddress=PEER)
    broker.makeConnection(transport)
    broker.currentDialect = b"pb"
    data = unfinished(SHAPES[shape])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        broker.dataReceived(data)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert not transport.disconnected
    costs = allocated(after) - allocated(before)
    charged = broker._messageBytes
    assert 0.97 * costs <= charged <= 2 * costs, (shape, charged, costs, len(data))


def test_bytes_waiting_to_be_decoded_count_too():
    from pbrealms.unfinished import UnfinishedBytes

    broker = Holding()
    broker.unfinished = UnfinishedBytes(1 << 30)
    broker.makeConnection(StringTransport(peerAddress=PEER))
    broker.currentDialect = b"pb"
    broker.dataReceived(header(3, b"\x80") + banana.encode(b"ab"))
    decoded = broker.unfinished.held(broker)
    assert decoded > 0
    # Half of a 500 kB string: it waits, whole, in the buffer.
    broker.dataReceived(header(500_000, b"\x82") + b"x" * 250_000)
    assert broker.unfinished.held(broker) >= decoded + 250_000
    assert broker.unfinished.total == broker.unfinished.held(broker)
    broker.connectionLost(protocol.connectionDone)
    assert broker.unfinished.total == 0


class Sender(protocol.Protocol):
    """
    A client that sends an unfinished message of C{count} 2-byte strings.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(banana.encode(b"pb") + unfinished([b"ab"] * self.count))

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_beyond_the_budget_the_connection_holding_the_most_is_closed(harness, reactor, log):
    """
    Three connections hold unfinished messages of about 570, 114 and 285 kB
    (10,000, 2,000 and 5,000 short strings) against a server-wide budget of
    900 kB: the third takes the total beyond it, and the first, which holds
    the most, is closed, with one log line; the others stay open.
    """
    served = await harness.serve("cache")
    budget = served.factory.unfinished
    budget.limit = 900_000
    port = served.port.getHost().port
    clients = []
    for count in (10_000, 2_000):
        client = await protocol.ClientCreator(reactor, Sender, count).connectTCP("127.0.0.1", port)
        clients.append(client)
        # The budget fills as data arrives, telling nothing: polled.
        await eventually(reactor, lambda count=count: budget.total > count * 57)
    assert not any(c.closed.called for c in clients)
    held = budget.total
    third = await protocol.ClientCreator(reactor, Sender, 5_000).connectTCP("127.0.0.1", port)
    clients.append(third)
    await clients[0].closed
    # The budget fills as data arrives, telling nothing: polled.
    await eventually(reactor, lambda: budget.total > 5_000 * 57)
    assert not clients[1].closed.called and not third.closed.called
    assert budget.total < budget.limit
    assert budget.total > held - 10_000 * 57
    [line] = [m for m in log.messages() if "closed the connection" in m]
    assert re.fullmatch(
        r"closed the connection from 127\.0\.0\.1:\d+: unfinished messages held more than "
        r"the server's 900000 bytes \(--max-unfinished-bytes\), this connection the most "
        r"\(\d+ bytes\)",
        line,
    ), line
    for client in clients[1:]:
        client.transport.loseConnection()
        await client.closed


def test_the_budget_is_an_option(capsys):
    from pbrealms.tap import Options, makeService

    options = Options()
    options.parseOptions(
        ["--max-unfinished-bytes", "5000000", "--port", "tcp:0:interface=127.0.0.1"]
    )
    factory = makeService(options).getServiceNamed("pb-listener").factory
    assert factory.unfinished.limit == 5_000_000
    defaults = Options()
    defaults.parseOptions(["--port", LOOPBACK])
    assert defaults["max-unfinished-bytes"] == 128 * 1024 * 1024
    for bad, words in (
        ("0", "--max-unfinished-bytes must be a whole number above 0, not '0'"),
        ("lots", "--max-unfinished-bytes must be a whole number above 0, not 'lots'"),
        ("1000", f"--max-unfinished-bytes (1000) must be at least --max-message-size "
                 f"({MAX_MESSAGE_BYTES})"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            Options().parseOptions(["--max-unfinished-bytes", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err == f"twistd pbrealms: error: {words}\n"


# ----------------------------------------------------------- against twistd

ATTACK = r"""
import select, socket, sys, time
from twisted.spread import banana

port, connections = int(sys.argv[1]), int(sys.argv[2])
string = banana.encode(b"ab")
opening = banana.encode(b"pb") + b"\x7f\x7f\x27\x80"  # a list of 640 K - 1 items


def connect(source):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.recv(64)  # the server's dialect offer
    sock.sendall(opening)
    return sock


def gone(sock):
    # Whether the server closed it; it also sends PB's version, once.
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(4096):
                return True
        except OSError:
            return True
    return False


hold = int(sys.argv[3])
message = string * hold
socks = []
for _ in range(connections):
    sock = connect("127.0.0.1")
    sock.sendall(message)
    socks.append(sock)
print(hold, flush=True)
sys.stdin.read()  # hold them until told
closed = sum(1 for s in socks if gone(s))
print(closed, flush=True)
"""


def memory(pid: int) -> dict[str, int]:
    found = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


#: As many 2-byte strings as one message may hold, less 4 KiB of margin: each
#: is charged its object, rounded up to 16 bytes, and its slot in the list.
#: (A probe that sent until it was cut off read the limit late on a loaded
#: machine.)
HOLD = (MAX_MESSAGE_BYTES - 4096) // (((2 + _STRING_BASE) & -16) + _SLOT)


@pytest.mark.timing
def test_connections_holding_unfinished_messages_cost_what_they_are_charged(tmp_path, passwd):
    """
    128 connections from one address (the default cap) each hold one
    unfinished message of 2-byte strings, nearly as many as the server lets
    one connection hold, with the server-wide budget raised beyond them all:
    the server grows by at most 1.5 times 128 MiB, and holds them all open.
    """
    connections = 128
    output = tmp_path / "twistd.log"
    env = environment(PBREALMS_MAX_UNFINISHED_BYTES="2000000000")
    with output.open("wb") as handle:
        server = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "pbrealms", "--passwd", str(passwd),
             "--port", "tcp:0:interface=127.0.0.1", "--login-timeout", "3600"],
            stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path, env=env,
        )  # fmt: skip
    attacker = None
    try:
        deadline = time.monotonic() + 20
        while not (found := re.search(r"listening on 127.0.0.1:(\d+)", output.read_text())):
            assert time.monotonic() < deadline and server.poll() is None, output.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # let it settle
        before = memory(server.pid)["VmRSS"]
        attacker = subprocess.Popen(
            [sys.executable, "-c", ATTACK, found.group(1), str(connections), str(HOLD)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=environment(),
        )  # fmt: skip
        hold = int(attacker.stdout.readline())
        # Until the server has decoded it all: its memory stops growing.
        last, still = 0, 0
        deadline = time.monotonic() + 120
        while still < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
            now = memory(server.pid)["VmRSS"]
            still = still + 1 if now - last < 256 * 1024 else 0
            last = now
        grown = memory(server.pid)["VmHWM"] - before
        attacker.stdin.close()
        closed = int(attacker.stdout.readline())
    finally:
        if attacker is not None:
            stop(attacker)
        server.terminate()
        server.wait(10)
    bound = 1.5 * connections * MAX_MESSAGE_BYTES
    figures = (
        f"{connections} connections holding {hold} 2-byte strings each "
        f"({hold * 4 / 2**10:.0f} KiB on the wire): grew {grown / 2**20:.1f} MiB, "
        f"bound {bound / 2**20:.0f} MiB"
    )
    print(figures)
    assert grown <= bound, figures
    assert closed == 0, f"{closed} connections were closed: {figures}"
    log = output.read_text()
    assert "closed the connection" not in log, log
    assert "Traceback" not in log
