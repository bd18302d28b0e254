"""
The options of C{pbrealms-bench}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.python import usage

from pbrealms.bench.workloads import WORKLOADS
from pbrealms.options import Options
from pbrealms.push import MAX_PERIOD, MIN_PERIOD


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
