"""
The password file: load, validate, reload, permissions.

The file holds one C{username:password} pair per line; blank lines and lines
starting with C{#} are ignored; the password is everything after the first
colon.  It is read once into memory, so a login costs one dictionary look-up
whatever the number of users, and read again only when it changes.
"""

from __future__ import annotations

import hmac
import os
import re
import stat
from collections import Counter
from pathlib import Path

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer


class PasswordFileError(Exception):
    """
    The password file cannot be used; the message names the file (and the line).
    """


def parsePasswords(path: str | os.PathLike[str]) -> dict[bytes, bytes]:
    """
    Read a password file into a mapping of user name to password.

    @raise PasswordFileError: if the file cannot be read, a line is malformed,
        a user appears twice, or there is no user at all.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PasswordFileError(f"{path}: cannot read password file: {e.strerror}") from None
    users: dict[bytes, bytes] = {}
    firstSeen: dict[bytes, int] = {}
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise PasswordFileError(f"{where}: not valid UTF-8") from None
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, password = line.partition(":")
        if not colon:
            raise PasswordFileError(f"{where}: expected 'username:password', found no ':'")
        if not name or name != name.strip() or any(c.isspace() for c in name):
            raise PasswordFileError(f"{where}: user name {name!r} is empty or has spaces")
        if not password:
            raise PasswordFileError(f"{where}: user {name!r} has an empty password")
        key = name.encode("utf-8")
        if key in users:
            raise PasswordFileError(
                f"{where}: user {name!r} is already defined on line {firstSeen[key]}"
            )
        users[key] = password.encode("utf-8")
        firstSeen[key] = number
    if not users:
        raise PasswordFileError(f"{path}: password file defines no users")
    return users


def checkPermissions(path: str | os.PathLike[str]) -> str | None:
    """
    Apply OpenSSH's StrictModes rule to a password file.

    @return: a warning to log if others may read the file, else L{None}.
    @raise PasswordFileError: if the group or others may write to it, since
        whoever can write it can log in as anyone.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise PasswordFileError(f"{path}: cannot read password file: {e.strerror}") from None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PasswordFileError(
            f"{path}: password file is writable by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod go-w {path}"
        )
    if mode & stat.S_IROTH:
        return (
            f"{path}: password file is readable by every user "
            f"(mode {stat.S_IMODE(mode):04o}); consider: chmod o-r {path}"
        )
    return None


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)


# Compared against for unknown users, so that they cost what a wrong password costs.
_NO_SUCH_USER = b"\0no such user\0"
#: A bcrypt hash (cost 12, as pbrealms-passwd writes) that no password matches.
DUMMY_HASH = b"$2b$12$WyAZc.PiM4es0FE/mo8Nz.eGsYyJ8GUYxkMw1m9W.ghuGlZ4M9Vji"
_BCRYPT = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


def isHashed(password: bytes) -> bool:
    """
    Whether a password file entry is a bcrypt hash rather than a password.
    """
    return _BCRYPT.fullmatch(password) is not None


class PasswordHasher:
    """
    Checks passwords against bcrypt hashes in a thread pool of bounded size,
    so that the reactor stays responsive while hashes are computed.
    """

    def __init__(self, threads: int = 4, maxPending: int = 32) -> None:
        self.threads = threads
        self.maxPending = maxPending
        self.pending = 0
        self._pool: ThreadPool | None = None

    def check(self, password: bytes, hashed: bytes) -> defer.Deferred[bool]:
        """
        @return: a L{Deferred} firing with whether C{password} matches; with
            C{False} at once when C{maxPending} checks are already waiting, so
            that a burst of logins cannot queue up hours of hashing.
        """
        from twisted.internet import reactor

        if self.pending >= self.maxPending:
            return defer.succeed(False)
        if self._pool is None:
            self._pool = ThreadPool(0, self.threads, name="pbrealms-bcrypt")
            self._pool.start()
            reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        self.pending += 1
        d = threads.deferToThreadPool(reactor, self._pool, _checkpw, password, hashed)
        return d.addBoth(self._done)

    def _done(self, result: object) -> object:
        self.pending -= 1
        return result

    def stop(self) -> None:
        """
        Stop the threads (they start again on the next check).
        """
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # bcrypt reads at most 72 bytes, and bcrypt 5 refuses more: such a
    # password never matches, after the same work as any other.
    if len(password) > 72:
        bcrypt.checkpw(password[:72], hashed)
        return False
    return bcrypt.checkpw(password, hashed)


