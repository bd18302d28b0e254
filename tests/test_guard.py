"""
Brute force: failed logins close their connection after a few tries, and
penalise their source address, which is refused for a while.
"""

import ipaddress
import os
import re
from pathlib import Path

import pytest
import pytest_twisted
from conftest import disconnection, eventually
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.spread import pb

from pbrealms.errors import BadCredentials, SourcePenalised, TooManyConnections, localize
from pbrealms.guard import SourcePenalties, parseNetworks
from pbrealms.login import LoginRoot
from pbrealms.realms.tracking import TrackingRealm
from pbrealms.sessions import SessionRegistry


def test_a_source_is_refused_once_its_penalty_reaches_the_threshold():
    clock = task.Clock()
    penalties = SourcePenalties(clock, perFailure=5, threshold=15, maximum=60)
    for _ in range(2):
        penalties.failed("192.0.2.1")
    assert penalties.penalty("192.0.2.1") == 0  # 10 s: not yet
    penalties.failed("192.0.2.1")
    assert penalties.penalty("192.0.2.1") == 15
    assert penalties.penalty("192.0.2.2") == 0  # another source
    clock.advance(14)
    assert penalties.penalty("192.0.2.1") == 1
    clock.advance(1)
    assert penalties.penalty("192.0.2.1") == 0  # drained: allowed again
    penalties.failed("192.0.2.1")
    assert penalties.penalty("192.0.2.1") == 0  # and starting from nothing


def test_three_quick_failures_penalise_and_two_do_not():
    """
    The README's "three": each failure's 5 s drains while the next is tried,
    so three failures a moment apart leave less than 15 s; they penalise
    all the same, and the penalty drains in real time.
    """
    clock = task.Clock()
    penalties = SourcePenalties(clock)  # the defaults: 5 s each, 15 s
    penalties.failed("192.0.2.1")
    clock.advance(0.4)
    penalties.failed("192.0.2.1")
    clock.advance(0.4)
    assert penalties.penalty("192.0.2.1") == 0  # two: not yet
    penalties.failed("192.0.2.1")
    assert penalties.penalty("192.0.2.1") == pytest.approx(14.2)
    clock.advance(14.1)
    assert penalties.penalty("192.0.2.1") == pytest.approx(0.1)
    clock.advance(0.1)
    assert penalties.penalty("192.0.2.1") == 0  # drained: allowed again
    penalties.failed("192.0.2.1")
    assert penalties.penalty("192.0.2.1") == 0  # and starting from nothing


@pytest.mark.parametrize(("spacing", "penalised"), [(2.45, True), (2.5, False), (3, False)])
def test_three_failures_penalise_within_5_s(spacing, penalised):
    clock = task.Clock()
    penalties = SourcePenalties(clock)
    for n in range(3):
        clock.advance(spacing if n else 0)
        penalties.failed("192.0.2.1")
    assert bool(penalties.penalty("192.0.2.1")) is penalised


def test_failures_spread_out_in_time_never_add_up():
    clock = task.Clock()
    penalties = SourcePenalties(clock, perFailure=5, threshold=15)
    for _ in range(100):
        penalties.failed("192.0.2.1")
        clock.advance(6)
    assert penalties.penalty("192.0.2.1") == 0


def test_the_penalty_has_a_maximum():
    clock = task.Clock()
    penalties = SourcePenalties(clock, perFailure=5, threshold=15, maximum=60)
    for _ in range(1000):
        penalties.failed("2001:db8::1")
    assert penalties.penalty("2001:db8::1") == 60


def test_exempt_networks_and_unix_sockets_are_never_penalised():
    clock = task.Clock()
    penalties = SourcePenalties(
        clock, perFailure=5, threshold=5, exempt=parseNetworks("10.0.0.0/8, ::1")
    )
    for host in ("10.1.2.3", "::1", ""):
        penalties.failed(host)
        assert penalties.penalty(host) == 0
    assert len(penalties) == 0


def test_the_table_is_bounded():
    clock = task.Clock()
    penalties = SourcePenalties(clock, perFailure=5, threshold=5, capacity=100)
    for n in range(1000):
        penalties.failed(str(ipaddress.ip_address("198.51.100.0") + n % 256) + "")
        penalties.failed(f"2001:db8::{n:x}")
    assert len(penalties) == 100
    assert penalties.penalty("2001:db8::3e7") > 0  # the newest are kept


def test_bad_networks_are_named():
    with pytest.raises(ValueError, match="'nope'"):
        parseNetworks("10.0.0.0/8,nope")


async def loginOn(factory, password: bytes):
    return await factory.login(UsernamePassword(b"alice", password)).addErrback(localize)


@pytest.fixture
def guarded(harness):
    clock = task.Clock()
    penalties = SourcePenalties(clock, perFailure=5, threshold=15)

    async def serve(**limits):
        base = harness.makeRoot("tracking")
        root = LoginRoot(
            base.checker,
            base.realm,
            base.registry,
            base.registry.clock,
            base.registry.metrics,
            penalties=penalties,
            **limits,
        )
        return await harness.serve(root=root)

    return serve, clock, penalties


