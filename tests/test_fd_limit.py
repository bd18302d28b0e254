"""
File descriptors: the real twistd under a low C{prlimit}, filled with idle
connections from several addresses, still logs a user in and answers
/healthz; its limit is raised as far as it needs; a C{--max-connections}
that cannot fit stops it before it listens.  And the room made at the
connection cap, unit by unit.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import environment, stop, tool, waitFor

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CLIENT = str(BIN / "pbrealms-client")
LISTENING = re.compile(r"pbrealms listening on 127\.0\.0\.1:(\d+)")
METRICS_LISTENING = re.compile(r"metrics listening on 127\.0\.0\.1:(\d+)")
ALLOWING = re.compile(r"allowing (\d+) PB connections, not 16384: the file descriptor limit")
START_TIMEOUT = 15.0
#: The README's figures: descriptors PB connections never use, and those of
#: connections being closed to make room for newcomers.
DESCRIPTOR_RESERVE = 128
MAKING_ROOM = 16
#: The attack: idle connections from each of these addresses, as many as
#: --max-unauthenticated-per-source lets one address hold (its default).
SOURCES = [f"127.0.0.{i}" for i in range(2, 11)]
PER_SOURCE = 128


def limits(pid: int) -> tuple[int, int]:
    """
    A process's soft and hard limits on open files.
    """
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for {pid}")


def openCount(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def prlimit() -> str:
    return tool("prlimit")


@pytest.fixture
def serve(prlimit: str, tmp_path: Path, pwfile: Path) -> Iterator:
    """
    Start twistd pbrealms under C{prlimit --nofile=LIMIT}; each is killed
    at the end.
    """
    started: list[subprocess.Popen] = []
    handles = []

    def start(limit: str, *options: str) -> tuple[subprocess.Popen, Path]:
        output = tmp_path / f"twistd-{len(started)}.log"
        handle = output.open("wb")
        handles.append(handle)
        args = [prlimit, f"--nofile={limit}", "--", TWISTD, "-n", "--pidfile=", "pbrealms",
                "--port", "tcp:0:interface=127.0.0.1", "--passwd", str(pwfile),
                *options]  # fmt: skip
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=environment(),
        )
        started.append(process)
        return process, output

    try:
        yield start
    finally:
        for process in started:
            stop(process)
        for handle in handles:
            handle.close()


def waitForLine(process: subprocess.Popen, output: Path, pattern: re.Pattern) -> re.Match:
    def found() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"twistd exited with {process.returncode}:\n{output.read_text()}")
        return pattern.search(output.read_text(errors="replace")) is not None

    waitFor(found, START_TIMEOUT, f"twistd saying {pattern.pattern!r}")
    return pattern.search(output.read_text(errors="replace"))


@pytest.fixture
def manyDescriptors() -> Iterator[None]:
    """
    Room in this process for the attack's client sockets: its soft limit
    raised for the test, or the test skipped if the hard one is too low.
    """
    need = len(SOURCES) * PER_SOURCE + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard limit on open files is {hard}; the attack's clients need {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def settle(pid: int, quiet: float = 0.5, timeout: float = 15.0) -> int:
    """
    Wait until a process's count of open descriptors has not changed for
    C{quiet} seconds, and return it.
    """
    deadline = time.monotonic() + timeout
    last, since = openCount(pid), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"descriptors still changing after {timeout} s"
        time.sleep(0.05)
        now = openCount(pid)
        if now != last:
            last, since = now, time.monotonic()
    return last


def refusal(process: subprocess.Popen, output: Path) -> list[str]:
    """
    Wait for twistd to exit, as it must before it listens; return its lines.
    """

    def exited() -> bool:
        assert not LISTENING.search(output.read_text(errors="replace")), output.read_text()
        return process.poll() is not None

    waitFor(exited, START_TIMEOUT, "twistd exiting")
    assert process.returncode == 2, output.read_text()
    return output.read_text().splitlines()


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status
    except OSError as e:
        raise AssertionError(f"/healthz did not answer: {e}") from None


def connectionsOpen(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return float(re.search(r"^pbrealms_connections_open (\S+)$", text, re.MULTILINE).group(1))


def test_idle_connections_leave_room_for_a_login_and_healthz(serve, manyDescriptors, alicePassword):
    process, output = serve(
        "1024:1024", "--metrics", "tcp:0:interface=127.0.0.1", "--login-timeout", "300"
    )
    port = int(waitForLine(process, output, LISTENING).group(1))
    metrics = int(waitForLine(process, output, METRICS_LISTENING).group(1))
    attack: list[socket.socket] = []
    try:
        for source in SOURCES:
            for _ in range(PER_SOURCE):
                s = socket.socket()
                attack.append(s)
                s.settimeout(5)
                s.bind((source, 0))
                s.connect(("127.0.0.1", port))
        held = settle(process.pid)

        assert healthz(metrics) == 200
        # PB is at its cap, which the attack alone would pass.
        allowed = int(ALLOWING.search(output.read_text()).group(1))
        assert allowed < len(attack)
        assert allowed <= connectionsOpen(metrics) <= allowed + MAKING_ROOM
        result = subprocess.run(
            [CLIENT, "--connect", f"tcp:127.0.0.1:{port}", "--user", "alice",
             "--password-file", str(alicePassword), "--timeout", "10", "greet"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            env=environment(),
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, "<1>hello alice\n"), result.stderr
        assert healthz(metrics) == 200
    finally:
        for s in attack:
            s.close()
    # PB connections never reached into the reserve, and the limit stayed.
    assert held <= 1024 - DESCRIPTOR_RESERVE
    assert limits(process.pid) == (1024, 1024)
    text = output.read_text()
    # The default did not fit: it was lowered, said in one line.
    assert len(ALLOWING.findall(text)) == 1, text
    assert "Traceback" not in text
    assert "EMFILE" not in text  # no port ever ran out


def test_the_limit_is_raised_to_the_hard_one_for_the_default(serve):
    process, output = serve("1024:4096")
    waitForLine(process, output, LISTENING)
    assert limits(process.pid) == (4096, 4096)
    # 16384 and the reserve do not fit in 4096: fewer, and one line saying so.
    allowed = int(waitForLine(process, output, ALLOWING).group(1))
    assert 4096 - DESCRIPTOR_RESERVE - MAKING_ROOM - 64 < allowed < 4096 - DESCRIPTOR_RESERVE
    [line] = [line for line in output.read_text().splitlines() if ALLOWING.search(line)]
    assert "the file descriptor limit is 4096 (hard 4096)" in line


def test_the_limit_is_raised_only_as_far_as_needed(serve):
    process, output = serve("1024:8192", "--max-connections", "2000")
    waitForLine(process, output, LISTENING)
    soft, hard = limits(process.pid)
    assert hard == 8192
    assert 2000 + DESCRIPTOR_RESERVE + MAKING_ROOM < soft < 2000 + DESCRIPTOR_RESERVE + 128
    assert "allowing" not in output.read_text()


def test_an_explicit_max_connections_that_cannot_fit_stops_the_start(serve):
    lines = refusal(*serve("1024:1024", "--max-connections", "5000"))
    assert len(lines) == 1, lines
    assert lines[0].startswith("twistd pbrealms: error: --max-connections=5000 does not fit")
    assert "limit is 1024 (hard 1024)" in lines[0]
    assert "LimitNOFILE=" in lines[0]


def test_a_limit_too_low_for_any_connection_stops_the_start(serve):
    lines = refusal(*serve("100:100"))
    assert len(lines) == 1, lines
    assert "--max-connections=16384 does not fit" in lines[0]
    assert "leaves room for 0" in lines[0]


def test_the_unit_sets_a_limit_that_holds_the_default():
    unit = (ROOT / "config" / "pbrealms.service").read_text()
    values = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert len(values) == 1, values
    assert int(values[0]) >= 16384 + DESCRIPTOR_RESERVE + MAKING_ROOM + 64


# WaitingRoom


@pytest.fixture
def room():
    from pbrealms.descriptors import WaitingRoom

    return WaitingRoom()


class Connection:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True

    def __repr__(self) -> str:
        return self.name


def fill(room, **held: int) -> dict[str, list[Connection]]:
    made = {}
    for source, count in held.items():
        made[source] = [Connection(f"{source}-{i}") for i in range(count)]
        for c in made[source]:
            room.add(source, c)
    return made


def test_room_is_made_from_the_oldest_of_the_source_holding_the_most(room):
    made = fill(room, a=3, b=5, c=5)
    assert room.makeRoom("new")
    # b got to 5 first; its oldest connection goes, and only that one.
    assert [c.name for cs in made.values() for c in cs if c.dropped] == ["b-0"]
    assert (room.count("a"), room.count("b"), room.count("c")) == (3, 4, 5)
    assert room.makeRoom("new")
    assert made["c"][0].dropped
    assert not room.makeRoom("a")  # a holds 3, the most is 4
    room.add("a", Connection("a-3"))
    assert room.makeRoom("new")  # of those at the most, b got there first
    assert made["b"][1].dropped
    assert (room.count("a"), room.count("b"), room.count("c")) == (4, 3, 4)


def test_a_source_is_never_left_with_fewer_than_the_newcomer(room):
    made = fill(room, a=1, b=1, c=2)
    assert not room.makeRoom("c")  # its own
    assert not room.makeRoom("a")  # 2 is not 2 more than 1
    assert room.makeRoom("new")
    assert made["c"][0].dropped
    # Everyone holds one: nobody's is closed for a newcomer.
    assert not room.makeRoom("other")
    assert not any(c.dropped for c in made["a"] + made["b"])


def test_removed_connections_no_longer_count(room):
    made = fill(room, a=4, b=1)
    for c in made["a"][:3]:
        room.remove("a", c)  # logged in, or gone
    room.remove("a", made["a"][0])  # twice does nothing
    room.remove("z", Connection("z"))  # nor one never added
    assert room.count("a") == 1
    assert not room.makeRoom("new")  # the most is 1 again
    room.remove("a", made["a"][3])
    room.remove("b", made["b"][0])
    assert room.count("a") == room.count("b") == 0
    assert not room.makeRoom("new")
    fill(room, d=2)
    assert room.makeRoom("new")


# The PB factory at its cap


def test_at_the_cap_few_newcomers_take_a_place_per_turn(passwd):
    from twisted.internet.address import IPv4Address
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from pbrealms.checkers import PasswordFile
    from pbrealms.login import LoginRoot
    from pbrealms.realms import REALMS
    from pbrealms.service import PBServerFactory
    from pbrealms.servicetree import wireSecurity
    from pbrealms.sessions import SessionRegistry

    clock = Clock()
    registry = SessionRegistry(clock, realm="cache")
    root = LoginRoot(
        PasswordFile(str(passwd)),
        REALMS["cache"].realm.build(registry, clock, {}),
        registry,
        registry.clock,
        registry.metrics,
    )
    factory = PBServerFactory(root, wireSecurity(), maxConnections=20)

    def connect(host: str):
        broker = factory.buildProtocol(IPv4Address("TCP", host, 4242))
        if broker is not None:
            broker.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 4242)))
        return broker

    held = [connect("192.0.2.1") for _ in range(20)]
    assert all(held) and connect("192.0.2.1") is None  # its own place: none
    newcomers = [connect(f"198.51.100.{i}") for i in range(MAKING_ROOM + 4)]
    # Until the closed ones are gone, MAKING_ROOM newcomers at most: the
    # oldest of 192.0.2.1 are closed for them, in order.
    assert [b is not None for b in newcomers] == [True] * MAKING_ROOM + [False] * 4
    closed = [b for b in held if b.transport.disconnecting]
    assert closed == held[:MAKING_ROOM]
    assert len(factory.brokers) == 20 + MAKING_ROOM
    for broker in closed:
        broker.connectionLost(Failure(ConnectionDone()))
    assert len(factory.brokers) == 20
    # 192.0.2.1 holds 4, the newcomers' addresses 1 each: a place is taken
    # only if the newcomer's address then holds no more than 192.0.2.1.
    count = root.waiting.count
    assert connect("198.51.100.1") is not None
    assert (count("192.0.2.1"), count("198.51.100.1")) == (3, 2)
    assert connect("198.51.100.1") is None  # it would hold 3, and 192.0.2.1 2
    assert connect("203.0.113.1") is not None
    assert (count("192.0.2.1"), count("203.0.113.1")) == (2, 1)
    assert [b.transport.disconnecting for b in held[MAKING_ROOM:]] == [True, True, False, False]
    for broker in factory.brokers.copy():
        broker.connectionLost(Failure(ConnectionDone()))
    assert not factory.brokers and not root.unauthenticated


def test_the_reserve_holds_the_metrics_port():
    from pbrealms import descriptors
    from pbrealms.metricssite import MAX_HTTP_CONNECTIONS

    assert (descriptors.DESCRIPTOR_RESERVE, descriptors.MAKING_ROOM) == (
        DESCRIPTOR_RESERVE,
        MAKING_ROOM,
    )
    # Its connections take at most a half; the rest is for everything else.
    assert MAX_HTTP_CONNECTIONS <= DESCRIPTOR_RESERVE // 2
