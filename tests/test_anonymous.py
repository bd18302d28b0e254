"""
Anonymous login, as stock PB clients ask for it: refused with a typed
UnauthorizedLogin, as a portal without an anonymous checker refuses it.
"""

import pytest_twisted
from conftest import counted, disconnection
from twisted.cred.credentials import Anonymous, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.errors import AnonymousRefused, SourcePenalised, localize
from pbrealms.guard import SourcePenalties

REFUSED = "anonymous login is not allowed"


def connectRaw(harness, served) -> pb.PBClientFactory:
    factory = pb.PBClientFactory()
    port = served.port.getHost().port
    harness.connectors.append(harness.reactor.connectTCP("127.0.0.1", port, factory))
    return factory


async def refusal(d):
    failures: list = []
    await d.addCallbacks(lambda result: failures.append(result), failures.append)
    (failure,) = failures
    assert isinstance(failure, Failure), f"not refused: {failure}"
    return failure


@pytest_twisted.ensureDeferred
async def test_anonymous_login_is_refused_as_an_unauthorized_login(harness, log):
    served = await harness.serve("limited", maxPerUser=1)
    factory = connectRaw(harness, served)
    failure = await refusal(factory.login(Anonymous()))
    # What a client that only knows Twisted sees: an UnauthorizedLogin.
    assert failure.check(UnauthorizedLogin)
    assert failure.getErrorMessage() == REFUSED
    assert isinstance(localize(failure).value, AnonymousRefused)
    assert not failure.frames  # and no stack frames
    # One line, no traceback (the log fixture fails on any error logged).
    (broker,) = served.factory.made
    peer = f"127.0.0.1:{broker.transport.getPeer().port}"
    assert [m for m in log.messages() if "anonymous" in m] == [
        f"login refused for an anonymous client from {peer} (realm limited): {REFUSED}"
    ]
    assert counted(served.registry.metrics, "logins", outcome="refused") == 1
    # The connection stays, and a login with a password goes through on it.
    perspective = await factory.login(UsernamePassword(b"alice", b"wonderland"))
    assert await perspective.callRemote("greet") == "<1>hello alice"


@pytest_twisted.ensureDeferred
async def test_anonymous_logins_count_against_the_connection(harness, reactor, log):
    served = await harness.serve()
    served.root.maxAuthTries = 3
    factory = connectRaw(harness, served)
    for _ in range(3):
        failure = await refusal(factory.login(Anonymous()))
        assert localize(failure).check(AnonymousRefused)
    (broker,) = served.factory.made
    await disconnection(reactor, broker)  # its tries are used up
    lines = [m for m in log.messages() if "anonymous" in m or "refused logins" in m]
    assert len(lines) == 2, lines  # the first refusal, and the close
    peer = f"127.0.0.1:{broker.transport.getPeer().port}"
    assert lines[1] == f"closing the connection from {peer}: 3 refused logins"


@pytest_twisted.ensureDeferred
async def test_anonymous_logins_penalise_their_address(harness, reactor, log):
    """
    Each connection's first anonymous refusal is a log line: were they not
    failed logins, an address could write two lines per connection for
    ever.  Three penalise it, as three bad passwords do; then its
    connections, this one included, are turned away without a line.
    """
    served = await harness.serve()
    served.root.maxAuthTries = 6
    served.root.penalties = penalties = SourcePenalties(task.Clock())
    factory = connectRaw(harness, served)
    for _ in range(3):
        failure = await refusal(factory.login(Anonymous()))
        assert localize(failure).check(AnonymousRefused)
    assert penalties.penalty("127.0.0.1") == 15
    failure = await refusal(factory.login(Anonymous()))
    assert localize(failure).check(SourcePenalised)
    (broker,) = served.factory.made
    await disconnection(reactor, broker)
    for _ in range(5):
        failure = await refusal(connectRaw(harness, served).login(Anonymous()))
        assert localize(failure).check(SourcePenalised)
    await defer.gatherResults([disconnection(reactor, b) for b in served.factory.made])
    peer = f"127.0.0.1:{broker.transport.getPeer().port}"
    assert [m for m in log.messages() if "127.0.0.1" in m and "starting" not in m] == [
        f"login refused for an anonymous client from {peer} (realm cache): {REFUSED}",
        "refusing logins from 127.0.0.1 for at least 15 s: too many failed logins",
    ]
