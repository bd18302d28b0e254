"""
The client command's options and its one-line explanations of failures; the
client object's pushes; the commands run in-process against a real server.
"""

import io
import re

import pytest
import pytest_twisted
from conftest import eventually
from twisted.internet import defer, error
from twisted.python import usage
from twisted.python.failure import Failure

from pbrealms.client import ClientMind
from pbrealms.client.cli import (
    EXIT_KICKED,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_TOO_MANY,
    EXIT_UNREACHABLE,
    CommandFailed,
    explain,
    main,
    run,
)
from pbrealms.client.options import ClientOptions
from pbrealms.errors import BadCredentials, TooManyConnections


@pytest.fixture
def password(monkeypatch):
    monkeypatch.setenv("PBREALMS_PASSWORD", "wonderland")


@pytest.mark.parametrize("connect", ["bogus:1", "tcp:127.0.0.1:", "tcp:host:notaport"])
def test_a_bad_endpoint_is_a_usage_error(password, capsys, connect):
    with pytest.raises(SystemExit) as exited:
        main(["--connect", connect, "--user", "alice", "status"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"pbrealms-client: error: bad --connect {connect!r}")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["greet"], "--user"),
        (["--user", "alice"], "command"),
        (["--user", "alice", "greet", "--count", "0"], "--count"),
        (["--user", "alice", "--timeout", "0", "greet"], "--timeout"),
        (["--user", "alice", "clock", "--ticks", "0"], "--ticks"),
        (["--user", "alice", "watch", "--count", "0"], "--count"),
    ],
)
def test_usage_errors_name_the_problem(password, args, problem):
    with pytest.raises(usage.UsageError) as refused:
        ClientOptions().parseOptions(args)
    assert problem in str(refused.value)


def test_the_password_comes_from_a_file_or_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PBREALMS_PASSWORD", raising=False)
    with pytest.raises(usage.UsageError, match="PBREALMS_PASSWORD"):
        ClientOptions().parseOptions(["--user", "alice", "status"])
    path = tmp_path / "pw"
    path.write_text("s3cret:with colon\nsecond line\n")
    options = ClientOptions()
    options.parseOptions(["--user", "alice", "--password-file", str(path), "status"])
    assert options["password"] == "s3cret:with colon"
    path.write_text("")
    with pytest.raises(usage.UsageError, match="empty"):
        ClientOptions().parseOptions(["--user", "a", "--password-file", str(path), "status"])


@pytest.mark.parametrize(
    ("exception", "status", "words"),
    [
        (BadCredentials(), EXIT_REFUSED, "wrong user name or password"),
        (TooManyConnections(2), EXIT_TOO_MANY, "at most 2 sessions"),
        (defer.TimeoutError(), EXIT_TIMEOUT, "timed out after 3 s"),
        (error.ConnectionRefusedError(), EXIT_UNREACHABLE, "connection refused"),
    ],
)
def test_failures_are_explained_in_one_line(exception, status, words):
    explained = explain(Failure(exception), "tcp:127.0.0.1:1", 3.0)
    assert explained.status == status
    assert words in str(explained)
    assert "\n" not in str(explained)


def test_the_help_lists_watch_and_the_kicked_status():
    help = str(ClientOptions())
    assert re.search(r"^\s+watch\s+Stay connected", help, re.MULTILINE), help
    assert "7 kicked" in " ".join(help.split())


def test_every_push_calls_its_callback():
    told: list = []
    mind = ClientMind(
        onTime=lambda seconds: told.append(("time", seconds)),
        onShutdown=lambda reason: told.append(("shutdown", reason)),
        onGreeting=lambda text: told.append(("greeting", text)),
        onSessionOpened=lambda info: told.append(("opened", info)),
        onSessionClosed=lambda info: told.append(("closed", info)),
        onKicked=lambda reason: told.append(("kicked", reason)),
    )
    opened = {"id": 7, "peer": "127.0.0.1:5555", "since": 1.5}
    closed = {**opened, "reason": "logged out"}
    mind.remote_notifyTime(12.5)
    mind.remote_notifyShutdown("going")
    mind.remote_notifyGreeting("<3>hello alice")
    mind.remote_notifySessionOpened(opened)
    mind.remote_notifySessionClosed(closed)
    mind.remote_notifyKicked("replaced")
    assert told == [
        ("time", 12.5),
        ("shutdown", "going"),
        ("greeting", "<3>hello alice"),
        ("opened", opened),
        ("closed", closed),
        ("kicked", "replaced"),
    ]


def test_pushes_are_ignored_by_default():
    mind = ClientMind()
    mind.remote_notifyGreeting("<1>hello alice")
    mind.remote_notifySessionOpened({"id": 1, "peer": "p", "since": 0.0})
    mind.remote_notifyKicked("replaced")  # not on a connection: nothing to remember


def options(served, *args: str) -> ClientOptions:
    parsed = ClientOptions()
    parsed.parseOptions(["--connect", served.endpoint, "--user", "alice", *args])
    return parsed


@pytest.fixture
def alice(monkeypatch):
    monkeypatch.setenv("PBREALMS_PASSWORD", "wonderland")


@pytest_twisted.ensureDeferred
async def test_watch_prints_a_line_per_push(reactor, harness, alice):
    served = await harness.serve("sessions")
    out, err = io.StringIO(), io.StringIO()
    watching = defer.ensureDeferred(
        run(reactor, options(served, "watch", "--count", "3"), out, err)
    )
    await eventually(reactor, lambda: "connected to" in err.getvalue())
    other = await served.login("alice")
    peer = other.perspective.broker.transport.getHost()
    mine = next(s for s in await other.callRemote("sessions") if s["current"])
    assert await other.callRemote("greet") == "<1>hello alice"
    await other.disconnect()
    await watching
    where = f"127.0.0.1:{peer.port}"
    assert out.getvalue().splitlines() == [
        f"session {mine['id']} opened from {where}",
        "greeting <1>hello alice",
        f"session {mine['id']} closed from {where}: disconnected",
    ]
    assert err.getvalue() == f"connected to {served.endpoint} as alice\n"
    assert reactor.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_watch_with_a_wrong_password_is_refused(reactor, harness, monkeypatch):
    served = await harness.serve("sessions")
    monkeypatch.setenv("PBREALMS_PASSWORD", "wrong")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandFailed) as failed:
        await run(reactor, options(served, "watch"), out, err)
    assert failed.value.status == EXIT_REFUSED
    assert str(failed.value) == "login refused: wrong user name or password"
    assert out.getvalue() == err.getvalue() == ""


@pytest_twisted.ensureDeferred
async def test_the_clock_command_kicked_says_so(reactor, harness, alice):
    served = await harness.serve("clock", maxPerUser=1, whenFull="replace-oldest")
    out = io.StringIO()
    ticking = defer.ensureDeferred(run(reactor, options(served, "clock"), out))
    await eventually(reactor, lambda: out.getvalue().count("\n") >= 1)
    await served.login("alice", mind=ClientMind())
    with pytest.raises(CommandFailed) as failed:
        await ticking
    assert failed.value.status == EXIT_KICKED
    # The server's words (its wording is the server's to choose), on one line.
    kicked = re.compile(r"kicked: .*replaced by a newer login .*127\.0\.0\.1:\d+")
    assert kicked.fullmatch(str(failed.value))
