"""
The processes C{pbrealms-bench} starts: the servers under test, each on a
loopback port with its output in the work directory, and (through L{spawn})
the load generator; none outlives the bench (L{killLeftovers}).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pbrealms.bench.workloads import AUTH_FILE, BASELINE, PBREALMS, Workload

#: The commands of the virtualenv (or installation) running this one.
BIN = Path(sys.executable).parent
#: The bench logs in as this user (password the same) wherever it needs one.
BENCH_USER = "bench"
#: Seconds a server may take to say which port it listens on.
START_TIMEOUT = 60.0
#: Seconds a server gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Room for the storm and held workloads, whose clients all come from 127.0.0.1.
SERVER_LIMITS = ["--max-unauthenticated-per-source", "20000", "--max-connections", "19000"]


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
