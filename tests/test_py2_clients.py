"""
End to end with the PB clients that exist in the field: Python 2.7 and
Twisted 20.3 (tests/py2client.py), against twistd in its own process.

Twisted 20.3 is installed for Python 2.7 once, with pip, into pytest's cache
directory (keyed by the version), and reused by later runs.  The tests are
skipped only where Python 2.7 is absent; a failed install is an error.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import environment, stop, waitFor

TWISTED = "20.3.0"
BIN = Path(sys.executable).parent
SCRIPT = Path(__file__).with_name("py2client.py")
LISTENING = re.compile(r"pbrealms listening on 127\.0\.0\.1:(\d+)")
#: Seconds any one event may take to show.
TIMEOUT = 10.0


def python27() -> str | None:
    """
    Python 2.7: on the PATH, or among pyenv's versions.
    """
    found = shutil.which("python2.7")
    if found is not None and subprocess.run([found, "-V"], capture_output=True).returncode == 0:
        return found
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    pyenv = shutil.which("pyenv")
    if pyenv is not None:
        result = subprocess.run([pyenv, "root"], capture_output=True, text=True)
        roots.insert(0, result.stdout.strip())
    for root in filter(None, roots):
        for candidate in sorted(glob.glob(os.path.join(root, "versions", "2.7*", "bin", "python"))):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


@pytest.fixture(scope="session")
def py2(request, tmp_path_factory) -> tuple[str, Path]:
    """
    Python 2.7 and a directory holding Twisted 20.3 for it.
    """
    python = python27()
    if python is None:
        pytest.skip("Python 2.7 is not installed (neither python2.7 on PATH nor pyenv's 2.7)")
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        base = Path(cache.mkdir(f"py2-twisted-{TWISTED}"))
    else:  # -p no:cacheprovider
        base = tmp_path_factory.mktemp(f"py2-twisted-{TWISTED}")
    target = base / "site"
    if not (target / "twisted" / "__init__.py").exists():
        partial = base / f"installing-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(
            [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
             "--target", str(partial), f"twisted=={TWISTED}"],
            capture_output=True, text=True, timeout=300, cwd=base,
        )  # fmt: skip
        if result.returncode != 0:
            pytest.fail(
                f"pip could not install Twisted {TWISTED} for {python}:\n"
                f"{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
        try:
            partial.rename(target)
        except OSError:
            # Another xdist worker renamed its complete copy first: use that.
            if not (target / "twisted" / "__init__.py").exists():
                raise
            shutil.rmtree(partial)
    return python, target


class Py2Client:
    """
    A running tests/py2client.py: commands go to its standard input, and
    each line it prints is an event.
    """

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<exited>")

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def expect(self, prefix: str, timeout: float = TIMEOUT) -> str:
        """
        Wait for a line starting with C{prefix}, keeping the others.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {timeout} s: {self.seen}") from None
            self.seen.append(line)
            if line.startswith(prefix):
                return line
            if line == "<exited>":
                raise AssertionError(f"exited before {prefix!r}: {self.seen}")

    def drain(self) -> list[str]:
        """
        The lines printed so far and not yet expected.
        """
        lines = []
        while True:
            try:
                lines.append(self.lines.get_nowait())
            except queue.Empty:
                self.seen.extend(lines)
                return lines


