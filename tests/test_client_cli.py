"""
The command-line tools as a new user meets them: one usage line per help,
versions that name pbrealms, errors that say in one line what is wrong and
what to do, and pbrealms-client interrupted by Ctrl-C or SIGTERM logging out
and exiting 0, with real twistd and pbrealms-client processes.
"""

from __future__ import annotations

import io
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
import trustme
from conftest import RecordingFactory, Served, exited
from processes import environment, stop, waitFor
from twisted.internet import endpoints, protocol, ssl, task
from twisted.python.failure import Failure

from pbrealms import passwd
from pbrealms.bench import baseline, cli, load
from pbrealms.client import TLSFailed, connect
from pbrealms.client.cli import EXIT_REFUSED, EXIT_UNREACHABLE, CommandFailed, explain, main, run
from pbrealms.client.options import ClientOptions
from pbrealms.guard import SourcePenalties
from pbrealms.login import LoginRoot
from pbrealms.options import versionText

BIN = Path(sys.executable).parent
CLIENT = str(BIN / "pbrealms-client")
TWISTD = str(BIN / "twistd")
LISTENING = re.compile(r"pbrealms listening on 127\.0\.0\.1:(\d+)")
TIMEOUT = 15.0


@pytest.fixture
def password(monkeypatch):
    monkeypatch.setenv("PBREALMS_PASSWORD", "wonderland")


# ---------------------------------------------------------------------------
# Help and --version


@pytest.mark.parametrize("command", ["greet", "status", "clock", "watch"])
def test_a_commands_help_has_one_usage_line(capsys, command):
    with pytest.raises(SystemExit) as exited:
        ClientOptions().parseOptions([command, "--help"])
    assert exited.value.code == 0
    help = capsys.readouterr().out
    assert help.count("Usage:") == 1, help
    first = help.splitlines()[0]
    assert re.fullmatch(rf"Usage: pbrealms-client --user NAME \[options\] {command}\b.*", first)
    assert "Options:" in help


def test_the_clients_help_has_one_usage_line(capsys):
    with pytest.raises(SystemExit):
        ClientOptions().parseOptions(["--help"])
    help = capsys.readouterr().out
    assert help.count("Usage:") == 1
    assert "logs out and exits 0" in " ".join(help.split())


