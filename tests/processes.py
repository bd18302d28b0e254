"""
Helpers for the tests that run real processes: twistd, pbrealms-client and
the system tools around them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

#: The commands a user runs, from the virtualenv running the tests.
BIN = Path(sys.executable).parent


def environment(**extra: str) -> dict[str, str]:
    """
    This process's environment without anything that would reach into the
    server: no pbrealms settings, no systemd protocol variables.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PBREALMS_", "LISTEN_", "NOTIFY_SOCKET"))
    }
    env.update(extra)
    return env


def waitFor(condition, timeout: float, what: str) -> None:
    """
    Poll C{condition} until it holds; fail, naming C{what}, after C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def stop(process: subprocess.Popen) -> None:
    """
    Kill a process if it still runs, and reap it.
    """
    if process.poll() is None:
        process.kill()
    process.wait()


def killAndReap(process: subprocess.Popen, pids, timeout: float = 10.0) -> None:
    """
    Kill C{pids} (a wrapper's children, which may outlive it), give
    C{process} C{timeout} seconds to reap them and exit, then L{stop} it.
    """
    for pid in pids:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    stop(process)


def tool(name: str) -> str:
    """
    The path of a system command; the test is skipped without it.
    """
    import pytest

    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def childrenOf(pid: int) -> list[int]:
    """
    The processes whose parent is C{pid}.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name, in parentheses, may hold spaces.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found
