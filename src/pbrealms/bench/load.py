"""
The load generator: runs one workload against one PB server and prints its
figures.

C{python -m pbrealms.bench.load WORKLOAD --connect HOST:PORT [options]}

Every client logs in with a raw L{pb.PBClientFactory} and
C{login(UsernamePassword(user, password), client=mind)}, PB's standard
challenge and response, whichever server it talks to.  The last line on
stdout is one JSON object: C{workload}, the sizes used and the figures
below.  Progress goes to stderr, at most once a second.  Exit status 0 on
success; 1, with one line on stderr, if the server is unreachable, the
workload fails, or it does not finish within C{--timeout} (save C{storm} and
C{fanout}, which then report what they got).  A login (but a storm's) whose
connection the server has not spoken on within C{--retry-after} seconds
starts over on a new connection; C{login_retries} counts those.  Closing the
connections at the end takes at most L{CLOSE_GRACE} seconds more.

Workloads and their keys (besides C{workload}):
  - greet: C{count}, C{in_flight}, C{sequential_per_s}, C{in_flight_per_s}.
  - logins: C{count}, C{concurrency}, C{users} (0 for one user),
    C{login_retries}, C{sequential_per_s}, C{concurrent_per_s}.
  - storm: C{clients}, C{logged_in}, C{failed}, C{seconds}, C{p50_login_s},
    C{p99_login_s}, C{timed_out}.
  - held: C{sessions}, C{concurrency}, C{logged_in}, C{failed},
    C{login_retries}, C{login_seconds}, and with C{--server-pid}:
    C{rss_before}, C{rss_after}, C{rss_per_session} (bytes).
  - clock: C{sessions}, C{concurrency}, C{logged_in}, C{failed},
    C{login_retries}, C{duration}, C{period}, C{received}, C{expected},
    C{delivered}, C{p50_lateness_s}, C{p99_lateness_s}, C{max_lateness_s},
    and with C{--server-pid}: C{rss_start}, C{rss_end}, C{rss_samples}.
  - fanout: C{sessions}, C{concurrency}, C{logged_in}, C{failed},
    C{login_retries}, C{greetings}, C{deliveries}, C{expected_deliveries},
    C{seconds}, C{deliveries_per_s}, C{complete}.
A percentile or maximum over no values is C{null}.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.bench import ArgumentParser, number, wholeNumber

#: Seconds that closing every connection at the end may take.
CLOSE_GRACE = 3.0
#: Seconds a held workload lets the server settle before measuring its memory.
HELD_SETTLE = 2.0
#: Seconds fanout lets the notifications of the logins arrive before greeting.
FANOUT_SETTLE = 1.0
#: Seconds without a delivery after which fanout stops waiting for the rest.
FANOUT_QUIET = 5.0
#: Seconds between two memory samples of the clock workload.
RSS_INTERVAL = 5

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

    def clientConnectionFailed(self, connector, reason) -> None:
        super().clientConnectionFailed(connector, reason)
        self._fireClosed()

    def clientConnectionLost(self, connector, reason, reconnecting=0) -> None:
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
        client.connector = reactor.connectTCP(
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

    def failure(self, error: object) -> None:
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


async def inParallel(count: int, width: int, job: Callable[[int], Awaitable[object]]) -> None:
    """
    Await C{job(i)} for each C{i} in C{range(count)}, at most C{width} at a time.
    """
    indices = iter(range(count))

    async def worker() -> None:
        for i in indices:
            await job(i)

    await gather([defer.ensureDeferred(worker()) for _ in range(min(width, count))])


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


def serverRss(pid: int) -> int:
    """
    @return: the resident memory of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """
    @return: the nearest-rank C{q} quantile (0 < q <= 1) of the sorted
        C{ordered}, or L{None} if it is empty.
    """
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


async def greet(args: argparse.Namespace, target: Target, progress: Progress) -> Result:
    """
    C{--count} sequential greets, then C{--count} with C{--in-flight}
    outstanding, on one session.
    """
    client = await target.login(args.user, args.password)
    call = client.perspective.callRemote
    try:
        progress.begin("sequential greets", args.count)
        start = time.perf_counter()
        for _ in range(args.count):
            await call("greet")
            progress.done += 1
        sequential = time.perf_counter() - start

        async def one(i: int) -> None:
            await call("greet")
            progress.done += 1

        progress.begin("in-flight greets", args.count)
        start = time.perf_counter()
        await inParallel(args.count, args.in_flight, one)
        inFlight = time.perf_counter() - start
    finally:
        await closeAll([client])
    return {
        "count": args.count,
        "in_flight": args.in_flight,
        "sequential_per_s": rate(args.count, sequential),
        "in_flight_per_s": rate(args.count, inFlight),
    }


