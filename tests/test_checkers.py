"""
The password file: parsing, permissions, checking credentials, reloading.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.spread import pb
from zope.interface import implementer

from pbrealms.checkers import PasswordFile, PasswordFileError, checkPermissions, parsePasswords


def write(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    path.chmod(mode)
    return path


def changed(path: Path, data: str, mode: int = 0o600) -> None:
    """
    Rewrite C{path} and move its modification time a second on, so that the
    change is seen whatever the file system's timestamp resolution.
    """
    before = path.stat().st_mtime_ns
    write(path, data, mode)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def outcome(d: defer.Deferred):
    results: list = []
    d.addBoth(results.append)
    assert len(results) == 1, "the Deferred has not fired"
    return results[0]


def avatarId(checker: PasswordFile, credentials) -> str:
    result = outcome(checker.requestAvatarId(credentials))
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def accepts(checker: PasswordFile, user: str, password: str) -> bool:
    result = outcome(checker.requestAvatarId(UsernamePassword(user.encode(), password.encode())))
    if hasattr(result, "trap"):
        result.trap(UnauthorizedLogin)
        return False
    assert result == user
    return True


class InlineHasher:
    """
    Checks bcrypt hashes at once, in this thread, so that these tests stay
    synchronous (the thread pool is tested in test_bcrypt.py).
    """

    def check(self, password: bytes, hashed: bytes, source: str | None = None):
        import bcrypt
        from twisted.internet import defer

        return defer.succeed(bcrypt.checkpw(password, hashed))


@pytest.fixture(autouse=True)
def inlineHasher(monkeypatch):
    monkeypatch.setattr(PasswordFile, "hasher", InlineHasher())


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return write(tmp_path / "users", "alice:wonderland\nbob:builder\n")


# parsePasswords


def test_parse_skips_comments_and_blank_lines(tmp_path):
    path = write(
        tmp_path / "p",
        "# the users\n\n   \n\t\n  # indented comment\nalice:wonderland\n\n# bob next\nbob:builder",
    )
    assert parsePasswords(path) == {b"alice": b"wonderland", b"bob": b"builder"}


def test_parse_password_is_everything_after_the_first_colon(tmp_path):
    path = write(tmp_path / "p", "alice:pa:ss#word\nbob:#not a comment\ncarol:trailing \n")
    assert parsePasswords(path) == {
        b"alice": b"pa:ss#word",
        b"bob": b"#not a comment",
        b"carol": b"trailing ",
    }


def test_parse_crlf_line_endings(tmp_path):
    path = write(tmp_path / "p", "alice:wonderland\r\nbob:builder\r\n")
    assert parsePasswords(path) == {b"alice": b"wonderland", b"bob": b"builder"}


def test_parse_utf8(tmp_path):
    path = write(tmp_path / "p", "zoë:mot de passe é\n")
    assert parsePasswords(path) == {"zoë".encode(): "mot de passe é".encode()}


@pytest.mark.parametrize("line", ["al ice:x", " alice:x", "alice :x", "\talice:x", "a\u00a0b:x"])
def test_parse_refuses_names_with_spaces(tmp_path, line):
    path = write(tmp_path / "p", f"bob:builder\n{line}\n")
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:2:")
    assert "spaces" in message


def test_parse_refuses_empty_name(tmp_path):
    path = write(tmp_path / "p", ":secret\n")
    with pytest.raises(PasswordFileError, match=r":1: user name '' is empty"):
        parsePasswords(path)


def test_parse_refuses_empty_password(tmp_path):
    path = write(tmp_path / "p", "alice:wonderland\nbob:\n")
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    assert str(exc.value).startswith(f"{path}:2:")
    assert "'bob'" in str(exc.value)
    assert "empty password" in str(exc.value)


def test_parse_refuses_line_without_colon(tmp_path):
    path = write(tmp_path / "p", "alice:wonderland\n\n# comment\njust a name\n")
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    assert str(exc.value).startswith(f"{path}:4:")


def test_parse_invalid_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "p", b"alice:wonderland\n# fine\n\xff\xfe:secret\n")
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    assert str(exc.value) == f"{path}:3: not valid UTF-8"


def test_parse_invalid_utf8_password_names_the_line(tmp_path):
    path = write(tmp_path / "p", b"alice:caf\xe9\n")
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    assert str(exc.value) == f"{path}:1: not valid UTF-8"


def test_parse_duplicate_user_names_both_lines(tmp_path):
    path = write(tmp_path / "p", "alice:one\n# x\nbob:b\nalice:two\n")
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    assert str(exc.value).startswith(f"{path}:4:")
    assert "'alice'" in str(exc.value)
    assert "line 1" in str(exc.value)


@pytest.mark.parametrize("text", ["", "\n", "# only\n# comments\n"])
def test_parse_refuses_a_file_without_users(tmp_path, text):
    path = write(tmp_path / "p", text)
    with pytest.raises(PasswordFileError, match="defines no users"):
        parsePasswords(path)


def test_parse_missing_file(tmp_path):
    path = tmp_path / "missing"
    with pytest.raises(PasswordFileError) as exc:
        parsePasswords(path)
    assert str(exc.value).startswith(f"{path}: cannot read password file")


# checkPermissions


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_permissions_private(tmp_path, mode):
    assert checkPermissions(write(tmp_path / "p", "a:b\n", mode)) is None


@pytest.mark.parametrize("mode", [0o604, 0o644, 0o444])
def test_permissions_world_readable_warns(tmp_path, mode):
    path = write(tmp_path / "p", "a:b\n", mode)
    warning = checkPermissions(path)
    assert warning is not None
    assert str(path) in warning
    assert f"{mode:04o}" in warning
    assert "readable by every user" in warning


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o660, 0o606, 0o666, 0o622])
def test_permissions_writable_by_others_refused(tmp_path, mode):
    path = write(tmp_path / "p", "a:b\n", mode)
    with pytest.raises(PasswordFileError) as exc:
        checkPermissions(path)
    assert str(path) in str(exc.value)
    assert f"{mode:04o}" in str(exc.value)
    assert "chmod go-w" in str(exc.value)


def test_permissions_missing_file(tmp_path):
    with pytest.raises(PasswordFileError, match="cannot read"):
        checkPermissions(tmp_path / "missing")


# PasswordFile


def test_users_sorted(tmp_path):
    path = write(tmp_path / "p", "zed:z\nalice:a\nmia:m\n")
    assert PasswordFile(str(path)).users == ["alice", "mia", "zed"]


def test_refuses_a_writable_file(tmp_path):
    path = write(tmp_path / "p", "alice:wonderland\n", 0o666)
    with pytest.raises(PasswordFileError, match="writable by group or others"):
        PasswordFile(str(path))


def test_strict_modes_off_accepts_a_writable_file(tmp_path, log):
    path = write(tmp_path / "p", "alice:wonderland\n", 0o666)
    assert PasswordFile(str(path), strictModes=False).users == ["alice"]
    assert not [e for e in log if e.get("log_level") == LogLevel.warn]


def test_world_readable_logs_a_warning(tmp_path, log):
    path = write(tmp_path / "p", "alice:wonderland\n", 0o644)
    PasswordFile(str(path))
    warnings = [e for e in log if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert any(str(path) in m and "readable by every user" in m for m in log.messages())


def test_right_password(users):
    checker = PasswordFile(str(users))
    result = avatarId(checker, UsernamePassword(b"alice", b"wonderland"))
    assert result == "alice"
    assert type(result) is str
    assert avatarId(checker, UsernamePassword(b"bob", b"builder")) == "bob"


def test_str_user_name(users):
    checker = PasswordFile(str(users))
    assert avatarId(checker, UsernamePassword("alice", b"wonderland")) == "alice"


def test_wrong_password(users):
    checker = PasswordFile(str(users))
    with pytest.raises(UnauthorizedLogin):
        avatarId(checker, UsernamePassword(b"alice", b"builder"))


def test_unknown_user(users):
    checker = PasswordFile(str(users))
    with pytest.raises(UnauthorizedLogin):
        avatarId(checker, UsernamePassword(b"mallory", b"wonderland"))


def test_unknown_user_cannot_guess_the_placeholder(users):
    checker = PasswordFile(str(users))
    with pytest.raises(UnauthorizedLogin):
        avatarId(checker, UsernamePassword(b"mallory", b"\0no such user\0"))


def test_password_with_colon_and_hash_checks(tmp_path):
    checker = PasswordFile(str(write(tmp_path / "p", "alice:pa:ss#word\n")))
    assert accepts(checker, "alice", "pa:ss#word")
    assert not accepts(checker, "alice", "pa")


@implementer(IUsernameHashedPassword)
class ChallengeResponse:
    """
    What PB's login sends: a response to a challenge, never the password.
    """

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.challenge = pb.challenge()
        self.response = pb.respond(self.challenge, password)

    def checkPassword(self, password: bytes) -> bool:
        return pb.respond(self.challenge, password) == self.response


def test_challenge_response_credentials(users):
    checker = PasswordFile(str(users))
    assert avatarId(checker, ChallengeResponse(b"alice", b"wonderland")) == "alice"
    with pytest.raises(UnauthorizedLogin):
        avatarId(checker, ChallengeResponse(b"alice", b"builder"))
    with pytest.raises(UnauthorizedLogin):
        avatarId(checker, ChallengeResponse(b"mallory", b"wonderland"))


class DeferredCredentials:
    """
    Credentials whose check answers later, as a remote challenge might.
    """

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password
        self.checking: defer.Deferred[bool] = defer.Deferred()

    def checkPassword(self, password: bytes) -> defer.Deferred[bool]:
        self.checked = password
        return self.checking


def test_deferred_check_right(users):
    checker = PasswordFile(str(users))
    credentials = DeferredCredentials(b"alice", b"wonderland")
    d = checker.requestAvatarId(credentials)
    results: list = []
    d.addBoth(results.append)
    assert results == []
    credentials.checking.callback(credentials.checked == credentials.password)
    assert results == ["alice"]


@pytest.mark.parametrize(("user", "password"), [(b"alice", b"x"), (b"nobody", b"wonderland")])
def test_deferred_check_wrong(users, user, password):
    checker = PasswordFile(str(users))
    credentials = DeferredCredentials(user, password)
    d = checker.requestAvatarId(credentials)
    credentials.checking.callback(credentials.checked == credentials.password)
    with pytest.raises(UnauthorizedLogin):
        outcome(d).raiseException()


# reloadIfChanged


def test_unchanged_file_not_reloaded(users, log):
    checker = PasswordFile(str(users))
    assert checker.reloadIfChanged() is False
    assert checker.reloadIfChanged() is False
    assert checker.users == ["alice", "bob"]
    assert not any("reloaded" in m for m in log.messages())


def test_reload_picks_up_a_new_user(users, log):
    checker = PasswordFile(str(users))
    assert not accepts(checker, "carol", "singer")
    changed(users, "alice:wonderland\nbob:builder\ncarol:singer\n")
    assert checker.reloadIfChanged() is True
    assert checker.users == ["alice", "bob", "carol"]
    assert accepts(checker, "carol", "singer")
    assert accepts(checker, "alice", "wonderland")
    assert any("reloaded" in m and str(users) in m for m in log.messages())
    assert checker.reloadIfChanged() is False


def test_reload_drops_a_removed_user_and_changes_a_password(users):
    checker = PasswordFile(str(users))
    changed(users, "alice:looking-glass\n")
    assert checker.reloadIfChanged() is True
    assert checker.users == ["alice"]
    assert not accepts(checker, "bob", "builder")
    assert not accepts(checker, "alice", "wonderland")
    assert accepts(checker, "alice", "looking-glass")


def test_reload_sees_a_replacement_with_the_same_size_and_time(users):
    checker = PasswordFile(str(users))
    before = users.stat()
    replacement = write(users.parent / "users.new", "alice:wonderlane\nbob:builder\n")
    assert replacement.stat().st_size == before.st_size
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, users)
    assert checker.reloadIfChanged() is True
    assert accepts(checker, "alice", "wonderlane")


def test_reload_keeps_the_old_table_if_the_new_file_is_malformed(users, log):
    log.errorsExpected = True
    checker = PasswordFile(str(users))
    changed(users, "alice:wonderland\nbob builder\ncarol:singer\n")
    assert checker.reloadIfChanged() is False
    assert checker.users == ["alice", "bob"]
    assert accepts(checker, "bob", "builder")
    assert not accepts(checker, "carol", "singer")
    errors = log.errors()
    assert len(errors) == 1
    message = log.messages()[log.index(errors[0])]
    assert f"{users}:2:" in message
    assert "not reloaded" in message

    # Not logged again every time the watcher looks, only when it changes.
    assert checker.reloadIfChanged() is False
    assert len(log.errors()) == 1

    changed(users, "alice:wonderland\ncarol:singer\n")
    assert checker.reloadIfChanged() is True
    assert checker.users == ["alice", "carol"]


def test_reload_refuses_a_file_that_became_world_writable(users, log):
    log.errorsExpected = True
    checker = PasswordFile(str(users))
    # A change of mode alone is noticed and logged.
    users.chmod(0o606)
    assert checker.reloadIfChanged() is False
    assert checker.reloadIfChanged() is False  # logged once, not every second
    changed(users, "alice:wonderland\nbob:builder\nmallory:evil\n", mode=0o606)
    assert checker.reloadIfChanged() is False
    assert checker.users == ["alice", "bob"]
    assert not accepts(checker, "mallory", "evil")
    messages = [log.messages()[log.index(e)] for e in log.errors()]
    assert len(messages) == 2
    assert all("writable by group or others" in m for m in messages)
    assert str(users) in messages[0]


def test_reload_keeps_the_old_table_if_the_file_disappears(users, log):
    log.errorsExpected = True
    checker = PasswordFile(str(users))
    users.unlink()
    assert checker.reloadIfChanged() is False
    assert accepts(checker, "alice", "wonderland")
    assert len(log.errors()) == 1
    write(users, "dave:diver\n")
    assert checker.reloadIfChanged() is True
    assert checker.users == ["dave"]
