"""
Faults in the password file: a bcrypt cost out of range stops the start with
one line and keeps the old users on reload, the watcher survives anything a
reload raises, a byte-order mark is skipped, and no hash is made on the
reactor thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest
from processes import environment
from twisted.application import internet
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task

from pbrealms import checkers
from pbrealms.checkers import PasswordFile, isHashed, parsePasswords
from pbrealms.tap import Options

BIN = Path(sys.executable).parent
SALT_AND_HASH = b"WyAZc.PiM4es0FE/mo8Nz.eGsYyJ8GUYxkMw1m9W.ghuGlZ4M9Vji"


def entry(cost: str) -> str:
    return f"$2b${cost}$" + SALT_AND_HASH.decode()


def write(path: Path, text: str | bytes) -> Path:
    before = path.stat().st_mtime_ns if path.exists() else None
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(0o600)
    if before is not None:  # seen as changed whatever the timestamp resolution
        os.utime(path, ns=(before + 10**9, before + 10**9))
    return path


class RecordingHasher:
    def __init__(self) -> None:
        self.hashes: list[bytes] = []

    def check(self, password, hashed, source=None):
        self.hashes.append(hashed)
        return defer.succeed(False)


@pytest.fixture(autouse=True)
def recordingHasher(monkeypatch) -> RecordingHasher:
    hasher = RecordingHasher()
    monkeypatch.setattr(PasswordFile, "hasher", hasher)
    return hasher


# The cost of a bcrypt entry.


@pytest.mark.parametrize("cost", ["00", "03", "32", "99"])
def test_a_cost_out_of_range_stops_the_start_with_one_line(tmp_path, capsys, cost):
    path = write(tmp_path / "users", f"alice:wonderland\ncarol:{entry(cost)}\n")
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--passwd", str(path), "--port", "tcp:0:interface=127.0.0.1"])
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{path}:2: user 'carol' has a malformed bcrypt hash" in line
    assert "04 to 31" in line


@pytest.mark.parametrize("cost", ["04", "12", "31"])
def test_costs_from_4_to_31_are_hashes(tmp_path, cost):
    assert isHashed(entry(cost).encode())
    path = write(tmp_path / "users", f"carol:{entry(cost)}\n")
    assert parsePasswords(path) == {b"carol": entry(cost).encode()}


def test_something_else_than_a_hash_is_still_a_password(tmp_path):
    path = write(tmp_path / "users", "dave:$2b$12\nerin:$2x$99$abc\n")
    assert parsePasswords(path) == {b"dave": b"$2b$12", b"erin": b"$2x$99$abc"}


def test_twistd_exits_2_with_one_line_for_a_bad_cost(tmp_path):
    path = write(tmp_path / "users", f"carol:{entry('99')}\n")
    result = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "pbrealms", "--passwd", str(path),
         "--port", "tcp:0:interface=127.0.0.1"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env=environment(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"twistd pbrealms: error: {path}:1: ")
    assert "Traceback" not in result.stdout + result.stderr


# Reloading.


def startWatching(checker: PasswordFile) -> tuple[internet.TimerService, task.Clock]:
    clock = task.Clock()
    watcher = internet.TimerService(1.0, checker.reloadIfChanged)
    watcher.clock = clock
    watcher.startService()
    return watcher, clock


def refusals(log) -> list[str]:
    return [m for m in log.messages() if "not reloaded" in m]


def test_a_bad_cost_on_reload_keeps_the_users_and_the_watcher(tmp_path, log):
    log.errorsExpected = True
    path = write(tmp_path / "users", "alice:wonderland\n")
    checker = PasswordFile(str(path))
    watcher, clock = startWatching(checker)
    try:
        write(path, f"alice:wonderland\ncarol:{entry('99')}\n")
        clock.advance(1)
        assert checker.users == ["alice"]
        (line,) = refusals(log)
        assert f"{path}:2: user 'carol' has a malformed bcrypt hash" in line
        assert not [e for e in log if "log_failure" in e]  # no traceback
        clock.advance(5)
        assert len(refusals(log)) == 1  # once per change, not once a second
        write(path, "alice:wonderland\nbob:builder\n")
        clock.advance(1)
        assert checker.users == ["alice", "bob"]  # still watching
    finally:
        watcher.stopService()


def test_anything_a_reload_raises_is_one_line_and_the_watcher_goes_on(tmp_path, log, monkeypatch):
    log.errorsExpected = True
    path = write(tmp_path / "users", "alice:wonderland\n")
    checker = PasswordFile(str(path))
    watcher, clock = startWatching(checker)

    def broken(path):
        raise RuntimeError("disk on fire")

    try:
        with monkeypatch.context() as patched:
            patched.setattr(checkers, "parsePasswords", broken)
            write(path, "alice:wonderland\nbob:builder\n")
            clock.advance(1)
        (line,) = refusals(log)
        assert "RuntimeError: disk on fire" in line
        assert "previous 1 users" in line
        assert not [e for e in log if "log_failure" in e]
        assert watcher._loop.running
        write(path, "alice:wonderland\nbob:builder\ncarol:x\n")
        clock.advance(1)
        assert checker.users == ["alice", "bob", "carol"]
    finally:
        watcher.stopService()


# A byte-order mark.


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    path = write(tmp_path / "users", b"\xef\xbb\xbfalice:wonderland\nbob:builder\n")
    checker = PasswordFile(str(path))
    assert checker.users == ["alice", "bob"]
    answer = checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
    assert answer.result == "alice"


def test_pbrealms_passwd_changes_the_first_user_of_a_file_with_a_mark(tmp_path):
    path = write(tmp_path / "users", b"\xef\xbb\xbfalice:wonderland\nbob:builder\n")
    result = subprocess.run(
        [str(BIN / "pbrealms-passwd"), "--rounds", "4", str(path), "alice"],
        input="n3w\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "changed the password of alice" in result.stdout
    users = parsePasswords(path)
    assert list(users) == [b"alice", b"bob"]
    assert bcrypt.checkpw(b"n3w", users[b"alice"])
    assert not path.read_bytes().startswith(b"\xef\xbb\xbf")


# No hashing on the reactor thread.


def test_no_hash_is_made_on_the_reactor_thread_at_start_or_reload(tmp_path, monkeypatch):
    made: list[str] = []
    real = bcrypt.hashpw

    def hashpw(password, salt):
        made.append(threading.current_thread().name)
        return real(password, b"$2b$04$" + salt[7:29])  # cheap, whatever was asked

    monkeypatch.setattr(bcrypt, "hashpw", hashpw)
    # A cost-16 hash takes 5 s here: making one on reload stalled the reactor.
    path = write(tmp_path / "users", f"carol:{entry('16')}\nalice:wonderland\n")
    checker = PasswordFile(str(path))
    write(path, f"carol:{entry('16')}\ndave:{entry('16')}\nerin:{entry('10')}\n")
    started = time.monotonic()
    assert checker.reloadIfChanged()
    assert time.monotonic() - started < 0.5
    assert made == []
    assert checker.users == ["carol", "dave", "erin"]


def test_an_unknown_user_costs_what_a_known_one_costs(tmp_path, recordingHasher):
    path = write(
        tmp_path / "users", f"carol:{entry('16')}\ndave:{entry('16')}\nerin:{entry('10')}\n"
    )
    checker = PasswordFile(str(path))
    checker.requestAvatarId(UsernamePassword(b"mallory", b"guess")).addErrback(lambda _: None)
    (hashed,) = recordingHasher.hashes
    assert hashed.startswith(b"$2b$16$")  # the file's usual cost


def test_a_file_without_hashes_hashes_nothing_for_an_unknown_user(tmp_path, recordingHasher):
    # Its users are compared at no cost: an unknown one must not take longer.
    path = write(tmp_path / "users", "alice:wonderland\n")
    checker = PasswordFile(str(path))
    for user in (b"alice", b"mallory"):
        d = checker.requestAvatarId(UsernamePassword(user, b"guess"))
        assert d.called
        d.addErrback(lambda _: None)
    assert recordingHasher.hashes == []
