"""
The client library and the C{pbrealms-client} command.

    >>> conn = await connect(reactor, "tcp:127.0.0.1:8787", "alice", "wonderland")
    >>> await conn.perspective.callRemote("greet")
    '<1>hello alice'
    >>> await conn.disconnect()

A session that stays connected, logging in again whenever the connection is
lost, and doing again what C{onLogin} does (here: subscribing to the time):

    >>> session = ReconnectingSession(
    ...     reactor, "tcp:127.0.0.1:8787", "alice", "wonderland", ClientMind(onTime=print),
    ...     onLogin=lambda conn: conn.callRemote("setperiod", 5),
    ... )
    >>> stopped = session.start()  # fails with Kicked, BadCredentials ... if it gives up
    >>> if session.connection is not None:  # None while it is not logged in
    ...     await session.connection.callRemote("greet")
    '<2>hello alice'
    >>> await session.stop()
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, endpoints, error, ssl, task
from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.addresses import isLocal
from pbrealms.errors import (
    LoginFailed,
    ServerBusy,
    ShuttingDown,
    SourcePenalised,
    TooManyConnections,
    localize,
)
from pbrealms.options import Options as BaseOptions

DEFAULT_CONNECT = "tcp:127.0.0.1:8787"
DEFAULT_TIMEOUT = 10.0


class Connection:
    """
    A logged-in PB connection.

    @ivar perspective: the remote reference to the avatar.
    @ivar mind: the client object passed at login, or L{None}.
    """

    def __init__(
        self,
        factory: pb.PBClientFactory,
        perspective: pb.RemoteReference,
        mind: pb.Referenceable | None = None,
    ) -> None:
        self._factory = factory
        self.perspective = perspective
        self.mind = mind

    @property
    def connected(self) -> bool:
        """
        Whether the connection is still open.
        """
        return not self.perspective.broker.disconnected

    @property
    def kicked(self) -> str | None:
        """
        The reason the server gave (with C{notifyKicked}) when a newer login
        replaced this session, whose connection it then closes; L{None} if it
        did not, or if the mind is not a L{ClientMind}, which alone records it.
        """
        if isinstance(self.mind, ClientMind):
            return self.mind.kickedReason(self.perspective.broker)
        return None

    def callRemote(self, method: str, *args: object, **kw: object) -> defer.Deferred:
        """
        Call C{method} on the avatar.
        """
        return self.perspective.callRemote(method, *args, **kw).addErrback(localize)

    def notifyOnDisconnect(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback()} once the connection is closed; at once if it is.
        """
        broker = self.perspective.broker
        if broker.disconnected:
            callback()
        else:
            broker.notifyOnDisconnect(callback)

    def disconnect(self) -> defer.Deferred[None]:
        """
        Close the connection; the Deferred fires once it is closed.
        """
        broker = self.perspective.broker
        if broker.disconnected:
            return defer.succeed(None)
        closed: defer.Deferred[None] = defer.Deferred()
        broker.notifyOnDisconnect(lambda: closed.callback(None))
        self._factory.disconnect()
        return closed


def _ignore(_: object) -> None:
    pass


def isPrivate(transport) -> bool:
    """
    Whether only the server can read what is sent on C{transport}: a UNIX
    socket, or loopback.  (TLS counts only if its certificate was checked,
    which the transport cannot tell: the caller says so.)
    """
    return isLocal(transport.getPeer())


