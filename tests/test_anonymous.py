"""
Anonymous login, as stock PB clients ask for it: refused with a typed
UnauthorizedLogin, as a portal without an anonymous checker refuses it.
"""

import pytest_twisted
from conftest import eventually
from twisted.cred.credentials import Anonymous, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.errors import AnonymousRefused, localize
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
    assert served.registry.metrics.logins.labels("refused")._value.get() == 1
    # The connection stays, and a login with a password goes through on it.
    perspective = await factory.login(UsernamePassword(b"alice", b"wonderland"))
    assert await perspective.callRemote("greet") == "<1>hello alice"


@pytest_twisted.ensureDeferred
async def test_anonymous_logins_count_against_the_connection_not_the_address(harness, reactor, log):
    served = await harness.serve()
    served.root.maxAuthTries = 3
    served.root.penalties = penalties = SourcePenalties(task.Clock(), perFailure=5, threshold=5)
    factory = connectRaw(harness, served)
    for _ in range(3):
        failure = await refusal(factory.login(Anonymous()))
        assert localize(failure).check(AnonymousRefused)
    (broker,) = served.factory.made
    await eventually(reactor, lambda: broker.disconnected)  # its tries are used up
    assert penalties.penalty("127.0.0.1") == 0  # no password was guessed
    lines = [m for m in log.messages() if "anonymous" in m or "failed logins" in m]
    assert len(lines) == 2, lines  # the first refusal, and the close
    assert lines[1].endswith(": 3 failed logins")
    # The address is not penalised: another connection logs in.
    other = await served.login("alice")
    assert await other.callRemote("greet") == "<1>hello alice"
