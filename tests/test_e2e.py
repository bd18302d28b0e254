"""
End to end: twistd serving pbrealms in its own process, and pbrealms-client
calling it from another.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import environment, stop, waitFor

#: The commands a user runs, from the virtualenv running the tests.
BIN = Path(sys.executable).parent
TWISTD = [str(BIN / "twistd")]
CLIENT = [str(BIN / "pbrealms-client")]
LISTENING = re.compile(r"pbrealms listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class Server:
    """
    A twistd pbrealms process, its output going to a file.
    """

    def __init__(self, process: subprocess.Popen, output: Path) -> None:
        self.process = process
        self.outputPath = output
        self.port: int | None = None

    def output(self) -> str:
        return self.outputPath.read_text(errors="replace")

    def waitUntilListening(self) -> int:
        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {self.process.returncode}:\n{self.output()}"
                )
            return LISTENING.search(self.output()) is not None

        waitFor(listening, START_TIMEOUT, "twistd listening")
        self.port = int(LISTENING.search(self.output()).group(1))
        assert self.port > 0
        return self.port

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def terminate(self, sig: int = signal.SIGTERM, within: float = STOP_TIMEOUT) -> str:
        """
        Stop with C{sig} (SIGTERM, as a service manager would); check it
        stopped within C{within} seconds and cleanly, and return its output.
        """
        self.process.send_signal(sig)
        try:
            status = self.process.wait(within)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"twistd still running {within} s after {sig!r}") from None
        output = self.output()
        # twistd shuts down, then ends itself with the signal it received.
        assert status in (0, -sig), output
        assert "Main loop terminated" in output
        assert "Traceback" not in output
        assert "Unhandled" not in output
        return output

    def kill(self) -> None:
        stop(self.process)


@pytest.fixture
def serve(tmp_path: Path, pwfile: Path) -> Iterator:
    """
    Start twistd pbrealms with some options; every server is killed at the end.
    """
    servers: list[Server] = []
    handles = []

    def start(*options: str, twistdOptions: tuple[str, ...] = (), port: int = 0) -> Server:
        output = tmp_path / f"twistd-{len(servers)}.log"
        handle = output.open("wb")
        handles.append(handle)
        args = [
            *TWISTD,
            *twistdOptions,
            "-n",
            "--pidfile=",
            "pbrealms",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--passwd",
            str(pwfile),
            *options,
        ]
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=environment(),
        )
        server = Server(process, output)
        servers.append(server)
        server.waitUntilListening()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.kill()
        for handle in handles:
            handle.close()


def client(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLIENT, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        env=environment(**env),
    )


def oneLine(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def closedPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def limited(serve) -> Server:
    return serve("--realm=limited", "--max=2")


def test_greet(limited, alicePassword):
    result = client(
        "--connect", limited.endpoint, "--user", "alice", "--password-file", str(alicePassword),
        "greet", "--count", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["<1>hello alice", "<2>hello alice"]
    assert result.stderr == ""
    output = limited.terminate()
    assert "alice logged in" in output
    assert "alice disconnected" in output


def test_status(limited, alicePassword):
    result = client(
        "--connect", limited.endpoint, "--user", "alice", "--password-file", str(alicePassword),
        "status",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status = json.loads(oneLine(result.stdout))
    assert status["realm"] == "limited"
    assert status["max"] == 2
    assert status["user"] == "alice"
    assert status["sessions"] == 1


def test_wrong_password(limited, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("builder\n")
    result = client(
        "--connect", limited.endpoint, "--user", "alice", "--password-file", str(wrong),
        "greet",
    )  # fmt: skip
    assert result.returncode == 3
    assert result.stdout == ""
    line = oneLine(result.stderr)
    assert "login refused" in line
    assert "builder" not in line


def test_password_from_environment(limited):
    result = client(
        "--connect", limited.endpoint, "--user", "bob", "greet", PBREALMS_PASSWORD="builder"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["<1>hello bob"]
    wrong = client("--connect", limited.endpoint, "--user", "bob", "greet", PBREALMS_PASSWORD="x")
    assert wrong.returncode == 3


def test_connection_refused(alicePassword):
    port = closedPort()
    result = client(
        "--connect", f"tcp:127.0.0.1:{port}", "--user", "alice",
        "--password-file", str(alicePassword), "greet",
    )  # fmt: skip
    assert result.returncode == 5
    assert result.stdout == ""
    line = oneLine(result.stderr)
    assert "connection refused" in line
    assert str(port) in line


@pytest.mark.parametrize("command", [CLIENT, [sys.executable, "-m", "pbrealms.client"]])
def test_client_help(command):
    result = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=30, env=environment()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: pbrealms-client")
    assert "--connect" in result.stdout
    assert "greet" in result.stdout


def test_clock_and_sigterm_with_a_session_open(serve, alicePassword, tmp_path):
    server = serve("--realm=clock", "--period=0.1")
    common = [
        "--connect", server.endpoint, "--user", "alice", "--password-file", str(alicePassword),
    ]  # fmt: skip

    started = time.monotonic()
    result = client(*common, "clock", "--ticks", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", line), line
    assert time.monotonic() - started < 10

    # A client that stays connected while the server is told to stop.
    ticks, errors = tmp_path / "ticks", tmp_path / "errors"
    with ticks.open("wb") as out, errors.open("wb") as err:
        listener = subprocess.Popen(
            [*CLIENT, *common, "clock"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=environment(),
        )
    try:
        waitFor(
            lambda: listener.poll() is not None or ticks.read_text().count("\n") >= 2,
            START_TIMEOUT,
            "the clock client printing",
        )
        assert listener.poll() is None, errors.read_text()
        output = server.terminate()
        assert output.count("alice logged in") == 2
        assert output.count("alice disconnected") == 2
        assert listener.wait(STOP_TIMEOUT) == 1
        assert "the server stopped: the server is shutting down" in oneLine(errors.read_text())
    finally:
        stop(listener)


def test_bad_option_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "pbrealms", "--port", "tcp:0:interface=127.0.0.1",
         "--realm=nope"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=environment(),
    )  # fmt: skip
    assert result.returncode == 2
    line = oneLine(result.stderr)
    assert "'nope'" in line
    assert "realm" in line
    assert "listening" not in result.stdout
    assert "starting up" not in result.stdout


def test_twistd_help_lists_pbrealms(tmp_path):
    result = subprocess.run(
        [*TWISTD, "--help"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=environment(),
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+pbrealms\s+\S", result.stdout, re.MULTILINE), result.stdout


def test_json_logs(serve, alicePassword):
    server = serve("--realm=tracking", twistdOptions=("--logger=pbrealms.logs.jsonLogger",))
    common = ["--connect", server.endpoint, "--user", "alice"]
    assert client(*common, "--password-file", str(alicePassword), "greet").returncode == 0
    assert client(*common, "status", PBREALMS_PASSWORD="wrong").returncode == 3
    output = server.terminate()
    records = [json.loads(line) for line in output.splitlines()]
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    login, logout = (
        next(r for r in records if r["message"].startswith(f"alice {what}"))
        for what in ("logged in", "disconnected")
    )
    for record in (login, logout):
        assert record["user"] == "alice"
        assert record["realm"] == "tracking"
        assert record["peer"].startswith("127.0.0.1:")
        assert record["session"] == login["session"]
    assert isinstance(logout["duration"], float)
    refused = next(r for r in records if r["message"].startswith("login refused"))
    assert (refused["user"], refused["realm"], refused["level"]) == ("alice", "tracking", "info")


class SilentMind:
    """
    Source of a client that logs in and then never answers anything.
    """

    script = """
