"""
The report of C{pbrealms-bench}: the lines of the table and their targets,
the Markdown table and its footnote, the machine the figures come from, and
the scaling curves of C{--plot}.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pbrealms.bench.workloads import AUTH_FILE, BASELINE, PBREALMS, WORKLOADS, Result, Workload, key


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
