"""
The command line of C{twistd pbrealms}: every bad value stops with one line on
stderr and exit status 2, and the service tree that good options build.
"""

from __future__ import annotations

import io
import os
import re
import resource
import stat
from importlib.metadata import version as distributionVersion
from pathlib import Path

import pytest
import pytest_twisted
from twisted.application import internet, service
from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from twisted.logger import LogLevel

import twisted
from pbrealms.checkers import PasswordFile
from pbrealms.login import LoginRoot
from pbrealms.realms import REALMS
from pbrealms.serverendpoints import TCP_BACKLOG, withBacklog, withSocketMode
from pbrealms.tap import Options, makeService

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
        (["--max-auth-tries", "0"], "--max-auth-tries must be a whole number above 0"),
        (["--max-auth-tries", "2.5"], "--max-auth-tries"),
        (["--login-timeout", "-1"], "--login-timeout must be a number above 0"),
        (["--login-timeout", "soon"], "--login-timeout"),
        (["--penalty-exempt", "10.0.0.0/8,nope"], "--penalty-exempt: 'nope'"),
        (["--max-message-size", "0"], "--max-message-size must be a whole number above 0"),
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


def test_replacing_in_sessions_needs_a_limit(capsys):
    line = refused(capsys, "--realm=sessions", "--when-full=replace-oldest")
    assert (
        line == "--when-full=replace-oldest needs --max: --realm=sessions has no limit without it"
    )


@pytest.mark.parametrize("realm", ["cache", "clock"])
def test_replacing_needs_a_limiting_realm(capsys, realm):
    line = refused(capsys, "--realm", realm, "--when-full=replace-oldest")
    assert line == (
        f"--when-full=replace-oldest applies to --realm=limited or --realm=sessions only, "
        f"not {realm!r}"
    )


@pytest.mark.parametrize("policy", ["replace-oldest", "replace-stale"])
def test_limited_replaces_at_its_default_max_of_1(capsys, policy):
    # The README's contract: limited always has a limit, so a replacing
    # policy needs no --max there.
    options = parse(capsys, "--realm=limited", "--when-full", policy, "--port", LOOPBACK)
    assert (options["max"], options["when-full"]) == (1, policy)
    registry = makeService(options).getServiceNamed("pb-listener").factory.root.registry
    assert (registry.maxPerUser, registry.whenFull) == (1, policy)


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


# Help, --version, the environment


def optionBlocks(text: str) -> dict[str, str]:
    """
    The help of each option in C{--help}'s text, by option, in one line.
    """
    blocks: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        found = re.match(r"\s+(?:-\w, )?--([\w-]+)=?\s", line)
        if found:
            name = found.group(1)
            blocks[name] = ""
        if name is not None:
            blocks[name] += " " + line.strip()
    return blocks


def test_help_gives_each_default_once():
    blocks = optionBlocks(str(Options()))
    assert "penalty-exempt" in blocks and "max" in blocks
    for name, text in blocks.items():
        assert text.count("[default:") <= 1, (name, text)
        assert "[default: ]" not in text, (name, text)
    assert blocks["penalty-exempt"].endswith("[default: none]")


