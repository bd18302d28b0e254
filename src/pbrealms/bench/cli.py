"""
The C{pbrealms-bench} command: a load tool in the manner of redis-benchmark
or pgbench.  It starts the server under test (pbrealms under twistd, a fresh
one per workload) and a bare PB server for a baseline
(L{pbrealms.bench.baseline}), runs each workload from a separate load
generator process (L{pbrealms.bench.load}) against each server, and prints
one Markdown table: each figure for pbrealms, for the baseline, their ratio,
which way is better, and whether the issue's target is met.

Single runs of the short throughput workloads are noisy, so those run
C{--rounds} times against pbrealms and the baseline by turns, each server
started once, and the table gives each figure's best round.

Everything about a workload (its realm, the load generator's arguments, the
rows it gives, whether it runs in rounds) is in L{WORKLOADS}.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from twisted.python import usage

from pbrealms.options import Options
from pbrealms.push import MAX_PERIOD, MIN_PERIOD

EXIT_FAILED = 1
EXIT_USAGE = 2

#: The commands of the virtualenv (or installation) running this one.
BIN = Path(sys.executable).parent

#: The servers a workload may run against: pbrealms with --passwd, the bare PB
#: server, and pbrealms with Twisted's --auth file: (the logins contrast).
PBREALMS, BASELINE, AUTH_FILE = "pbrealms", "baseline", "auth-file"
#: The bench logs in as this user (password the same) wherever it needs one.
BENCH_USER = "bench"
#: Seconds a server may take to say which port it listens on.
START_TIMEOUT = 60.0
#: Seconds a server gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Room for the storm and held workloads, whose clients all come from 127.0.0.1.
SERVER_LIMITS = ["--max-unauthenticated-per-source", "20000", "--max-connections", "19000"]
#: Clock RSS counts as flat if it ends at most this much above where it started.
FLAT_RSS = 1.1

Result = dict[str, Any]


# ---------------------------------------------------------------------------
# Workloads and the rows of the table


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


# ---------------------------------------------------------------------------
# Options


class BenchOptions(Options):
    """
    The options of C{pbrealms-bench}.
    """

    synopsis = "Usage: pbrealms-bench [options]"
    longdesc = (
        "Measure pbrealms against a bare Twisted PB server. For each workload it starts a "
        "fresh pbrealms (twistd pbrealms, on a loopback port) and the bare PB server, runs "
        "the load generator against each in a separate process, and prints one Markdown "
        "table: each figure for pbrealms, for the baseline, their ratio, which way is "
        "better, and whether the target is met. greet and logins run --rounds times "
        "against the two servers by turns (each started once), and each of their figures "
        "is the best round's. Progress goes to stderr. Workloads: "
        "greet (calls), logins, storm (every client logging in at once), held (memory "
        "per logged-in session), clock (timed pushes), fanout (the sessions realm). "
        "With --connect it measures a pbrealms server you started instead: run it with "
        "--realm=cache and a password file holding bench:bench and user0:pw0 ... "
        "userN-1:pwN-1 (N = --users) for greet, logins, storm and held; "
        "--realm=clock --period P for clock; --realm=sessions for fanout; and raise its "
        "--max-connections and --max-unauthenticated-per-source for storm and held. "
        "It writes no file but those --json, --plot and --logs name, and removes its "
        "temporary files (password files, the servers' output) when it ends, however it ends."
    )
    optParameters = [
        ["only", None, ",".join(WORKLOADS), "The workloads to run, comma-separated."],
        [
            "connect",
            None,
            None,
            "HOST:PORT of a running pbrealms server to measure instead of starting one "
            "(see below for how it must run). The baseline is still started.",
        ],
        [
            "server-pid",
            None,
            None,
            "With --connect: the process id of that server, for the memory figures.",
        ],
        [
            "json",
            None,
            None,
            "Also write the results, with the machine's details, to this JSON file.",
        ],
        [
            "plot",
            None,
            None,
            "Also run clock and held at each --scale size and draw the curves to this PNG "
            "file (needs matplotlib: pip install 'pbrealms[bench]').",
        ],
        [
            "logs",
            None,
            None,
            "Keep the output of every server it starts in this directory, as "
            "KIND-WORKLOAD.out. [default: none is kept]",
        ],
        [
            "scale",
            None,
            "1000,2500,5000,10000",
            "With --plot: the session counts, comma-separated.",
        ],
        ["scale-duration", None, "10", "With --plot: the seconds each clock run lasts."],
        [
            "rounds",
            None,
            "3",
            "greet and logins: rounds against pbrealms and the baseline, by turns; "
            "each figure is the best of its rounds.",
        ],
        ["greet-count", None, "10000", "greet: calls, made one at a time and then in flight."],
        ["in-flight", None, "50", "greet: calls in flight at once."],
        ["login-count", None, "500", "logins: logins, made one at a time and then concurrently."],
        ["concurrency", None, "50", "logins: logins under way at once."],
        ["users", None, "100000", "logins: users in pbrealms' password file, logged in in turn."],
        ["contrast-count", None, "50", "logins: logins against pbrealms with --auth file:."],
        ["storm-clients", None, "3000", "storm: clients that connect and log in at once."],
        [
            "storm-timeout",
            None,
            "60",
            "storm: seconds to wait for every client to log in; then it reports how many did.",
        ],
        ["held-sessions", None, "10000", "held: sessions logged in and held."],
        [
            "hold-concurrency",
            None,
            "200",
            "held and clock: logins under way at once while the sessions log in.",
        ],
        ["clock-sessions", None, "10000", "clock: sessions receiving the time."],
        ["clock-duration", None, "30", "clock: seconds to receive pushes for, once all logged in."],
        ["period", None, "1", "clock: seconds between pushes."],
        ["fanout-sessions", None, "1000", "fanout: sessions of one user."],
        ["greetings", None, "20", "fanout: greetings, each pushed to every other session."],
        [
            "timeout",
            None,
            None,
            "Seconds one run of a workload other than storm may take before it fails. "
            "[default: the load generator's, 120]",
        ],
    ]

    #: Options that are counts, and options that are seconds.
    counts = (
        "rounds greet-count in-flight login-count concurrency users contrast-count storm-clients "
        "held-sessions hold-concurrency clock-sessions fanout-sessions greetings"
    ).split()
    durations = ("scale-duration", "clock-duration", "storm-timeout", "timeout")

    def postOptions(self) -> None:
        for name in self.counts:
            self[name] = self._number(name, int)
        for name in self.durations:
            if self[name] is not None:
                self[name] = self._number(name, float)
        period = self["period"] = self._number("period", float)
        if not MIN_PERIOD <= period <= MAX_PERIOD:
            raise usage.UsageError(f"--period must be from {MIN_PERIOD:g} to {MAX_PERIOD:g}")
        self["only"] = self._workloads(self["only"])
        self["scale"] = [self._number("scale", int, v) for v in self["scale"].split(",")]
        if self["connect"] is not None:
            host, _, port = self["connect"].rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise usage.UsageError(f"--connect must be HOST:PORT, not {self['connect']!r}")
        if self["server-pid"] is not None:
            if self["connect"] is None:
                raise usage.UsageError("--server-pid goes with --connect")
            self["server-pid"] = self._number("server-pid", int)
        for name in ("json", "plot"):
            if self[name] is not None and not Path(self[name]).parent.resolve().is_dir():
                raise usage.UsageError(f"--{name} {self[name]}: no such directory")
        if self["logs"] is not None and not Path(self["logs"]).is_dir():
            raise usage.UsageError(f"--logs {self['logs']}: no such directory")
        if self["plot"] is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--plot needs matplotlib: pip install 'pbrealms[bench]'"
                ) from None

    def _number(self, name: str, kind: type, value: str | None = None) -> Any:
        value = self[name] if value is None else value
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if not number > 0:
            what = "a whole number" if kind is int else "a number"
            raise usage.UsageError(f"--{name} must be {what} above 0, not {value!r}")
        return number

    @staticmethod
    def _workloads(value: str) -> list[str]:
        chosen = [name.strip() for name in value.split(",") if name.strip()]
        for name in chosen:
            if name not in WORKLOADS:
                raise usage.UsageError(
                    f"unknown workload {name!r} in --only: choose from " + ", ".join(WORKLOADS)
                )
        if not chosen:
            raise usage.UsageError("--only needs at least one workload")
        return [name for name in WORKLOADS if name in chosen]


# ---------------------------------------------------------------------------
# Servers and the load generator


class BenchError(Exception):
    """
    A server or a load generator run failed; the message says how, in one line.
    """


def progress(message: str) -> None:
    """
    Tell the person waiting what is going on, on stderr.
    """
    sys.stderr.write(f"pbrealms-bench: {message}\n")
    sys.stderr.flush()


def environment() -> dict[str, str]:
    """
    This process's environment without pbrealms settings, which would change
    the servers' options behind the bench's back.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith("PBREALMS_")}