def connectFrom(reactor, served, source: str) -> pb.PBClientFactory:
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory, bindAddress=(source, 0))
    return factory


@pytest_twisted.ensureDeferred
async def test_a_connection_is_closed_after_its_tries(guarded, reactor, log):
    serve, _, _ = guarded
    served = await serve(maxAuthTries=3)
    factory = connectFrom(reactor, served, "127.0.0.3")
    for _ in range(3):
        with pytest.raises(BadCredentials):
            await loginOn(factory, b"guess")
    await served.settled()
    assert served.factory.made[0].disconnected
    assert any("127.0.0.3" in m and "3 refused logins" in m for m in log.messages())
    refusals = [m for m in log.messages() if m.startswith("login refused for 'alice' from")]
    assert len(refusals) == 3
    factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_penalised_source_is_refused_and_others_are_not(guarded, reactor, log):
    serve, clock, penalties = guarded
    served = await serve()
    attacker = connectFrom(reactor, served, "127.0.0.4")
    for _ in range(3):
        with pytest.raises(BadCredentials):
            await loginOn(attacker, b"guess")
    assert penalties.penalty("127.0.0.4") == 15
    attacker.disconnect()

    # A new connection from the attacker is told why at its login, with the
    # right password too, as an UnauthorizedLogin, and closed.
    refused = connectFrom(reactor, served, "127.0.0.4")
    failures: list = []
    await refused.login(UsernamePassword(b"alice", b"wonderland")).addErrback(failures.append)
    (failure,) = failures
    assert failure.check(UnauthorizedLogin)
    assert failure.getErrorMessage() == (
        "too many failed logins from this address: try again in 15 s"
    )
    assert localize(failure).check(SourcePenalised)
    await disconnection(reactor, served.factory.made[-1])
    assert served.registry.countOf("alice") == 0
    # A line per failure and one for the penalty; none for the refused
    # connection.
    guesser = f"127.0.0.4:{served.factory.made[0].transport.getPeer().port}"
    refusal = (
        f"login refused for 'alice' from {guesser} (realm tracking): wrong user name or password"
    )
    assert [m for m in log.messages() if "127.0.0.4" in m] == [
        refusal,
        refusal,
        "refusing logins from 127.0.0.4 for at least 15 s: too many failed logins",
        refusal,
    ]

    # Someone else is served meanwhile.
    canary = connectFrom(reactor, served, "127.0.0.5")
    perspective = await loginOn(canary, b"wonderland")
    assert await perspective.callRemote("greet") == "<1>hello alice"
    canary.disconnect()

    # Once the penalty drains, the attacker may try again.
    clock.advance(15)
    again = connectFrom(reactor, served, "127.0.0.4")
    perspective = await loginOn(again, b"wonderland")
    assert await perspective.callRemote("greet") == "<2>hello alice"
    again.disconnect()
    await served.settled()


@pytest_twisted.ensureDeferred
async def test_a_connection_that_does_not_log_in_in_time_is_closed(harness, reactor, log):
    clock = task.Clock()
    registry = SessionRegistry(clock, realm="tracking")
    root = harness.makeRoot("tracking")
    timed = LoginRoot(
        root.checker,
        TrackingRealm(registry, clock),
        registry,
        registry.clock,
        registry.metrics,
        loginTimeout=30,
    )
    served = await harness.serve(root=timed)
    idle = connectFrom(reactor, served, "127.0.0.6")
    await idle.getRootObject()
    busy = connectFrom(reactor, served, "127.0.0.7")
    await loginOn(busy, b"wonderland")
    clock.advance(29)
    assert not served.factory.made[0].disconnected
    clock.advance(1)
    await disconnection(reactor, served.factory.made[0])
    assert not served.factory.made[1].disconnected  # logged in: stays
    assert any("no login within 30 s" in m for m in log.messages())
    assert not clock.getDelayedCalls()
    idle.disconnect()
    busy.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_readme_fail2ban_filter_matches_failed_logins(harness, log):
    """
    The README's fail2ban filter, with fail2ban's <HOST> as a group, matches
    the line a failed login logs, and no other refusal.
    """
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    failregex = re.search(r"^failregex = (.*)$", readme, re.MULTILINE).group(1)
    pattern = re.compile(failregex.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))

    served = await harness.serve("limited", maxPerUser=1)
    with pytest.raises(BadCredentials):
        await served.login("alice", "guess")
    await served.login("alice")
    with pytest.raises(TooManyConnections):
        await served.login("alice")
    matched = [m for m in log.messages() if pattern.search(m)]
    assert len(matched) == 1
    assert pattern.search(matched[0]).group("host") == "127.0.0.1"
    ipv6 = matched[0].replace("127.0.0.1:", "[2001:db8::1]:")
    assert pattern.search(ipv6).group("host") == "2001:db8::1"


