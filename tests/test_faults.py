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
from conftest import USERS, ending, nextLogin
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.spread import pb

from pbrealms.client import ClientMind
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


class SlowLogin:
    """
    A limited realm (one session per user) behind a late checker and realm,
    and a client that logs in step by step so that it can drop at any point.
    """

    def __init__(self, reactor, served, checker: LateChecker, realm: LateRealm) -> None:
        self.reactor = reactor
        self.served = served
        self.checker = checker
        self.realm = realm
        self.factory = pb.PBClientFactory()

    async def connect(self):
        port = self.served.port.getHost().port
        self.reactor.connectTCP("127.0.0.1", port, self.factory)
        return await self.factory.getRootObject()

    async def start(self, password: str = USERS["alice"]) -> defer.Deferred:
        """
        Ask for a challenge and respond.  The answer is the perspective, or
        L{None} if the connection was lost first.
        """
        root = await self.connect()
        challenge, challenger = await root.callRemote("login", b"alice")
        answer = challenger.callRemote("respond", pb.respond(challenge, password.encode()), None)
        answer.addErrback(lambda f: None if f.check(pb.PBConnectionLost) else localize(f))
        return answer

    async def passChecker(self) -> None:
        await self.checker.called
        self.checker.release()

    async def passRealm(self) -> None:
        await self.realm.called
        self.realm.release()

    async def drop(self) -> None:
        self.factory.disconnect()
        await self.served.settled()

    async def assertRecovered(self) -> None:
        """
        No session is left open, every avatar created was logged out, and
        the user's one slot is free again.
        """
        await self.served.settled()
        assert self.served.registry.countOf("alice") == 0
        assert self.realm.logouts == self.realm.created
        # Answer at once from now on.
        self.served.root.checker = self.checker.checker
        self.served.root.realm = self.realm.realm
        conn = await self.served.login("alice")
        assert (await conn.callRemote("status"))["sessions"] == 1


@pytest_twisted.async_yield_fixture()
async def slow(harness, reactor):
    root = harness.makeRoot("limited", maxPerUser=1)
    checker = LateChecker(root.checker)
    realm = LateRealm(root.realm)
    served = await harness.serve(
        root=LoginRoot(checker, realm, root.registry, root.registry.clock, root.registry.metrics)
    )
    login = SlowLogin(reactor, served, checker, realm)
    yield login
    login.factory.disconnect()


@pytest_twisted.ensureDeferred
async def test_drop_before_responding(slow, log):
    root = await slow.connect()
    await root.callRemote("login", b"alice")
    await slow.drop()
    assert not slow.checker.waiting and slow.realm.created == 0
    await slow.assertRecovered()
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_drop_while_the_checker_runs(slow, log):
    await slow.start()
    await slow.checker.called
    await slow.drop()
    slow.checker.release()
    assert slow.realm.created == 0
    await slow.assertRecovered()
    assert any("abandoned" in m for m in log.messages())


@pytest_twisted.ensureDeferred
async def test_drop_while_the_realm_runs(slow):
    await slow.start()
    await slow.passChecker()
    await slow.realm.called
    # The slot is taken while the realm works.
    assert slow.served.registry.countOf("alice") == 1
    await slow.drop()
    slow.realm.release()
    assert (slow.realm.created, slow.realm.logouts) == (1, 1)
    await slow.assertRecovered()


@pytest_twisted.ensureDeferred
async def test_drop_after_the_login_completed(slow):
    answer = await slow.start()
    await slow.passChecker()
    await slow.passRealm()
    perspective = await answer
    assert await perspective.callRemote("greet") == "<1>hello alice"
    perspective.broker.transport.abortConnection()
    await slow.served.settled()
    assert (slow.realm.created, slow.realm.logouts) == (1, 1)
    await slow.assertRecovered()


@pytest_twisted.ensureDeferred
async def test_refused_login_while_the_checker_runs(slow):
    answer = await slow.start(password="wrong")
    await slow.passChecker()
    with pytest.raises(BadCredentials):
        await answer
    assert slow.realm.created == 0
    await slow.drop()
    await slow.assertRecovered()


@pytest_twisted.ensureDeferred
async def test_many_logins_on_one_connection_leave_nothing_behind(harness, reactor):
    served = await harness.serve("tracking")
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", served.port.getHost().port, factory)
    await factory.getRootObject()
    broker = served.factory.made[0]
    notifiers = len(broker.disconnects)  # the factory's and the harness's own
    for _ in range(20):
        perspective = await factory.login(UsernamePassword(b"alice", b"wonderland"))
        await perspective.callRemote("greet")
        assert len(broker.disconnects) == notifiers + 1
        (session,) = served.registry.sessionsOf("alice")
        del perspective
        await ending(reactor, session)
        assert served.registry.countOf("alice") == 0
    # Nothing is left per login.
    assert len(broker.disconnects) == notifiers
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
    login = nextLogin(reactor, served.registry, 15)
    client = subprocess.Popen([sys.executable, "-c", CLIENT, port])
    try:
        session = await login
        assert served.registry.countOf("alice") == 1
        os.kill(client.pid, signal.SIGKILL)
    finally:
        client.kill()
        client.wait(10)
    await ending(reactor, session)
    assert served.registry.countOf("alice") == 0
    conn = await served.login("alice", mind=ClientMind())
    assert await conn.callRemote("greet") == "<1>hello alice"
    assert not log.errors()
