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

import json
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.python import usage

from pbrealms.bench import raiseFileLimit
from pbrealms.bench.options import BenchOptions
from pbrealms.bench.report import (
    describeMachine,
    evaluate,
    formatTable,
    machineInfo,
    plot,
    roundsNote,
)
from pbrealms.bench.runs import runScaling, runWorkload
from pbrealms.bench.servers import killLeftovers, progress
from pbrealms.bench.workloads import WORKLOADS

EXIT_FAILED = 1
EXIT_USAGE = 2


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