async def logins(args: argparse.Namespace, target: Target, progress: Progress) -> Result:
    """
    C{--count} cycles of connect, login, greet, close, one at a time, then
    C{--count} more with C{--concurrency} at a time.  With C{--users N},
    cycle C{i} (counted across both phases) logs in as C{user{i % N}}.
    """

    def credentials(i: int) -> tuple[str, str]:
        if args.users:
            return f"user{i % args.users}", f"pw{i % args.users}"
        return args.user, args.password

    async def cycle(i: int) -> None:
        client = await target.login(*credentials(i))
        try:
            await client.perspective.callRemote("greet")
        finally:
            await client.close()
        progress.done += 1

    progress.begin("sequential logins", args.count)
    start = time.perf_counter()
    for i in range(args.count):
        await cycle(i)
    sequential = time.perf_counter() - start

    progress.begin("concurrent logins", args.count)
    start = time.perf_counter()
    await inParallel(args.count, args.concurrency, lambda i: cycle(args.count + i))
    concurrent = time.perf_counter() - start
    return {
        "count": args.count,
        "concurrency": args.concurrency,
        "users": args.users or 0,
        "login_retries": target.retries,
        "sequential_per_s": rate(args.count, sequential),
        "concurrent_per_s": rate(args.count, concurrent),
    }


async def storm(args: argparse.Namespace, target: Target, progress: Progress) -> Result:
    """
    C{--clients} connections opened in one turn of the reactor, each logging
    in; wait until all have logged in or failed, or the timeout.
    """
    progress.begin("storm logins", args.clients)
    loginTimes = array("d")
    failures = Logins()
    settled = defer.Deferred()

    def done() -> None:
        progress.done += 1
        if progress.done == args.clients:
            settled.callback(None)

    def ok(_: Client) -> None:
        loginTimes.append(time.perf_counter() - start)
        done()

    def failed(reason: Failure) -> None:
        # After the timeout, closing the connections fails the rest.
        if not settled.called:
            failures.failure(reason.value)
            done()

    start = time.perf_counter()
    clients = [target.connect(args.user, args.password) for _ in range(args.clients)]
    for client in clients:
        client.loggedIn.addCallbacks(ok, failed)
    timedOut = False
    try:
        await settled
    except defer.CancelledError:
        # The workload's timeout: report what made it.
        timedOut = True
    seconds = time.perf_counter() - start if timedOut else max(loginTimes, default=0.0)
    ordered = sorted(loginTimes)
    await closeAll(clients)
    return {
        "clients": args.clients,
        "logged_in": len(ordered),
        "failed": failures.failed,
        "seconds": seconds,
        "p50_login_s": percentile(ordered, 0.5),
        "p99_login_s": percentile(ordered, 0.99),
        "timed_out": timedOut,
    }


async def held(args: argparse.Namespace, target: Target, progress: Progress) -> Result:
    """
    Log in C{--sessions} sessions, hold them, and measure the server's memory.
    """
    rssBefore = serverRss(args.server_pid) if args.server_pid else None
    start = time.perf_counter()
    sessions = await ramp(
        target, progress, args.sessions, args.concurrency, args.user, args.password
    )
    result: Result = {
        "sessions": args.sessions,
        "concurrency": args.concurrency,
        **sessions.figures(),
        "login_seconds": time.perf_counter() - start,
    }
    try:
        if rssBefore is not None:
            progress.begin("settling", 0)
            await sleep(HELD_SETTLE)
            rssAfter = serverRss(args.server_pid)
            result.update(
                rss_before=rssBefore,
                rss_after=rssAfter,
                rss_per_session=(rssAfter - rssBefore) / max(1, len(sessions.clients)),
            )
    finally:
        await closeAll(sessions.clients)
    return result


class ClockMind(pb.Referenceable):
    """
    The one mind shared by every clock session: records how late each push
    arrives while recording.
    """

    def __init__(self) -> None:
        self.recording = False
        # Compact floats: hundreds of thousands of pushes in a window.
        self.latenesses = array("d")

    def remote_notifyTime(self, t: float) -> None:
        if self.recording:
            self.latenesses.append(time.time() - t)


