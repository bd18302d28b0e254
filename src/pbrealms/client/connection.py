"""
A logged-in PB connection, and L{connect}, which opens one: how it logs in,
and why it failed when the server closed it or the TLS handshake failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, endpoints, error
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.addresses import isLocal
from pbrealms.client.mind import ClientMind
from pbrealms.errors import localize

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


def isPrivate(transport) -> bool:
    """
    Whether only the server can read what is sent on C{transport}: a UNIX
    socket, or loopback.  (TLS counts only if its certificate was checked,
    which the transport cannot tell: the caller says so.)
    """
    return isLocal(transport.getPeer())


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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
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


def _printable(text: object) -> str:
    """
    C{text} on one line, without control characters: what the server sends
    must not start lines or move the terminal's cursor.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


async def connect(
    reactor: IReactorTime,
    endpoint: str | IStreamClientEndpoint,
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
    client = (
        endpoints.clientFromString(reactor, endpoint) if isinstance(endpoint, str) else endpoint
    )
    factory = _ClientFactory()

    async def attempt() -> pb.RemoteReference:
        # What factory built: endpoints type it only as an IProtocol.
        broker = cast(_ClientBroker, await client.connect(factory))
        loggingIn = defer.ensureDeferred(logIn(broker))
        outcome: defer.Deferred[pb.RemoteReference] = defer.Deferred()

        def settle(result: pb.RemoteReference | Failure) -> None:
            if not outcome.called:
                outcome.callback(result)

        loggingIn.addBoth(settle)

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
