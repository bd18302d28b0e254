"""
L{ReconnectingSession}, a login that stays logged in, and what it asks of a
failure: whether trying again makes sense (L{retryable}), and how long the
server said to wait (L{penaltySeconds}).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Coroutine
from typing import Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, endpoints, error, protocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from pbrealms.client.connection import DEFAULT_TIMEOUT, Connection, TLSFailed, connect
from pbrealms.client.mind import ClientMind, Kicked
from pbrealms.errors import (
    LoginFailed,
    ServerBusy,
    ShuttingDown,
    SourcePenalised,
    TooManyConnections,
)


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

    It is Twisted's L{ClientService} with a backoff policy, whose endpoint
    connects and logs in once (L{_LoginEndpoint}); what Twisted's does not
    do, giving up on a refusal for good, is this class's.

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
        connect: Callable[
            ..., defer.Deferred[Connection] | Coroutine[Any, Any, Connection]
        ] = connect,
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
        @param connect: connects and logs in once, as L{connect} does: it
            returns a L{Deferred} or a coroutine.
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
        # Twisted's backoff gives the delay before jitter: the first one,
        # for attempt 1, is initialDelay.
        self._backoff = backoffPolicy(initialDelay / factor, maxDelay, factor, lambda: 0.0)
        self._failures = 0
        self._nextDelay = initialDelay
        self._started = False
        self._stopping = False
        self._stopped = False
        self._reason: Failure | None = None
        self._waiting: list[defer.Deferred[None]] = []
        self._hook: defer.Deferred | None = None
        self._service = ClientService(
            _LoginEndpoint(self),
            protocol.Factory.forProtocol(_LoggedIn),
            # The delay is worked out as each failure arrives (see _delayAfter),
            # so that onLost hears it outside the service's state machine.
            retryPolicy=lambda attempt: self._nextDelay,
            clock=reactor,
        )

    def start(self) -> defer.Deferred[None]:
        """
        Start connecting.  A session starts only once.

        @return: L{whenStopped}.
        """
        if self._started or self._stopping:
            raise RuntimeError("a ReconnectingSession starts only once")
        self._started = True
        self._service.startService()
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

    def _attempt(self, factory: IProtocolFactory) -> defer.Deferred:
        """
        One attempt to connect and log in, for L{ClientService}: the
        L{Deferred} fires with a protocol of C{factory} for the
        L{Connection}, or fails with why there is none.
        """
        # An outcome held for the next turn (see below), and its delayed call.
        held: list[tuple[Connection | Failure, IDelayedCall]] = []

        def cancel(d: defer.Deferred) -> None:
            attempt.cancel()
            if held and held[0][1].active():
                # Settled now, as stopping: a connection is closed.
                held[0][1].cancel()
                self._settle(held[0][0], result, factory)

        def hold(outcome: Connection | Failure) -> None:
            call = self.reactor.callLater(0, self._settle, outcome, result, factory)
            held.append((outcome, call))

        result: defer.Deferred = defer.Deferred(cancel)
        # maybeDeferred waits for the Deferred or coroutine that connect
        # returns; its overloads cannot tell which from the union.
        attempt = cast(
            "defer.Deferred[Connection]",
            defer.maybeDeferred(
                self._connect,
                self.reactor,
                self.endpoint,
                self.user,
                self._password,
                self.mind,
                self.timeout,
                sendPassword=self._sendPassword,
            ),
        )
        if attempt.called:
            # Answered at once, inside the service's state machine, which
            # cannot be stopped from within: settle on the next turn.
            attempt.addBoth(hold)
        else:
            attempt.addBoth(self._settle, result, factory)
        return result

    def _settle(
        self, outcome: Connection | Failure, result: defer.Deferred, factory: IProtocolFactory
    ) -> None:
        if isinstance(outcome, Failure):
            self._failed(outcome, result)
            return
        conn = outcome
        if self._stopping or result.called:
            conn.disconnect()
            if not result.called:
                result.errback(defer.CancelledError())
            return
        self.connection = conn
        self._failures = 0
        # No address: the login has no transport of its own, and neither the
        # service's wrapper of the factory nor protocol.Factory reads it.
        loggedIn = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert loggedIn is not None  # protocol.Factory always builds one
        # ClientService calls only loseConnection of it (see the class).
        loggedIn.makeConnection(cast(ITransport, _ConnectionTransport(conn)))
        result.callback(loggedIn)
        conn.notifyOnDisconnect(lambda: self._lost(conn, loggedIn))
        if self._onLogin is not None and conn.connected and conn is self.connection:
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

    def _failed(self, reason: Failure, result: defer.Deferred) -> None:
        if not self._stopping and not result.called:
            if retryable(reason):
                self._tell(reason, atLeast=penaltySeconds(reason) or 0.0)
            else:
                self._finish(reason)  # which cancels result
        if not result.called:
            result.errback(reason)  # the service waits, or has stopped

    def _lost(self, conn: Connection, loggedIn: IProtocol) -> None:
        if conn is self.connection:
            self.connection = None
            if self._hook is not None:
                self._hook.cancel()
            kicked = conn.kicked
            if kicked is not None:
                self._finish(Failure(Kicked(kicked)))
            elif not self._stopping:
                self._tell(Failure(error.ConnectionLost("the connection was lost")))
        # The service then waits to try again, or, stopping, has stopped.
        loggedIn.connectionLost(Failure(error.ConnectionLost("the connection was lost")))

    def _tell(self, reason: Failure, atLeast: float = 0.0) -> None:
        """
        Work out the delay before the next attempt, for the service's retry
        policy, and tell onLost.
        """
        self._failures += 1
        base = self._backoff(self._failures)
        delay = base * (1 + min(max(self._jitter(), 0.0), 1.0)) / 2
        self._nextDelay = max(delay, atLeast)
        if self._onLost is not None:
            self._onLost(reason, self._nextDelay)

    def _finish(self, reason: Failure | None) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._reason = reason
        if self._hook is not None:
            self._hook.cancel()
        # The service cancels the attempt or the delay under way, or closes
        # the connection, and fires once that is done.
        self.connection = None
        self._service.stopService().addBoth(self._closed)

    def _closed(self, _: object) -> None:
        self._stopped = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if self._reason is None:
                d.callback(None)
            else:
                d.errback(self._reason)


@implementer(IStreamClientEndpoint)
class _LoginEndpoint:
    """
    What a L{ReconnectingSession}'s L{ClientService} connects to: a
    connection that is logged in, through the session's C{connect}.
    """

    def __init__(self, session: ReconnectingSession) -> None:
        self.session = session

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred:
        return self.session._attempt(protocolFactory)

    def __repr__(self) -> str:
        return f"<login of {self.session.user!r} at {self.session.endpoint!r}>"


class _LoggedIn(protocol.Protocol):
    """
    The protocol that L{ClientService} holds for a logged-in L{Connection}:
    the service learns through it that the connection is lost.
    """


class _ConnectionTransport:
    """
    What L{ClientService} uses of a transport, to close a L{Connection} as
    it stops.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def loseConnection(self) -> None:
        self.connection.disconnect()
