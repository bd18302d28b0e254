"""
The password file: load, validate, reload, permissions.

The file holds one C{username:password} pair per line; blank lines and lines
starting with C{#} are ignored; the password is everything after the first
colon.  It is read once into memory, so a login costs one dictionary look-up
whatever the number of users, and read again only when it changes.
"""

from __future__ import annotations

import codecs
import hmac
import ipaddress
import os
import re
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
from twisted.application import service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from pbrealms.errors import ServerBusy, ShuttingDown


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


def shareOf(source: str | None) -> str:
    """
    Whose share of the waiting hash checks a check from the address
    C{source} takes: the address itself, or for IPv6 its /64, which one
    subscriber usually holds whole; C{""} for no source.
    """
    if not source:
        return ""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return source


class UsernamePasswordFrom(UsernamePassword):
    """
    A user name and password, and the source address they were sent from,
    so that L{PasswordHasher} can share its waiting slots between sources.

    @ivar source: the address, as L{pbrealms.addresses.sourceOf} gives it.
    """

    def __init__(self, username: bytes, password: bytes, source: str) -> None:
        super().__init__(username, password)
        self.source = source


#: Seconds between two log lines about checks answered busy.
BUSY_LOG_INTERVAL = 10.0


class _DaemonThread(threading.Thread):
    # A hash of cost 16 takes seconds, and nobody waits for its answer once
    # the server stops: the process may exit without waiting for it.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


class _DaemonThreadPool(ThreadPool):
    threadFactory = _DaemonThread


class _Check:
    __slots__ = ("deferred", "hashed", "password")

    def __init__(self, password: bytes, hashed: bytes) -> None:
        self.password = password
        self.hashed = hashed
        self.deferred: defer.Deferred[bool] = defer.Deferred()


