"""
Login challenges over real loopback TCP: a connection holds a few at most,
however many it asks for and never answers (issue #10, point 12).
"""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from conftest import eventually
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.spread import pb

from pbrealms.errors import LoginRefused, localize
from pbrealms.guard import SourcePenalties
from pbrealms.login import MAX_CHALLENGES, MAX_NAME_BYTES, _Challenger

#: How many challenges the hostile client asks for on one connection.
ASKED = 1000


def challengersOf(broker: pb.Broker) -> int:
    """
    How many challenges the server holds for C{broker}'s client.
    """
    return sum(isinstance(local.object, _Challenger) for local in broker.localObjects.values())


async def connectRaw(harness, served) -> tuple[pb.PBClientFactory, pb.RemoteReference]:
    factory = pb.PBClientFactory()
    port = served.port.getHost().port
    harness.connectors.append(harness.reactor.connectTCP("127.0.0.1", port, factory))
    return factory, await factory.getRootObject()


@pytest_twisted.ensureDeferred
async def test_a_connection_holds_at_most_a_few_unanswered_challenges(harness, reactor, log):
    served = await harness.serve()
    served.root.penalties = penalties = SourcePenalties(reactor)
    served.root.maxAuthTries = 2
    factory, root = await connectRaw(harness, served)
    (broker,) = served.factory.made

    # A hostile client: asks again and again, answers none, keeps them all.
    calls = [root.callRemote("login", b"alice").addErrback(localize) for _ in range(ASKED)]
    results = await defer.DeferredList(calls, consumeErrors=True)
    held = [result for ok, result in results if ok]
    refusals = [result for ok, result in results if not ok]
    assert len(held) == MAX_CHALLENGES == 4
    assert challengersOf(broker) == MAX_CHALLENGES
    assert len(refusals) == ASKED - MAX_CHALLENGES
    for refusal in refusals:
        assert refusal.check(LoginRefused)
        assert refusal.getErrorMessage() == "at most 4 login challenges at once on a connection"
    # No failed login: neither the connection nor its address is charged.
    assert broker.localObjectForID(b"root").failures == 0
    assert penalties.penalty("127.0.0.1") == 0
    assert not broker.disconnected
    lines = [m for m in log.messages() if "login challenges" in m]
    assert lines == [
        f"refusing login challenges to 127.0.0.1:{broker.transport.getPeer().port}:"
        " it holds 4 already"
    ]

    # Another connection logs in as usual.
    other = await served.login("bob")
    assert await other.callRemote("greet") == "<1>hello bob"
    # The challenges held are good ones.
    challenge, challenger = held[0]
    alice = await challenger.callRemote("respond", pb.respond(challenge, b"wonderland"), None)
    assert await alice.callRemote("greet") == "<1>hello alice"

    # Once the client lets them go, the connection gets challenges again.
    del calls, results, held, challenge, challenger
    gc.collect()
    # Freed by the client's decrefs, which nothing reports: polled.
    await eventually(reactor, lambda: challengersOf(broker) == 0)
    assert broker.localObjectForID(b"root").challenges == 0
    bob = await factory.login(UsernamePassword(b"bob", b"builder"))
    assert await bob.callRemote("greet") == "<2>hello bob"
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_a_client_logging_in_again_and_again_is_never_refused_a_challenge(harness):
    served = await harness.serve()
    factory, _ = await connectRaw(harness, served)
    credentials = UsernamePassword(b"alice", b"wonderland")
    for _ in range(3 * MAX_CHALLENGES):
        perspective = await factory.login(credentials)
    assert (await perspective.callRemote("greet")).endswith("hello alice")
    (broker,) = served.factory.made
    assert challengersOf(broker) <= 1


@pytest_twisted.ensureDeferred
async def test_a_name_too_long_gets_no_challenge(harness):
    served = await harness.serve()
    _, root = await connectRaw(harness, served)
    with pytest.raises(LoginRefused, match=f"at most {MAX_NAME_BYTES} bytes"):
        await root.callRemote("login", b"a" * (MAX_NAME_BYTES + 1)).addErrback(localize)
    (broker,) = served.factory.made
    assert challengersOf(broker) == 0
    assert broker.localObjectForID(b"root").failures == 0