class Kicked(Exception):
    """
    The server closed the session because a newer login of the same user
    replaced it, and said so first (C{notifyKicked}).  Logging in again would
    only replace the newer session in turn.

    @ivar reason: the server's words.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ClientMind(pb.Referenceable):
    """
    The client object passed at login, which the server pushes to.  Each push
    calls the keyword argument of the same name, which by default ignores it:

      - C{onTime(seconds)}: C{notifyTime}, the time (in seconds since the
        epoch) that the clock realm pushes once per period;
      - C{onShutdown(reason)}: C{notifyShutdown}, the server is shutting down;
      - C{onGreeting(text)}: C{notifyGreeting}, another session of the user
        was greeted with C{text};
      - C{onSessionOpened(info)}, C{onSessionClosed(info)}:
        C{notifySessionOpened} and C{notifySessionClosed}, another session
        of the user opened or closed; C{info} is a dict of C{id} (int),
        C{peer} (str) and C{since} (seconds since the epoch), and when it
        closed C{reason} (str);
      - C{onKicked(reason)}: C{notifyKicked}, a newer login of the user
        replaced this session, and the server is about to close its
        connection.

    It also remembers which connections were kicked: see L{Connection.kicked}.
    """

    def __init__(
        self,
        onTime: Callable[[float], object] = _ignore,
        onShutdown: Callable[[str], object] = _ignore,
        onGreeting: Callable[[str], object] = _ignore,
        onSessionOpened: Callable[[dict], object] = _ignore,
        onSessionClosed: Callable[[dict], object] = _ignore,
        onKicked: Callable[[str], object] = _ignore,
    ) -> None:
        self.onTime = onTime
        self.onShutdown = onShutdown
        self.onGreeting = onGreeting
        self.onSessionOpened = onSessionOpened
        self.onSessionClosed = onSessionClosed
        self.onKicked = onKicked
        # One mind may be passed on several connections: a kick is recorded
        # for the connection it came on, and forgotten with it.
        self._kicked: weakref.WeakKeyDictionary[pb.Broker, str] = weakref.WeakKeyDictionary()
        self._pushedOn: pb.Broker | None = None

    def kickedReason(self, broker: pb.Broker) -> str | None:
        """
        The reason of the C{notifyKicked} received on C{broker}'s connection,
        or L{None}.
        """
        return self._kicked.get(broker)

    def remoteMessageReceived(self, broker, message, args, kw):
        # PB does not tell a remote_ method which connection called it.
        self._pushedOn = broker
        try:
            return super().remoteMessageReceived(broker, message, args, kw)
        finally:
            self._pushedOn = None

    def remote_notifyTime(self, seconds: float) -> None:
        self.onTime(seconds)

    def remote_notifyShutdown(self, reason: str) -> None:
        self.onShutdown(reason)

    def remote_notifyGreeting(self, text: str) -> None:
        self.onGreeting(text)

    def remote_notifySessionOpened(self, info: dict) -> None:
        self.onSessionOpened(info)

    def remote_notifySessionClosed(self, info: dict) -> None:
        self.onSessionClosed(info)

    def remote_notifyKicked(self, reason: str) -> None:
        reason = str(reason)
        if self._pushedOn is not None:
            self._kicked[self._pushedOn] = reason
        self.onKicked(reason)


class TLSFailed(error.ConnectError):
    """
    The TLS handshake with the server failed, so no PB message was exchanged.
    Trying again would fail the same way until the certificate or the
    client's trust changes.

    @ivar problem: C{"untrusted"} (the certificate's chain does not lead to
        an authority the client trusts, or it expired), C{"name"} (it is
        not for the host name connected to), or C{"handshake"} (anything
        else, e.g. the server does not speak TLS).
    @ivar detail: OpenSSL's or service_identity's words.
    """

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(string=f"TLS {problem}: {detail}")
        self.problem = problem
        self.detail = detail


class ClosedBeforeLogin(error.ConnectError):
    """
    The server closed the connection before it answered the login: what a
    pbrealms server does at accept when it holds as many connections as it
    allows (C{--max-connections}, C{--max-unauthenticated-per-source}).
    """

    def __init__(self) -> None:
        super().__init__(string="the server closed the connection before answering the login")


class _ClientBroker(pb.Broker):
    """
    PB's client broker, remembering why its connection was lost: PB tells
    C{notifyOnDisconnect} callbacks nothing, and a failed TLS handshake
    is told only there.
    """

    lostReason: Failure | None = None

    def connectionLost(self, reason: Failure) -> None:
        self.lostReason = reason
        super().connectionLost(reason)


class _ClientFactory(pb.PBClientFactory):
    protocol = _ClientBroker


def _closedBeforeLogin(broker: pb.Broker) -> Exception:
    """
    Why C{broker}'s connection closed before the login was answered.
    """
    reason = getattr(broker, "lostReason", None)
    if reason is not None and not reason.check(error.ConnectionDone, error.ConnectionLost):
        try:
            from OpenSSL import SSL
            from service_identity import VerificationError
        except ImportError:  # without Twisted's tls extra, no TLS either
            return ClosedBeforeLogin()
        if reason.check(VerificationError):
            return TLSFailed("name", _mismatch(reason.value))
        if reason.check(SSL.Error):
            detail = _sslText(reason.value)
            if "certificate verify failed" in detail:
                return TLSFailed("untrusted", detail)
            return TLSFailed("handshake", detail)
    return ClosedBeforeLogin()


def _mismatch(e: Exception) -> str:
    """
    The names a service_identity C{VerificationError} says the certificate
    is not for, e.g. C{"localhost"}.
    """
    names = []
    for mismatch in getattr(e, "errors", []):
        found = getattr(getattr(mismatch, "mismatched_id", None), "hostname", None)
        if found is None:
            found = getattr(getattr(mismatch, "mismatched_id", None), "ip", None)
        if isinstance(found, bytes):
            found = found.decode("ascii", "replace")
        if found is not None:
            names.append(str(found))
    return _printable(", ".join(names) or str(e))


def _sslText(e: Exception) -> str:
    """
    The reasons of an L{OpenSSL.SSL.Error}, which holds a list of (library,
    function, reason) triples, as one line.
    """
    reasons = []
    for entry in e.args[0] if e.args and isinstance(e.args[0], list) else []:
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]))
    return _printable("; ".join(reasons) or str(e) or type(e).__name__)


async def connect(
    reactor: IReactorTime,
    endpoint: str | Any,
    user: str,
    password: str,
    mind: pb.Referenceable | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    sendPassword: bool | None = None,
) -> Connection:
    """
    Connect to a pbrealms (or any PB portal) server and log in.

    @param endpoint: a client endpoint, or its description.
    @param mind: the client object the server may push to.
    @param timeout: seconds that connecting and logging in may take together.
    @param sendPassword: log in by sending the password itself (which is
        what a user whose entry is a bcrypt hash needs), rather than with
        PB's challenge.  By default, exactly when the connection is loopback
        or a UNIX socket; pass C{True} for a TLS connection whose certificate
        you verify (as C{pbrealms-client --tls} does), never for one you
        do not.
    @raise pbrealms.errors.LoginRefused: if the server refuses the login; it
        is also an L{UnauthorizedLogin}, and its subclasses
        L{pbrealms.errors.BadCredentials} and L{TooManyConnections} tell why.
    @raise defer.TimeoutError: if it took longer than C{timeout}.
    @raise TLSFailed: if the TLS handshake failed, e.g. on a certificate
        that is not trusted.
    @raise ClosedBeforeLogin: if the server closed the connection before
        answering the login.
    """
    if isinstance(endpoint, str):
        endpoint = endpoints.clientFromString(reactor, endpoint)
    factory = _ClientFactory()

    async def attempt() -> pb.RemoteReference:
        broker = await endpoint.connect(factory)
        loggingIn = defer.ensureDeferred(logIn(broker))
        outcome: defer.Deferred = defer.Deferred()
        loggingIn.addBoth(lambda result: outcome.called or outcome.callback(result))

        def closed() -> None:
            # PB's factory would wait for its root object for ever.
            if not outcome.called:
                outcome.errback(_closedBeforeLogin(broker))

        broker.notifyOnDisconnect(closed)
        return await outcome

    async def logIn(broker: pb.Broker) -> pb.RemoteReference:
        name, secret = user.encode("utf-8"), password.encode("utf-8")
        if sendPassword if sendPassword is not None else isPrivate(broker.transport):
            root = await factory.getRootObject()
            return await root.callRemote("loginPassword", name, secret, mind).addErrback(localize)
        credentials = UsernamePassword(name, secret)
        return await factory.login(credentials, client=mind).addErrback(localize)

    d = defer.ensureDeferred(attempt())
    d.addTimeout(timeout, reactor)
    try:
        perspective = await d
    except BaseException:
        factory.disconnect()
        raise
    return Connection(factory, perspective, mind)


def retryable(reason: Failure) -> bool:
    """
    Whether a failure to connect or log in may pass by itself, so that trying
    again later makes sense: the server could not be reached, timed out or
    closed the connection, already has as many sessions of the user as it
    allows, is too busy to check the password now, is shutting down (and will
    come back), refuses this address for a while after too many failed logins
    (see L{penaltySeconds}), or failed on its side.
    A refused login (a wrong password, a client the realm cannot serve) would
    be refused again, and so would a TLS handshake that failed (L{TLSFailed});
    nothing else is known to pass.
    """
    if reason.check(TooManyConnections, ServerBusy, ShuttingDown, SourcePenalised, LoginFailed):
        return True
    if reason.check(UnauthorizedLogin, TLSFailed):
        return False
    transient = (
        error.ConnectError,
        error.DNSLookupError,
        error.ConnectionLost,
        error.ConnectionDone,
        defer.TimeoutError,
        pb.PBConnectionLost,
    )
    return reason.check(*transient) is not None


def penaltySeconds(reason: Failure) -> float | None:
    """
    The seconds after which the server said it will hear this address again,
    if C{reason} is its L{SourcePenalised} refusal; otherwise L{None}.
    """
    if not reason.check(SourcePenalised):
        return None
    seconds = getattr(reason.value, "seconds", None)
    if isinstance(seconds, int | float):
        return float(seconds)
    # What crosses the wire is the message only.
    found = re.search(r"try again in (\d+(?:\.\d+)?) s", str(reason.value))
    return float(found.group(1)) if found else None


class ReconnectingSession:
    """
    A login that stays logged in: whenever the connection is lost, or an
    attempt fails in a way that may pass (see L{retryable}), it tries again
    after a delay that doubles with each failure, up to C{maxDelay}, and
    starts over once logged in.  Each delay is jittered, between half and all
    of its length, so that the clients of a server that restarts do not all
    come back at once.

    When the server refuses this address for a while after too many failed
    logins (L{pbrealms.errors.SourcePenalised}), the next attempt waits at
    least as long as it said: an attempt before would only be refused again.

    It stops for good when told to (L{stop}), when the login is refused for
    good (L{pbrealms.errors.BadCredentials} and the other refusals but
    L{TooManyConnections}, L{ServerBusy}, L{ShuttingDown} and
    L{pbrealms.errors.SourcePenalised}), when the TLS handshake fails
    (L{TLSFailed}), and when the server kicks the session because a newer
    login of the same user replaced it (L{Kicked}): logging in again would
    kick the newer one in turn.

    @ivar connection: the current L{Connection}, or L{None} while it is not
        logged in.
    @ivar mind: the L{ClientMind} passed at every login.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: str | Any,
        user: str,
        password: str,
        mind: ClientMind | None = None,
        *,
        onLogin: Callable[[Connection], object] | None = None,
        onLost: Callable[[Failure, float], object] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        sendPassword: bool | None = None,
        initialDelay: float = 0.5,
        factor: float = 2.0,
        maxDelay: float = 30.0,
        jitter: Callable[[], float] = random.random,
        connect: Callable[..., Awaitable[Connection]] = connect,
    ) -> None:
        """
        @param endpoint: a client endpoint, or its description.
        @param mind: the client object to log in with; a L{ClientMind} that
            ignores every push by default.  It must be a L{ClientMind}, the
            only kind that notices a kick.
        @param onLogin: called with the L{Connection} after every login, to
            do again what a new session needs (subscribe to pushes, say).  It
            may return a L{Deferred} or a coroutine.  If it fails while the
            connection is still open, the session stops with its failure;
            L{stop} cancels it.
        @param onLost: called with the reason and the delay in seconds before
            the next attempt, whenever the connection is lost or an attempt
            fails and it will try again.
        @param timeout: seconds that each attempt may take (see L{connect}).
        @param sendPassword: as for L{connect}.
        @param initialDelay: the first delay, in seconds (before jitter):
            after the first failed attempt, and after a lost connection.
        @param factor: how much longer each next delay is.
        @param maxDelay: the longest delay.
        @param jitter: returns a number from 0 to 1 for each delay: 0 waits
            half of it, 1 all of it.
        @param connect: connects and logs in once, as L{connect} does.
        """
        if not 0 < initialDelay <= maxDelay:
            raise ValueError("need 0 < initialDelay <= maxDelay")
        if factor < 1:
            raise ValueError("factor must be 1 or more")
        if isinstance(endpoint, str):
            endpoint = endpoints.clientFromString(reactor, endpoint)
        self.reactor = reactor
        self.endpoint = endpoint
        self.user = user
        self.mind = mind if mind is not None else ClientMind()
        self.timeout = timeout
        self.initialDelay = initialDelay
        self.factor = factor
        self.maxDelay = maxDelay
        self.connection: Connection | None = None
        self._password = password
        self._sendPassword = sendPassword
        self._onLogin = onLogin
        self._onLost = onLost
        self._jitter = jitter
        self._connect = connect
        self._delay = initialDelay
        self._started = False
        self._stopping = False
        self._stopped = False
        self._reason: Failure | None = None
        self._waiting: list[defer.Deferred[None]] = []
        # At most one of these is under way at any time.
        self._attempt: defer.Deferred[Connection] | None = None
        self._retry: IDelayedCall | None = None
        self._hook: defer.Deferred | None = None

    def start(self) -> defer.Deferred[None]:
        """
        Start connecting.  A session starts only once.

        @return: L{whenStopped}.
        """
        if self._started or self._stopping:
            raise RuntimeError("a ReconnectingSession starts only once")
        self._started = True
        self._attemptNow()
        return self.whenStopped()

    def whenStopped(self) -> defer.Deferred[None]:
        """
        @return: a new L{Deferred} that fires once the session has stopped
            for good and its connection is closed: with L{None} if L{stop}
            was called, or failing with the reason it gave up (L{Kicked},
            L{pbrealms.errors.BadCredentials} ...).
        """
        if not self._stopped:
            d: defer.Deferred[None] = defer.Deferred()
            self._waiting.append(d)
            return d
        return defer.fail(self._reason) if self._reason is not None else defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        """
        Stop for good: cancel the attempt or the delay under way, and close
        the connection.  Nothing of the session remains once the L{Deferred}
        fires, with L{None}; L{whenStopped} fires then too, with L{None}
        unless the session had given up before.
        """
        self._finish(None)
        return self.whenStopped().addErrback(lambda _: None)

    def _attemptNow(self) -> None:
        self._retry = None
        self._attempt = attempt = defer.maybeDeferred(
            self._connect,
            self.reactor,
            self.endpoint,
            self.user,
            self._password,
            self.mind,
            self.timeout,
            sendPassword=self._sendPassword,
        )
        attempt.addCallbacks(self._loggedIn, self._failed)

    def _loggedIn(self, conn: Connection) -> None:
        self._attempt = None
        if self._stopping:
            conn.disconnect()
            return
        self.connection = conn
        self._delay = self.initialDelay
        conn.notifyOnDisconnect(lambda: self._lost(conn))
        if self._onLogin is not None and conn.connected:
            self._hook = hook = defer.maybeDeferred(self._onLogin, conn)
            hook.addCallbacks(self._hooked, self._hookFailed, errbackArgs=(conn,))

    def _hooked(self, _: object) -> None:
        self._hook = None

    def _hookFailed(self, reason: Failure, conn: Connection) -> None:
        self._hook = None
        # A hook failing because the connection went is no reason to stop:
        # what happens next is the lost connection's to decide.
        if not self._stopping and conn is self.connection and conn.connected:
            self._finish(reason)

    def _failed(self, reason: Failure) -> None:
        self._attempt = None
        if self._stopping:
            return  # cancelled by stop()
        if retryable(reason):
            self._retryLater(reason, atLeast=penaltySeconds(reason) or 0.0)
        else:
            self._finish(reason)

    def _lost(self, conn: Connection) -> None:
        if conn is not self.connection:
            return  # closed by stop()
        self.connection = None
        if self._hook is not None:
            self._hook.cancel()
        kicked = conn.kicked
        if kicked is not None:
            self._finish(Failure(Kicked(kicked)))
        else:
            self._retryLater(Failure(error.ConnectionLost("the connection was lost")))

    def _retryLater(self, reason: Failure, atLeast: float = 0.0) -> None:
        delay = self._delay * (1 + min(max(self._jitter(), 0.0), 1.0)) / 2
        self._delay = min(self.maxDelay, self._delay * self.factor)
        delay = max(delay, atLeast)
        self._retry = self.reactor.callLater(delay, self._attemptNow)
        if self._onLost is not None:
            self._onLost(reason, delay)

    def _finish(self, reason: Failure | None) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._reason = reason
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        # Their errbacks see _stopping, and swallow the cancellation.
        for pending in (self._attempt, self._hook):
            if pending is not None:
                pending.cancel()
        conn, self.connection = self.connection, None
        closed = conn.disconnect() if conn is not None else defer.succeed(None)
        closed.addBoth(self._closed)

    def _closed(self, _: object) -> None:
        self._stopped = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if self._reason is None:
                d.callback(None)
            else:
                d.errback(self._reason)