def test_the_bench_help_points_where_the_text_is(capsys):
    with pytest.raises(SystemExit):
        cli.BenchOptions().parseOptions(["--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert "see above" not in help
    # "see below" for what is printed below.
    below = help.index("see below")
    assert help.index("With --connect it measures a pbrealms server you started") > below


def run_baseline(argv: list[str]) -> None:
    sys.argv = ["baseline", *argv]
    baseline.main()


@pytest.mark.parametrize(
    "tool",
    [main, passwd.main, cli.main, load.main, run_baseline],
    ids=["client", "passwd", "bench", "load", "baseline"],
)
def test_version_names_pbrealms_and_twisted(capsys, monkeypatch, tool):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exited:
        tool(["--version"])
    assert exited.value.code in (0, None)
    out = capsys.readouterr().out
    assert out == versionText() + "\n"
    assert re.fullmatch(r"pbrealms \S+ \(Twisted \d+\.\d+\S*\)\n", out)


def test_the_installed_commands_print_that_version():
    for command in ("pbrealms-client", "pbrealms-passwd", "pbrealms-bench"):
        done = subprocess.run(
            [str(BIN / command), "--version"], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, versionText() + "\n", "")


# ---------------------------------------------------------------------------
# Usage errors: one line, naming the option, never echoing a password


def usageLine(capsys, tool, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        tool(args)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert out == ""
    return lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--timeout", "abc", "greet"], "--timeout 'abc': must be a number"),
        (["clock", "--period", "abc"], "--period 'abc': must be a number"),
        (["watch", "--period", "1e"], "--period '1e': must be a number"),
        (["greet", "--count", "x"], "--count 'x': must be a whole number"),
        (["clock", "--ticks", "1.5"], "--ticks '1.5': must be a whole number"),
        (["greet", "x", "y"], "greet takes no arguments, but was given 'x' 'y'"),
        (["status", "extra"], "status takes no arguments, but was given 'extra'"),
        (["--password-f", "pw", "greet"],
         "--password-f: give the whole option name (--password-file)"),
        (["--time", "5", "greet"], "--time: give the whole option name (--timeout)"),
    ],
)  # fmt: skip
def test_usage_errors_say_what_is_wrong_in_one_line(capsys, password, args, line):
    assert usageLine(capsys, main, ["--user", "alice", *args]) == f"pbrealms-client: error: {line}"


@pytest.mark.parametrize(
    "args",
    [
        ["--password=s3cret", "greet"],
        ["--password", "s3cret", "greet"],
        ["--pass=s3cret", "greet"],
        ["--passw", "s3cret", "greet"],
        ["greet", "--password=s3cret"],
    ],
)
def test_a_password_on_the_command_line_is_refused_and_not_repeated(capsys, password, args):
    line = usageLine(capsys, main, ["--user", "alice", *args])
    assert "s3cret" not in line
    assert "the password never goes on the command line" in line
    assert "--password-file FILE or set PBREALMS_PASSWORD" in line


@pytest.mark.parametrize(
    ("tool", "args", "line"),
    [
        (passwd.main, ["f", "alice", "extra"],
         "pbrealms-passwd: error: too many arguments: 'extra' after FILE USER"),
        (passwd.main, ["f"],
         "pbrealms-passwd: error: give the password file and the user name: FILE USER"),
        (passwd.main, ["--rounds", "x", "f", "u"],
         "pbrealms-passwd: error: --rounds 'x': must be a whole number"),
        (passwd.main, ["--ro", "5", "f", "u"],
         "pbrealms-passwd: error: --ro: give the whole option name (--rounds)"),
        (cli.main, ["--jso", "x.json"],
         "pbrealms-bench: error: --jso: give the whole option name (--json)"),
        (cli.main, ["--logs", "/no/such/dir"],
         "pbrealms-bench: error: --logs /no/such/dir: no such directory"),
        (load.main, ["greet", "--connect", "h:1", "--count", "x"],
         "python -m pbrealms.bench.load: error: --count 'x': must be a whole number"),
        (load.main, ["greet", "--connect", "h:1", "--in", "5"],
         "python -m pbrealms.bench.load: error: unrecognized arguments: --in 5"),
    ],
)  # fmt: skip
def test_the_other_tools_say_it_in_one_line_too(capsys, monkeypatch, tmp_path, tool, args, line):
    # Were an option taken for another, nothing would be written in the clone.
    monkeypatch.chdir(tmp_path)
    assert usageLine(capsys, tool, args) == line


# ---------------------------------------------------------------------------
# What went wrong connecting, in one line with what to do


def options(endpoint: str, *args: str) -> ClientOptions:
    parsed = ClientOptions()
    parsed.parseOptions(["--connect", endpoint, "--user", "alice", *args])
    return parsed


@pytest_twisted.async_fixture
async def tlsServer(reactor, harness, tmp_path):
    """
    pbrealms over TLS on 127.0.0.1 with a certificate for "localhost" only,
    signed by an authority nobody trusts: its port and that authority.
    """
    ca = trustme.CA()
    key = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(key))
    factory = RecordingFactory(harness.makeRoot("cache"))
    listening = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={key}"
    port = await endpoints.serverFromString(reactor, listening).listen(factory)
    harness.servers.append(Served(harness, factory.root, factory, port))
    return port.getHost().port, ca


def tls(reactor, host: str, port: int, ca: trustme.CA | None = None):
    trust = None if ca is None else ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    return endpoints.wrapClientTLS(
        ssl.optionsForClientTLS(host, trustRoot=trust),
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port),
    )


