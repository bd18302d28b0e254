"""
The metrics endpoint against hostile HTTP clients, over real loopback TCP:
no request body is read, answers a client does not read do not pile up, a
connection cap, an idle timeout that trickled bytes do not reset, paged
/sessions, and PB clients served promptly while /sessions is hammered.

Raw sockets stand for the attacker: a client that stops reading is a socket
nobody calls recv on.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from conftest import USERS, eventually
from twisted.internet import task
from twisted.web import http

from pbrealms.client import connect
from pbrealms.tap import Options, makeService

#: Seconds the acceptance test hammers /sessions.
HAMMER_SECONDS = float(os.environ.get("PBREALMS_TEST_HAMMER_SECONDS", "3"))


class Running:
    """
    A server made by L{makeService}, in this process, with its metrics
    endpoint on a loopback port.
    """

    def __init__(self, reactor, server) -> None:
        self.reactor = reactor
        self.server = server
        self.registry = server.getServiceNamed("graceful-shutdown").registry
        self.site = server.getServiceNamed("metrics-http").factory
        self.httpPort = server.getServiceNamed("metrics-http").port.getHost().port
        pb = server.getServiceNamed("pb-listener").port.getHost().port
        self.endpoint = f"tcp:127.0.0.1:{pb}"
        self.sockets: list[socket.socket] = []
        self.renders = 0
        sessions = self.site.resource.children[b"sessions"]
        describe = sessions.sessions

        def counted(*args):
            self.renders += 1
            return describe(*args)

        sessions.sessions = counted

    def open(self, count: int, name: str = "user") -> None:
        """
        Open and log in C{count} sessions in the registry, without clients.
        """
        for i in range(count):
            session = self.registry.open(f"{name}{i}", f"192.0.2.{i % 250 + 1}:{1024 + i}")
            self.registry.activate(session)

    def socket(self, rcvbuf: int | None = None, source: str = "127.0.0.1") -> socket.socket:
        """
        A connected raw socket to the metrics port from address C{source}
        (the kernel completes the connection; the server accepts it when the
        reactor next runs).
        """
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((source, 0))
        s.connect(("127.0.0.1", self.httpPort))
        s.setblocking(False)
        self.sockets.append(s)
        return s

    async def held(self, count: int, source: str) -> list[socket.socket]:
        """
        C{count} idle connections from C{source}, once the server has
        accepted them: in that order, oldest first.
        """
        sockets = []
        for _ in range(count):
            s = self.socket(source=source)
            sockets.append(s)
            await eventually(self.reactor, lambda s=s: self.accepted(s) or closedByServer(s))
        return sockets

    def accepted(self, s: socket.socket) -> bool:
        """
        Whether the server holds a connection for C{s}.
        """
        peers = (c.transport.getPeer() for c in self.site.channels)
        return s.getsockname() in {(p.host, p.port) for p in peers}

    async def ask(self, request: bytes, timeout: float = 5.0) -> bytes:
        """
        Send C{request} on a new connection and read until the server
        closes it.
        """
        s = self.socket()
        s.sendall(request)
        received: list[bytes] = []
        await eventually(self.reactor, lambda: readUntilClosed(s, received), timeout)
        return b"".join(received)

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        answer = await self.ask(b"GET %s HTTP/1.1\r\nConnection: close\r\n\r\n" % path.encode())
        return parse(answer)[0]

    async def settle(self) -> None:
        """
        Close every raw socket, and give the server the turns to see it.
        """
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        for _ in range(5):
            await task.deferLater(self.reactor, 0.01, lambda: None)


def readUntilClosed(s: socket.socket, into: list[bytes]) -> bool:
    """
    Read what C{s} has; whether the server has closed it.
    """
    while True:
        try:
            data = s.recv(1 << 20)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True
        into.append(data)


def closedByServer(s: socket.socket) -> bool:
    """
    Whether the server has closed or reset C{s}, without reading from it.
    """
    poller = select.poll()
    poller.register(s, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def parse(stream: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """
    The answers in C{stream}, each with a C{Content-Length}.
    """
    answers = []
    while stream:
        head, _, rest = stream.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        code = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        answers.append((code, headers, rest[:length]))
        stream = rest[length:]
    return answers


@pytest_twisted.async_yield_fixture()
async def running(reactor, passwd):
    options = Options()
    options.parseOptions(
        [
            "--passwd", str(passwd),
            "--port", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1", "--shutdown-grace=0.5",
        ]
    )  # fmt: skip
    server = makeService(options)
    server.privilegedStartService()
    server.startService()
    served = Running(reactor, server)
    yield served
    await served.settle()
    if server.running:
        await server.stopService()
    for session in list(served.registry):
        session.close()


@pytest_twisted.ensureDeferred
async def test_a_body_or_another_method_is_refused_at_once_and_nothing_is_spooled(
    running, monkeypatch
):
    spooled = []
    getContentFile = http._getContentFile
    monkeypatch.setattr(http, "_getContentFile", lambda n: spooled.append(n) or getContentFile(n))
    huge = b"Content-Length: 100000000000\r\n"
    cases = [
        (b"POST /metrics HTTP/1.1\r\n" + huge + b"\r\n" + b"x" * 65536, 405),
        (b"PUT /sessions HTTP/1.1\r\nHost: a\r\n" + huge + b"\r\n", 405),
        (b"DELETE /sessions HTTP/1.0\r\n\r\n", 405),  # no header at all
        (b"GET /metrics HTTP/1.1\r\n" + huge + b"\r\n" + b"x" * 65536, 413),
        (b"GET /healthz HTTP/1.1\r\nContent-Length: 1\r\n\r\n", 413),
        (b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nxxxxx\r\n", 413),
        # After an answered request on the same connection, too.
        (b"GET /healthz HTTP/1.1\r\n\r\nPOST /healthz HTTP/1.1\r\n" + huge + b"\r\n", 405),
    ]
    for request, code in cases:
        started = time.monotonic()
        answers = parse(await running.ask(request, timeout=2.0))
        assert time.monotonic() - started < 1.0
        assert answers[-1][0] == code, request
        assert answers[-1][2].count(b"\n") == 1  # one line
        if code == 405:
            assert answers[-1][1]["allow"] == "GET, HEAD"
    assert [n for n in spooled if n] == []
    # The endpoint still serves, and a request without a body is served.
    assert (await running.get("/healthz"))[:1] == (200,)
    empty = b"GET /healthz HTTP/1.1\r\nContent-Length: 0\r\n"
    ok = parse(await running.ask(empty + b"\r\n" + empty + b"Connection: close\r\n\r\n", 2.0))
    assert [a[0] for a in ok] == [200, 200]


@pytest_twisted.ensureDeferred
async def test_pipelined_answers_a_client_does_not_read_do_not_pile_up(running, reactor):
    running.open(1000)  # each answer is a page of 1000 sessions, ~100 KB
    s = running.socket(rcvbuf=4096)
    s.sendall(b"GET /sessions HTTP/1.1\r\n\r\n" * 60)
    # Long enough for the server to answer all 60 (on main it does so at
    # once, into its write buffer): 6 MB would be waiting for the client.
    for _ in range(50):
        await task.deferLater(reactor, 0.01, lambda: None)
    # What the kernel's buffers take (on main, all 60).
    assert running.renders < 10, running.renders
    # The client reads at last: every answer comes, complete and in order.
    s.sendall(b"GET /sessions HTTP/1.1\r\nConnection: close\r\n\r\n")
    received: list[bytes] = []
    await eventually(reactor, lambda: readUntilClosed(s, received), 20)
    answers = parse(b"".join(received))
    assert len(answers) == 61
    for code, _, body in answers:
        assert code == 200
        assert len(json.loads(body)) == 1000
    assert running.renders == 61


@pytest_twisted.ensureDeferred
async def test_small_pipelined_answers_are_served_one_per_turn(running, reactor):
    # Small answers, which never fill the write buffer: on main all 300
    # are rendered in the turn that reads them.
    s = running.socket()
    s.sendall(b"GET /sessions?limit=1 HTTP/1.1\r\n\r\n" * 300)
    perTurn = []
    while running.renders < 300:
        before = running.renders
        await task.deferLater(reactor, 0, lambda: None)
        perTurn.append(running.renders - before)
        assert len(perTurn) < 3000, "not all served"
    assert max(perTurn) <= 2, perTurn


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_hold_more_than_4(running, reactor, log):
    mine = await running.held(10, "127.0.0.2")
    for _ in range(10):
        await task.deferLater(reactor, 0.01, lambda: None)
    # The newest are closed as they are accepted (on main all 10 are held).
    assert [closedByServer(s) for s in mine] == [False] * 4 + [True] * 6
    # Said once, however many are refused.
    assert len([m for m in log.messages() if "holds 4 HTTP connections" in m]) == 1
    # Another address is served; once one of the 4 goes, this one is too.
    assert (await running.get("/healthz"))[:1] == (200,)
    mine[0].close()
    await eventually(reactor, lambda: len(running.site.channels) == 3)
    assert [closedByServer(s) for s in await running.held(1, "127.0.0.2")] == [False]
    from pbrealms import metricssite

    assert metricssite.MAX_HTTP_CONNECTIONS_PER_SOURCE == 4  # what the README states


@pytest_twisted.ensureDeferred
async def test_healthz_answers_with_32_connections_held_by_8_addresses(running):
    held = [await running.held(4, f"127.0.0.{i}") for i in range(2, 10)]
    assert len(running.site.channels) == 32
    # On main it is closed as it is accepted: an orchestrator would restart.
    answer = await running.ask(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    # In the place of the oldest idle connection of an address that holds 4.
    assert [s for each in held for s in each if closedByServer(s)] == [held[0][0]]
    from pbrealms import metricssite

    assert metricssite.MAX_HTTP_CONNECTIONS == 32  # what the README states


@pytest_twisted.ensureDeferred
async def test_at_the_cap_a_newcomer_is_closed_unless_an_address_holds_more(running, log):
    running.site.maxConnections = 8
    a = await running.held(4, "127.0.0.2")
    b = await running.held(4, "127.0.0.3")
    c = await running.held(4, "127.0.0.4")
    # c's first three take the places of a[0] (a holds 4), b[0] (b holds 4,
    # a 3) and a[1] (a and b hold 3, c 2); c holds 3 when its last comes, as
    # many as the most, and it is closed.
    everyone = a + b + c
    await eventually(running.reactor, lambda: sum(map(closedByServer, everyone)) == 4)
    assert [s for s in everyone if closedByServer(s)] == [a[0], a[1], b[0], c[3]]
    assert len(running.site.channels) == 8
    # Said once, however many are refused or replaced.
    assert len([m for m in log.messages() if "HTTP connections open" in m]) == 1


@pytest_twisted.ensureDeferred
async def test_a_connection_being_answered_is_not_replaced(running, reactor):
    running.open(1000, name="u" * 200)  # a page is ~300 KB: more than the kernel takes
    running.site.maxConnections = 2
    busy = [running.socket(rcvbuf=4096, source="127.0.0.2") for _ in range(2)]
    for s in busy:
        s.sendall(b"GET /sessions HTTP/1.1\r\n\r\n")  # and never read
    await eventually(
        reactor,
        lambda: len(running.site.channels) == 2 and not any(c.idle for c in running.site.channels),
    )
    newcomer = (await running.held(1, "127.0.0.3"))[0]
    assert closedByServer(newcomer)
    assert not any(map(closedByServer, busy))


@pytest_twisted.ensureDeferred
async def test_the_idle_timeout_is_30_s_and_trickled_bytes_do_not_reset_it(running, reactor):
    default, running.site.timeOut = running.site.timeOut, 0.5
    idle, trickling = running.socket(), running.socket()
    started = time.monotonic()
    trickling.sendall(b"GET /healthz HTTP/1.1\r\n")
    while not (closedByServer(idle) and closedByServer(trickling)):
        assert time.monotonic() - started < 3.0, "not closed at the idle timeout"
        if not closedByServer(trickling):
            trickling.send(b"X")  # a header, one byte every 50 ms
        await task.deferLater(reactor, 0.05, lambda: None)
    assert time.monotonic() - started >= 0.4
    # A client that asks one request at a time is not idle.
    s = running.socket()
    for _ in range(8):
        s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        await task.deferLater(reactor, 0.1, lambda: None)
        assert not closedByServer(s)
        readUntilClosed(s, [])
    assert default == 30  # what the README states


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_aborted_at_the_idle_timeout(running, reactor):
    running.open(1000, name="u" * 200)  # a page is ~300 KB: more than the kernel takes
    running.site.timeOut = 0.5
    keptOpen = running.socket(rcvbuf=4096)
    keptOpen.sendall(b"GET /sessions HTTP/1.1\r\n\r\n" * 100)
    closing = running.socket(rcvbuf=4096)  # its answer ends with a close
    closing.sendall(b"GET /sessions HTTP/1.0\r\n\r\n")
    started = time.monotonic()
    # Neither reads: a graceful close could never finish.  Twisted's own
    # abort comes 15 s after the timeout, or never for a closing connection.
    await eventually(reactor, lambda: closedByServer(keptOpen) and closedByServer(closing), 4)
    assert time.monotonic() - started < 3.0


@pytest_twisted.ensureDeferred
async def test_a_client_that_half_closes_after_its_request_is_answered(running, reactor):
    # As `printf 'GET /healthz HTTP/1.0\r\n\r\n' | nc` does: its end
    # arrives while the request waits for its turn.
    sockets = [running.socket(source=f"127.0.0.{2 + i % 5}") for i in range(10)]
    for s in sockets:
        s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
    answers: list[list[bytes]] = [[] for _ in sockets]
    await eventually(
        reactor, lambda: all(readUntilClosed(s, a) for s, a in zip(sockets, answers, strict=True))
    )
    assert [parse(b"".join(a))[0][:1] for a in answers] == [(200,)] * 10


@pytest_twisted.ensureDeferred
async def test_head_is_served(running):
    answer = await running.ask(b"HEAD /sessions HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_sessions_are_paged_in_id_order(running):
    running.open(2500)
    code, headers, body = await running.get("/sessions")
    assert code == 200
    page = json.loads(body)
    assert [s["session"] for s in page] == list(range(1, 1001))
    assert headers["link"] == '<?after=1000&limit=1000>; rel="next"'
    # Following the links walks every session once, in order.
    seen, path = [], "/sessions?limit=300"
    while True:
        code, headers, body = await running.get(path)
        assert code == 200
        seen += [s["session"] for s in json.loads(body)]
        if "link" not in headers:
            break
        path = "/sessions" + re.fullmatch(r'<(\?[^>]*)>; rel="next"', headers["link"]).group(1)
    assert seen == list(range(1, 2501))
    # A page after sessions that have closed starts at the next open one.
    for session in list(running.registry)[10:20]:
        session.close()
    code, headers, body = await running.get("/sessions?after=10&limit=5")
    assert [s["session"] for s in json.loads(body)] == [21, 22, 23, 24, 25]
    code, headers, body = await running.get("/sessions?after=2495")
    assert [s["session"] for s in json.loads(body)] == [2496, 2497, 2498, 2499, 2500]
    assert "link" not in headers  # the last page


@pytest_twisted.ensureDeferred
async def test_bad_paging_values_get_400_and_one_line(running):
    for query in [
        "limit=0", "limit=1001", "limit=abc", "limit=-1", "limit=%2B5", "limit=%205", "limit=5%00",
        "after=-1", "after=1e3", "after=" + "9" * 40, "limit=1&limit=2", "after=1&after=2",
    ]:  # fmt: skip
        code, _, body = await running.get("/sessions?" + query)
        assert code == 400, query
        assert body.count(b"\n") == 1 and len(body) < 100, body
        assert b"9999" not in body  # what the client sent is not quoted


def test_a_page_costs_the_page_not_all_sessions(reactor):
    from pbrealms.sessions import SessionRegistry

    registry = SessionRegistry(reactor)
    for i in range(50_000):
        registry.open("u", f"p{i}").active = True

    def timed(**kw) -> float:
        started = time.perf_counter()
        for _ in range(20):
            registry.describe(**kw)
        return time.perf_counter() - started

    timed(after=49_000, limit=10)
    assert timed(after=49_000, limit=10) < timed(limit=None) / 50
    assert timed(after=10, limit=10) < timed(limit=None) / 50


HAMMER = r"""
import socket, sys, threading, time
port, seconds, pipeline = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ask = b"GET /sessions HTTP/1.1\r\n\r\n"
end = time.monotonic() + seconds
read = [0]
def reader(source):  # one address each: the endpoint holds 4 per address
    while time.monotonic() < end:
        s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        s.sendall(ask * (pipeline - 1) + b"GET /sessions HTTP/1.1\r\nConnection: close\r\n\r\n")
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            read[0] += len(data)
        s.close()
