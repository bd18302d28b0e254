"""
The options of the load generator: C{WORKLOAD --connect HOST:PORT
[options]}, in any order, as L{pbrealms.bench.cli} passes them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from twisted.python import usage

from pbrealms.bench.load.workloads import WORKLOADS
from pbrealms.options import Options

#: The command, as it names itself in its help and its errors.
PROG = "python -m pbrealms.bench.load"

# What argparse takes for a negative number rather than an option.
_NEGATIVE = re.compile(r"^-\d+$|^-\d*\.\d+$")


class LoadOptions(Options):
    """
    The load generator's command line.  Options and the workload may come in
    any order (getopt alone stops at the workload), and the errors are those
    the command gave when it parsed with argparse: an unknown or shortened
    option or a second argument is C{unrecognized arguments: ...}, and a
    missing one C{the following arguments are required: ...}.

    After parsing, C{count}, C{concurrency} and C{sessions} hold the
    workload's default if they were not given, and C{host} and C{port} say
    where C{connect} is.
    """

    synopsis = f"Usage: {PROG} WORKLOAD --connect HOST:PORT [options]"
    longdesc = (
        "Run one workload against one PB server; print its figures as JSON. "
        "Workloads: " + ", ".join(WORKLOADS) + "."
    )
    optParameters = [
        ["connect", None, None, "HOST:PORT of the server (required)."],
        ["user", None, "bench", "The user to log in as."],
        ["password", None, "bench", "Its password."],
        ["timeout", None, 120.0, "Seconds for the workload.", float],
        [
            "retry-after",
            None,
            10.0,
            "Seconds after which a login starts over if the server has not spoken on its "
            "connection (not in storm).",
            float,
        ],
        ["server-pid", None, None, "Read the server's memory from /proc.", int],
        ["count", None, None, "greet: 20000; logins: 1000.", int],
        ["in-flight", None, 50, "greet: calls in flight at once.", int],
        ["concurrency", None, None, "logins: 50; held, clock, fanout: 200.", int],
        ["users", None, None, "logins: log in as user{i % N} / pw{i % N}.", int],
        ["clients", None, 3000, "storm: clients.", int],
        ["sessions", None, None, "held, clock: 10000; fanout: 1000.", int],
        ["period", None, 1.0, "clock: the server's period.", float],
        ["duration", None, 30.0, "clock: seconds of pushes.", float],
        ["greetings", None, 20, "fanout: greetings.", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["workload"] = None
        self._unrecognized: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        arguments = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self._sortOut(arguments))

    def _sortOut(self, arguments: list[str]) -> list[str]:
        """
        Take the workload and whatever is not an option out of C{arguments}
        and return the options, for getopt.  Only whole option names count,
        as argparse had it with C{allow_abbrev=False}.
        """
        takesValue = {o[:-1] for o in self.longOpt if o.endswith("=")}
        flags = {o for o in self.longOpt if not o.endswith("=")}
        given: list[str] = []
        i = 0
        while i < len(arguments):
            argument = arguments[i]
            i += 1
            if argument == "--":
                rest = arguments[i:]
                if self["workload"] is None and rest:
                    self["workload"] = rest.pop(0)
                else:
                    rest.insert(0, argument)
                self._unrecognized.extend(rest)
                break
            if not self._looksLikeOption(argument):
                if self["workload"] is None:
                    self["workload"] = argument
                else:
                    self._unrecognized.append(argument)
                continue
            name, equals, value = argument[2:].partition("=")
            if argument == "-h" or (argument[1] == "-" and name in flags):
                if equals:
                    shown = "-h/--help" if name == "help" else f"--{name}"
                    raise usage.UsageError(f"argument {shown}: ignored explicit argument {value!r}")
                given.append("--help" if argument == "-h" else argument)
            elif argument[1] == "-" and name in takesValue:
                if not equals:
                    if i == len(arguments) or self._looksLikeOption(arguments[i]):
                        raise usage.UsageError(f"argument --{name}: expected one argument")
                    argument = f"--{name}={arguments[i]}"
                    i += 1
                given.append(argument)
            else:
                self._unrecognized.append(argument)
        return given

    @staticmethod
    def _looksLikeOption(argument: str) -> bool:
        return argument.startswith("-") and argument != "-" and not _NEGATIVE.match(argument)

    def postOptions(self) -> None:
        workload = self["workload"]
        if workload is not None and workload not in WORKLOADS:
            choices = ", ".join(map(repr, WORKLOADS))
            raise usage.UsageError(
                f"argument workload: invalid choice: {workload!r} (choose from {choices})"
            )
        missing = [
            name
            for name, value in (("workload", workload), ("--connect", self["connect"]))
            if value is None
        ]
        if missing:
            raise usage.UsageError("the following arguments are required: " + ", ".join(missing))
        if self._unrecognized:
            raise usage.UsageError("unrecognized arguments: " + " ".join(self._unrecognized))
        logins = workload == "logins"
        if self["count"] is None:
            self["count"] = 1000 if logins else 20000
        if self["concurrency"] is None:
            self["concurrency"] = 50 if logins else 200
        if self["sessions"] is None:
            self["sessions"] = 1000 if workload == "fanout" else 10000
        host, _, port = self["connect"].rpartition(":")
        if not host or not port.isdigit():
            raise usage.UsageError(f"--connect wants HOST:PORT, not {self['connect']!r}")
        self["host"], self["port"] = host, int(port)
