"""
The workloads as C{pbrealms-bench} runs them: for each, the realm it needs,
the load generator's arguments, the servers it runs against, whether it runs
in rounds, and the rows of the table it gives (L{WORKLOADS}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: The servers a workload may run against: pbrealms with --passwd, the bare PB
#: server, and pbrealms with Twisted's --auth file: (the logins contrast).
PBREALMS, BASELINE, AUTH_FILE = "pbrealms", "baseline", "auth-file"
#: Clock RSS counts as flat if it ends at most this much above where it started.
FLAT_RSS = 1.1

#: What one run of the load generator gave: the JSON object it printed.
Result = dict[str, Any]


@dataclass(frozen=True)
class Row:
    """
    One line of the table: one figure of a workload, for pbrealms and for the
    baseline.

    @ivar label: what it is; a format string given the options as C{o}.
    @ivar figure: the number from a load generator's result (L{None} if
        there is none, e.g. the storm timed out).
    @ivar show: the cell for a result; by default C{fmt} of the figure.
    @ivar better: C{higher}, C{lower} or C{flat}.
    @ivar target: the target, in words; empty if the figure is only reported.
    @ivar met: whether the target is met, given the figures of pbrealms and
        of the baseline (L{None} if there is no baseline figure).
    @ivar ratio: whether pbrealms/baseline means something for this figure.
    @ivar server: whose result the pbrealms column shows.
    """

    label: str
    figure: Callable[[Result], float | None]
    fmt: str = "{:,.0f}"
    show: Callable[[Result], str] | None = None
    better: str = "higher"
    target: str = ""
    met: Callable[[float, float | None], bool | None] | None = None
    ratio: bool = True
    server: str = PBREALMS

    def cell(self, result: Result) -> str:
        """
        The table cell for C{result}.
        """
        if self.show is not None:
            return self.show(result)
        value = self.figure(result)
        return "n/a" if value is None else self.fmt.format(value)


@dataclass(frozen=True)
class Workload:
    """
    A workload of the load generator, and how the bench runs it.

    @ivar realm: the pbrealms realm it needs (C{clock} also gets --period).
    @ivar sizes: the load generator's size arguments; a format string given
        the options as C{o}.
    @ivar servers: what it runs against; the bare PB server cannot serve
        every workload.
    @ivar perServer: more arguments, given the options and the server.
    @ivar throughput: the result keys that are throughputs (higher is better).
        If there are any, the workload runs C{--rounds} times against
        pbrealms and the baseline by turns, and each of these figures is
        the best of its rounds (L{bestOf}); otherwise it runs once.
    """

    name: str
    realm: str
    sizes: str
    rows: tuple[Row, ...]
    servers: tuple[str, ...] = (PBREALMS, BASELINE)
    perServer: Callable[[Mapping[str, Any], str], list[str]] = lambda options, kind: []
    throughput: tuple[str, ...] = ()

    def arguments(self, options: Mapping[str, Any], kind: str) -> list[str]:
        """
        The load generator's arguments for a run against a server of C{kind}.
        """
        return [*self.sizes.format(o=options).split(), *self.perServer(options, kind)]


def key(name: str, scale: float = 1.0) -> Callable[[Result], float | None]:
    """
    The figure C{name} of a result, times C{scale}.
    """

    def figure(result: Result) -> float | None:
        value = result.get(name)
        return None if value is None else value * scale

    return figure


def ratioAtLeast(low: float) -> Callable[[float, float | None], bool | None]:
    return lambda p, b: None if not b else p / b >= low


def stormSeconds(result: Result) -> float | None:
    """
    The seconds until every client of the storm logged in; L{None} if some
    never did.
    """
    if result.get("logged_in") != result.get("clients"):
        return None
    return result.get("seconds")


def showStormSeconds(result: Result) -> str:
    seconds = stormSeconds(result)
    if seconds is not None:
        return f"{seconds:.1f}"
    made = f"{result.get('logged_in', 0):,} of {result.get('clients', 0):,}"
    if result.get("timed_out"):
        return f"timed out after {result.get('seconds', 0):.0f} s ({made})"
    return f"not all logged in ({made})"


def rssGrowth(result: Result) -> float | None:
    """
    How many times its start the RSS ended at, in the clock workload.
    """
    start, end = result.get("rss_start"), result.get("rss_end")
    return end / start if start and end else None


def showRss(result: Result) -> str:
    start, end = result.get("rss_start"), result.get("rss_end")
    if not start or not end:
        return "n/a"
    return f"{start / 2**20:.1f} → {end / 2**20:.1f} MB"


def lateEnough(p: float, b: float | None) -> bool | None:
    if p > 100:
        return False
    return None if b is None else p <= b


def loginArguments(options: Mapping[str, Any], kind: str) -> list[str]:
    """
    The logins workload logs in as the many users of pbrealms' password file,
    but as the bare PB server's one user; and only a few times with --auth
    file:, which is slow.
    """
    count = options["contrast-count"] if kind == AUTH_FILE else options["login-count"]
    users = [] if kind == BASELINE else ["--users", str(options["users"])]
    return ["--count", str(count), *users]


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "greet",
            "cache",
            "--count {o[greet-count]} --in-flight {o[in-flight]}",
            (
                Row(
                    "greet: sequential calls/s",
                    key("sequential_per_s"),
                    target="ratio ≥ 0.95",
                    met=ratioAtLeast(0.95),
                ),
                Row(
                    "greet: calls/s, {o[in-flight]} in flight",
                    key("in_flight_per_s"),
                    target="ratio ≥ 0.95",
                    met=ratioAtLeast(0.95),
                ),
            ),
            throughput=("sequential_per_s", "in_flight_per_s"),
        ),
        Workload(
            "logins",
            "cache",
            "--concurrency {o[concurrency]}",
            (
                Row(
                    "logins: sequential logins/s",
                    key("sequential_per_s"),
                    target="ratio ≥ 0.9",
                    met=ratioAtLeast(0.9),
                ),
                Row(
                    "logins: logins/s, {o[concurrency]} concurrent",
                    key("concurrent_per_s"),
                    target="ratio ≥ 0.9",
                    met=ratioAtLeast(0.9),
                ),
                Row(
                    "logins via --auth file: (contrast), sequential logins/s",
                    key("sequential_per_s"),
                    server=AUTH_FILE,
                ),
            ),
            servers=(PBREALMS, BASELINE, AUTH_FILE),
            perServer=loginArguments,
            throughput=("sequential_per_s", "concurrent_per_s"),
        ),
        Workload(
            "storm",
            "cache",
            "--clients {o[storm-clients]} --timeout {o[storm-timeout]}",
            (
                Row(
                    "storm: {o[storm-clients]:,} clients, seconds until all logged in",
                    stormSeconds,
                    show=showStormSeconds,
                    better="lower",
                ),
                Row(
                    "storm: {o[storm-clients]:,} clients, logged in",
                    key("logged_in"),
                    show=lambda r: f"{r.get('logged_in', 0):,} of {r.get('clients', 0):,}",
                ),
            ),
        ),
        Workload(
            "held",
            "cache",
            "--sessions {o[held-sessions]} --concurrency {o[hold-concurrency]}",
            (
                Row(
                    "held: {o[held-sessions]:,} sessions, RSS bytes per session",
                    key("rss_per_session"),
                    better="lower",
                    target="ratio ≤ 1.5",
                    met=lambda p, b: None if not b else p / b <= 1.5,
                ),
            ),
        ),
        Workload(
            "clock",
            "clock",
            "--sessions {o[clock-sessions]} --duration {o[clock-duration]} --period {o[period]} "
            "--concurrency {o[hold-concurrency]}",
            (
                Row(
                    "clock: {o[clock-sessions]:,} sessions, pushes delivered %",
                    key("delivered", 100),
                    fmt="{:.2f} %",
                    target="≥ 99.9 %",
                    met=lambda p, _: p >= 99.9,
                ),
                Row(
                    "clock: p99 lateness ms",
                    key("p99_lateness_s", 1000),
                    fmt="{:,.1f}",
                    better="lower",
                    target="≤ 100 ms and ≤ baseline",
                    met=lateEnough,
                ),
                Row(
                    "clock: RSS start → end",
                    rssGrowth,
                    show=showRss,
                    better="flat",
                    target=f"end ≤ {FLAT_RSS:g}x start",
                    ratio=False,
                    met=lambda p, _: p <= FLAT_RSS,
                ),
            ),
        ),
        Workload(
            "fanout",
            "sessions",
            "--sessions {o[fanout-sessions]} --greetings {o[greetings]}",
            (
                Row(
                    "fanout: {o[fanout-sessions]:,} sessions, deliveries/s", key("deliveries_per_s")
                ),
            ),
            servers=(PBREALMS,),
        ),
    )
}