class PasswordHasher(service.Service):
    """
    Checks passwords against bcrypt hashes in C{threads} threads, so that
    the reactor stays responsive while hashes are computed, with at most
    C{maxPending} checks hashing or waiting for a thread, so that a burst of
    logins cannot queue up hours of hashing.

    Waiting checks are kept by source and started round-robin across
    sources, so that the checks of one source delay its own more than
    another's.  When C{maxPending} is reached, a check from a source that
    would still hold fewer waiting checks than the source holding the most
    takes the place of that one's newest, which fails with L{ServerBusy};
    any other check fails with L{ServerBusy} at once.  So no source holds
    more than a fair share of the waiting checks while others want some.

    In a service tree, it stops with it: see L{stopService}.  Outside one,
    its threads stop when the reactor shuts down.

    @ivar hashing: how many checks are hashing in a thread.
    @ivar waiting: how many checks wait for a thread.
    @ivar closing: set once stopping: every check fails with L{ShuttingDown}.
    """

    _log = Logger()

    def __init__(
        self,
        threads: int = 4,
        maxPending: int = 32,
        run: Callable[[bytes, bytes], defer.Deferred[bool]] | None = None,
    ) -> None:
        """
        @param run: hashes one check (for tests); by default C{bcrypt} in
            this hasher's threads.
        """
        if not 1 <= threads <= maxPending:
            raise ValueError("need 1 <= threads <= maxPending")
        self.threads = threads
        self.maxPending = maxPending
        self.hashing = 0
        self.waiting = 0
        self.closing = False
        # Insertion-ordered: the first source is served next, then goes last.
        self._queues: dict[str, deque[_Check]] = {}
        self._idle: list[defer.Deferred[None]] = []
        self._pool: ThreadPool | None = None
        self._run = run or self._inThread
        self._busyCount = 0
        self._busyLogged: float | None = None

    def _busy(self) -> ServerBusy:
        """
        A refusal, counted: those that cost nothing to ask for are logged at
        most once per L{BUSY_LOG_INTERVAL}, not once each.
        """
        self._busyCount += 1
        now = time.monotonic()
        if self._busyLogged is None or now - self._busyLogged >= BUSY_LOG_INTERVAL:
            self._log.info(
                "password checks: {count} answered busy since the last such line; "
                "{pending} of {limit} hashing or waiting",
                count=self._busyCount,
                pending=self.pending,
                limit=self.maxPending,
            )
            self._busyLogged, self._busyCount = now, 0
        return ServerBusy()

    @property
    def pending(self) -> int:
        """
        How many checks are hashing or waiting.
        """
        return self.hashing + self.waiting

    def check(
        self, password: bytes, hashed: bytes, source: str | None = None
    ) -> defer.Deferred[bool]:
        """
        Check C{password} against the bcrypt hash C{hashed}, for a login
        from the address C{source} (L{None}: one anonymous source).

        @return: a L{Deferred} firing with whether C{password} matches;
            failing with L{ServerBusy} if there is no room for it or it lost
            its place to a source holding fewer, with L{ShuttingDown} once
            the hasher stops.
        """
        if self.closing:
            return defer.fail(ShuttingDown())
        share = shareOf(source)
        if self.pending >= self.maxPending and not self._makeRoom(share):
            return defer.fail(self._busy())
        check = _Check(password, hashed)
        self._queues.setdefault(share, deque()).append(check)
        self.waiting += 1
        self._startWaiting()
        return check.deferred

    def _makeRoom(self, share: str) -> bool:
        """
        Fail the newest waiting check of the source holding the most, if
        C{share} would still hold fewer with one more.
        """
        if not self._queues:
            return False
        biggest = max(self._queues.values(), key=len)
        if len(self._queues.get(share, ())) + 1 >= len(biggest):
            return False
        evicted = biggest.pop()  # it held 2 or more: never left empty
        self.waiting -= 1
        evicted.deferred.errback(self._busy())
        return True

    def _startWaiting(self) -> None:
        while self.hashing < self.threads and self._queues:
            share = next(iter(self._queues))
            queue = self._queues.pop(share)
            check = queue.popleft()
            if queue:
                self._queues[share] = queue  # to the back of the round
            self.waiting -= 1
            self.hashing += 1
            d = defer.maybeDeferred(self._run, check.password, check.hashed)
            d.addBoth(self._finished, check)

    def _finished(self, result: bool | Failure, check: _Check) -> None:
        self.hashing -= 1
        self._startWaiting()
        if isinstance(result, Failure):
            check.deferred.errback(result)
        else:
            check.deferred.callback(result)
        if not self.hashing:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _inThread(self, password: bytes, hashed: bytes) -> defer.Deferred[bool]:
        from twisted.internet import reactor

        if self._pool is None:
            self._pool = _DaemonThreadPool(0, self.threads, name="pbrealms-bcrypt")
            self._pool.start()
            if not self.running:
                reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        # Adapted: the reactor module's type does not name IReactorFromThreads,
        # which every reactor provides.
        return threads.deferToThreadPool(
            IReactorFromThreads(reactor), self._pool, _checkpw, password, hashed
        )

    def close(self) -> None:
        """
        Refuse new checks, and fail those that wait with L{ShuttingDown};
        those hashing go on.  Called as the server begins to shut down, so
        that only the checks already hashing go on, during the grace.
        """
        self.closing = True
        queues, self._queues = self._queues, {}
        self.waiting = 0
        for queue in queues.values():
            for check in queue:
                check.deferred.errback(ShuttingDown())

    def whenIdle(self) -> defer.Deferred[None]:
        """
        @return: a L{Deferred} that fires once no check is hashing.
        """
        if not self.hashing:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self.closing = False

    def stopService(self) -> None:
        """
        L{close}, and stop the threads once the checks hashing are done,
        without waiting for them: the server stops its hasher after the
        grace, when the connections those checks answer have closed.  (The
        threads are daemons: a process that exits does not wait for them.)
        """
        super().stopService()
        self.close()
        self.whenIdle().addCallback(lambda _: self.stop())

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
            L{ServerBusy} or L{ShuttingDown} (see L{PasswordHasher.check}).
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
