"""
The password file: load, validate, reload, permissions; the credentials
checker over it, which checks bcrypt entries in L{pbrealms.hasher}'s threads.

The file holds one C{username:password} pair per line; blank lines and lines
starting with C{#} are ignored; the password is everything after the first
colon.  It is read once into memory, so a login costs one dictionary look-up
whatever the number of users, and read again only when it changes.
"""

from __future__ import annotations

import codecs
import hmac
import os
import re
import stat
from collections import Counter
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pbrealms.hasher import PasswordHasher


class PasswordFileError(Exception):
    """
    The password file cannot be used; the message names the file (and the line).
    """


def parsePasswords(path: str | os.PathLike[str]) -> dict[bytes, bytes]:
    """
    Read a password file into a mapping of user name to password.

    A UTF-8 byte-order mark at the start (as some editors write) is skipped.

    @raise PasswordFileError: if the file cannot be read, a line is malformed,
        a user appears twice, an entry that starts like a bcrypt hash
        (C{$2b$NN$}) is not a usable one (its cost must be from 4 to 31), or
        there is no user at all.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PasswordFileError(f"{path}: cannot read password file: {e.strerror}") from None
    data = stripBOM(data)
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
        entry = password.encode("utf-8")
        # Checked here, not at the first login, where bcrypt would raise.
        if _BCRYPT_LIKE.match(entry) and not isHashed(entry):
            raise PasswordFileError(
                f"{where}: user {name!r} has a malformed bcrypt hash: it needs a cost "
                "from 04 to 31 and 53 characters of salt and hash"
            )
        users[key] = entry
        firstSeen[key] = number
    if not users:
        raise PasswordFileError(f"{path}: password file defines no users")
    return users


def stripBOM(data: bytes) -> bytes:
    """
    C{data} without the UTF-8 byte-order mark it may start with, which would
    otherwise become part of the first user's name.
    """
    return data[len(codecs.BOM_UTF8) :] if data.startswith(codecs.BOM_UTF8) else data


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
#: The costs bcrypt accepts.
MIN_COST, MAX_COST = 4, 31
_BCRYPT = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# An entry meant as a bcrypt hash, usable or not.
_BCRYPT_LIKE = re.compile(rb"\$2[aby]\$[0-9][0-9]\$")


def isHashed(password: bytes) -> bool:
    """
    Whether a password file entry is a bcrypt hash (of a cost from 4 to 31)
    rather than a password.
    """
    return _BCRYPT.fullmatch(password) is not None


class UsernamePasswordFrom(UsernamePassword):
    """
    A user name and password, and the source address they were sent from,
    so that L{PasswordHasher} can share its waiting slots between sources.

    @ivar source: the address, as L{pbrealms.addresses.sourceOf} gives it.
    """

    def __init__(self, username: bytes, password: bytes, source: str) -> None:
        super().__init__(username, password)
        self.source = source


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

    #: What an unknown user's password is checked against: a hash of the
    #: file's usual cost, or None for a file without hashes.
    _dummy: bytes | None = None

    def _load(self) -> dict[bytes, bytes]:
        if self._strictModes:
            warning = checkPermissions(self.path)
            if warning:
                self._log.warn("{warning}", warning=warning)
        users = parsePasswords(self.path)
        # Unknown users are checked against a hash of the file's usual cost,
        # so that they take as long as its users.  One of the file's own
        # serves, as the verdict refuses an unknown user whatever the check
        # says: making a new one would stall the reactor for as long as a
        # login takes (5 s at cost 16).
        # A file without hashes has none: its unknown users are compared as
        # its users are, at no cost, and tell nothing by taking longer.
        hashes = [p for p in users.values() if isHashed(p)]
        costs = Counter(int(p[4:6]) for p in hashes)
        if costs:
            cost = costs.most_common(1)[0][0]
            self._dummy = next(p for p in hashes if int(p[4:6]) == cost)
        else:
            self._dummy = None
        return users

    def reloadIfChanged(self) -> bool:
        """
        Read the file again if its modification time, size, inode or mode
        changed.
        If the new contents are unusable, keep the current table and log why,
        in one line.  It never raises, so that the watcher calling it keeps
        watching.

        @return: whether a new table is now in use.
        """
        try:
            signature = _signature(self.path)
            if signature == self._signature:
                return False
            self._signature = signature
            users = self._load()
        except Exception as e:
            # A reason for an operator, not a traceback: one line per change.
            reason = str(e) if isinstance(e, PasswordFileError) else f"{type(e).__name__}: {e}"
            self._log.error(
                "password file not reloaded, still serving the previous {count} users: {reason}",
                count=len(self._users),
                reason=reason[:300],
            )
            return False
        self._users = users
        self._log.info(
            "password file {path} reloaded: {count} users", path=self.path, count=len(users)
        )
        return True

    # Twisted types avatar IDs as bytes; ours are the user names as text, which
    # the Portal hands to our realms untouched.
    def requestAvatarId(  # type: ignore[override]
        self, credentials: IUsernameHashedPassword
    ) -> defer.Deferred[str]:
        """
        Check C{credentials} against the table.

        A bcrypt entry can only be checked against the password itself
        (L{IUsernamePassword}), in L{hasher}'s threads, which share their
        queue fairly between the sources of L{UsernamePasswordFrom}
        credentials (plain ones count as one source); an unknown user is
        checked against a hash of the file's usual cost, so that it costs the
        same.

        @return: a L{Deferred} firing with the user name, or failing with
            L{UnauthorizedLogin}; for a hash check, possibly with
            L{pbrealms.errors.ServerBusy} or L{pbrealms.errors.ShuttingDown}
            (see L{PasswordHasher.check}).
        """
        username = credentials.username
        if isinstance(username, str):
            username = username.encode("utf-8")
        password = self._users.get(username)
        # Twisted's checkPassword may answer with a Deferred.
        matched: bool | defer.Deferred[bool]
        if IUsernamePassword.providedBy(credentials):
            given = credentials.password
            if isinstance(given, str):
                given = given.encode("utf-8")
            hashed = password if password is not None else self._dummy
            if hashed is not None and isHashed(hashed):
                source = getattr(credentials, "source", None)
                checked = self.hasher.check(given, hashed, source=source)
                return checked.addCallback(self._verdict, username, password)
            matched = hmac.compare_digest(given, hashed or _NO_SUCH_USER)
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
