"""
Shutdown does not wait for queued password checks: those not yet started are
answered ShuttingDown as the stop begins, those hashing finish during the
grace, and the hasher's threads stop with the service tree.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import bcrypt
import pytest_twisted
from conftest import eventually, exited
from processes import environment, stop
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.client import ClientMind, connect
from pbrealms.errors import ShuttingDown
from pbrealms.hasher import PasswordHasher
from pbrealms.tap import Options, makeService

TWISTD = str(Path(sys.executable).parent / "twistd")
LISTENING = re.compile(r"pbrealms listening on 127\.0\.0\.1:(\d+)")
GRACE = 2.0
#: More checks than the queue holds (32), so that it is full.
CHECKS = 40


class FakeHash:
    def __init__(self) -> None:
        self.running: list[defer.Deferred[bool]] = []

    def __call__(self, password: bytes, hashed: bytes) -> defer.Deferred[bool]:
        self.running.append(defer.Deferred())
        return self.running[-1]


def outcome(d: defer.Deferred) -> object:
    results: list = []
    d.addBoth(results.append)
    assert results, "not fired"
    return results[0].type if isinstance(results[0], Failure) else results[0]


def test_stopping_drops_the_waiting_checks_and_waits_for_those_hashing():
    fake = FakeHash()
    hasher = PasswordHasher(threads=2, maxPending=8, run=fake)
    hasher.startService()
    checks = [hasher.check(b"pw", b"hash", f"192.0.2.{i}") for i in range(6)]
    hasher.stopService()
    stopped = hasher.whenIdle()
    assert [outcome(d) for d in checks[2:]] == [ShuttingDown] * 4  # at once
    assert not checks[0].called and not stopped.called  # hashing goes on
    assert outcome(hasher.check(b"pw", b"hash")) is ShuttingDown  # nothing new
    fake.running[0].callback(True)
    assert outcome(checks[0]) is True and not stopped.called
    fake.running[1].callback(False)
    assert outcome(checks[1]) is False
    assert stopped.called
    assert len(fake.running) == 2  # nothing more was started
    hasher.startService()  # and it can start again
    assert not hasher.check(b"pw", b"hash").called
    fake.running[2].callback(True)


def cost14(tmp_path: Path) -> Path:
    # A cost-4 hash relabelled: bcrypt then works at cost 14 (about 1 s
    # here) with its salt, and no password matches it.
    fast = bcrypt.hashpw(b"unused", bcrypt.gensalt(4))
    path = tmp_path / "users.passwd"
    path.write_bytes(b"carol:" + fast.replace(b"$04$", b"$14$", 1) + b"\nalice:wonderland\n")
    path.chmod(0o600)
    return path


@pytest_twisted.ensureDeferred
async def test_the_tree_stops_the_hasher_without_waiting_for_hashes(reactor, tmp_path, log):
    options = Options()
    options.parseOptions(
        ["--passwd", str(cost14(tmp_path)), "--port", "tcp:0:interface=127.0.0.1",
         f"--shutdown-grace={GRACE}"]
    )  # fmt: skip
    server = makeService(options)
    hasher = server.getServiceNamed("password-hasher")
    assert options["checker"].hasher is hasher
    server.privilegedStartService()
    server.startService()
    assert hasher.running
    fake = FakeHash()
    hasher._run = fake
    hashing = [hasher.check(b"pw", b"hash") for _ in range(hasher.threads)]
    waiting = [hasher.check(b"pw", b"hash") for _ in range(3)]
    await server.stopService()
    # The waiting ones were dropped; those hashing go on, but nobody waits
    # for them once the grace is over.
    assert [outcome(d) for d in waiting] == [ShuttingDown] * 3
    assert not hasher.running and not any(d.called for d in hashing)
    for d in fake.running:
        d.callback(False)
    assert [outcome(d) for d in hashing] == [False] * hasher.threads


class SilentMind(ClientMind):
    """
    A client that never answers the shutdown notice: the grace is used whole.
    """

    def remote_notifyShutdown(self, reason):
        return defer.Deferred()


@pytest_twisted.ensureDeferred
async def test_sigterm_with_checks_queued_exits_within_the_grace_and_2_s(reactor, tmp_path):
    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pbrealms", "--port", "tcp:0:interface=127.0.0.1",
             "--passwd", str(cost14(tmp_path)), f"--shutdown-grace={GRACE:g}"],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=environment(),
        )  # fmt: skip
    connectors = []
    try:
        await eventually(reactor, lambda: LISTENING.search(output.read_text()), timeout=15)
        port = int(LISTENING.search(output.read_text()).group(1))
        session = await connect(reactor, f"tcp:127.0.0.1:{port}", "alice", "wonderland",
                                SilentMind())  # fmt: skip
        answers: Counter[str] = Counter()

        def answered(result: object) -> None:
            if not isinstance(result, Failure):
                answers["logged in"] += 1
            elif result.check(pb.PBConnectionLost):
                answers["connection lost"] += 1
            else:
                kind = result.type  # the remote type's name, for an error it sent
                answers[kind.decode() if isinstance(kind, bytes) else str(kind)] += 1

        logins = []
        for _ in range(CHECKS):
            factory = pb.PBClientFactory()
            connectors.append(reactor.connectTCP("127.0.0.1", port, factory))
            login = factory.getRootObject().addCallback(
                lambda gate: gate.callRemote("loginPassword", b"carol", b"guess", None)
            )
            logins.append(login.addBoth(answered))
        # Those beyond the queue's 32 are answered at once: the rest are queued.
        await eventually(reactor, lambda: sum(answers.values()) >= CHECKS - 32, timeout=10)

        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        await exited(process, GRACE + 4)
        took = time.monotonic() - started
        await defer.DeferredList(logins)
        await session.disconnect()
    finally:
        for connector in connectors:
            connector.disconnect()
        stop(process)
    log = output.read_text()
    print(f"\nexit {took:.1f} s after SIGTERM (grace {GRACE:g} s); answers {dict(answers)}")
    assert took < GRACE + 2, f"{took:.1f} s"
    assert took >= GRACE - 0.5  # the silent client had its grace
    assert process.returncode in (0, -signal.SIGTERM), log
    assert "Traceback" not in log and "Unhandled" not in log
    # The queued checks were answered at once, not hashed.
    assert answers["pbrealms.errors.ShuttingDown"] >= 32 - 4, answers