# The command line.

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_TOO_MANY, EXIT_UNREACHABLE, EXIT_TIMEOUT = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
)
EXIT_KICKED = 7
EXIT_BUSY = 8


def _noPasswordOption(name: str) -> usage.UsageError:
    # The value is not repeated: it may be the password itself.
    return usage.UsageError(
        f"{name}: the password never goes on the command line (ps shows it to every "
        "user): give --password-file FILE or set PBREALMS_PASSWORD"
    )


class _CommandOptions(BaseOptions):
    """
    The options of one command of C{pbrealms-client}.  Its C{synopsis} is
    its whole usage line: Twisted's would put the parent's in front of it.
    """

    synopsis: str

    def getSynopsis(self) -> str:
        return self.synopsis

    def parseOptions(self, options: list[str] | None = None) -> None:
        for argument in sys.argv[1:] if options is None else options:
            if argument == "--":
                break
            name = argument.partition("=")[0]
            if len(name) > 2 and "--password".startswith(name):
                raise _noPasswordOption(name)
        super().parseOptions(options)

    def parseArgs(self, *extra: str) -> None:
        if extra:
            command = self.parent.subCommand if self.parent is not None else "the command"
            words = " ".join(repr(e) for e in extra)
            raise usage.UsageError(f"{command} takes no arguments, but was given {words}")


