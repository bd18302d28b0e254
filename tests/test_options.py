"""
The command line of C{twistd pbrealms}: every bad value stops with one line on
stderr and exit status 2, and the service tree that good options build.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from twisted.application import internet, service
from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from twisted.logger import LogLevel

from pbrealms.checkers import PasswordFile
from pbrealms.login import LoginRoot
from pbrealms.realms import REALMS
from pbrealms.tap import TCP_BACKLOG, Options, makeService, withBacklog

LOOPBACK = "tcp:0:interface=127.0.0.1"
PREFIX = "twistd pbrealms: error: "


def parse(capsys, *args: str) -> Options:
    """
    Parse C{args}, which must be accepted without a word on stderr.
    """
    options = Options()
    options.parseOptions(list(args))
    assert capsys.readouterr().err == ""
    return options


def refused(capsys, *args: str) -> str:
    """
    Parse C{args}, which must be refused with exit status 2 and exactly one
    line on stderr; return that line without its prefix.
    """
    with pytest.raises(SystemExit) as exc:
        Options().parseOptions(list(args))
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(PREFIX), lines[0]
    return lines[0][len(PREFIX) :]


def writePasswd(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def checks(checker, user: bytes, password: bytes) -> bool:
    results: list = []
    checker.requestAvatarId(UsernamePassword(user, password)).addBoth(results.append)
    (result,) = results
    return not hasattr(result, "trap")


# Realm


def test_default_realm_is_cache(capsys):
    options = parse(capsys)
    assert options["realm"] == "cache"
    assert options["max"] is None
    assert options["period"] is None


@pytest.mark.parametrize("realm", sorted(REALMS))
def test_every_realm_is_accepted(capsys, realm):
    assert parse(capsys, "--realm", realm)["realm"] == realm


def test_unknown_realm(capsys):
    line = refused(capsys, "--realm", "nope")
    assert "unknown realm 'nope'" in line
    for realm in REALMS:
        assert realm in line


# --max


def test_limited_defaults_max_to_1(capsys):
    assert parse(capsys, "--realm=limited")["max"] == 1


def test_max_accepted_with_limited(capsys):
    assert parse(capsys, "--realm=limited", "--max=7")["max"] == 7


def test_max_zero(capsys):
    line = refused(capsys, "--realm=limited", "--max", "0")
    assert "--max" in line
    assert "1 or more" in line
    assert "0" in line


def test_max_not_a_number(capsys):
    line = refused(capsys, "--realm=limited", "--max", "abc")
    assert "--max" in line
    assert "'abc'" in line


@pytest.mark.parametrize("realm", sorted(set(REALMS) - {"limited", "sessions"}))
def test_max_with_another_realm(capsys, realm):
    line = refused(capsys, "--realm", realm, "--max", "2")
    assert "--max" in line
    assert "limited" in line
    assert repr(realm) in line


# --period


def test_clock_defaults_period_to_1(capsys):
    assert parse(capsys, "--realm=clock")["period"] == 1.0


@pytest.mark.parametrize(
    ("value", "expected"), [("0.5", 0.5), ("0.05", 0.05), ("86400", 86400.0), ("2", 2.0)]
)
def test_valid_period(capsys, value, expected):
    period = parse(capsys, "--realm=clock", "--period", value)["period"]
    assert period == expected
    assert isinstance(period, float)


def test_period_not_a_number(capsys):
    line = refused(capsys, "--realm=clock", "--period", "abc")
    assert "--period" in line
    assert "'abc'" in line


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "0.01", "1e9"])
def test_period_out_of_range(capsys, value):
    line = refused(capsys, "--realm=clock", "--period", value)
    assert line.startswith("--period")
    assert "0.05" in line
    assert "86400" in line


@pytest.mark.parametrize("realm", sorted(set(REALMS) - {"clock"}))
def test_period_with_another_realm(capsys, realm):
    line = refused(capsys, "--realm", realm, "--period", "1")
    assert "--period" in line
    assert "clock" in line
    assert repr(realm) in line


# --passwd


def test_passwd_loaded(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\nbob:builder\n")
    options = parse(capsys, "--passwd", str(path))
    checker = options["checker"]
    assert isinstance(checker, PasswordFile)
    assert checker.users == ["alice", "bob"]
    assert options["demo"] is False


def test_passwd_missing(capsys, tmp_path):
    path = tmp_path / "missing"
    line = refused(capsys, "--passwd", str(path))
    assert str(path) in line
    assert "cannot read" in line


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode"
)
def test_passwd_unreadable(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n", mode=0)
    line = refused(capsys, "--passwd", str(path))
    assert str(path) in line
    assert "cannot read" in line


def test_passwd_is_a_directory(capsys, tmp_path):
    path = tmp_path / "dir"
    path.mkdir(mode=0o700)
    line = refused(capsys, "--passwd", str(path))
    assert str(path) in line
    assert "cannot read" in line


def test_passwd_malformed_line(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "# users\nalice:wonderland\nbob builder\n")
    line = refused(capsys, "--passwd", str(path))
    assert f"{path}:3:" in line
    assert "':'" in line


def test_passwd_duplicate_user(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:one\nbob:builder\nalice:two\n")
    line = refused(capsys, "--passwd", str(path))
    assert f"{path}:3:" in line
    assert "'alice'" in line
    assert "line 1" in line


@pytest.mark.parametrize("text", ["", "\n\n", "# nobody here\n  # indented comment\n\n"])
def test_passwd_without_users(capsys, tmp_path, text):
    path = writePasswd(tmp_path / "users", text)
    line = refused(capsys, "--passwd", str(path))
    assert str(path) in line
    assert "no users" in line


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660])
def test_passwd_writable_by_others_refused(capsys, tmp_path, mode):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n", mode=mode)
    line = refused(capsys, "--passwd", str(path))
    assert str(path) in line
    assert "writable by group or others" in line
    assert f"{mode:04o}" in line


def test_passwd_world_readable_accepted_with_warning(capsys, tmp_path, log):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n", mode=0o644)
    options = parse(capsys, "--passwd", str(path))
    assert options["checker"].users == ["alice"]
    warnings = [e for e in log if e.get("log_level") == LogLevel.warn]
    messages = log.messages()
    assert warnings
    assert any("readable by every user" in m and str(path) in m for m in messages), messages


def test_passwd_private_no_warning(capsys, tmp_path, log):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n", mode=0o600)
    parse(capsys, "--passwd", str(path))
    assert not [e for e in log if e.get("log_level") == LogLevel.warn]


# --auth


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-auth-tries", "0"], "--max-auth-tries must be a number above 0"),
        (["--max-auth-tries", "2.5"], "--max-auth-tries"),
        (["--login-timeout", "-1"], "--login-timeout must be a number above 0"),
        (["--login-timeout", "soon"], "--login-timeout"),
        (["--penalty-exempt", "10.0.0.0/8,nope"], "--penalty-exempt: 'nope'"),
        (["--max-message-size", "0"], "--max-message-size must be a number above 0"),
        (["--max-depth", "deep"], "--max-depth"),
        (["--max-connections", "-5"], "--max-connections"),
        (["--max-unauthenticated-per-source", "0"], "--max-unauthenticated-per-source"),
    ],
)
def test_guard_options_are_checked(capsys, args, words):
    assert words in refused(capsys, *args, "--port", LOOPBACK)


def test_guard_options_reach_the_login_root(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    options = parse(
        capsys, "--passwd", str(path), "--port", LOOPBACK, "--max-auth-tries", "3",
        "--login-timeout", "2.5", "--penalty-exempt", "10.0.0.0/8",
    )  # fmt: skip
    factory = makeService(options).getServiceNamed("pb-listener").factory
    root = factory.root
    assert (root.maxAuthTries, root.loginTimeout) == (3, 2.5)
    assert (factory.maxMessageBytes, factory.maxDepth) == (1 << 20, 64)
    assert factory.maxConnections == 16384 and root.maxUnauthenticated == 128
    assert root.penalties.isExempt("10.9.8.7") and not root.penalties.isExempt("11.0.0.1")


def test_an_empty_passwd_is_refused(capsys):
    line = refused(capsys, "--passwd=", "--port", LOOPBACK)
    assert "--passwd needs the name of a password file" in line


def test_auth_file_refuses_passwords_twisted_would_cut(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonder:land\n")
    line = refused(capsys, "--auth", f"file:{path}")
    assert "'alice'" in line and "--passwd" in line


def test_passwd_and_auth_together(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    line = refused(capsys, "--passwd", str(path), "--auth", f"file:{path}")
    assert "--passwd" in line
    assert "--auth" in line


def test_auth_twice(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    line = refused(capsys, "--auth", f"file:{path}", "--auth", f"file:{path}")
    assert "--auth" in line


def test_auth_memory_refused(capsys):
    line = refused(capsys, "--auth", "memory:alice:wonderland")
    assert "--auth memory" in line


def test_auth_unix_refused(capsys):
    line = refused(capsys, "--auth", "unix")
    assert "--auth unix" in line


def test_auth_unknown_type(capsys):
    line = refused(capsys, "--auth", "bogus:x")
    assert "--auth bogus" in line
    assert "unknown" in line


def test_auth_file_accepted(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    options = parse(capsys, "--auth", f"file:{path}")
    checker = options["checker"]
    assert not isinstance(checker, PasswordFile)
    assert IUsernameHashedPassword in checker.credentialInterfaces
    assert options["demo"] is False
    assert checks(checker, b"alice", b"wonderland")
    assert not checks(checker, b"alice", b"wrong")


@pytest.mark.parametrize("mode", [None, 0o622])
def test_auth_file_missing_or_writable_by_others_refused(capsys, tmp_path, mode):
    path = tmp_path / "users"
    if mode is not None:
        writePasswd(path, "alice:wonderland\n").chmod(mode)
    line = refused(capsys, "--auth", f"file:{path}")
    assert line.startswith("--auth ")
    assert str(path) in line


def test_auth_file_allowed_on_any_interface(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    options = parse(capsys, "--auth", f"file:{path}", "--port", "tcp:0")
    assert options["demo"] is False


def test_help_auth_lists_only_usable_types():
    options = Options()
    options.authOutput = io.StringIO()
    with pytest.raises(SystemExit) as exc:
        options.parseOptions(["--help-auth"])
    assert exc.value.code == 0
    text = options.authOutput.getvalue()
    table = text.split("================", 1)[1]
    types = {line.split()[0] for line in table.splitlines() if line.strip()}
    assert "file" in types
    assert not types & {"memory", "unix", "anonymous"}, types


# --port


@pytest.mark.parametrize(("port", "why"), [("bogus:1", "bogus"), ("tcp:abc", "abc")])
def test_bad_port(capsys, port, why):
    line = refused(capsys, "--port", port)
    assert line.startswith("bad --port")
    assert port in line
    assert why in line


@pytest.mark.parametrize("port", ["tcp:8787", "tcp:8787:interface=0.0.0.0", "tcp:0", "8787"])
def test_demo_users_refused_off_loopback(capsys, port):
    line = refused(capsys, "--port", port)
    assert "demo users" in line
    assert "--passwd" in line


@pytest.mark.parametrize(
    "port",
    [
        LOOPBACK,
        r"tcp6:0:interface=\:\:1",
        "unix:/tmp/x",
        "tcp:0:interface=localhost",
        "tcp:0:interface=127.1.2.3",
    ],
)
def test_demo_users_accepted_on_loopback(capsys, port):
    options = parse(capsys, "--port", port)
    assert options["demo"] is True
    assert options["checker"].users == ["alice", "bob"]


def test_default_port_is_loopback(capsys):
    options = parse(capsys)
    assert options["demo"] is True
    assert options["port"].startswith("tcp:8787:interface=127.0.0.1")


def test_passwd_allows_any_interface(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    options = parse(capsys, "--passwd", str(path), "--port", "tcp:0:interface=0.0.0.0")
    assert options["demo"] is False


def test_demo_users_refused_with_a_second_interface(capsys):
    # Twisted listens on the last interface= given.
    refused(capsys, "--port", "tcp:0:interface=127.0.0.1:interface=0.0.0.0")


def test_demo_users_allowed_with_a_positional_loopback_interface(capsys):
    options = parse(capsys, "--port", "tcp:0:127.0.0.1")
    assert options["demo"] is True


# TCP backlog


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tcp:8787", f"tcp:8787:backlog={TCP_BACKLOG}"),
        ("tcp:0:interface=127.0.0.1", f"tcp:0:interface=127.0.0.1:backlog={TCP_BACKLOG}"),
        (r"tcp6:0:interface=\:\:1", rf"tcp6:0:interface=\:\:1:backlog={TCP_BACKLOG}"),
        ("ssl:8443:privateKey=k.pem", f"ssl:8443:privateKey=k.pem:backlog={TCP_BACKLOG}"),
        ("tcp:8787:backlog=5", "tcp:8787:backlog=5"),
        ("tcp:8787:backlog=5:interface=127.0.0.1", "tcp:8787:backlog=5:interface=127.0.0.1"),
        ("unix:/tmp/x", "unix:/tmp/x"),
    ],
)
def test_withBacklog(given, expected):
    assert withBacklog(given) == expected


def test_options_give_tcp_a_backlog(capsys):
    options = parse(capsys, "--port", LOOPBACK)
    assert options["endpoint"]._backlog == TCP_BACKLOG
    assert options["port"] == LOOPBACK  # messages show what the user typed


@pytest.mark.parametrize("port", [f"{LOOPBACK}:backlog=7", "tcp:0:127.0.0.1:7"])
def test_options_keep_an_explicit_backlog(capsys, port):
    options = parse(capsys, "--port", port)
    assert options["endpoint"]._backlog == 7


# makeService


def test_makeService_with_passwd(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    options = parse(capsys, "--passwd", str(path), "--port", LOOPBACK, "--realm=limited")
    server = makeService(options)
    assert isinstance(server, service.MultiService)
    assert server.name == "pbrealms"
    assert not server.running
    assert [child.name for child in server] == [
        "password-hasher",
        "password-file-watcher",
        "keepalive",
        "graceful-shutdown",
        "pb-listener",
    ]
    watcher = server.getServiceNamed("password-file-watcher")
    assert isinstance(watcher, internet.TimerService)
    assert watcher.call[0] == options["checker"].reloadIfChanged
    listener = server.getServiceNamed("pb-listener")
    assert not listener.running
    assert listener.port is None
    root = listener.factory.root
    assert isinstance(root, LoginRoot)
    assert root.checker is options["checker"]
    assert root.realm.name == "limited"
    assert root.registry.maxPerUser == 1


def test_makeService_with_demo_users(capsys, log):
    server = makeService(parse(capsys, "--port", LOOPBACK))
    assert server.name == "pbrealms"
    assert [child.name for child in server] == [
        "password-hasher",
        "keepalive",
        "graceful-shutdown",
        "pb-listener",
    ]
    assert any("demo users" in m for m in log.messages()), log.messages()


def test_makeService_with_auth(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    server = makeService(parse(capsys, "--auth", f"file:{path}", "--port", LOOPBACK))
    assert [child.name for child in server] == ["keepalive", "graceful-shutdown", "pb-listener"]


@pytest.mark.parametrize("realm", sorted(REALMS))
def test_makeService_every_child_named(capsys, tmp_path, realm):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    server = makeService(parse(capsys, "--passwd", str(path), "--port", LOOPBACK, "--realm", realm))
    assert server.name == "pbrealms"
    names = [child.name for child in server]
    assert all(names), names
    assert len(set(names)) == len(names)
    assert server.getServiceNamed("pb-listener").factory.root.realm.name == realm


def test_makeService_clock_period(capsys, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    options = parse(capsys, "--passwd", str(path), "--port", LOOPBACK, "--realm=clock")
    options2 = parse(
        capsys, "--passwd", str(path), "--port", LOOPBACK, "--realm=clock", "--period=0.25"
    )
    assert makeService(options).getServiceNamed("pb-listener").factory.root.realm.period == 1.0
    realm = makeService(options2).getServiceNamed("pb-listener").factory.root.realm
    assert realm.period == 0.25


# --when-full, --ping-timeout, --keepalive


def test_sessions_has_no_limit_unless_given(capsys):
    assert parse(capsys, "--realm=sessions")["max"] is None
    assert parse(capsys, "--realm=sessions", "--max=3")["max"] == 3


@pytest.mark.parametrize("realm", ["limited", "sessions"])
@pytest.mark.parametrize("policy", ["refuse", "replace-oldest", "replace-stale"])
def test_when_full_policies(capsys, realm, policy):
    options = parse(capsys, "--realm", realm, "--max=2", "--when-full", policy)
    assert options["when-full"] == policy
    server = makeService(options)
    assert server.getServiceNamed("pb-listener").factory.root.registry.whenFull == policy


def test_when_full_defaults_to_refuse(capsys):
    assert parse(capsys, "--realm=limited")["when-full"] == "refuse"


def test_an_unknown_policy_is_refused(capsys):
    line = refused(capsys, "--realm=limited", "--when-full=kick")
    assert line == (
        "unknown --when-full 'kick': choose one of refuse, replace-oldest, replace-stale"
    )


@pytest.mark.parametrize("realm", ["cache", "clock", "sessions"])
def test_replacing_needs_a_limit(capsys, realm):
    line = refused(capsys, "--realm", realm, "--when-full=replace-oldest")
    assert line.startswith("--when-full=replace-oldest needs --max")


def test_policy_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("PBREALMS_WHEN_FULL", "replace-stale")
    monkeypatch.setenv("PBREALMS_PING_TIMEOUT", "2.5")
    options = parse(capsys, "--realm=sessions", "--max=1")
    assert options["when-full"] == "replace-stale"
    assert options["ping-timeout"] == 2.5


def test_keepalive_and_ping_timeout_defaults(capsys):
    options = parse(capsys)
    assert options["keepalive"] == 60.0
    assert options["ping-timeout"] == 10.0


def test_keepalive_zero_turns_it_off(capsys):
    server = makeService(parse(capsys, "--keepalive=0", "--port", LOOPBACK))
    assert "keepalive" not in [child.name for child in server]


def test_keepalive_interval_reaches_the_service(capsys):
    server = makeService(parse(capsys, "--keepalive=2.5", "--port", LOOPBACK))
    assert server.getServiceNamed("keepalive").interval == 2.5


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf", "0.5", "1e-6"])
def test_a_bad_keepalive_is_refused(capsys, value):
    line = refused(capsys, "--keepalive", value)
    assert line == f"--keepalive must be 1 or more seconds, or 0 for none, not {value!r}"


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_a_bad_ping_timeout_is_refused(capsys, value):
    line = refused(capsys, "--ping-timeout", value)
    assert line == f"--ping-timeout must be a number above 0, not {value!r}"