@pytest_twisted.ensureDeferred
async def test_an_untrusted_certificate_says_so_and_what_to_do(
    reactor, tlsServer, tmp_path, password
):
    port, ca = tlsServer
    with pytest.raises(TLSFailed) as failed:
        await connect(reactor, tls(reactor, "localhost", port), "alice", "wonderland")
    assert failed.value.problem == "untrusted"
    where = f"tcp:localhost:{port}"
    explained = explain(Failure(failed.value), where, 10.0)
    assert explained.status == EXIT_UNREACHABLE
    assert str(explained) == (
        f"the TLS certificate of {where} is not trusted (certificate verify failed): "
        "give --ca-file with the authority that signed it"
    )
    # The wrong authority is named.
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(CommandFailed) as refused:
        await run(reactor, options(where, "--tls", "--ca-file", str(other), "greet"), io.StringIO())
    assert str(refused.value).endswith(f": --ca-file {other} is not the authority that signed it")
    # With the right one, it logs in.
    right = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(right))
    out = io.StringIO()
    await run(reactor, options(where, "--tls", "--ca-file", str(right), "greet"), out)
    assert out.getvalue() == "<1>hello alice\n"


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_says_so(reactor, tlsServer):
    port, ca = tlsServer
    with pytest.raises(TLSFailed) as failed:
        await connect(reactor, tls(reactor, "127.0.0.1", port, ca), "alice", "wonderland")
    assert failed.value.problem == "name"
    assert str(explain(Failure(failed.value), "tcp:127.0.0.1:1", 10.0)) == (
        "the TLS certificate of tcp:127.0.0.1:1 is not issued for 127.0.0.1: "
        "give --connect the host name it is issued for"
    )


@pytest_twisted.ensureDeferred
async def test_pbrealms_client_with_an_untrusted_certificate(reactor, tlsServer, alicePassword):
    port, _ = tlsServer
    args = [
        CLIENT, "--connect", f"tcp:localhost:{port}", "--tls", "--user", "alice",
        "--password-file", str(alicePassword), "greet",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment()
    )
    try:
        # The reactor serves it meanwhile.
        await exited(process, 30)
        out, err = process.communicate()
    finally:
        stop(process)
    assert process.returncode == EXIT_UNREACHABLE
    assert out == ""
    assert err == (
        f"pbrealms-client: the TLS certificate of tcp:localhost:{port} is not trusted "
        "(certificate verify failed): give --ca-file with the authority that signed it\n"
    )


@pytest_twisted.ensureDeferred
async def test_a_penalised_address_is_told_how_long_to_wait(reactor, harness, password):
    penalties = SourcePenalties(task.Clock())
    for _ in range(3):
        penalties.failed("127.0.0.1")
    base = harness.makeRoot("cache")
    served = await harness.serve(
        root=LoginRoot(
            base.checker,
            base.realm,
            base.registry,
            base.registry.clock,
            base.registry.metrics,
            penalties=penalties,
        )
    )
    with pytest.raises(CommandFailed) as refused:
        await run(reactor, options(served.endpoint, "greet"), io.StringIO())
    assert refused.value.status == EXIT_REFUSED
    assert str(refused.value) == (
        "login refused: too many failed logins from this address: try again in 15 s "
        "(every failed login from this address adds to the wait: check the user name and "
        "password first)"
    )
    assert penalties.penalty("127.0.0.1") == 15  # asking again added nothing


class CloseAtOnce(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_at_accept_names_the_likely_causes(reactor, password):
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(CloseAtOnce), interface="127.0.0.1")
    try:
        where = f"tcp:127.0.0.1:{port.getHost().port}"
        with pytest.raises(CommandFailed) as failed:
            await run(reactor, options(where, "status"), io.StringIO())
    finally:
        await port.stopListening()
    assert failed.value.status == EXIT_UNREACHABLE
    assert str(failed.value) == (
        f"cannot connect to {where}: the server closed the connection before answering the "
        "login (it may hold as many connections as it allows, or be refusing this address; "
        "its log says which)"
    )


