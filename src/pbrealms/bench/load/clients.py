"""
The load generator's clients: connections that log in with PB's standard
challenge and response, the ramp that logs many in at a bounded rate, and
the small Deferred helpers the workloads share.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.spread import pb

#: Seconds that closing every connection at the end may take.
CLOSE_GRACE = 3.0

#: What a workload gives: the figures of the JSON object printed at the end.
Result = dict[str, Any]


class Progress:
    """
    What a person watching stderr is told: the current phase and how far it is.
    """

    def __init__(self) -> None:
        self.phase = ""
        self.done = 0
        self.total = 0

    def begin(self, phase: str, total: int) -> None:
        self.phase, self.done, self.total = phase, 0, total

    def report(self) -> None:
        if self.total:
            print(f"{self.phase}: {self.done}/{self.total}", file=sys.stderr, flush=True)
        elif self.phase:
            print(f"{self.phase}...", file=sys.stderr, flush=True)


class Client(pb.PBClientFactory):
    """
    One connection and its login.

    @ivar perspective: the avatar's reference, once logged in.
    @ivar loggedIn: fires with this client once logged in, or fails (and the
        connection is closed); set by L{Target.connect}.
    @ivar served: whether the server has spoken on the connection.
    @ivar abandoned: whether L{abandonUnlessServed} closed the connection.
    @ivar closed: fires with L{None} once the connection has closed or failed
        to open; await it once.
    """

    # Factories log their start and stop; thousands of them would only fill
    # Twisted's in-memory log buffer.
    noisy = False

    def __init__(self) -> None:
        super().__init__()
        self.connector: Any = None
        self.perspective: pb.RemoteReference | None = None
        self.loggedIn: defer.Deferred[Client] | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.served = False
        self.abandoned = False

    def clientConnectionMade(self, broker: pb.Broker) -> None:
        # PB calls this once the server's first bytes (its dialects) came.
        self.served = True
        super().clientConnectionMade(broker)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        super().clientConnectionFailed(connector, reason)
        self._fireClosed()

    def clientConnectionLost(
        self, connector: IConnector, reason: Failure, reconnecting: int = 0
    ) -> None:
        super().clientConnectionLost(connector, reason, reconnecting)
        self._fireClosed()

    def _fireClosed(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)

    def close(self) -> defer.Deferred[None]:
        """
        Close the connection, or stop opening it.

        @return: L{closed}.
        """
        self.connector.disconnect()
        return self.closed

    def abandonUnlessServed(self) -> None:
        """
        Close the connection if the server has not spoken on it yet.
        """
        if not self.served:
            self.abandoned = True
            self.close()


class Target:
    """
    The server under load, and how to log in to it.

    @ivar retries: how many login attempts L{login} gave up on and started over.
    """

    def __init__(self, host: str, port: int, connectTimeout: float, retryAfter: float) -> None:
        self.host = host
        self.port = port
        self.connectTimeout = connectTimeout
        self.retryAfter = retryAfter
        self.retries = 0

    def connect(self, user: str, password: str, mind: object = None) -> Client:
        """
        Open a connection and start logging in.

        @return: the client, whose C{loggedIn} tells how the login went.
        """
        client = Client()
        # Twisted types connectTCP's factory as making protocols with a typed
        # factory attribute, which PB's Broker (factory = None) does not match.
        client.connector = reactor.connectTCP(  # type: ignore[type-var]
            self.host, self.port, client, timeout=self.connectTimeout
        )
        credentials = UsernamePassword(user.encode(), password.encode())
        client.loggedIn = client.login(credentials, client=mind).addCallbacks(
            _loggedIn, _loginFailed, callbackArgs=(client,), errbackArgs=(client,)
        )
        return client

    async def login(self, user: str, password: str, mind: object = None) -> Client:
        """
        Connect and log in, starting over on a new connection whenever the
        server has not spoken on one within C{retryAfter} seconds.  When a
        server's accept queue overflows, the kernel may drop a connection
        that the client already sees open, and a PB client would wait for
        ever for the server to speak first.  A server that has spoken is
        waited for: it is only slow.

        @return: the logged-in client.
        @raise Exception: if the login fails otherwise; its connection is closed.
        """
        while True:
            client = self.connect(user, password, mind)
            check = reactor.callLater(self.retryAfter, client.abandonUnlessServed)
            assert client.loggedIn is not None  # connect set it
            try:
                return await client.loggedIn
            except Exception:
                if not client.abandoned:
                    raise
                if not self.retries:
                    print("a server never spoke: retrying", file=sys.stderr, flush=True)
                self.retries += 1
            finally:
                if check.active():
                    check.cancel()


def _loggedIn(perspective: pb.RemoteReference, client: Client) -> Client:
    client.perspective = perspective
    return client


def _loginFailed(reason: Failure, client: Client) -> Failure:
    client.close()
    return reason


class Logins:
    """
    The sessions a ramp logged in, the logins that failed, and the
    attempts started over.
    """

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.failed = 0
        self.retries = 0
        self.firstError = ""

    def failure(self, error: BaseException) -> None:
        """
        Count a failed login; the first one is told on stderr.
        """
        self.failed += 1
        if not self.firstError:
            self.firstError = describe(error)
            print(f"a login failed: {self.firstError}", file=sys.stderr, flush=True)

    def figures(self) -> Result:
        return {
            "logged_in": len(self.clients),
            "failed": self.failed,
            "login_retries": self.retries,
        }


def describe(error: BaseException) -> str:
    """
    @return: one line that tells what C{error} is.
    """
    lines = str(error).strip().splitlines()
    if not isinstance(error, pb.RemoteError):
        return lines[0] if lines else type(error).__name__
    # The server's exception, of which PB sends the type as bytes.
    remote = error.remoteType
    name = (remote.decode() if isinstance(remote, bytes) else str(remote)).rpartition(".")[2]
    return f"{name}: {lines[0]}" if lines else name


async def probe(host: str, port: int, timeout: float) -> None:
    """
    Open and close one TCP connection to the server.

    @raise Exception: if it cannot be reached.
    """
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    protocol = await connectProtocol(endpoint, Protocol())
    protocol.transport.loseConnection()


def sleep(seconds: float) -> defer.Deferred[None]:
    """
    @return: a L{Deferred} that fires after C{seconds} (at once if negative).
    """
    return task.deferLater(reactor, max(0.0, seconds), lambda: None)


async def gather(ds: Sequence[defer.Deferred[Any]]) -> list[Any]:
    """
    Await every one of C{ds}; the first failure (cancellation included)
    raises as itself, not wrapped in L{defer.FirstError}.
    """
    try:
        return await defer.gatherResults(ds, consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()


async def inParallel(
    count: int, width: int, job: Callable[[int], Coroutine[Any, Any, object]]
) -> None:
    """
    Await C{job(i)} for each C{i} in C{range(count)}, at most C{width} at a
    time (none if C{width} is below 1); the first failure raises as itself.
    """
    if width < 1:
        return
    limit = defer.DeferredSemaphore(width)
    jobs = [limit.run(job, i) for i in range(count)]

    def cancel(_: object) -> None:
        # The waiting jobs first, oldest first: a running job, cancelled,
        # releases its token and would start the next waiting one.
        for d in sorted(jobs, key=lambda d: d.called):
            d.cancel()

    finished: defer.Deferred[list[Any]] = defer.Deferred(cancel)
    defer.ensureDeferred(gather(jobs)).chainDeferred(finished)
    await finished


async def closeAll(clients: Sequence[Client]) -> None:
    """
    Close every connection and wait, at most L{CLOSE_GRACE} seconds, until
    the client side has seen each close.
    """
    closing = defer.DeferredList([c.close() for c in clients])
    closing.addTimeout(CLOSE_GRACE, reactor)
    try:
        await closing
    except defer.TimeoutError:
        print(f"not every connection closed within {CLOSE_GRACE:g} s", file=sys.stderr)


async def ramp(
    target: Target,
    progress: Progress,
    count: int,
    width: int,
    user: str,
    password: str,
    mind: object = None,
) -> Logins:
    """
    Log in C{count} sessions of C{user}, at most C{width} logins in flight,
    and keep them open.  A login that fails is counted, not retried (only a
    server that never spoke is, by L{Target.login}).
    """
    logins = Logins()
    progress.begin("logins", count)

    async def one(i: int) -> None:
        try:
            logins.clients.append(await target.login(user, password, mind))
        except defer.CancelledError:
            raise
        except Exception as e:
            logins.failure(e)
        progress.done += 1

    try:
        await inParallel(count, width, one)
    except BaseException:
        await closeAll(logins.clients)
        raise
    logins.retries = target.retries
    return logins
