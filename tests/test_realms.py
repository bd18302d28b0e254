"""
Each realm's behaviour on the wire, over real loopback TCP.
"""

import pytest
import pytest_twisted
from conftest import Arrivals, ending, eventually, nextLogout
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.spread import pb

from pbrealms.client import ClientMind
from pbrealms.errors import (
    BadArguments,
    BadCredentials,
    MindRequired,
    TooManyConnections,
    UnknownMethod,
    localize,
)


@pytest_twisted.ensureDeferred
async def test_cache_counts_greetings_across_connections_past_and_present(harness):
    served = await harness.serve("cache")
    first = await served.login("alice")
    assert await first.callRemote("greet") == "<1>hello alice"
    second = await served.login("alice")
    assert await second.callRemote("greet") == "<2>hello alice"
    await first.disconnect()
    await second.disconnect()
    third = await served.login("alice")
    assert await third.callRemote("greet") == "<3>hello alice"
    assert await third.callRemote("status") == {
        "realm": "cache",
        "user": "alice",
        "greetings": 3,
    }
    bob = await served.login("bob")
    assert await bob.callRemote("greet") == "<1>hello bob"


@pytest_twisted.ensureDeferred
async def test_cache_serves_one_avatar_per_user(harness):
    served = await harness.serve("cache")
    await served.login("alice")
    await served.login("alice")
    await served.login("bob")
    assert served.realm.cachedUsers() == ["alice", "bob"]
    alice = served.realm.avatarFor("alice", None)
    assert served.realm.avatarFor("alice", None) is alice
    assert served.realm.avatarFor("bob", None) not in (alice, None)


@pytest_twisted.ensureDeferred
async def test_a_challenge_takes_one_answer(harness, reactor):
    served = await harness.serve("tracking")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    root = await factory.getRootObject()
    challenge, challenger = await root.callRemote("login", b"alice")
    response = pb.respond(challenge, b"wonderland")
    first = await challenger.callRemote("respond", response, None)
    assert await first.callRemote("greet") == "<1>hello alice"
    with pytest.raises(BadCredentials):
        await challenger.callRemote("respond", response, None).addErrback(localize)
    assert served.registry.countOf("alice") == 1
    factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_refused_login_that_wants_no_answer_logs_no_traceback(harness, reactor, log):
    served = await harness.serve("cache")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    root = await factory.getRootObject()
    challenge, challenger = await root.callRemote("login", b"alice")
    challenger.callRemote("respond", pb.respond(challenge, b"wrong"), None, pbanswer=False)
    # A log line, with no event of its own: polled.
    await eventually(reactor, lambda: any("login refused" in m for m in log.messages()))
    import gc

    gc.collect()  # an unhandled failure would be logged now
    assert not log.errors()
    factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_shared_state_counts_user_total_and_connection_own(harness):
    served = await harness.serve("shared-state")
    first = await served.login("alice")
    second = await served.login("alice")
    assert await first.callRemote("greet") == "<1>hello alice"
    assert await first.callRemote("greet") == "<2>hello alice"
    assert await second.callRemote("greet") == "<3>hello alice"
    assert await first.callRemote("status") == {
        "realm": "shared-state",
        "user": "alice",
        "greetings": 3,
        "session_greetings": 2,
    }
    status = await second.callRemote("status")
    assert (status["greetings"], status["session_greetings"]) == (3, 1)


@pytest_twisted.ensureDeferred
async def test_tracking_counts_open_sessions_on_every_path(harness, reactor):
    served = await harness.serve("tracking")
    first = await served.login("alice")
    second = await served.login("alice")
    assert (await first.callRemote("status"))["sessions"] == 2

    # A clean disconnect.
    secondSession = served.registry.sessionsOf("alice")[1]
    await second.disconnect()
    await ending(reactor, secondSession)
    assert served.registry.countOf("alice") == 1
    assert (await first.callRemote("status"))["sessions"] == 1

    # An aborted connection.
    third = await served.login("alice")
    assert (await first.callRemote("status"))["sessions"] == 2
    thirdSession = served.registry.sessionsOf("alice")[1]
    third.perspective.broker.transport.abortConnection()
    await ending(reactor, thirdSession)
    assert served.registry.countOf("alice") == 1
    assert (await first.callRemote("status"))["sessions"] == 1


@pytest_twisted.ensureDeferred
async def test_dropping_the_avatar_reference_ends_the_session(harness, reactor):
    served = await harness.serve("tracking")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    from twisted.cred.credentials import UsernamePassword

    perspective = await factory.login(UsernamePassword(b"alice", b"wonderland"))
    assert await perspective.callRemote("greet") == "<1>hello alice"
    assert served.registry.countOf("alice") == 1
    broker = perspective.broker
    (session,) = served.registry.sessionsOf("alice")
    del perspective  # the client sends a decref
    await ending(reactor, session)
    assert served.registry.countOf("alice") == 0
    # The connection is still open, and another login on it works.
    assert not broker.disconnected
    again = await factory.login(UsernamePassword(b"alice", b"wonderland"))
    assert await again.callRemote("greet") == "<2>hello alice"
    assert served.registry.countOf("alice") == 1
    factory.disconnect()
    await served.settled()
    assert served.registry.countOf("alice") == 0
    # The closed sessions left nothing behind on the connection.
    assert not served.factory.made[0]._localCleanup