# ---------------------------------------------------------------------------
# Interrupted: real processes


class Twistd:
    def __init__(self, tmp_path: Path, pwfile: Path, *options: str) -> None:
        self.log = tmp_path / "twistd.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "pbrealms", "--port", "tcp:0:interface=127.0.0.1",
                 "--passwd", str(pwfile), *options],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=tmp_path, env=environment(),
            )  # fmt: skip

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited: {self.output()}")
            return LISTENING.search(self.output()) is not None

        waitFor(listening, TIMEOUT, "twistd listening")
        self.endpoint = f"tcp:127.0.0.1:{LISTENING.search(self.output()).group(1)}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def clockServer(tmp_path: Path, pwfile: Path) -> Iterator[Twistd]:
    server = Twistd(tmp_path, pwfile, "--realm=clock", "--period=0.1")
    try:
        yield server
    finally:
        stop(server.process)


def defaultSigint() -> None:
    # A shell's background job starts with SIGINT ignored, which Python
    # and then Twisted keep: give the client what a terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Client:
    """
    A pbrealms-client process, its output and errors going to files.
    """

    def __init__(self, tmp_path: Path, name: str, *args: str) -> None:
        self.name = name
        self.outPath, self.errPath = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with self.outPath.open("wb") as out, self.errPath.open("wb") as err:
            self.process = subprocess.Popen(
                [CLIENT, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=environment(), preexec_fn=defaultSigint,
            )  # fmt: skip

    def out(self) -> list[str]:
        return self.outPath.read_text(errors="replace").splitlines()

    def err(self) -> list[str]:
        return self.errPath.read_text(errors="replace").splitlines()

    def waitFor(self, condition, what: str) -> None:
        def met() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.process.returncode}: {self.err()}"
                )
            return condition()

        waitFor(met, TIMEOUT, f"{self.name}: {what}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_commands_log_out_and_exit_0(tmp_path, clockServer, alicePassword, sig):
    common = ["--connect", clockServer.endpoint, "--user", "alice",
              "--password-file", str(alicePassword)]  # fmt: skip
    # A server that accepts and never speaks: the commands that would be
    # over at once are interrupted while they log in.
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    quiet = ["--connect", f"tcp:127.0.0.1:{silent.getsockname()[1]}", "--user", "alice",
             "--password-file", str(alicePassword)]  # fmt: skip
    clients = {
        "greet": Client(tmp_path, "greet", *common, "greet", "--count", "10000000"),
        "clock": Client(tmp_path, "clock", *common, "clock"),
        "watch": Client(tmp_path, "watch", *common, "watch"),
        "status-logging-in": Client(tmp_path, "status-logging-in", *quiet, "status"),
    }
    try:
        silent.settimeout(TIMEOUT)
        held.append(silent.accept()[0])
        for name in ("greet", "clock", "watch"):
            clients[name].waitFor(lambda c=clients[name]: len(c.out()) >= 2, "under way")
        for client in clients.values():
            client.process.send_signal(sig)
        for client in clients.values():
            status = client.process.wait(TIMEOUT)
            assert (client.name, status) == (client.name, 0), client.err()
    finally:
        for client in clients.values():
            stop(client.process)
        for s in [silent, *held]:
            s.close()
    # No error line; watch says only that it connected.
    for name, client in clients.items():
        assert client.err() == (
            [f"connected to {clockServer.endpoint} as alice"] if name == "watch" else []
        ), name
    assert all(re.fullmatch(r"<\d+>hello alice", line) for line in clients["greet"].out()[:-1])
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", line)
        for line in clients["clock"].out()
    )
    assert all(line.startswith("time ") for line in clients["watch"].out())
    # Each logged out: the server saw three sessions end, none left open.
    waitFor(lambda: clockServer.output().count("alice disconnected") == 3, TIMEOUT, "logouts")
    output = clockServer.output()
    assert output.count("alice logged in") == 3
    assert "Traceback" not in output