class GreetOptions(_CommandOptions):
    synopsis = "Usage: pbrealms-client --user NAME [options] greet [--count N]"
    optParameters = [["count", "n", 1, "How many greetings to ask for.", int]]

    def postOptions(self) -> None:
        if self["count"] < 1:
            raise usage.UsageError("--count must be 1 or more")


class StatusOptions(_CommandOptions):
    synopsis = "Usage: pbrealms-client --user NAME [options] status"


class ClockOptions(_CommandOptions):
    synopsis = "Usage: pbrealms-client --user NAME [options] clock [--period SECONDS] [--ticks K]"
    optParameters = [
        ["period", None, None, "Ask the server for this push period, in seconds.", float],
        ["ticks", "k", None, "Stop after K times. [default: run until interrupted]", int],
    ]

    def postOptions(self) -> None:
        if self["ticks"] is not None and self["ticks"] < 1:
            raise usage.UsageError("--ticks must be 1 or more")


class WatchOptions(_CommandOptions):
    synopsis = "Usage: pbrealms-client --user NAME [options] watch [--period SECONDS] [--count N]"
    longdesc = (
        "Stay logged in, logging in again whenever the connection is lost, and print "
        "every push of the server as one line: the time, greetings and sessions of "
        "the user's other sessions, kicks, shutdowns. What happens to the connection "
        "goes to standard error. Runs until interrupted, or until the login is refused "
        "for good or a newer login replaces this one."
    )
    optParameters = [
        [
            "period",
            None,
            None,
            "After every login, ask the server for this push period, in seconds, "
            "if its realm pushes the time.",
            float,
        ],
        ["count", "n", None, "Stop after N pushes. [default: run until interrupted]", int],
    ]

    def postOptions(self) -> None:
        if self["count"] is not None and self["count"] < 1:
            raise usage.UsageError("--count must be 1 or more")


