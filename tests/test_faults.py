"""
Sessions end exactly once, whatever happens: a checker and a realm that
answer late (Deferreds fired by the test), with the client aborting its
connection before, during and after them; and a client process killed.
"""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import pytest_twisted
from conftest import USERS, eventually
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.spread import pb

from pbrealms.client import ClockListener
from pbrealms.errors import BadCredentials, localize
from pbrealms.login import LoginRoot


class LateChecker:
    """
    A checker whose answers wait until the test releases them.
    """

    def __init__(self, checker) -> None:
        self.checker = checker
        self.credentialInterfaces = checker.credentialInterfaces
        self.called: defer.Deferred = defer.Deferred()
        self.waiting: list[defer.Deferred] = []

    def requestAvatarId(self, credentials):
        answer = self.checker.requestAvatarId(credentials)
        held: defer.Deferred = defer.Deferred()
        self.waiting.append(held)
        held.addCallback(lambda _: answer)
        if not self.called.called:
            self.called.callback(None)
        return held

    def release(self) -> None:
        self.waiting.pop(0).callback(None)


class LateRealm:
    """
    A realm whose avatars wait until the test releases them, and that counts
    the logouts of each avatar it handed out.
    """

    def __init__(self, realm) -> None:
        self.realm = realm
        self.called: defer.Deferred = defer.Deferred()
        self.waiting: list[defer.Deferred] = []
        self.created = 0
        self.logouts = 0

    def requestAvatar(self, avatarId, mind, *interfaces):
        iface, avatar, logout = self.realm.requestAvatar(avatarId, mind, *interfaces)
        self.created += 1

        def counted():
            self.logouts += 1
            logout()

        held: defer.Deferred = defer.Deferred()
        held.addCallback(lambda _: (iface, avatar, counted))
        self.waiting.append(held)
        if not self.called.called:
            self.called.callback(None)
        return held

    def release(self) -> None:
        self.waiting.pop(0).callback(None)


async def startLogin(reactor, served, password=USERS["alice"]):
    """
    Log in step by step: get the root, ask for a challenge, respond.

    @return: the client factory and the Deferred of the response.
    """
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    root = await factory.getRootObject()
    challenge, challenger = await root.callRemote("login", b"alice")
    response = pb.respond(challenge, password.encode())
    answer = challenger.callRemote("respond", response, None)
    answer.addErrback(lambda f: None if f.check(pb.PBConnectionLost) else localize(f))
    return factory, answer


@pytest.fixture
def late(harness):
    root = harness.makeRoot("limited", maxPerUser=1)
    checker = LateChecker(root.checker)
    realm = LateRealm(root.realm)
    return LoginRoot(checker, realm, root.registry), checker, realm


async def assertRecovered(served, reactor, realm=None):
    """
    No session is left open, and the one slot of the user is free again.
    """
    await served.settled()
    assert served.registry.countOf("alice") == 0
    if realm is not None:
        assert realm.logouts == realm.created
        # Answer at once from now on.
        served.root.checker = served.root.checker.checker
        served.root.realm = realm.realm
    conn = await served.login("alice")
    assert (await conn.callRemote("status"))["sessions"] == 1


@pytest_twisted.ensureDeferred
async def test_drop_before_responding(harness, reactor, late, log):
    root, checker, realm = late
    served = await harness.serve(root=root)
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    rootObject = await factory.getRootObject()
    await rootObject.callRemote("login", b"alice")
    factory.disconnect()
    await served.settled()
    assert not checker.waiting and realm.created == 0
    await assertRecovered(served, reactor, realm)
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_drop_while_the_checker_runs(harness, reactor, late, log):
    root, checker, realm = late
    served = await harness.serve(root=root)
    factory, _ = await startLogin(reactor, served)
    await checker.called
    factory.disconnect()
    await served.settled()
    checker.release()
    assert realm.created == 0
    await assertRecovered(served, reactor, realm)
    assert any("abandoned" in m for m in log.messages())


@pytest_twisted.ensureDeferred
async def test_drop_while_the_realm_runs(harness, reactor, late, log):
    root, checker, realm = late
    served = await harness.serve(root=root)
    factory, _ = await startLogin(reactor, served)
    await checker.called
    checker.release()
    await realm.called
    # The slot is taken while the realm works.
    assert served.registry.countOf("alice") == 1
    factory.disconnect()
    await served.settled()
    realm.release()
    assert (realm.created, realm.logouts) == (1, 1)
    await assertRecovered(served, reactor, realm)


@pytest_twisted.ensureDeferred
async def test_drop_after_the_login_completed(harness, reactor, late, log):
    root, checker, realm = late
    served = await harness.serve(root=root)
    _factory, answer = await startLogin(reactor, served)
    await checker.called
    checker.release()
    await realm.called
    realm.release()
    perspective = await answer
    assert await perspective.callRemote("greet") == "<1>hello alice"
    perspective.broker.transport.abortConnection()
    await served.settled()
    assert (realm.created, realm.logouts) == (1, 1)
    await assertRecovered(served, reactor, realm)


@pytest_twisted.ensureDeferred
async def test_refused_login_while_the_checker_runs(harness, reactor, late, log):
    root, checker, realm = late
    served = await harness.serve(root=root)
    factory, answer = await startLogin(reactor, served, password="wrong")
    await checker.called
    checker.release()
    with pytest.raises(BadCredentials):
        await answer
    assert realm.created == 0
    factory.disconnect()
    await assertRecovered(served, reactor, realm)


@pytest_twisted.ensureDeferred
async def test_many_logins_on_one_connection_leave_nothing_behind(harness, reactor):
    served = await harness.serve("tracking")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    for _ in range(20):
        perspective = await factory.login(UsernamePassword(b"alice", b"wonderland"))
        await perspective.callRemote("greet")
        del perspective
        await eventually(reactor, lambda: served.registry.countOf("alice") == 0)
    broker = served.factory.brokers[0]
    # One disconnect notifier is PB's own (the harness's); none per login.
    assert len(broker.disconnects) == 1
    assert not broker._localCleanup
    factory.disconnect()


CLIENT = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.spread import pb
    from twisted.cred.credentials import UsernamePassword

    class Mind(pb.Referenceable):
        def remote_notifyTime(self, t):
            pass

    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", int(sys.argv[1]), factory)
    held = []  # keep the perspective: dropping it would log out
    login = factory.login(UsernamePassword(b"alice", b"wonderland"), client=Mind())
    login.addCallback(held.append)
    reactor.run()
    """
)


@pytest.mark.parametrize("realm", ["limited", "clock"])
@pytest_twisted.ensureDeferred
async def test_client_process_killed(harness, reactor, log, realm):
    served = await harness.serve(realm, **({"maxPerUser": 1} if realm == "limited" else {}))
    port = str(served.port.getHost().port)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, port])
    try:
        await eventually(reactor, lambda: served.registry.countOf("alice") == 1, timeout=15)
        os.kill(client.pid, signal.SIGKILL)
    finally:
        client.kill()
        client.wait(10)
    await eventually(reactor, lambda: served.registry.countOf("alice") == 0)
    conn = await served.login("alice", mind=ClockListener(lambda t: None))
    assert await conn.callRemote("greet") == "<1>hello alice"
    assert not log.errors()