def raiseFileLimit() -> None:
    """
    Let this process and its children open as many files as they may.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def writePasswords(path: Path, users: int) -> Path:
    """
    Write a password file (mode 0600): bench:bench and, if C{users},
    user{users-1}:pw{users-1} ... user0:pw0.  The order is backwards because
    the load generator logs in as user0, user1 ... and Twisted's file checker
    (the logins contrast) reads the file up to the user: so it reads all of it,
    as it would for most users of a large file.
    """
    lines = [f"{BENCH_USER}:{BENCH_USER}\n"]
    lines.extend(f"user{i}:pw{i}\n" for i in reversed(range(users)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(lines)
    return path


#: Every process the bench started, so that none outlives it.
STARTED: list[subprocess.Popen] = []


def spawn(command: list[str], **kw: Any) -> subprocess.Popen:
    """
    Start a process, stdin closed, without the pbrealms settings of the
    environment, and remember it for L{killLeftovers}.
    """
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment(), **kw)
    STARTED.append(process)
    return process


def killLeftovers() -> None:
    """
    Kill whatever the bench started and did not stop yet: stopping may have
    been interrupted by a second Ctrl-C or a signal.
    """
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.wait()


def stopProcess(process: subprocess.Popen) -> None:
    """
    SIGTERM, then SIGKILL after L{STOP_TIMEOUT} seconds; reap it.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def tail(path: Path, lines: int = 3) -> str:
    """
    The last lines of a file, joined in one line, for an error message.
    """
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def freshName(work: Path, stem: str) -> str:
    """
    C{stem}, or C{stem-2}, C{stem-3} ...: the first that names no output file
    in C{work} yet (the scaling runs start the same server several times).
    """
    name, n = stem, 1
    while (work / f"{name}.out").exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def serverCommand(
    kind: str, workload: Workload, options: Mapping[str, Any], work: Path, name: str
) -> tuple[list[str], Path, re.Pattern]:
    """
    How to start a server of C{kind} for C{workload}: its command line, the
    file that will say where it listens, and the pattern of that line.  Its
    output, and so its log, goes to C{name}.out.
    """
    period = ["--period", f"{options['period']:g}"] if workload.realm == "clock" else []
    if kind == BASELINE:
        realm = ["--realm", "clock", *period] if workload.realm == "clock" else []
        module = [sys.executable, "-m", "pbrealms.bench.baseline"]
        command = [*module, "--port", "0", "--user", BENCH_USER, "--password", BENCH_USER, *realm]
        # Its first line, on stdout.
        return command, work / f"{name}.out", re.compile(r"^listening on \S+:(\d+)")
    users = options["users"] if workload.name == "logins" else 0
    passwd = work / f"passwd-{users}"
    if not passwd.exists():
        writePasswords(passwd, users)
    checker = ["--auth", f"file:{passwd}"] if kind == AUTH_FILE else ["--passwd", str(passwd)]
    # As the systemd unit and the container run it: its log on stdout, with
    # pbrealms's text logger, one line per login and per logout.
    logger = "--logger=pbrealms.logs.textLogger"
    twistd = [str(BIN / "twistd"), "-n", "--pidfile=", logger, "pbrealms"]
    realm = [f"--realm={workload.realm}", *period]
    command = [*twistd, *realm, *checker, "--port", "tcp:0:interface=127.0.0.1", *SERVER_LIMITS]
    return command, work / f"{name}.out", re.compile(r"pbrealms listening on \S+:(\d+)")