import sys
from twisted.internet import reactor, defer
from twisted.spread import pb
from twisted.cred.credentials import UsernamePassword

class Mind(pb.Referenceable):
    def remote_notifyShutdown(self, reason):
        print("told:", reason, flush=True)
        return defer.Deferred()  # never answers

factory = pb.PBClientFactory()
reactor.connectTCP("127.0.0.1", int(sys.argv[1]), factory)
held = []
factory.login(UsernamePassword(b"alice", b"wonderland"), client=Mind()).addCallback(held.append)
reactor.run()
"""


@pytest.mark.timing
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_waits_the_grace_period_at_most(serve, sig, tmp_path):
    server = serve("--shutdown-grace=1")
    out = tmp_path / "silent.out"
    with out.open("wb") as handle:
        silent = subprocess.Popen(
            [sys.executable, "-c", SilentMind.script, str(server.port)],
            stdout=handle, stderr=subprocess.STDOUT, env=environment(),
        )  # fmt: skip
    try:
        waitFor(lambda: "alice logged in" in server.output(), START_TIMEOUT, "login")
        started = time.monotonic()
        output = server.terminate(sig, within=2.0 + 1.0)
        took = time.monotonic() - started
        assert 1.0 <= took < 2.0 + 0.5, took  # the grace, then at most a second
        assert "told: the server is shutting down" in out.read_text()
        assert output.count("alice disconnected") == 1
        assert "shutting down: telling 1 session, waiting up to 1 s for answers" in output
    finally:
        stop(silent)


class Watch:
    """
    A C{pbrealms-client ... watch} process, its output and errors going to files.
    """

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.outPath, self.errPath = tmp_path / "watch.out", tmp_path / "watch.err"
        with self.outPath.open("wb") as out, self.errPath.open("wb") as err:
            self.process = subprocess.Popen(
                [*CLIENT, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=environment(),
            )

    def lines(self) -> list[str]:
        return self.outPath.read_text(errors="replace").splitlines()

    def errors(self) -> list[str]:
        return self.errPath.read_text(errors="replace").splitlines()

    def waitFor(self, condition, what: str) -> None:
        def met() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"watch exited with {self.process.returncode}: {self.errors()}"
                )
            return condition()

        waitFor(met, START_TIMEOUT, what)

    def connections(self) -> int:
        return sum(line.startswith("connected to ") for line in self.errors())

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(STOP_TIMEOUT)


def test_watch_prints_what_the_other_sessions_do(serve, alicePassword, tmp_path):
    server = serve("--realm=sessions")
    common = [
        "--connect", server.endpoint, "--user", "alice", "--password-file", str(alicePassword),
    ]  # fmt: skip
    watch = Watch(tmp_path, *common, "watch")
    try:
        watch.waitFor(lambda: watch.connections() == 1, "watch logged in")
        result = client(*common, "greet")
        assert result.stdout == "<1>hello alice\n", result.stderr
        watch.waitFor(lambda: len(watch.lines()) >= 3, "watch printing")
        opened, greeting, closed = watch.lines()
        session = re.fullmatch(r"session (\d+) opened from (127\.0\.0\.1:\d+)", opened)
        assert session, opened
        assert greeting == "greeting <1>hello alice"
        number, peer = session.groups()
        assert closed in (
            f"session {number} closed from {peer}: disconnected",
            f"session {number} closed from {peer}: logged out",
        )
        # Interrupted, it logs out and exits quietly.
        assert watch.interrupt() == 0
        assert watch.errors() == [f"connected to {server.endpoint} as alice"]
        assert len(watch.lines()) == 3
    finally:
        stop(watch.process)
    output = server.terminate()
    assert output.count("alice logged in") == 2
    assert output.count("alice disconnected") == 2


def test_watch_kicked_by_a_newer_login_exits_7(serve, alicePassword, tmp_path):
    server = serve("--realm=sessions", "--max=1", "--when-full=replace-oldest")
    common = [
        "--connect", server.endpoint, "--user", "alice", "--password-file", str(alicePassword),
    ]  # fmt: skip
    watch = Watch(tmp_path, *common, "watch")
    try:
        watch.waitFor(lambda: watch.connections() == 1, "watch logged in")
        result = client(*common, "greet")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "<1>hello alice\n"
        assert watch.process.wait(STOP_TIMEOUT) == 7
    finally:
        stop(watch.process)
    kicked = re.compile(
        r"kicked: alice's session \d+ from 127\.0\.0\.1:\d+ "
        r"was replaced by a newer login from 127\.0\.0\.1:\d+"
    )
    (line,) = watch.lines()
    assert kicked.fullmatch(line), line
    connected, last = watch.errors()
    assert connected == f"connected to {server.endpoint} as alice"
    assert last == f"pbrealms-client: {line}"
    output = server.terminate()
    assert output.count("alice logged in") == 2


def test_watch_comes_back_after_a_restart_and_subscribes_again(serve, alicePassword, tmp_path):
    # The server's period is long: only the watch's --period makes ticks come
    # this often, and so only if it asks again after logging in again.
    server = serve("--realm=clock", "--period=60")
    common = [
        "--connect", server.endpoint, "--user", "alice", "--password-file", str(alicePassword),
    ]  # fmt: skip
    watch = Watch(tmp_path, *common, "watch", "--period", "0.1")

    def ticks() -> int:
        return sum(line.startswith("time ") for line in watch.lines())

    try:
        watch.waitFor(lambda: ticks() >= 3, "ticks from the first server")
        for line in watch.lines():
            assert re.fullmatch(r"time \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", line), line
        server.terminate()
        watch.waitFor(
            lambda: any("reconnecting in" in line for line in watch.errors()), "watch retrying"
        )
        assert "server shutting down: the server is shutting down" in watch.lines()
        again = serve("--realm=clock", "--period=60", port=server.port)
        watch.waitFor(lambda: watch.connections() == 2, "watch logged in again")
        before = ticks()
        watch.waitFor(lambda: ticks() >= before + 3, "ticks from the second server")
        assert watch.interrupt() == 0
    finally:
        stop(watch.process)
    errors = watch.errors()
    assert errors[0] == errors[-1] == f"connected to {again.endpoint} as alice"
    assert f"lost the connection to {server.endpoint}; reconnecting in " in errors[1]
    for line in errors[1:-1]:
        assert re.fullmatch(r".*; reconnecting in \d+\.\d s", line), line
    assert again.terminate().count("alice logged in") == 1