def sleeper(source):
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.sendall(ask * pipeline)
    time.sleep(seconds)
    s.close()
threads = [
    threading.Thread(target=f, args=(f"127.0.0.{i + 2}",))
    for i, f in enumerate([reader] * 4 + [sleeper] * 4)
]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(read[0])
"""


@pytest.mark.timing
@pytest_twisted.ensureDeferred
async def test_greet_stays_fast_while_sessions_is_hammered(running, reactor):
    running.open(5000)
    conn = await connect(reactor, running.endpoint, "alice", USERS["alice"], None, 5.0)
    try:
        await conn.callRemote("greet")
        hammer = subprocess.Popen(
            [sys.executable, "-c", HAMMER, str(running.httpPort), str(HAMMER_SECONDS), "200"],
            stdout=subprocess.PIPE,
        )
        try:
            await task.deferLater(reactor, 0.3, lambda: None)  # under way
            took = []
            while hammer.poll() is None:
                started = time.monotonic()
                await conn.callRemote("greet").addTimeout(2.0, reactor)
                took.append(time.monotonic() - started)
                await task.deferLater(reactor, 0.02, lambda: None)
            read = int(hammer.stdout.read())
        finally:
            if hammer.poll() is None:
                hammer.kill()
            hammer.wait()
            hammer.stdout.close()
        assert hammer.returncode == 0
        # It was hammered: at least 2 MB/s of pages read.
        assert read > 2_000_000 * HAMMER_SECONDS, read
        took.sort()
        # The acceptance: a greet stays under 100 ms while /sessions
        # is hammered, judged by the median greet, and 95 in 100 within
        # 250 ms: the hammer and the server share 2 cores, and either can
        # lose the CPU for a moment (95th percentiles of up to 140 ms seen
        # here), but a server that /sessions starves is slow on every greet.
        typical, slow = took[len(took) // 2], took[len(took) * 95 // 100]
        assert typical < 0.1 and slow < 0.25, f"median {typical:.3f} s, slowest {took[-5:]}"
    finally:
        await conn.disconnect()
