"""
The bcrypt queue cannot be turned against users: a full queue answers
ServerBusy (retried, and counted as no failed login), and one source holds at
most a fair share of the waiting checks.  Unit tests of the queue with a fake
hash function, then an attack over real loopback TCP.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import bcrypt
import pytest
import pytest_twisted
from conftest import Arrivals, counted, eventually
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.checkers import PasswordFile, UsernamePasswordFrom
from pbrealms.client import ReconnectingSession, connect, retryable
from pbrealms.client.cli import EXIT_BUSY, explain
from pbrealms.errors import LoginRefused, ServerBusy, ShuttingDown, localize
from pbrealms.guard import SourcePenalties
from pbrealms.hasher import PasswordHasher, shareOf
from pbrealms.metrics import OUTCOMES

#: Logins the victim tries during the attack; more for a longer attack.
ATTEMPTS = int(os.environ.get("BCRYPT_FAIRNESS_ATTEMPTS", "20"))
#: Connections of the attacker: more than the queue holds.
ATTACKERS = 48
HASH = b"$2b$04$" + b"a" * 53  # never hashed: the fake only records it


class FakeHash:
    """
    The hasher's C{run}: each check waits until the test finishes it.
    """

    def __init__(self) -> None:
        self.started = Arrivals()  # the passwords checked, in order
        self.running: dict[bytes, defer.Deferred[bool]] = {}

    def __call__(self, password: bytes, hashed: bytes) -> defer.Deferred[bool]:
        self.started.append(password)
        d: defer.Deferred[bool] = defer.Deferred()
        self.running[password] = d
        return d

    def finish(self, password: bytes, matched: bool = False) -> None:
        self.running.pop(password).callback(matched)

    def finishAll(self) -> None:
        while self.running:
            self.finish(next(iter(self.running)))


def outcome(d: defer.Deferred) -> object:
    """
    What a fired Deferred holds: its result, or its failure's exception type.
    """
    assert d.called
    results: list = []
    d.addBoth(results.append)
    result = results[0]
    return result.type if isinstance(result, Failure) else result


A, B, C, D, E = (f"192.0.2.{i}" for i in range(1, 6))


def test_waiting_checks_are_started_round_robin_across_sources():
    fake = FakeHash()
    hasher = PasswordHasher(threads=1, maxPending=10, run=fake)
    checks = [hasher.check(p, HASH, A) for p in (b"a1", b"a2", b"a3", b"a4")]
    checks.append(hasher.check(b"b1", HASH, B))
    assert (hasher.hashing, hasher.waiting) == (1, 4)
    for _ in range(5):
        fake.finish(fake.started[-1])
    # First come first served would have started b1 last.
    assert fake.started == [b"a1", b"a2", b"b1", b"a3", b"a4"]
    assert [outcome(d) for d in checks] == [False] * 5
    assert hasher.pending == 0


def test_a_full_queue_makes_room_for_a_source_holding_fewer():
    fake = FakeHash()
    hasher = PasswordHasher(threads=1, maxPending=5, run=fake)
    a = [hasher.check(b"a%d" % i, HASH, A) for i in range(1, 6)]  # 1 hashing, 4 waiting
    assert hasher.pending == hasher.maxPending
    b1 = hasher.check(b"b1", HASH, B)  # takes a5's place
    assert outcome(a[4]) is ServerBusy
    c1 = hasher.check(b"c1", HASH, C)  # takes a4's
    d1 = hasher.check(b"d1", HASH, D)  # takes a3's
    assert outcome(a[3]) is ServerBusy and outcome(a[2]) is ServerBusy
    # Now every source holds one waiting check: a fair share each.
    e1 = hasher.check(b"e1", HASH, E)
    a6 = hasher.check(b"a6", HASH, A)
    assert outcome(e1) is ServerBusy and outcome(a6) is ServerBusy
    assert (hasher.hashing, hasher.waiting) == (1, 4)
    fake.finishAll()
    while fake.running or hasher.waiting:
        fake.finishAll()
    assert fake.started == [b"a1", b"a2", b"b1", b"c1", b"d1"]
    assert [outcome(d) for d in (a[0], a[1], b1, c1, d1)] == [False] * 5


def test_a_source_cannot_take_the_place_of_its_own_checks():
    fake = FakeHash()
    hasher = PasswordHasher(threads=1, maxPending=3, run=fake)
    checks = [hasher.check(b"%d" % i, HASH) for i in range(4)]  # no source: one anonymous
    assert outcome(checks[3]) is ServerBusy
    assert not any(d.called for d in checks[:3])
    fake.finishAll()
    fake.finishAll()
    fake.finishAll()
    assert [outcome(d) for d in checks[:3]] == [False] * 3


def test_two_sources_of_one_ipv6_64_share_one_share():
    assert shareOf("2001:db8::1") == shareOf("2001:db8::ffff:2") == "2001:db8::/64"
    assert shareOf("2001:db8:0:1::1") != shareOf("2001:db8::1")
    assert shareOf("192.0.2.1") != shareOf("192.0.2.2")
    assert shareOf(None) == shareOf("") == ""


def test_a_hash_that_fails_fails_its_check_only():
    fake = FakeHash()
    hasher = PasswordHasher(threads=1, maxPending=4, run=fake)
    first, second = hasher.check(b"1", HASH, A), hasher.check(b"2", HASH, A)
    fake.running.pop(b"1").errback(ValueError("Invalid salt"))
    assert outcome(first) is ValueError
    fake.finish(b"2", True)
    assert outcome(second) is True


class RecordingHasher:
    def __init__(self) -> None:
        self.sources: list[str | None] = []

    def check(self, password, hashed, source=None):
        self.sources.append(source)
        return defer.succeed(False)


def test_the_checker_passes_the_source_along(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"carol:{bcrypt.hashpw(b'c', bcrypt.gensalt(4)).decode()}\n")
    path.chmod(0o600)
    checker = PasswordFile(str(path))
    checker.hasher = recording = RecordingHasher()
    answers = [
        checker.requestAvatarId(UsernamePasswordFrom(b"carol", b"x", "198.51.100.7")),
        checker.requestAvatarId(UsernamePassword(b"carol", b"x")),  # plain Twisted ones
        checker.requestAvatarId(UsernamePasswordFrom(b"mallory", b"x", "198.51.100.8")),
    ]
    assert recording.sources == ["198.51.100.7", None, "198.51.100.8"]
    assert [outcome(d) for d in answers] == [UnauthorizedLogin] * 3


# The client side.


def test_busy_is_tried_again_and_reported_as_busy():
    assert retryable(Failure(ServerBusy()))
    failed = explain(Failure(ServerBusy()), "tcp:127.0.0.1:8787", 10)
    assert failed.status == EXIT_BUSY == 8
    assert str(failed).startswith("server busy: ")
    assert "retry" in str(failed)
    assert "busy" in OUTCOMES


def test_a_reconnecting_session_retries_a_busy_server():
    clock = task.Clock()
    attempts: list[defer.Deferred] = []

    def fakeConnect(*args, **kw):
        attempts.append(defer.Deferred())
        return attempts[-1]

    lost: list = []
    session = ReconnectingSession(
        clock, object(), "carol", "pw", connect=fakeConnect, onLost=lambda r, d: lost.append(r)
    )
    stopped = session.start()
    attempts[0].errback(ServerBusy())
    assert lost[0].check(ServerBusy) and not stopped.called
    clock.advance(30)
    assert len(attempts) == 2  # tried again
    attempts[1].errback(ShuttingDown())
    clock.advance(30)
    stopping = session.stop()
    assert stopping.called and stopped.called


# Over real TCP.


@pytest.fixture
def bcryptPasswd(tmp_path: Path) -> Path:
    path = tmp_path / "users.passwd"
    path.write_text(f"carol:{bcrypt.hashpw(b'c4r0l', bcrypt.gensalt(6)).decode()}\n")
    path.chmod(0o600)
    return path


async def serveBcrypt(harness, passwd: Path, hasher: PasswordHasher):
    root = harness.makeRoot("cache")
    root.checker = PasswordFile(str(passwd))
    root.checker.hasher = hasher
    served = await harness.serve(root=root)
    return root, served, served.port.getHost().port


@pytest_twisted.ensureDeferred
async def test_busy_counts_against_neither_the_connection_nor_the_source(
    reactor, harness, bcryptPasswd, log
):
    fake = FakeHash()
    hasher = PasswordHasher(threads=1, maxPending=1, run=fake)
    root, _, port = await serveBcrypt(harness, bcryptPasswd, hasher)
    root.maxAuthTries = 1
    root.penalties = SourcePenalties(reactor, perFailure=5.0, threshold=5.0)
    hasher.check(b"held", HASH, "127.0.0.1")  # the only slot, held

    factory = pb.PBClientFactory()
    harness.connectors.append(reactor.connectTCP("127.0.0.1", port, factory))
    gate = await factory.getRootObject()
    for _ in range(3):
        with pytest.raises(ServerBusy):
            await gate.callRemote("loginPassword", b"carol", b"c4r0l", None).addErrback(localize)
    assert not gate.broker.disconnected  # one try allowed, none used
    assert root.penalties.penalty("127.0.0.1") == 0
    assert counted(root.registry.metrics, "logins", outcome="busy") == 3
    assert counted(root.registry.metrics, "logins", outcome="bad_credentials") == 0
    # Asking again costs nothing: not one log line each, but a count now and then.
    (line,) = [m for m in log.messages() if "busy" in m]
    assert "1 answered busy" in line

    fake.finish(b"held")
    login = gate.callRemote("loginPassword", b"carol", b"c4r0l", None)
    # The slot is free: carol's is the next check to start.
    assert await fake.started.waitFor(reactor, 2) == [b"held", b"c4r0l"]
    fake.finish(b"c4r0l", True)
    assert isinstance(await login, pb.RemoteReference)


@pytest.mark.timing
@pytest_twisted.ensureDeferred
async def test_one_attacking_address_cannot_keep_another_out(reactor, harness, bcryptPasswd, log):
    hasher = PasswordHasher(threads=2, maxPending=32)
    _, served, port = await serveBcrypt(harness, bcryptPasswd, hasher)
    attacking = True
    answers: Counter[str] = Counter()

    async def attack(factory: pb.PBClientFactory) -> None:
        gate = await factory.getRootObject()
        while attacking:
            try:
                await gate.callRemote("loginPassword", b"carol", b"guess", None)
            except pb.RemoteError as e:
                kind = e.remoteType
                answers[kind.decode() if isinstance(kind, bytes) else kind] += 1
            except Exception:
                return  # the connection closed

    attacks = []
    for _ in range(ATTACKERS):
        factory = pb.PBClientFactory()
        connector = reactor.connectTCP("127.0.0.1", port, factory, bindAddress=("127.0.0.2", 0))
        harness.connectors.append(connector)
        attacks.append(defer.ensureDeferred(attack(factory)))
    try:
        # The queue fills as the attacks arrive, telling nothing: polled.
        await eventually(reactor, lambda: hasher.pending >= hasher.maxPending)
        victim = f"tcp:host=127.0.0.1:port={port}:bindAddress=127.0.0.3"
        loggedIn, refusals, took = 0, Counter(), []
        full = 0
        for _ in range(ATTEMPTS):
            full += hasher.pending >= hasher.maxPending - hasher.threads
            started = time.monotonic()
            try:
                conn = await connect(reactor, victim, "carol", "c4r0l", timeout=5)
            except LoginRefused as e:
                refusals[type(e).__name__] += 1
            else:
                loggedIn += 1
                took.append(time.monotonic() - started)
                await conn.disconnect()
    finally:
        attacking = False
        for connector in harness.connectors:
            connector.disconnect()
        await defer.DeferredList(attacks)
        await served.settled()
        hasher.stop()
    print(
        f"\nvictim: {loggedIn}/{ATTEMPTS} logins, refused {dict(refusals)}, "
        f"slowest {max(took, default=0) * 1000:.0f} ms; attacker's answers {dict(answers)}"
    )
    assert loggedIn >= 0.9 * ATTEMPTS, (loggedIn, refusals)
    # The attack really kept the queue full: checks were waiting at each
    # attempt, and the attacker was told it was busy.
    assert full >= 0.9 * ATTEMPTS
    assert answers["pbrealms.errors.ServerBusy"] > ATTEMPTS
