"""
The workloads of the load generator, each a coroutine function of the
options, the target and the progress that gives its figures (L{WORKLOADS}).
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.bench.load.clients import (
    Client,
    Logins,
    Progress,
    Result,
    Target,
    closeAll,
    inParallel,
    ramp,
    sleep,
)

#: Seconds a held workload lets the server settle before measuring its memory.
HELD_SETTLE = 2.0
#: Seconds fanout lets the notifications of the logins arrive before greeting.
FANOUT_SETTLE = 1.0
#: Seconds without a delivery after which fanout stops waiting for the rest.
FANOUT_QUIET = 5.0
#: Seconds between two memory samples of the clock workload.
RSS_INTERVAL = 5


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


async def greet(options: Mapping[str, Any], target: Target, progress: Progress) -> Result:
    """
    C{--count} sequential greets, then C{--count} with C{--in-flight}
    outstanding, on one session.
    """
    client = await target.login(options["user"], options["password"])
    assert client.perspective is not None  # set by the login
    call = client.perspective.callRemote
    try:
        progress.begin("sequential greets", options["count"])
        start = time.perf_counter()
        for _ in range(options["count"]):
            await call("greet")
            progress.done += 1
        sequential = time.perf_counter() - start

        async def one(i: int) -> None:
            await call("greet")
            progress.done += 1

        progress.begin("in-flight greets", options["count"])
        start = time.perf_counter()
        await inParallel(options["count"], options["in-flight"], one)
        inFlight = time.perf_counter() - start
    finally:
        await closeAll([client])
    return {
        "count": options["count"],
        "in_flight": options["in-flight"],
        "sequential_per_s": rate(options["count"], sequential),
        "in_flight_per_s": rate(options["count"], inFlight),
    }


async def logins(options: Mapping[str, Any], target: Target, progress: Progress) -> Result:
    """
    C{--count} cycles of connect, login, greet, close, one at a time, then
    C{--count} more with C{--concurrency} at a time.  With C{--users N},
    cycle C{i} (counted across both phases) logs in as C{user{i % N}}.
    """

    def credentials(i: int) -> tuple[str, str]:
        users = options["users"]
        if users:
            return f"user{i % users}", f"pw{i % users}"
        return options["user"], options["password"]

    async def cycle(i: int) -> None:
        client = await target.login(*credentials(i))
        assert client.perspective is not None  # set by the login
        try:
            await client.perspective.callRemote("greet")
        finally:
            await client.close()
        progress.done += 1

    progress.begin("sequential logins", options["count"])
    start = time.perf_counter()
    for i in range(options["count"]):
        await cycle(i)
    sequential = time.perf_counter() - start

    progress.begin("concurrent logins", options["count"])
    start = time.perf_counter()
    await inParallel(
        options["count"], options["concurrency"], lambda i: cycle(options["count"] + i)
    )
    concurrent = time.perf_counter() - start
    return {
        "count": options["count"],
        "concurrency": options["concurrency"],
        "users": options["users"] or 0,
        "login_retries": target.retries,
        "sequential_per_s": rate(options["count"], sequential),
        "concurrent_per_s": rate(options["count"], concurrent),
    }


async def storm(options: Mapping[str, Any], target: Target, progress: Progress) -> Result:
    """
    C{--clients} connections opened in one turn of the reactor, each logging
    in; wait until all have logged in or failed, or the timeout.
    """
    progress.begin("storm logins", options["clients"])
    loginTimes = array("d")
    failures = Logins()
    settled: defer.Deferred[None] = defer.Deferred()

    def done() -> None:
        progress.done += 1
        if progress.done == options["clients"]:
            settled.callback(None)

    def ok(_: Client) -> None:
        loginTimes.append(time.perf_counter() - start)
        done()

    def failed(reason: Failure) -> None:
        # After the timeout, closing the connections fails the rest.
        if not settled.called:
            assert reason.value is not None  # typed optional; a Failure always has one
            failures.failure(reason.value)
            done()

    start = time.perf_counter()
    clients = [
        target.connect(options["user"], options["password"]) for _ in range(options["clients"])
    ]
    for client in clients:
        assert client.loggedIn is not None  # connect set it
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
        "clients": options["clients"],
        "logged_in": len(ordered),
        "failed": failures.failed,
        "seconds": seconds,
        "p50_login_s": percentile(ordered, 0.5),
        "p99_login_s": percentile(ordered, 0.99),
        "timed_out": timedOut,
    }


async def held(options: Mapping[str, Any], target: Target, progress: Progress) -> Result:
    """
    Log in C{--sessions} sessions, hold them, and measure the server's memory.
    """
    rssBefore = serverRss(options["server-pid"]) if options["server-pid"] else None
    start = time.perf_counter()
    sessions = await ramp(
        target,
        progress,
        options["sessions"],
        options["concurrency"],
        options["user"],
        options["password"],
    )
    result: Result = {
        "sessions": options["sessions"],
        "concurrency": options["concurrency"],
        **sessions.figures(),
        "login_seconds": time.perf_counter() - start,
    }
    try:
        if rssBefore is not None:
            progress.begin("settling", 0)
            await sleep(HELD_SETTLE)
            rssAfter = serverRss(options["server-pid"])
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


async def clock(options: Mapping[str, Any], target: Target, progress: Progress) -> Result:
    """
    Log in C{--sessions} sessions with a mind to a clock realm, then count
    and time the pushes of C{--duration} seconds.
    """
    mind = ClockMind()
    sessions = await ramp(
        target,
        progress,
        options["sessions"],
        options["concurrency"],
        options["user"],
        options["password"],
        mind,
    )
    samples: list[int] = []

    def sample() -> None:
        if options["server-pid"]:
            samples.append(serverRss(options["server-pid"]))

    try:
        seconds = math.ceil(options["duration"])
        progress.begin("clock window (s)", seconds)
        mind.recording = True
        start = time.perf_counter()
        sample()
        for second in range(1, seconds + 1):
            await sleep(start + min(second, options["duration"]) - time.perf_counter())
            progress.done = second
            if second % RSS_INTERVAL == 0 or second == seconds:
                sample()
        mind.recording = False
    finally:
        await closeAll(sessions.clients)
    ordered = sorted(mind.latenesses)
    expected = len(sessions.clients) * options["duration"] / options["period"]
    result: Result = {
        "sessions": options["sessions"],
        "concurrency": options["concurrency"],
        **sessions.figures(),
        "duration": options["duration"],
        "period": options["period"],
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


async def fanout(options: Mapping[str, Any], target: Target, progress: Progress) -> Result:
    """
    Log in C{--sessions} sessions of one user; the first greets
    C{--greetings} times, and every other one should be told of each.
    Waiting ends once all deliveries arrived, none came for L{FANOUT_QUIET}
    seconds after the last greet, or at the timeout.
    """
    mind = FanoutMind()
    sessions = await ramp(
        target,
        progress,
        options["sessions"],
        options["concurrency"],
        options["user"],
        options["password"],
        mind,
    )
    expected = max(0, len(sessions.clients) - 1) * options["greetings"]
    try:
        await sleep(FANOUT_SETTLE)
        progress.begin("deliveries", expected)
        mind.deliveries = 0
        start = mind.lastAt = time.perf_counter()
        try:
            if sessions.clients:
                await greetAndWait(
                    sessions.clients[0], options["greetings"], mind, expected, progress
                )
        except defer.CancelledError:
            # The workload's timeout: report what arrived.
            pass
        seconds = (mind.lastAt if mind.deliveries else time.perf_counter()) - start
    finally:
        await closeAll(sessions.clients)
    return {
        "sessions": options["sessions"],
        "concurrency": options["concurrency"],
        **sessions.figures(),
        "greetings": options["greetings"],
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
    assert greeter.perspective is not None  # set by the login
    for _ in range(greetings):
        await greeter.perspective.callRemote("greet")
    quietFrom = time.perf_counter()
    while mind.deliveries < expected:
        progress.done = mind.deliveries
        if time.perf_counter() - max(mind.lastAt, quietFrom) >= FANOUT_QUIET:
            return
        # Polling costs nothing measurable: C{seconds} comes from lastAt.
        await sleep(0.05)


#: Each workload by name: given the options, the target and the progress, its figures.
WORKLOADS: dict[
    str, Callable[[Mapping[str, Any], Target, Progress], Coroutine[Any, Any, Result]]
] = {
    "greet": greet,
    "logins": logins,
    "storm": storm,
    "held": held,
    "clock": clock,
    "fanout": fanout,
}
