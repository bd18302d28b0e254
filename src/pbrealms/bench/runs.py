"""
The runs of C{pbrealms-bench}: the load generator against a server, a
workload against each of its servers (in rounds or once), and the scaling
runs of C{--plot}.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pbrealms.bench.servers import (
    BENCH_USER,
    BenchError,
    progress,
    server,
    spawn,
    stopProcess,
)
from pbrealms.bench.workloads import AUTH_FILE, BASELINE, PBREALMS, WORKLOADS, Result, Workload


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
