"""
The client command's options and its one-line explanations of failures.
"""

import pytest
from twisted.internet import defer, error
from twisted.python import usage
from twisted.python.failure import Failure

from pbrealms.client import (
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_TOO_MANY,
    EXIT_UNREACHABLE,
    ClientOptions,
    explain,
    main,
)
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