@implementer(ICredentialsChecker)
class PasswordFile:
    """
    A credentials checker backed by a password file held in memory.

    It checks L{IUsernameHashedPassword} (what PB's challenge sends) and
    L{IUsernamePassword}.  A successful check yields the user name as L{str}.

    @ivar path: the file's path.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    _log = Logger()
    #: Checks bcrypt hashes; shared by every password file of the process.
    hasher: PasswordHasher

    def __init__(self, path: str, strictModes: bool = True) -> None:
        """
        Load C{path}.

        @param strictModes: refuse a file that others may write to; off only
            for the demo file that ships inside the package.
        @raise PasswordFileError: if the file is unusable.
        """
        self.path = path
        self._strictModes = strictModes
        self._signature = _signature(path)
        self._users = self._load()

    @property
    def users(self) -> list[str]:
        """
        The user names, sorted.
        """
        return sorted(name.decode("utf-8") for name in self._users)

    _dummy = DUMMY_HASH

    def _load(self) -> dict[bytes, bytes]:
        if self._strictModes:
            warning = checkPermissions(self.path)
            if warning:
                self._log.warn("{warning}", warning=warning)
        users = parsePasswords(self.path)
        # Unknown users are checked against a hash of the file's usual cost,
        # so that they take as long as its users.
        costs = Counter(int(p[4:6]) for p in users.values() if isHashed(p))
        cost = costs.most_common(1)[0][0] if costs else 12
        if int(self._dummy[4:6]) != cost:
            self._dummy = bcrypt.hashpw(b"no such user: never matches", bcrypt.gensalt(cost))
        return users

    def reloadIfChanged(self) -> bool:
        """
        Read the file again if its modification time, size, inode or mode
        changed.
        If the new contents are unusable, keep the current table and log why.

        @return: whether a new table is now in use.
        """
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            users = self._load()
        except PasswordFileError as e:
            self._log.error(
                "password file not reloaded, still serving the previous {count} users: {reason}",
                count=len(self._users),
                reason=str(e),
            )
            return False
        self._users = users
        self._log.info(
            "password file {path} reloaded: {count} users", path=self.path, count=len(users)
        )
        return True

    def requestAvatarId(self, credentials: IUsernameHashedPassword) -> defer.Deferred[str]:
        """
        Check C{credentials} against the table.

        A bcrypt entry can only be checked against the password itself
        (L{IUsernamePassword}), in L{hasher}'s threads; an unknown user is
        checked against a dummy hash, so that it costs the same.

        @return: a L{Deferred} firing with the user name, or failing with
            L{UnauthorizedLogin}.
        """
        username = credentials.username
        if isinstance(username, str):
            username = username.encode("utf-8")
        password = self._users.get(username)
        if IUsernamePassword.providedBy(credentials):
            given = credentials.password
            if isinstance(given, str):
                given = given.encode("utf-8")
            if password is None or isHashed(password):
                checked = self.hasher.check(given, password or self._dummy)
                return checked.addCallback(self._verdict, username, password)
            matched: object = hmac.compare_digest(given, password)
        elif password is not None and isHashed(password):
            matched = False  # PB's challenge needs what a hash does not give
        else:
            matched = credentials.checkPassword(password or _NO_SUCH_USER)
        if isinstance(matched, defer.Deferred):
            return matched.addCallback(self._verdict, username, password)
        try:
            return defer.succeed(self._verdict(matched, username, password))
        except UnauthorizedLogin:
            return defer.fail()

    @staticmethod
    def _verdict(matched: bool, username: bytes, password: bytes | None) -> str:
        if password is None or not matched:
            raise UnauthorizedLogin()
        return username.decode("utf-8")


PasswordFile.hasher = PasswordHasher()