def test_version_names_pbrealms_and_twisted(capsys):
    with pytest.raises(SystemExit) as exc:
        Options().parseOptions(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == (
        f"pbrealms {distributionVersion('pbrealms')} (Twisted {twisted.__version__})\n"
    )


#: For every setting, a value it refuses, and what else it needs to be
#: checked at all.
BAD_SETTINGS = {
    "realm": ("nope", {}),
    "max": ("x", {"PBREALMS_REALM": "limited"}),
    "when-full": ("kick", {}),
    "ping-timeout": ("x", {}),
    "keepalive": ("x", {}),
    "passwd": ("/nonexistent/users", {}),
    "auth": ("bogus", {}),
    "port": ("tcp:x", {}),
    "period": ("x", {"PBREALMS_REALM": "clock"}),
    "shutdown-grace": ("x", {}),
    "max-message-size": ("x", {}),
    "max-depth": ("x", {}),
    "max-unfinished-bytes": ("x", {}),
    "max-connections": ("x", {}),
    "max-unauthenticated-per-source": ("x", {}),
    "max-auth-tries": ("x", {}),
    "login-timeout": ("x", {}),
    "penalty-exempt": ("nope", {}),
    "metrics": ("tcp:x", {}),
}


def test_every_setting_is_tried_from_the_environment():
    # The help promises every option that takes a value, --auth included.
    settings = {parameter[0] for parameter in Options.optParameters} | {"auth"}
    assert set(BAD_SETTINGS) == settings


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_a_bad_environment_value_is_refused_naming_its_variable(capsys, monkeypatch, name):
    value, others = BAD_SETTINGS[name]
    variable = "PBREALMS_" + name.upper().replace("-", "_")
    for key, other in {**others, variable: value}.items():
        monkeypatch.setenv(key, other)
    line = refused(capsys)
    assert variable in line
    assert "--" + name not in line
    assert repr(value) in line or value in line


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_the_command_line_names_its_option(capsys, monkeypatch, name):
    value, others = BAD_SETTINGS[name]
    for key, other in others.items():
        monkeypatch.setenv(key, other)
    line = refused(capsys, f"--{name}={value}")
    assert "PBREALMS_" not in line
    assert value in line


#: The settings that the coerce column checks, value by value.
COERCED = sorted(p[0] for p in Options.optParameters if len(p) > 4 and p[4] is not None)


@pytest.mark.parametrize("name", COERCED)
def test_the_environment_is_coerced_as_the_command_line(capsys, monkeypatch, name):
    value, others = BAD_SETTINGS[name]
    for key, other in others.items():
        monkeypatch.setenv(key, other)
    onCommandLine = refused(capsys, f"--{name}={value}")
    variable = "PBREALMS_" + name.upper().replace("-", "_")
    monkeypatch.setenv(variable, value)
    fromEnvironment = refused(capsys)
    bare = name if name == "realm" else "--" + name  # "unknown realm 'nope'"
    assert fromEnvironment == onCommandLine.replace(bare, variable, 1)


def test_the_command_line_wins_over_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("PBREALMS_REALM", "limited")
    monkeypatch.setenv("PBREALMS_MAX", "x")
    assert parse(capsys, "--max", "3")["max"] == 3


def test_auth_from_the_environment(capsys, monkeypatch, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    monkeypatch.setenv("PBREALMS_AUTH", f"file:{path}")
    options = parse(capsys)
    assert not isinstance(options["checker"], PasswordFile)
    assert options["demo"] is False
    assert checks(options["checker"], b"alice", b"wonderland")


def test_auth_from_the_environment_is_checked_as_on_the_command_line(capsys, monkeypatch, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonder:land\n")
    monkeypatch.setenv("PBREALMS_AUTH", f"file:{path}")
    line = refused(capsys)
    assert line.startswith(f"PBREALMS_AUTH file:{path}: the password of 'alice' has a ':'")


def test_a_password_source_on_the_command_line_overrides_the_environment(
    capsys, monkeypatch, tmp_path
):
    users = writePasswd(tmp_path / "users", "alice:wonderland\n")
    others = writePasswd(tmp_path / "others", "carol:secret\n")
    # A container image sets PBREALMS_PASSWD; --auth on its command line replaces it.
    monkeypatch.setenv("PBREALMS_PASSWD", str(users))
    options = parse(capsys, "--auth", f"file:{others}")
    assert not isinstance(options["checker"], PasswordFile)
    assert checks(options["checker"], b"carol", b"secret")
    monkeypatch.delenv("PBREALMS_PASSWD")
    monkeypatch.setenv("PBREALMS_AUTH", f"file:{users}")
    options = parse(capsys, "--passwd", str(others))
    assert isinstance(options["checker"], PasswordFile)
    assert options["checker"].users == ["carol"]


def test_two_password_sources_in_the_environment(capsys, monkeypatch, tmp_path):
    path = writePasswd(tmp_path / "users", "alice:wonderland\n")
    monkeypatch.setenv("PBREALMS_PASSWD", str(path))
    monkeypatch.setenv("PBREALMS_AUTH", f"file:{path}")
    assert refused(capsys) == "give PBREALMS_PASSWD or PBREALMS_AUTH, not both"


def test_an_empty_variable_is_unset(capsys, monkeypatch):
    monkeypatch.setenv("PBREALMS_PASSWD", "")
    monkeypatch.setenv("PBREALMS_AUTH", "")
    assert parse(capsys)["demo"] is True


def test_max_connections_that_cannot_fit_names_its_variable(capsys, monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard file descriptor limit")
    monkeypatch.setenv("PBREALMS_MAX_CONNECTIONS", str(hard + 1))
    try:
        line = refused(capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert line.startswith(f"PBREALMS_MAX_CONNECTIONS={hard + 1} does not fit")
    assert line.endswith("or lower PBREALMS_MAX_CONNECTIONS")


# Type errors, stray arguments and abbreviations


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        ("tcp:notaport", "'notaport' is not a whole number; expected e.g. tcp:8787:"),
        ("tcp:", "'' is not a whole number; expected e.g. tcp:8787:"),
        ("tcp:0:bogus=1", "tcp: has no parameter 'bogus'; expected e.g. tcp:8787:"),
        ("tcp:0:1:2:3:4", "too many fields for tcp:; expected e.g. tcp:8787:"),
        ("unix:/tmp/x:mode=abc", "'abc' is not an octal number"),
        ("tcp:65536:interface=127.0.0.1", "the port must be from 0 to 65535, not 65536"),
        ("nope:1", "unknown endpoint type 'nope'"),
    ],
)
def test_an_endpoint_error_says_what_is_expected(capsys, port, reason):
    line = refused(capsys, "--port", port)
    assert line.startswith(f"bad --port {port!r}: {reason}")
    for raw in ("invalid literal", "positional argument", "keyword argument", "_parse"):
        assert raw not in line


def test_a_metrics_endpoint_error_names_metrics(capsys):
    line = refused(capsys, "--metrics", "tcp:x")
    assert line.startswith("bad --metrics 'tcp:x': 'x' is not a whole number")


@pytest.mark.parametrize("words", [["extra"], ["extra", "words"]])
def test_stray_arguments(capsys, words):
    line = refused(capsys, *words)
    assert line == (
        f"unexpected argument {words[0]!r}: twistd pbrealms takes only options "
        "(see twistd pbrealms --help)"
    )


@pytest.mark.parametrize(
    ("args", "whole"),
    [
        (["--pass", "x"], "--passwd"),
        (["--pass=x"], "--passwd"),
        (["--max-conn", "5"], "--max-connections"),
        (["--max-conn=5"], "--max-connections"),
        (["--shutdown", "1"], "--shutdown-grace"),
    ],
)
def test_a_prefix_of_an_option_is_refused(capsys, args, whole):
    line = refused(capsys, *args)
    assert line.startswith(f"{args[0].partition('=')[0]}: give the whole option name (")
    assert whole in line


# UNIX sockets


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("unix:/run/x.sock", "unix:/run/x.sock:mode=660"),
        ("unix:/run/x.sock:mode=600", "unix:/run/x.sock:mode=600"),
        (r"unix:/run/a\:mode=1", r"unix:/run/a\:mode=1:mode=660"),
        ("tcp:8787", "tcp:8787"),
    ],
)
def test_withSocketMode(given, expected):
    assert withSocketMode(given) == expected


def socketMode(path: Path) -> int:
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    return stat.S_IMODE(info.st_mode)


@pytest.mark.parametrize(
    ("suffix", "mode"), [("", 0o660), (":mode=600", 0o600), (":mode=666", 0o666), (":640", 0o640)]
)
@pytest_twisted.ensureDeferred
async def test_unix_sockets_are_for_their_owner_and_group(capsys, tmp_path, suffix, mode):
    pb, metrics = tmp_path / "pb.sock", tmp_path / "metrics.sock"
    options = parse(capsys, "--port", f"unix:{pb}{suffix}", "--metrics", f"unix:{metrics}{suffix}")
    server = makeService(options)
    server.privilegedStartService()
    server.startService()
    try:
        assert (socketMode(pb), socketMode(metrics)) == (mode, mode)
    finally:
        await server.stopService()