@pytest_twisted.ensureDeferred
async def test_stalled_connections_cannot_starve_others(harness, reactor, log):
    """
    Slowloris: more stalled connections from one address than it may have
    unauthenticated; a canary from another address still logs in, and once
    the login timeout passes every stalled descriptor is closed.
    """
    clock = task.Clock()
    registry = SessionRegistry(clock, realm="tracking")
    base = harness.makeRoot("tracking")
    root = LoginRoot(
        base.checker,
        TrackingRealm(registry, clock),
        registry,
        registry.clock,
        registry.metrics,
        loginTimeout=30,
        maxUnauthenticated=3,
    )
    served = await harness.serve(root=root)
    baseline = len(os.listdir("/proc/self/fd"))

    closed: list[defer.Deferred] = []

    class Stall(protocol.Protocol):
        def connectionMade(self):
            self.lost = defer.Deferred()
            closed.append(self.lost)

        def connectionLost(self, reason):
            self.lost.callback(None)

    for _ in range(8):
        await protocol.ClientCreator(reactor, Stall).connectTCP(
            "127.0.0.1", served.port.getHost().port, bindAddress=("127.0.0.8", 0)
        )
    # Three are let in; the other five are closed as they are accepted.
    # Which five close is not known in advance: polled.
    await eventually(reactor, lambda: sum(d.called for d in closed) == 5)
    assert len(served.factory.made) == 3
    assert root.unauthenticated == {"127.0.0.8": 3}

    canary = connectFrom(reactor, served, "127.0.0.2")
    perspective = await loginOn(canary, b"wonderland")
    assert await perspective.callRemote("greet") == "<1>hello alice"
    assert root.unauthenticated == {"127.0.0.8": 3}  # the canary logged in

    clock.advance(30)
    await defer.gatherResults(closed)
    assert root.unauthenticated == {}
    canary.disconnect()
    await served.settled()
    # Descriptors close in the kernel's time, with nothing to tell: polled.
    await eventually(reactor, lambda: len(os.listdir("/proc/self/fd")) == baseline)


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_total_are_closed_at_once(harness, reactor):
    base = harness.makeRoot("tracking")
    served = await harness.serve(root=base)
    served.factory.maxConnections = 2
    first = connectFrom(reactor, served, "127.0.0.10")
    second = connectFrom(reactor, served, "127.0.0.11")
    await first.getRootObject()
    await second.getRootObject()

    lost: defer.Deferred = defer.Deferred()

    class Probe(protocol.Protocol):
        def connectionLost(self, reason):
            lost.callback(None)

    await protocol.ClientCreator(reactor, Probe).connectTCP(
        "127.0.0.1", served.port.getHost().port, bindAddress=("127.0.0.12", 0)
    )
    await lost
    assert len(served.factory.made) == 2
    first.disconnect()
    await disconnection(reactor, served.factory.made[0])
    assert len(served.factory.brokers) == 1
    third = connectFrom(reactor, served, "127.0.0.12")
    await loginOn(third, b"wonderland")
    second.disconnect()
    third.disconnect()


@pytest_twisted.ensureDeferred
async def test_pipelined_guesses_cannot_outrun_the_tries(guarded, reactor):
    serve, _, _ = guarded
    served = await serve(maxAuthTries=3)
    factory = connectFrom(reactor, served, "127.0.0.13")
    root = await factory.getRootObject()
    # As many challenges as a connection may hold (MAX_CHALLENGES).
    challenges = [await root.callRemote("login", b"alice") for _ in range(4)]
    guesses = [b"guess"] * 4
    guesses[3] = b"wonderland"  # the right one, after the limit
    answers = [
        challenger.callRemote("respond", pb.respond(challenge, guess), None)
        for (challenge, challenger), guess in zip(challenges, guesses, strict=True)
    ]
    results = await defer.DeferredList(answers, consumeErrors=True)
    refused = [f for ok, f in results if not ok and f.check(pb.PBConnectionLost) is None]
    assert len(refused) == 3  # the rest were never read
    assert all(ok is False for ok, _ in results)
    assert served.registry.countOf("alice") == 0
    factory.disconnect()


def test_ipv4_clients_of_a_dual_stack_socket_are_seen_as_ipv4():
    from twisted.internet.address import IPv6Address

    from pbrealms.addresses import sourceOf

    assert sourceOf(IPv6Address("TCP", "::ffff:127.0.0.1", 5)) == "127.0.0.1"
    assert sourceOf(IPv6Address("TCP", "2001:db8::1", 5)) == "2001:db8::1"
    penalties = SourcePenalties(task.Clock(), exempt=parseNetworks("127.0.0.0/8"))
    assert penalties.isExempt(sourceOf(IPv6Address("TCP", "::ffff:127.0.0.60", 5)))


@pytest_twisted.ensureDeferred
async def test_a_refused_client_hears_so_at_once(guarded, reactor):
    from pbrealms.client import connect

    serve, _, penalties = guarded
    served = await serve()
    for _ in range(3):
        penalties.failed("127.0.0.1")
    started = reactor.seconds()
    with pytest.raises(
        SourcePenalised, match=r"^too many failed logins from this address: try again in 15 s$"
    ):
        await connect(reactor, served.endpoint, "alice", "wonderland", timeout=5)
    assert reactor.seconds() - started < 1