async def clock(args: argparse.Namespace, target: Target, progress: Progress) -> Result:
    """
    Log in C{--sessions} sessions with a mind to a clock realm, then count
    and time the pushes of C{--duration} seconds.
    """
    mind = ClockMind()
    sessions = await ramp(
        target, progress, args.sessions, args.concurrency, args.user, args.password, mind
    )
    samples: list[int] = []

    def sample() -> None:
        if args.server_pid:
            samples.append(serverRss(args.server_pid))

    try:
        seconds = math.ceil(args.duration)
        progress.begin("clock window (s)", seconds)
        mind.recording = True
        start = time.perf_counter()
        sample()
        for second in range(1, seconds + 1):
            await sleep(start + min(second, args.duration) - time.perf_counter())
            progress.done = second
            if second % RSS_INTERVAL == 0 or second == seconds:
                sample()
        mind.recording = False
    finally:
        await closeAll(sessions.clients)
    ordered = sorted(mind.latenesses)
    expected = len(sessions.clients) * args.duration / args.period
    result: Result = {
        "sessions": args.sessions,
        "concurrency": args.concurrency,
        **sessions.figures(),
        "duration": args.duration,
        "period": args.period,
        "received": len(ordered),
        "expected": expected,
        "delivered": min(1.0, len(ordered) / expected) if expected else 0.0,
        "p50_lateness_s": percentile(ordered, 0.5),
        "p99_lateness_s": percentile(ordered, 0.99),
        "max_lateness_s": ordered[-1] if ordered else None,
    }
    if samples:
        result.update(rss_start=samples[0], rss_end=samples[-1], rss_samples=samples)
    return result


class FanoutMind(pb.Referenceable):
    """
    The one mind shared by every fanout session: counts greeting deliveries.

    @ivar lastAt: C{time.perf_counter()} of the last delivery.
    """

    def __init__(self) -> None:
        self.deliveries = 0
        self.lastAt = 0.0

    def remote_notifyGreeting(self, text: str) -> None:
        self.deliveries += 1
        self.lastAt = time.perf_counter()

    def remote_notifySessionOpened(self, info: object) -> None:
        pass

    def remote_notifySessionClosed(self, info: object) -> None:
        pass


async def fanout(args: argparse.Namespace, target: Target, progress: Progress) -> Result:
    """
    Log in C{--sessions} sessions of one user; the first greets
    C{--greetings} times, and every other one should be told of each.
    Waiting ends once all deliveries arrived, none came for L{FANOUT_QUIET}
    seconds after the last greet, or at the timeout.
    """
    mind = FanoutMind()
    sessions = await ramp(
        target, progress, args.sessions, args.concurrency, args.user, args.password, mind
    )
    expected = max(0, len(sessions.clients) - 1) * args.greetings
    try:
        await sleep(FANOUT_SETTLE)
        progress.begin("deliveries", expected)
        mind.deliveries = 0
        start = mind.lastAt = time.perf_counter()
        try:
            if sessions.clients:
                await greetAndWait(sessions.clients[0], args.greetings, mind, expected, progress)
        except defer.CancelledError:
            # The workload's timeout: report what arrived.
            pass
        seconds = (mind.lastAt if mind.deliveries else time.perf_counter()) - start
    finally:
        await closeAll(sessions.clients)
    return {
        "sessions": args.sessions,
        "concurrency": args.concurrency,
        **sessions.figures(),
        "greetings": args.greetings,
        "deliveries": mind.deliveries,
        "expected_deliveries": expected,
        "seconds": seconds,
        "deliveries_per_s": rate(mind.deliveries, seconds),
        "complete": mind.deliveries >= expected,
    }


async def greetAndWait(
    greeter: Client, greetings: int, mind: FanoutMind, expected: int, progress: Progress
) -> None:
    """
    Greet C{greetings} times, awaiting each answer, then wait for
    C{expected} deliveries or L{FANOUT_QUIET} seconds without one.
    """
    for _ in range(greetings):
        await greeter.perspective.callRemote("greet")
    quietFrom = time.perf_counter()
    while mind.deliveries < expected:
        progress.done = mind.deliveries
        if time.perf_counter() - max(mind.lastAt, quietFrom) >= FANOUT_QUIET:
            return
        # Polling costs nothing measurable: C{seconds} comes from lastAt.
        await sleep(0.05)