class Scenario:
    """
    One twistd, and the Python 2 clients logged in to it.
    """

    def __init__(self, py2: tuple[str, Path], tmp_path: Path, passwd: Path) -> None:
        self.python, self.site = py2
        self.tmp_path = tmp_path
        self.passwd = passwd
        self.server: subprocess.Popen | None = None
        self.clients: list[Py2Client] = []
        self.output = tmp_path / "twistd.log"
        self.port = 0

    def start(self, *options: str) -> None:
        with self.output.open("wb") as handle:
            self.server = subprocess.Popen(
                [str(BIN / "twistd"), "-n", "--pidfile=", "pbrealms",
                 "--port", "tcp:0:interface=127.0.0.1", "--passwd", str(self.passwd), *options],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                cwd=self.tmp_path, env=environment(),
            )  # fmt: skip

        def listening() -> bool:
            if self.server.poll() is not None:
                raise AssertionError(f"twistd exited: {self.log()}")
            return LISTENING.search(self.log()) is not None

        waitFor(listening, 15.0, "twistd listening")
        self.port = int(LISTENING.search(self.log()).group(1))

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def client(self, mind: str, user: str = "alice", password: str = "wonderland") -> Py2Client:
        errors = (self.tmp_path / f"py2client-{len(self.clients)}.err").open("wb")
        process = subprocess.Popen(
            [self.python, str(SCRIPT), str(self.port), user, password, mind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
            cwd=self.tmp_path, env=environment(PYTHONPATH=str(self.site)),
        )  # fmt: skip
        errors.close()
        client = Py2Client(process)
        self.clients.append(client)
        return client

    def terminate(self) -> float:
        """
        SIGTERM the server; how many seconds it took to exit.
        """
        started = time.monotonic()
        self.server.send_signal(signal.SIGTERM)
        status = self.server.wait(30)
        assert status in (0, -signal.SIGTERM), self.log()
        return time.monotonic() - started

    def close(self) -> None:
        for client in self.clients:
            stop(client.process)
            for stream in (client.process.stdin, client.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if self.server is not None:
            stop(self.server)

    def checkLog(self) -> str:
        log = self.log()
        assert "closed the connection" not in log, log
        assert "keepalive" not in log, log
        assert "Traceback" not in log and "Unhandled" not in log, log
        return log


@pytest.fixture
def scenario(py2, tmp_path, passwd) -> Iterator[Scenario]:
    s = Scenario(py2, tmp_path, passwd)
    try:
        yield s
    finally:
        s.close()


def test_a_python_2_client_gets_the_clock_sets_its_period_by_keyword_and_stays(scenario):
    """
    Python 2 logs in to the clock realm, gets pushes, sets its period with
    a keyword argument (a byte-string name), and is still served after five
    keepalive intervals of 1 s (each ping answered with Python 2's error).
    """
    scenario.start("--realm=clock", "--keepalive=1")
    client = scenario.client("full")
    client.expect("logged in")
    client.expect("time ")
    client.send("setperiod 0.5")
    assert client.expect("answer setperiod") == "answer setperiod 0.5"
    client.drain()
    time.sleep(5)
    ticks = [line for line in client.drain() if line.startswith("time ")]
    assert len(ticks) >= 8, ticks  # two a second
    assert "lost" not in client.seen
    client.send("greet")
    assert client.expect("answer greet") == "answer greet <1>hello alice"
    log = scenario.checkLog()
    assert "alice logged in" in log and "realm clock" in log


def test_python_2_clients_are_replaced_at_once_and_shut_down_without_waiting(scenario):
    """
    Under replace-oldest with a ping timeout of 10 s, each newer Python 2
    login (after one without a client object, one whose client object lacks
    notifyKicked, and one with it) is admitted at once; and a shutdown with
    10 s of grace does not wait for Python 2's answer.
    """
    scenario.start(
        "--realm=limited", "--max=1", "--when-full=replace-oldest", "--ping-timeout=10",
        "--keepalive=1", "--shutdown-grace=10",
    )  # fmt: skip
    old = scenario.client("none")
    old.expect("logged in")
    for mind in ("partial", "full", "full"):
        started = time.monotonic()
        new = scenario.client(mind)
        new.expect("logged in")
        took = time.monotonic() - started
        assert took < 2.0, f"the {mind} login took {took:.1f} s"
        old.expect("lost")
        old = new
    kicked = scenario.clients[2]
    assert any(line.startswith("kicked ") for line in kicked.seen), kicked.seen
    new.send("greet")
    assert new.expect("answer greet").startswith("answer greet <")
    took = scenario.terminate()
    assert took < 2.0, f"the shutdown took {took:.1f} s"
    new.expect("shutdown ")
    new.expect("lost")
    log = scenario.checkLog()
    assert log.count("was replaced by a newer login") == 3, log


def test_a_partial_python_2_client_object_keeps_its_session(scenario, alicePassword):
    """
    In the sessions realm, a Python 2 client object that lacks
    notifySessionOpened, notifySessionClosed and notifyShutdown: other
    sessions come and go, it hears their greetings, its session stays open
    and answers, the server logs its missing pushes once, and a shutdown
    does not wait for it.
    """
    scenario.start("--realm=sessions", "--keepalive=1", "--shutdown-grace=10")
    partial = scenario.client("partial")
    partial.expect("logged in")
    for count in (1, 2):
        result = subprocess.run(
            [str(BIN / "pbrealms-client"), "--connect", f"tcp:127.0.0.1:{scenario.port}",
             "--user", "alice", "--password-file", str(alicePassword), "greet"],
            capture_output=True, text=True, timeout=30, env=environment(),
        )  # fmt: skip
        assert result.stdout == f"<{count}>hello alice\n", result.stderr
        assert partial.expect("greeting ") == f"greeting <{count}>hello alice"
    time.sleep(1.5)  # a keepalive ping or more, answered with Python 2's error
    partial.send("sessions")
    listed = partial.expect("answer sessions")
    assert listed.count("True") == 1, listed  # its own session, and the only one
    partial.send("greet")
    assert partial.expect("answer greet") == "answer greet <3>hello alice"
    log = scenario.checkLog()
    assert log.count("client answered") == 1, log
    assert "client answered notifySessionOpened with an error" in log
    took = scenario.terminate()
    assert took < 2.0, f"the shutdown took {took:.1f} s"
    partial.expect("lost")
    assert scenario.checkLog().count("alice logged in") == 3