class ClientOptions(BaseOptions):
    synopsis = (
        "Usage: pbrealms-client --user NAME [--password-file FILE] [--connect ENDPOINT] "
        "COMMAND [options]"
    )
    longdesc = (
        "Log in to a pbrealms server and call it; COMMAND --help tells a command's own "
        "options. The password is read from --password-file or from the "
        "PBREALMS_PASSWORD environment variable, never from the command line. "
        "Interrupted (Ctrl-C, SIGTERM), a command logs out and exits 0. Exit status: "
        "0 success, 1 error, 2 bad usage, 3 login refused, 4 too many connections, "
        "5 cannot connect, 6 timed out, 7 kicked (a newer login of the user replaced "
        "this one), 8 server busy (the password was not checked: try again in a moment)."
    )
    optParameters = [
        ["connect", "c", DEFAULT_CONNECT, "The server, as a Twisted client endpoint description."],
        ["user", "u", None, "The user name."],
        ["password-file", None, None, "A file whose first line is the password."],
        [
            "timeout",
            "t",
            DEFAULT_TIMEOUT,
            "Seconds that connecting and logging in may take.",
            float,
        ],
        [
            "ca-file",
            None,
            None,
            "With --tls: the PEM certificate of the authority that signed the server's. "
            "[default: the system's trusted authorities]",
        ],
    ]
    optFlags = [
        [
            "tls",
            None,
            "Connect to --connect tcp:HOST:PORT over TLS, checking the server's "
            "certificate against HOST.",
        ],
    ]
    subCommands = [
        ["greet", None, GreetOptions, "Ask for greetings and print them."],
        ["status", None, StatusOptions, "Print the avatar's status as JSON."],
        ["clock", None, ClockOptions, "Print every time the clock realm pushes."],
        [
            "watch",
            None,
            WatchOptions,
            "Stay connected, reconnecting, and print every push of the server.",
        ],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # --password=... is refused as a prefix of --password-file: say
            # why there is no such option.  Its value is not repeated: it may
            # be the password itself.
            given = re.fullmatch(
                r"(--[\w-]+): give the whole option name \(--password-file\)", str(e)
            )
            if given is None or not "--password".startswith(given.group(1)):
                raise
            raise _noPasswordOption(given.group(1)) from None

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: greet, status, clock or watch")
        if not self["user"]:
            raise usage.UsageError("give --user NAME")
        if self["timeout"] <= 0:
            raise usage.UsageError("--timeout must be more than 0 seconds")
        from twisted.internet import reactor

        try:
            self["endpoint"] = endpoints.clientFromString(reactor, self["connect"])
        except Exception as e:
            raise usage.UsageError(f"bad --connect {self['connect']!r}: {e}") from None
        if self["tls"]:
            self["endpoint"] = self._tls(self["endpoint"])
        elif self["ca-file"]:
            raise usage.UsageError("--ca-file goes with --tls")
        self["password"] = self._password()

    def _tls(self, endpoint):
        host = getattr(endpoint, "_host", None)
        if not isinstance(endpoint, endpoints.TCP4ClientEndpoint | endpoints.HostnameEndpoint):
            raise usage.UsageError("--tls needs --connect tcp:HOST:PORT")
        trust = None
        if self["ca-file"]:
            try:
                with open(self["ca-file"], "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            except Exception as e:
                raise usage.UsageError(f"cannot read --ca-file {self['ca-file']}: {e}") from None
        if isinstance(host, bytes):
            host = host.decode("ascii")
        return endpoints.wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust), endpoint)

    def _password(self) -> str:
        path = self["password-file"]
        if path is None:
            password = os.environ.get("PBREALMS_PASSWORD")
            if not password:
                raise usage.UsageError("give --password-file FILE or set PBREALMS_PASSWORD")
            return password
        try:
            with open(path, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise usage.UsageError(f"cannot read password file {path}: {e}") from None
        if not password:
            raise usage.UsageError(f"password file {path} is empty")
        return password


class CommandFailed(Exception):
    """
    The command ends with this one-line message and exit status.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def explain(
    reason: Failure, where: str, timeout: float, caFile: str | None = None
) -> CommandFailed:
    """
    One line and an exit status for a failure to connect, log in or call.

    @param caFile: the C{--ca-file} given, if any, for the advice on a TLS
        certificate that is not trusted.
    """
    if reason.check(TooManyConnections):
        return CommandFailed(f"login refused: {reason.getErrorMessage()}", EXIT_TOO_MANY)
    if reason.check(ServerBusy):
        return CommandFailed(f"server busy: {reason.getErrorMessage()}", EXIT_BUSY)
    if reason.check(SourcePenalised):
        return CommandFailed(
            f"login refused: {_printable(reason.getErrorMessage())} (every failed login from "
            "this address adds to the wait: check the user name and password first)",
            EXIT_REFUSED,
        )
    if reason.check(UnauthorizedLogin):
        return CommandFailed(f"login refused: {reason.getErrorMessage()}", EXIT_REFUSED)
    if reason.check(defer.TimeoutError, defer.CancelledError):
        return CommandFailed(f"timed out after {timeout:g} s connecting to {where}", EXIT_TIMEOUT)
    if reason.check(TLSFailed):
        return CommandFailed(_tlsAdvice(reason.value, where, caFile), EXIT_UNREACHABLE)
    if reason.check(ClosedBeforeLogin):
        return CommandFailed(
            f"cannot connect to {where}: the server closed the connection before answering "
            "the login (it may hold as many connections as it allows, or be refusing this "
            "address; its log says which)",
            EXIT_UNREACHABLE,
        )
    if reason.check(error.ConnectError, error.DNSLookupError):
        return CommandFailed(f"cannot connect to {where}: {_why(reason)}", EXIT_UNREACHABLE)
    if reason.check(pb.PBConnectionLost, error.ConnectionLost, error.ConnectionDone):
        return CommandFailed(f"lost the connection to {where}", EXIT_ERROR)
    return CommandFailed(f"the server answered: {reason.getErrorMessage()}", EXIT_ERROR)


def _tlsAdvice(failed: TLSFailed, where: str, caFile: str | None) -> str:
    """
    What went wrong in the TLS handshake with C{where}, and what to do.
    """
    if failed.problem == "untrusted":
        head = f"the TLS certificate of {where} is not trusted ({failed.detail})"
        if "expired" in failed.detail or "not yet valid" in failed.detail:
            return f"{head}: the server needs a valid certificate"
        if caFile is not None:
            return f"{head}: --ca-file {caFile} is not the authority that signed it"
        return f"{head}: give --ca-file with the authority that signed it"
    if failed.problem == "name":
        return (
            f"the TLS certificate of {where} is not issued for {failed.detail}: "
            "give --connect the host name it is issued for"
        )
    return (
        f"the TLS handshake with {where} failed ({failed.detail}): "
        "check that the server serves TLS on that port"
    )


def _why(reason: Failure) -> str:
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    return reason.getErrorMessage()


def _printable(text: object) -> str:
    """
    C{text} on one line, without control characters: what the server sends
    must not start lines or move the terminal's cursor.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _stamp(seconds: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{int(seconds % 1 * 1000):03d} UTC"


def _kicked(reason: str) -> CommandFailed:
    return CommandFailed(f"kicked: {_printable(reason)}", EXIT_KICKED)


class _Interruption:
    """
    Whether the reactor began to shut down (Ctrl-C, SIGTERM) while a command
    ran, and what the command does about it first: log out, rather than see
    its connection lost at the shutdown and report that as a failure.

    @ivar happened: whether the shutdown began.
    @ivar onInterrupt: called when it does; a L{Deferred} it returns delays
        the shutdown until it fires.
    """

    def __init__(self, reactor: IReactorCore) -> None:
        self.reactor = reactor
        self.happened = False
        self.onInterrupt: Callable[[], object] = lambda: None
        self._trigger: object | None = reactor.addSystemEventTrigger(
            "before", "shutdown", self._interrupted
        )

    def _interrupted(self) -> object:
        self.happened = True
        self._trigger = None
        return self.onInterrupt()

    def remove(self) -> None:
        """
        Stop watching for the shutdown.
        """
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None


async def run(
    reactor: IReactorCore, options: ClientOptions, out=sys.stdout, err=sys.stderr
) -> None:
    """
    Run the command in C{options}, printing its output to C{out} and, for
    C{watch}, what happens to the connection to C{err}.  If the reactor
    shuts down meanwhile (the command was interrupted), it logs out and
    returns.

    @raise CommandFailed: with the line to print and the exit status.
    """
    interruption = _Interruption(reactor)
    try:
        if options.subCommand == "watch":
            await watch(reactor, options, out, err, interruption)
        else:
            await _call(reactor, options, out, interruption)
    except CommandFailed:
        if not interruption.happened:
            raise
    finally:
        interruption.remove()


async def _call(
    reactor: IReactorCore, options: ClientOptions, out, interruption: _Interruption
) -> None:
    """
    The commands that log in once: C{greet}, C{status} and C{clock}.
    """
    command, sub = options.subCommand, options.subOptions
    where, caFile = options["connect"], options["ca-file"]
    done: defer.Deferred[None] = defer.Deferred()
    ticks = 0

    def onTime(seconds: float) -> None:
        nonlocal ticks
        ticks += 1
        print(_stamp(seconds), file=out, flush=True)
        if sub["ticks"] is not None and ticks >= sub["ticks"] and not done.called:
            done.callback(None)

    # Every command passes a client object, so that it can log in to any realm.
    def onShutdown(reason: str) -> None:
        if not done.called:
            done.errback(CommandFailed(f"the server stopped: {reason}", EXIT_ERROR))

    mind = ClientMind(onTime if command == "clock" else _ignore, onShutdown)
    connecting = defer.ensureDeferred(
        connect(
            reactor,
            options["endpoint"],
            options["user"],
            options["password"],
            mind,
            options["timeout"],
            sendPassword=True if options["tls"] else None,
        )
    )
    interruption.onInterrupt = connecting.cancel
    try:
        conn = await connecting
    except Exception:
        if interruption.happened:
            return
        raise explain(Failure(), where, options["timeout"], caFile) from None
    interruption.onInterrupt = conn.disconnect
    try:
        if command == "greet":
            for _ in range(sub["count"]):
                print(await conn.callRemote("greet"), file=out, flush=True)
        elif command == "status":
            print(json.dumps(await conn.callRemote("status"), sort_keys=True), file=out)
        elif command == "clock":
            status = await conn.callRemote("status")
            if "period" not in status:
                raise CommandFailed(
                    f"the server does not push the time (realm {status.get('realm')!r})", EXIT_ERROR
                )
            if sub["period"] is not None:
                await conn.callRemote("setperiod", sub["period"])
            conn.notifyOnDisconnect(lambda: done.called or done.errback(pb.PBConnectionLost()))
            await done
    except CommandFailed:
        raise
    except Exception:
        if interruption.happened:
            return  # logged out: what was under way failed with the connection
        # A kick is told before the connection closes, failing what was under way.
        if conn.kicked is not None:
            raise _kicked(conn.kicked) from None
        raise explain(Failure(), where, options["timeout"], caFile) from None
    finally:
        await conn.disconnect()


async def watch(
    reactor: IReactorCore,
    options: ClientOptions,
    out,
    err,
    interruption: _Interruption | None = None,
) -> None:
    """
    The C{watch} command: a L{ReconnectingSession} printing every push to
    C{out}, one line each, and what happens to the connection to C{err}.
    It returns when interrupted (the reactor shuts down) or after C{--count}
    pushes.

    @raise CommandFailed: when the session gives up: kicked, or refused.
    """
    sub, where = options.subOptions, options["connect"]
    caFile = options["ca-file"]
    finished: defer.Deferred[None] = defer.Deferred()
    shown = 0

    def show(line: str) -> None:
        nonlocal shown
        print(line, file=out, flush=True)
        shown += 1
        if sub["count"] is not None and shown >= sub["count"] and not finished.called:
            finished.callback(None)

    def sessionLine(info: dict, what: str) -> str:
        line = f"session {_printable(info.get('id'))} {what} from {_printable(info.get('peer'))}"
        return line + (f": {_printable(info['reason'])}" if "reason" in info else "")

    mind = ClientMind(
        onTime=lambda seconds: show(f"time {_stamp(seconds)}"),
        onShutdown=lambda reason: show(f"server shutting down: {_printable(reason)}"),
        onGreeting=lambda text: show(f"greeting {_printable(text)}"),
        onSessionOpened=lambda info: show(sessionLine(info, "opened")),
        onSessionClosed=lambda info: show(sessionLine(info, "closed")),
        onKicked=lambda reason: show(f"kicked: {_printable(reason)}"),
    )

    async def subscribe(conn: Connection) -> None:
        print(f"connected to {where} as {options['user']}", file=err, flush=True)
        if sub["period"] is not None:
            # Each session starts with the server's period.
            if "period" in await conn.callRemote("status"):
                await conn.callRemote("setperiod", sub["period"])

    def lost(reason: Failure, delay: float) -> None:
        why = explain(reason, where, options["timeout"], caFile)
        print(f"{why}; reconnecting in {delay:.1f} s", file=err, flush=True)

    watching = ReconnectingSession(
        reactor,
        options["endpoint"],
        options["user"],
        options["password"],
        mind,
        onLogin=subscribe,
        onLost=lost,
        timeout=options["timeout"],
        sendPassword=True if options["tls"] else None,
    )
    watching.start().addCallbacks(
        lambda _: finished.called or finished.callback(None),
        lambda reason: finished.called or finished.errback(reason),
    )
    # Interrupted: log out, rather than see the connection lost and retry.
    ownInterruption = interruption is None
    if interruption is None:
        interruption = _Interruption(reactor)
    interruption.onInterrupt = watching.stop
    try:
        await finished
    except Kicked as e:
        raise _kicked(e.reason) from None
    except Exception:
        raise explain(Failure(), where, options["timeout"], caFile) from None
    finally:
        if ownInterruption:
            interruption.remove()
        await watching.stop()


def main(argv: list[str] | None = None) -> None:
    """
    The C{pbrealms-client} command.
    """
    options = ClientOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"pbrealms-client: error: {e}\n")
        raise SystemExit(EXIT_USAGE) from None

    async def command(reactor: IReactorCore) -> None:
        try:
            await run(reactor, options)
        except CommandFailed as e:
            sys.stderr.write(f"pbrealms-client: {e}\n")
            raise SystemExit(e.status) from None

    task.react(lambda reactor: defer.ensureDeferred(command(reactor)))


if __name__ == "__main__":
    main()