WORKLOADS: dict[str, Callable[[argparse.Namespace, Target, Progress], Awaitable[Result]]] = {
    "greet": greet,
    "logins": logins,
    "storm": storm,
    "held": held,
    "clock": clock,
    "fanout": fanout,
}


def parseArguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m pbrealms.bench.load",
        description="Run one workload against one PB server; print its figures as JSON.",
    )
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="bench")
    parser.add_argument("--timeout", type=number, default=120.0, help="seconds for the workload")
    parser.add_argument(
        "--retry-after",
        type=number,
        default=10.0,
        help="seconds after which a login starts over if the server has not spoken on its "
        "connection (not in storm)",
    )
    parser.add_argument(
        "--server-pid",
        type=wholeNumber,
        help="read the server's memory from /proc",
    )
    parser.add_argument("--count", type=wholeNumber, help="greet: 20000; logins: 1000")
    parser.add_argument("--in-flight", type=wholeNumber, default=50)
    parser.add_argument(
        "--concurrency",
        type=wholeNumber,
        help="logins: 50; held, clock, fanout: 200",
    )
    parser.add_argument(
        "--users",
        type=wholeNumber,
        help="logins: log in as user{i %% N} / pw{i %% N}",
    )
    parser.add_argument("--clients", type=wholeNumber, default=3000)
    parser.add_argument("--sessions", type=wholeNumber, help="held, clock: 10000; fanout: 1000")
    parser.add_argument("--period", type=number, default=1.0, help="the clock server's period")
    parser.add_argument("--duration", type=number, default=30.0)
    parser.add_argument("--greetings", type=wholeNumber, default=20)
    args = parser.parse_args(argv)
    logins = args.workload == "logins"
    if args.count is None:
        args.count = 1000 if logins else 20000
    if args.concurrency is None:
        args.concurrency = 50 if logins else 200
    if args.sessions is None:
        args.sessions = 1000 if args.workload == "fanout" else 10000
    host, _, port = args.connect.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--connect wants HOST:PORT, not {args.connect!r}")
    args.host, args.port = host, int(port)
    return args


def raiseFileLimit() -> None:
    """
    Raise the soft limit of open files to the hard one: every session is a
    connection.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(args: argparse.Namespace) -> Result:
    """
    Check that the server is reachable, then run the workload within
    C{--timeout} seconds.

    @raise Exception: with a one-line message, if either fails.
    """
    try:
        await probe(args.host, args.port, args.timeout)
    except Exception as e:
        raise RuntimeError(f"cannot connect to {args.connect}: {e}") from e
    progress = Progress()
    reporter = task.LoopingCall(progress.report)
    reporter.start(1.0, now=False)
    target = Target(args.host, args.port, args.timeout, args.retry_after)
    work = defer.ensureDeferred(WORKLOADS[args.workload](args, target, progress))
    # On timeout the workload is cancelled where it waits: storm and fanout
    # catch that and report; the others close their connections and fail.
    work.addTimeout(args.timeout, reactor)
    try:
        return {"workload": args.workload, **await work}
    except defer.TimeoutError:
        raise RuntimeError(
            f"timed out after {args.timeout:g} s in {progress.phase} "
            f"({progress.done}/{progress.total})"
        ) from None
    finally:
        reporter.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """
    Run the workload the command line names, print its JSON, and exit 0; or
    print one line of error to stderr and exit 1.
    """
    args = parseArguments(argv)
    raiseFileLimit()
    # The first of a result, an error, or an interruption wins.
    outcome: dict[str, Any] = {}

    def succeeded(result: Result) -> None:
        outcome.setdefault("result", result)

    def failed(reason: Failure) -> None:
        outcome.setdefault("error", describe(reason.value))

    def interrupted() -> None:
        # A signal stops the reactor, whose shutdown fails what was waiting:
        # no result may come of that.
        if not outcome:
            outcome["error"] = "interrupted"

    def start() -> None:
        d = defer.ensureDeferred(run(args)).addCallbacks(succeeded, failed)
        d.addCallback(lambda _: reactor.running and reactor.stop())

    reactor.addSystemEventTrigger("before", "shutdown", interrupted)
    reactor.callWhenRunning(start)
    reactor.run()
    if "result" in outcome:
        print(json.dumps(outcome["result"]), flush=True)
        sys.exit(0)
    print(f"error: {args.workload}: {outcome.get('error', 'interrupted')}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