@pytest_twisted.ensureDeferred
async def test_limited_refuses_login_beyond_max_with_typed_error(harness, log):
    served = await harness.serve("limited", maxPerUser=2)
    await served.login("alice")
    second = await served.login("alice")
    with pytest.raises(TooManyConnections) as refused:
        await served.login("alice")
    assert isinstance(refused.value, UnauthorizedLogin)
    assert isinstance(refused.value, pb.Error)
    assert "at most 2 sessions per user" in str(refused.value)
    assert (await second.callRemote("status"))["sessions"] == 2
    assert (await second.callRemote("status"))["max"] == 2
    # Another user has slots of their own.
    await served.login("bob")
    refusals = [m for m in log.messages() if "login refused" in m]
    assert len(refusals) == 1
    assert "too many connections" in refusals[0]
    assert not [e for e in log if "log_failure" in e]


@pytest_twisted.ensureDeferred
async def test_limited_admits_exactly_n_of_2n_concurrent_logins(harness, reactor):
    n = 3
    served = await harness.serve("limited", maxPerUser=n)
    attempts = [defer.ensureDeferred(served.login("alice")) for _ in range(2 * n)]
    results = await defer.DeferredList(attempts, consumeErrors=True)
    admitted = [conn for ok, conn in results if ok]
    refused = [f for ok, f in results if not ok]
    assert len(admitted) == n
    assert len(refused) == n
    assert all(f.check(TooManyConnections) for f in refused)
    assert served.registry.countOf("alice") == n

    logout = nextLogout(reactor, served.registry)
    await admitted[0].disconnect()
    await logout
    assert served.registry.countOf("alice") == n - 1
    late = await served.login("alice")
    assert await late.callRemote("greet") == "<1>hello alice"
    with pytest.raises(TooManyConnections):
        await served.login("alice")


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_refused_with_one_log_line(harness, log):
    served = await harness.serve("cache")
    with pytest.raises(BadCredentials) as refused:
        await served.login("alice", "not-the-password")
    assert isinstance(refused.value, UnauthorizedLogin)
    with pytest.raises(BadCredentials):
        await served.login("mallory", "guess")
    refusals = [m for m in log.messages() if "login refused" in m]
    assert len(refusals) == 2
    assert "'alice' from 127.0.0.1:" in refusals[0]
    assert "wrong user name or password" in refusals[0]
    assert "'mallory'" in refusals[1]
    assert served.registry.countOf("alice") == 0


@pytest_twisted.ensureDeferred
async def test_bad_remote_calls_get_typed_errors_and_log_nothing(harness, log):
    served = await harness.serve("cache")
    conn = await served.login("alice")
    with pytest.raises(UnknownMethod):
        await conn.callRemote("nonexistent")
    with pytest.raises(BadArguments) as bad:
        await conn.callRemote("greet", 1, 2)
    assert "greet" in str(bad.value)
    with pytest.raises(BadArguments):
        await conn.callRemote("status", surprise=True)
    # The session is unharmed.
    assert await conn.callRemote("greet") == "<1>hello alice"
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_tracebacks_never_cross_the_wire(harness):
    served = await harness.serve("cache")
    assert served.factory.unsafeTracebacks is False
    conn = await served.login("alice")
    with pytest.raises(UnknownMethod) as error:
        await conn.callRemote("nonexistent")
    assert "Traceback (most recent" not in str(error.value)


@pytest_twisted.ensureDeferred
async def test_clock_pushes_the_time_over_tcp(harness, reactor):
    served = await harness.serve("clock", period=0.05)
    times = Arrivals()
    conn = await served.login("alice", mind=ClientMind(times))
    await times.waitFor(reactor, 3)
    assert times == sorted(times)
    assert all(abs(t - reactor.seconds()) < 5 for t in times)
    assert await conn.callRemote("setperiod", 0.1) == 0.1
    status = await conn.callRemote("status")
    assert (status["realm"], status["period"]) == ("clock", 0.1)
    assert await conn.callRemote("greet") == "<1>hello alice"


@pytest_twisted.ensureDeferred
async def test_clock_refuses_bad_periods_with_typed_error(harness):
    from pbrealms.errors import InvalidPeriod

    served = await harness.serve("clock", period=1.0)
    conn = await served.login("alice", mind=ClientMind())
    for bad in ("1", None, True, float("nan"), float("inf"), -1.0, 0, 0.001, 1e9, [1]):
        with pytest.raises(InvalidPeriod):
            await conn.callRemote("setperiod", bad)
    assert (await conn.callRemote("status"))["period"] == 1.0


@pytest_twisted.ensureDeferred
async def test_clock_refuses_a_login_without_a_mind(harness, log):
    served = await harness.serve("clock")
    with pytest.raises(MindRequired) as refused:
        await served.login("alice")
    assert "client object" in str(refused.value)
    assert served.registry.countOf("alice") == 0
    assert any("needs a client object" in m for m in log.messages())


@pytest_twisted.ensureDeferred
async def test_clock_client_that_vanished_causes_no_error(harness, reactor, log):
    served = await harness.serve("clock", period=0.05)
    times = Arrivals()
    conn = await served.login("alice", mind=ClientMind(times))
    await times.waitFor(reactor)
    (session,) = served.registry.sessionsOf("alice")
    conn.perspective.broker.transport.abortConnection()
    await ending(reactor, session)
    assert served.registry.countOf("alice") == 0
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_strcred_file_checker_serves_pb_logins(harness, passwd):
    from twisted.cred import strcred

    from pbrealms.login import LoginRoot

    root = harness.makeRoot("tracking")
    checker = strcred.makeChecker(f"file:{passwd}")
    served = await harness.serve(
        root=LoginRoot(
            checker, root.realm, root.registry, root.registry.clock, root.registry.metrics
        )
    )
    conn = await served.login("alice")
    assert await conn.callRemote("greet") == "<1>hello alice"
    assert (await conn.callRemote("status"))["user"] == "alice"
    with pytest.raises(BadCredentials):
        await served.login("alice", "wrong")