@contextlib.contextmanager
def server(
    kind: str, workload: Workload, options: Mapping[str, Any], work: Path
) -> Iterator[tuple[str, int | None]]:
    """
    Start a server of C{kind} for C{workload}, and stop it on the way out,
    whatever happens.  Yields where to connect (C{HOST:PORT}) and its pid.
    """
    if kind == PBREALMS and options["connect"] is not None:
        yield options["connect"], options["server-pid"]
        return
    name = freshName(work, f"{kind}-{workload.name}")
    command, log, listening = serverCommand(kind, workload, options, work, name)
    with open(work / f"{name}.out", "wb") as out:
        process = spawn(command, stdout=out, stderr=out)
    try:
        port = waitForPort(process, log, listening)
        progress(f"{workload.name}: {kind} server listening on 127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", process.pid
    finally:
        stopProcess(process)
        if process.returncode not in (0, -signal.SIGTERM):
            progress(f"{workload.name}: {kind} server exited with status {process.returncode}")
        if options.get("logs") is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(log, Path(options["logs"]) / log.name)


def waitForPort(process: subprocess.Popen, log: Path, listening: re.Pattern) -> int:
    """
    Wait until C{log} says on which port the server listens.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(OSError):
            found = listening.search(log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
        if process.poll() is not None:
            reason = tail(log)
            raise BenchError(f"the server exited with status {process.returncode}: {reason}")
        if time.monotonic() > deadline:
            raise BenchError(f"the server did not listen within {START_TIMEOUT:g} s")
        time.sleep(0.05)


def runLoad(
    workload: Workload, kind: str, where: str, pid: int | None, options: Mapping[str, Any]
) -> Result:
    """
    Run the load generator for C{workload} against the server at C{where},
    forwarding its progress lines; return the JSON object it prints last.
    """
    sizes = workload.arguments(options, kind)
    if options["timeout"] and "--timeout" not in sizes:
        sizes += ["--timeout", f"{options['timeout']:g}"]
    if pid:
        sizes += ["--server-pid", str(pid)]
    credentials = ["--user", BENCH_USER, "--password", BENCH_USER]
    module = [sys.executable, "-m", "pbrealms.bench.load"]
    command = [*module, workload.name, "--connect", where, *credentials, *sizes]
    process = spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: list[str] = []

    def forward() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if line.strip():
                said.append(line.strip())
                progress(f"  [{workload.name} {kind}] {line.strip()}")

    forwarding = threading.Thread(target=forward, daemon=True)
    forwarding.start()
    try:
        assert process.stdout is not None
        output = process.stdout.read()
        process.wait()
    finally:
        stopProcess(process)
        forwarding.join(5)
    if process.returncode != 0:
        raise BenchError(
            said[-1] if said else f"the load generator exited with {process.returncode}"
        )
    lines = output.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise BenchError("the load generator printed no JSON result") from None
    if not isinstance(result, dict):
        raise BenchError("the load generator printed no JSON object")
    return result


def runWorkload(workload: Workload, options: Mapping[str, Any], work: Path) -> dict[str, Result]:
    """
    Run C{workload} against each of its servers: what each gave, or
    C{{"error": why}}.  A throughput workload runs in rounds against
    pbrealms and the baseline (L{runRounds}), and once against the rest.
    """
    kinds = [k for k in workload.servers if k != AUTH_FILE or options["connect"] is None]
    results: dict[str, Result] = {}
    if workload.throughput:
        results.update(runRounds(workload, [k for k in kinds if k != AUTH_FILE], options, work))
    for kind in kinds:
        if kind not in results:
            results[kind] = runOnce(workload, kind, options, work)
    return results


def runOnce(workload: Workload, kind: str, options: Mapping[str, Any], work: Path) -> Result:
    """
    Run C{workload} once against a fresh server of C{kind}: what it gave, or
    C{{"error": why}}.
    """
    progress(f"{workload.name}: running against {kind}")
    started = time.monotonic()
    try:
        with server(kind, workload, options, work) as (where, pid):
            result = runLoad(workload, kind, where, pid, options)
    except BenchError as e:
        progress(f"{workload.name}: {kind} failed: {e}")
        return {"error": str(e)}
    progress(f"{workload.name}: {kind} done in {time.monotonic() - started:.1f} s")
    return result


def runRounds(
    workload: Workload, kinds: list[str], options: Mapping[str, Any], work: Path
) -> dict[str, Result]:
    """
    Start a server of each of C{kinds} and run C{workload} --rounds times
    against them by turns (pbrealms, baseline, pbrealms, baseline ...), so
    that a slow spell of the machine hurts both alike.  What each gave at
    best (L{bestOf}); or C{{"error": why, "rounds": [...]}} if its server did
    not start or a round failed, after which it sits out the rest.
    """
    total = options["rounds"]
    rounds: dict[str, list[Result]] = {kind: [] for kind in kinds}
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as servers:
        where = {}
        for kind in kinds:
            try:
                where[kind] = servers.enter_context(server(kind, workload, options, work))
            except BenchError as e:
                progress(f"{workload.name}: {kind} failed: {e}")
                failed[kind] = str(e)
        for n in range(1, total + 1):
            for kind, (address, pid) in where.items():
                if kind in failed:
                    continue
                progress(f"{workload.name}: round {n} of {total} against {kind}")
                started = time.monotonic()
                try:
                    rounds[kind].append(runLoad(workload, kind, address, pid, options))
                except BenchError as e:
                    progress(f"{workload.name}: {kind} failed: {e}")
                    failed[kind] = str(e)
                else:
                    progress(f"{workload.name}: {kind} done in {time.monotonic() - started:.1f} s")
    return {
        kind: (
            {"error": failed[kind], "rounds": rounds[kind]}
            if kind in failed
            else bestOf(rounds[kind], workload.throughput)
        )
        for kind in kinds
    }


def bestOf(rounds: list[Result], figures: tuple[str, ...]) -> Result:
    """
    One result for several rounds against a server: the first round's, but
    each of C{figures} (throughputs) the highest any round gave, each figure
    on its own; every round's result is kept under C{rounds}.
    """
    best = dict(rounds[0])
    for name in figures:
        best[name] = max((r[name] for r in rounds if r.get(name) is not None), default=None)
    best["rounds"] = rounds
    return best


def runScaling(options: Mapping[str, Any], work: Path) -> dict[str, Any]:
    """
    Run clock (for --scale-duration seconds) and held at each --scale
    session count, against pbrealms and the baseline.
    """
    curves: dict[str, Any] = {"sessions": options["scale"]}
    for name in ("clock", "held"):
        curves[name] = {PBREALMS: [], BASELINE: []}
    for sessions in options["scale"]:
        sized = {
            **options,
            "clock-sessions": sessions,
            "clock-duration": options["scale-duration"],
            "held-sessions": sessions,
        }
        for name in ("clock", "held"):
            progress(f"scaling: {name} with {sessions:,} sessions")
            for kind, result in runWorkload(WORKLOADS[name], sized, work).items():
                curves[name][kind].append(result)
    return curves


# ---------------------------------------------------------------------------
# The report


def evaluate(workload: Workload, results: Mapping[str, Result], options: Mapping) -> list[dict]:
    """
    The table lines of C{workload}'s C{results}: for each row the figures,
    the cells, the ratio and whether the target is met (L{None}: no target,
    or it could not be judged).
    """
    lines = []
    base = results.get(BASELINE)
    for row in workload.rows:
        mine = results.get(row.server)
        if mine is None:
            continue
        p = None if "error" in mine else row.figure(mine)
        b = None if base is None or "error" in base else row.figure(base)
        ratio = p / b if row.ratio and p is not None and b else None
        met = None
        if row.met is not None and p is not None:
            met = row.met(p, b)
        lines.append(
            {
                "workload": workload.name,
                "figure": row.label.format(o=options),
                "pbrealms": p,
                "baseline": b,
                "ratio": ratio,
                "better": row.better,
                "target": row.target,
                "met": met,
                "cells": [
                    "failed" if "error" in mine else row.cell(mine),
                    "—" if base is None else "failed" if "error" in base else row.cell(base),
                    "n/a" if ratio is None else f"{ratio:.2f}",
                ],
            }
        )
    return lines


def targetCell(line: Mapping[str, Any]) -> str:
    if not line["target"]:
        return ""
    verdict = {True: "met", False: "MISSED", None: "n/a"}[line["met"]]
    return f"{line['target']}: {verdict}"


def formatTable(lines: list[Mapping[str, Any]]) -> str:
    """
    The lines as a Markdown table, its columns padded to line up.
    """
    header = ["figure", "pbrealms", "bare PB", "pbrealms/bare", "better when", "target"]
    body = [[line["figure"], *line["cells"], line["better"], targetCell(line)] for line in lines]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = {1, 2, 3}

    def render(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if i in numeric else "-" * w for i, w in enumerate(widths)]
    return "\n".join([render(header), render(rule), *map(render, body)])


def roundsNote(options: Mapping[str, Any]) -> str:
    """
    The footnote under the table saying which figures are the best of
    several rounds; empty if none are.
    """
    rounded = [WORKLOADS[name] for name in options["only"] if WORKLOADS[name].throughput]
    if not rounded or options["rounds"] == 1:
        return ""
    names = ", ".join(w.name for w in rounded)
    note = f"{names}: each figure is the best of {options['rounds']} interleaved rounds"
    note += " against pbrealms and bare PB"
    if options["connect"] is None and any(AUTH_FILE in w.servers for w in rounded):
        note += "; the --auth file: contrast is one round"
    return note + "."


def machineInfo() -> dict[str, Any]:
    """
    What the figures were measured on.
    """
    import twisted

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    try:
        version = metadata.version("pbrealms")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pbrealms": version,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def describeMachine(machine: Mapping[str, Any]) -> str:
    ram = f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM, " if machine["ram_bytes"] else ""
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {ram}Python {machine['python']}, "
        f"Twisted {machine['twisted']}, {machine['date']}"
    )


def plot(curves: Mapping[str, Any], path: str) -> None:
    """
    Draw the scaling curves: clock p99 lateness and delivered %, and held
    RSS per session, against the session count, for both servers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("clock", "p99 lateness (ms)", key("p99_lateness_s", 1000)),
        ("clock", "pushes delivered (%)", key("delivered", 100)),
        ("held", "RSS per session (bytes)", key("rss_per_session")),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (name, label, figureOf) in zip(axes, panels, strict=True):
        for kind, style in ((PBREALMS, "o-"), (BASELINE, "s--")):
            points = [
                (n, v)
                for n, r in zip(curves["sessions"], curves[name][kind], strict=True)
                if "error" not in r and (v := figureOf(r)) is not None
            ]
            if points:
                ax.plot(
                    *zip(*points, strict=True), style, label="bare PB" if kind == BASELINE else kind
                )
        ax.set_title(f"{name}: {label}")
        ax.set_xlabel("sessions")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------
# The command


def bench(options: Mapping[str, Any]) -> dict[str, Any]:
    """
    Run the chosen workloads (and the scaling runs for --plot): the report
    that is printed and written to --json.
    """
    report: dict[str, Any] = {"machine": machineInfo(), "workloads": {}, "rows": []}
    # The password files and the servers' output: removed whatever happens
    # (--logs keeps copies of the output where the user said).
    with tempfile.TemporaryDirectory(prefix="pbrealms-bench-", ignore_cleanup_errors=True) as w:
        work = Path(w)
        try:
            for name in options["only"]:
                workload = WORKLOADS[name]
                results = runWorkload(workload, options, work)
                report["workloads"][name] = results
                report["rows"].extend(evaluate(workload, results, options))
            if options["plot"] is not None:
                report["scaling"] = runScaling(options, work)
        finally:
            # The servers write into the directory until they are gone.
            killLeftovers()
    if failures(report):
        if options.get("logs") is not None:
            progress(f"the servers' logs are in {options['logs']}")
        else:
            progress("to see what the servers logged, run again with --logs DIR")
    return report


def failures(report: Mapping[str, Any]) -> list[str]:
    """
    The runs of C{report} that failed, as C{workload/server}.
    """
    failed = [
        f"{name}/{kind}"
        for name, results in report["workloads"].items()
        for kind, result in results.items()
        if "error" in result
    ]
    scaling = report.get("scaling", {})
    for name in ("clock", "held"):
        for kind, results in scaling.get(name, {}).items():
            for sessions, result in zip(scaling["sessions"], results, strict=False):
                if "error" in result:
                    failed.append(f"{name} with {sessions} sessions/{kind}")
    return failed


def main(argv: list[str] | None = None) -> None:
    """
    The C{pbrealms-bench} command.
    """
    options = BenchOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"pbrealms-bench: error: {e}\n")
        raise SystemExit(EXIT_USAGE) from None
    raiseFileLimit()

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # A SIGTERM stops the servers as Ctrl-C does, through the finally clauses.
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        report = bench(options)
    except KeyboardInterrupt:
        progress("interrupted")
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(describeMachine(report["machine"]))
    print()
    print(formatTable(report["rows"]))
    note = roundsNote(options)
    if note:
        print()
        print(note)
    sys.stdout.flush()
    if options["json"] is not None:
        report["options"] = dict(options)
        with open(options["json"], "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if options["plot"] is not None:
        plot(report["scaling"], options["plot"])
    failed = failures(report)
    if failed:
        progress("failed: " + ", ".join(failed))
        raise SystemExit(EXIT_FAILED)


if __name__ == "__main__":
    main()
