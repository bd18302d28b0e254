"""
Shared fixtures: the reactor, a log that fails any test that logged an error
it did not expect, a check that no timer outlives its test, and a harness that
serves pbrealms on a loopback port and logs clients in over real TCP.
"""

from __future__ import annotations

import fcntl
import gc
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from twisted.internet import defer, ssl, task, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.spread import pb

from pbrealms.checkers import PasswordFile
from pbrealms.client import Connection, connect
from pbrealms.login import LoginRoot
from pbrealms.metrics import ServerMetrics
from pbrealms.realms import REALMS, Realm
from pbrealms.service import PBServerFactory
from pbrealms.servicetree import wireSecurity
from pbrealms.sessions import Session, SessionRegistry

USERS = {"alice": "wonderland", "bob": "builder"}


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


class CapturedLog(list):
    """
    The events logged during a test.  Errors fail the test unless expected.
    """

    def __init__(self) -> None:
        super().__init__()
        self.errorsExpected = False

    def messages(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self]

    def errors(self) -> list[dict]:
        return [
            e
            for e in self
            if "log_failure" in e
            or e.get("isError")
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Timing tests last, where they hold up the other worker least: each
    # runs alone (below).
    items.sort(key=lambda item: item.get_closest_marker("timing") is not None)


@pytest.fixture(autouse=True)
def timingTestsRunAlone(request, tmp_path_factory) -> Iterator[None]:
    """
    Under pytest-xdist, a test marked C{timing} runs with no test beside it:
    it bounds how long something takes, which a test on the other core would
    stretch.  Other tests share a lock while they run and a timing test
    holds it alone; the gate in front lets a waiting timing test in before
    tests that have yet to start.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    alone = request.node.get_closest_marker("timing") is not None
    mode = fcntl.LOCK_EX if alone else fcntl.LOCK_SH
    run = tmp_path_factory.getbasetemp().parent  # one per pytest run, shared by its workers
    with open(run / "timing.gate", "a") as gate, open(run / "timing.lock", "a") as lock:
        fcntl.flock(gate, mode)
        fcntl.flock(lock, mode)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield


@pytest.fixture(autouse=True)
def log():
    captured = CapturedLog()
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)
    if not captured.errorsExpected:
        from twisted.logger import formatEvent

        errors = [formatEvent(e) for e in captured.errors()]
        assert not errors, f"errors were logged: {errors}"


@pytest.fixture(autouse=True)
def no_pbrealms_environment(monkeypatch):
    """
    Options read PBREALMS_* settings: the shell running the tests must not
    change what they see.
    """
    for name in [n for n in os.environ if n.startswith("PBREALMS_")]:
        monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def no_leftover_timers(reactor):
    yield
    left = [c for c in reactor.getDelayedCalls() if c.active()]
    for call in left:
        call.cancel()
    assert not left, f"timers left behind: {left}"


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    """
    A password file holding L{USERS}, mode 0600.
    """
    path = tmp_path / "users.passwd"
    path.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return path


@pytest.fixture
def pwfile(passwd: Path) -> Path:
    """
    The server's password file, for the tests that start twistd.
    """
    return passwd


@pytest.fixture
def alicePassword(tmp_path: Path) -> Path:
    """
    A client's password file for alice, mode 0600.
    """
    path = tmp_path / "alice.password"
    path.write_text(USERS["alice"] + "\n")
    path.chmod(0o600)
    return path


async def eventually(reactor, condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """
    Let the reactor run until C{condition()} holds; fail after C{timeout}.
    """
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await task.deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def counted(metrics: ServerMetrics, counter: str, **labels: str) -> float:
    """
    The value of the counter C{pbrealms_COUNTER_total} with C{labels}, as a
    scrape of C{metrics} shows it.
    """
    value = metrics.registry.get_sample_value(f"pbrealms_{counter}_total", labels)
    assert value is not None, f"no sample pbrealms_{counter}_total{labels}"
    return value


def within(reactor, d: defer.Deferred, timeout: float = 5.0) -> defer.Deferred:
    """
    C{d}, failing with L{defer.TimeoutError} if it has not fired within
    C{timeout} seconds.  Its result is handed on at the reactor's next
    turn: a test waiting for an event goes on once the code that made it
    has returned, not from inside it.
    """
    d.addTimeout(timeout, reactor)
    return d.addBoth(lambda result: task.deferLater(reactor, 0, lambda: result))


def disconnection(reactor, broker: pb.Broker, timeout: float = 5.0) -> defer.Deferred[None]:
    """
    A L{Deferred} firing once C{broker}'s connection has closed (at once if
    it has), or failing after C{timeout}.
    """
    if broker.disconnected:
        return defer.succeed(None)
    d: defer.Deferred[None] = defer.Deferred()
    broker.notifyOnDisconnect(lambda: d.called or d.callback(None))
    return within(reactor, d, timeout)


def ending(reactor, session: Session, timeout: float = 5.0) -> defer.Deferred[None]:
    """
    A L{Deferred} firing once C{session} has ended (at once if it has), or
    failing after C{timeout}.
    """
    d: defer.Deferred[None] = defer.Deferred()
    session.onClose(lambda: d.called or d.callback(None))
    return within(reactor, d, timeout)


def exited(process: subprocess.Popen, timeout: float) -> defer.Deferred[int]:
    """
    A L{Deferred} firing with C{process}'s exit status once it has exited,
    or failing with L{subprocess.TimeoutExpired} after C{timeout}.  It is
    waited for in a thread: the reactor serves the process meanwhile.
    """
    return threads.deferToThread(process.wait, timeout)


def nextLogin(reactor, registry: SessionRegistry, timeout: float = 5.0) -> defer.Deferred[Session]:
    """
    A L{Deferred} firing with the next session to log in to C{registry}, or
    failing after C{timeout}.
    """
    return _next(reactor, registry, timeout, opened=True)


def nextLogout(reactor, registry: SessionRegistry, timeout: float = 5.0) -> defer.Deferred[Session]:
    """
    A L{Deferred} firing with the next logged-in session of C{registry} to
    end, or failing after C{timeout}.
    """
    return _next(reactor, registry, timeout, opened=False)


def _next(reactor, registry: SessionRegistry, timeout: float, opened: bool) -> defer.Deferred:
    d: defer.Deferred[Session] = defer.Deferred()

    def seen(session: Session) -> None:
        if not d.called:
            d.callback(session)

    class Once:
        def sessionOpened(self, session: Session) -> None:
            if opened:
                seen(session)

        def sessionClosed(self, session: Session, reason: str) -> None:
            if not opened:
                seen(session)

    registry.observe(Once())
    return within(reactor, d, timeout)


class Arrivals(list):
    """
    A list of what it is called with, as a callback (a L{ClientMind}'s
    C{onTime}, say), or given with C{append}, and a way to wait until it
    holds so many.
    """

    def __init__(self) -> None:
        super().__init__()
        self._waiting: list[tuple[int, defer.Deferred[list]]] = []

    def __call__(self, value: object) -> None:
        self.append(value)

    def append(self, value: object) -> None:
        super().append(value)
        waiting, self._waiting = self._waiting, []
        for count, d in waiting:
            self._check(count, d)

    def _check(self, count: int, d: defer.Deferred[list]) -> None:
        if d.called:
            return  # timed out
        if len(self) >= count:
            d.callback(list(self))
        else:
            self._waiting.append((count, d))

    def waitFor(self, reactor, count: int = 1, timeout: float = 5.0) -> defer.Deferred[list]:
        """
        A L{Deferred} firing with a copy of this list once it holds at least
        C{count} items (at once if it does), or failing after C{timeout}.
        """
        d: defer.Deferred[list] = defer.Deferred()
        self._check(count, d)
        return within(reactor, d, timeout)


class RecordingFactory(PBServerFactory):
    """
    The server's factory, remembering every connection it made (open or
    not), so that a test can close them all and wait until they are closed.
    """

    def __init__(self, root) -> None:
        super().__init__(root, wireSecurity())
        self.made: list[pb.Broker] = []
        self.closed: list[defer.Deferred] = []
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def accepted(self, reactor, count: int, timeout: float = 5.0) -> defer.Deferred[None]:
        """
        A L{Deferred} firing once this factory has made C{count} connections
        (at once if it has), or failing after C{timeout} seconds.
        """
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.made) >= count:
            d.callback(None)
        else:
            self._waiting.append((count, d))
        return within(reactor, d, timeout)

    def buildProtocol(self, addr):
        broker = super().buildProtocol(addr)
        if broker is None:
            return None  # refused
        closed: defer.Deferred = defer.Deferred()
        broker.notifyOnDisconnect(lambda: closed.callback(None))
        self.made.append(broker)
        self.closed.append(closed)
        waiting, self._waiting = self._waiting, []
        for count, d in waiting:
            if d.called:
                continue  # timed out
            if len(self.made) >= count:
                d.callback(None)
            else:
                self._waiting.append((count, d))
        return broker


class Served:
    """
    A pbrealms server listening on a loopback port.
    """

    def __init__(self, harness, root: LoginRoot, factory: RecordingFactory, port) -> None:
        self.harness = harness
        self.root = root
        self.registry: SessionRegistry = root.registry
        self.realm: Realm = root.realm
        self.factory = factory
        self.port = port
        self.endpoint = f"tcp:127.0.0.1:{port.getHost().port}"

    async def login(
        self, user: str = "alice", password: str | None = None, mind=None
    ) -> Connection:
        conn = await connect(
            self.harness.reactor, self.endpoint, user, password or USERS[user], mind, 5.0
        )
        self.harness.connections.append(conn)
        return conn

    async def settled(self) -> None:
        """
        Wait until every connection the server saw that the client closed
        has been closed on the server's side too.
        """
        await eventually(
            self.harness.reactor,
            lambda: all(b.disconnected or not b.transport.connected for b in self.factory.made),
        )


class Harness:
    def __init__(self, reactor, passwd: Path) -> None:
        self.reactor = reactor
        self.passwd = passwd
        self.servers: list[Served] = []
        self.connections: list[Connection] = []
        #: Connectors of raw PB clients a test made, disconnected at the end.
        self.connectors: list = []

    def makeRoot(
        self,
        realm: str = "cache",
        maxPerUser: int | None = None,
        period: float = 1.0,
        whenFull: str = "refuse",
        pingTimeout: float = 10.0,
    ) -> LoginRoot:
        registry = SessionRegistry(
            self.reactor,
            realm=realm,
            maxPerUser=maxPerUser,
            whenFull=whenFull,
            pingTimeout=pingTimeout,
        )
        strategy = REALMS[realm].realm.build(registry, self.reactor, {"period": period})
        return LoginRoot(
            PasswordFile(str(self.passwd)), strategy, registry, registry.clock, registry.metrics
        )

    async def serve(self, realm: str = "cache", root: LoginRoot | None = None, **kw) -> Served:
        root = root or self.makeRoot(realm, **kw)
        factory = RecordingFactory(root)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        served = Served(self, root, factory, port)
        self.servers.append(served)
        return served

    async def cleanup(self) -> None:
        for conn in self.connections:
            await conn.disconnect()
        for connector in self.connectors:
            connector.disconnect()
        for served in self.servers:
            for broker in served.factory.made:
                if not broker.disconnected:
                    broker.transport.abortConnection()
            await defer.gatherResults(served.factory.closed)
            await served.port.stopListening()
        # Collect first: what it frees may write as it goes (a reference
        # sends its decref), and TLS flushes small writes on the next turn.
        gc.collect()
        # Let the client sides see their connections close, and that flush run.
        await task.deferLater(self.reactor, 0, lambda: None)


@pytest_twisted.async_yield_fixture()
async def harness(reactor, passwd):
    h = Harness(reactor, passwd)
    yield h
    await h.cleanup()


@pytest.fixture
def tlsContexts():
    """
    TLS options for a loopback server and a client that trusts it.
    """
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ssl.PrivateCertificate.loadPEM(
        cert.private_key_and_cert_chain_pem.bytes().decode()
    ).options()
    client = ssl.optionsForClientTLS(
        "localhost", trustRoot=ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    )
    return server, client
