"""
The PB login root: challenge/response, and sessions that end exactly once.

This replaces PB's C{_PortalRoot}.  PB loses the logout of a client that drops
while its login is pending, logs a traceback for every failed login, and keeps
one disconnect closure per login for the life of the connection.  Here every
session the registry admits is closed exactly once, whichever way it ends:
logout (the client drops its reference), disconnect, or a drop before, during
or after the checker and realm run.  This is the only module that touches
PB's login internals.

It is longer than the others (some 600 lines) because it is one state machine
read as a whole: the gate a connection gets, the challenge, the login's steps
and the reference a session is reached by, which hand each other the same
connection and session at every step.  Split, each part would reach into the
others' state.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any, NoReturn, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernameHashedPassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime, ISSLTransport, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from pbrealms import wire
from pbrealms.addresses import describeAddress, isLocal, sourceOf
from pbrealms.checkers import UsernamePasswordFrom
from pbrealms.descriptors import WaitingRoom
from pbrealms.errors import (
    AnonymousRefused,
    BadCredentials,
    InsecureLogin,
    LoginFailed,
    LoginRefused,
    ServerBusy,
    SessionEnded,
    SourcePenalised,
    TooManyConnections,
    dispatch,
    printable,
)
from pbrealms.guard import SourcePenalties
from pbrealms.metrics import ServerMetrics
from pbrealms.protocol import ISessionRealm
from pbrealms.sessions import ConnectionGone, Session, SessionRegistry

_log = Logger()

#: How many login challenges one connection may hold at once.  Each stays in
#: the broker's tables until the client drops its reference to it, which a
#: hostile client never does; a client logging in holds one.
MAX_CHALLENGES = 4

#: The longest user name a challenge is handed out for: each holds its name.
MAX_NAME_BYTES = 256


def _isPrivate(transport) -> bool:
    """
    Whether what is sent on C{transport} is for the server's eyes only: TLS,
    a UNIX socket, or loopback.
    """
    return ISSLTransport.providedBy(transport) or isLocal(transport.getHost())


def _printable(name: object) -> str:
    """
    A user name sent by a client, made safe for one log line: at most 64
    characters, control characters escaped.
    """
    return printable(name, 64)


class _RemoteObject(pb.Referenceable):
    """
    A referenceable that answers bad calls with a typed error, not a traceback.
    """

    def remoteMessageReceived(self, broker, message, args, kw):
        return dispatch(broker, self, "remote_", message, args, kw)


@implementer(pb.IPBRoot)
class LoginRoot:
    """
    The root object of a PB server: logs users in through C{checker} into
    sessions of C{registry} with avatars from C{realm}.

    Give it to L{pb.PBServerFactory} in place of a portal.  A client logs in
    with L{pb.PBClientFactory.login}, as it would to a portal.

    @ivar maxAuthTries: how many failed logins a connection may have before
        it is closed; L{None} for no limit.
    @ivar loginTimeout: seconds a connection may take to log in before it is
        closed; L{None} for no limit.
    @ivar penalties: where failed logins count against their source address.
    @ivar maxUnauthenticated: how many connections one source address may
        have open that have not logged in; L{None} for no limit.
    @ivar clock: what login timers run on.
    @ivar metrics: where logins are counted.
    """

    def __init__(
        self,
        checker: ICredentialsChecker,
        realm: IRealm,
        registry: SessionRegistry,
        clock: IReactorTime,
        metrics: ServerMetrics,
        maxAuthTries: int | None = None,
        loginTimeout: float | None = None,
        penalties: SourcePenalties | None = None,
        maxUnauthenticated: int | None = None,
    ) -> None:
        self.checker = checker
        self.realm = realm
        self.registry = registry
        self.clock = clock
        self.metrics = metrics
        self.maxAuthTries = maxAuthTries
        self.loginTimeout = loginTimeout
        self.penalties = penalties
        self.maxUnauthenticated = maxUnauthenticated
        self.unauthenticated: dict[str, int] = {}
        #: The same connections, to make room among at the connection cap.
        self.waiting = WaitingRoom()

    def admits(self, host: str) -> bool:
        """
        Whether a new connection from C{host} may be accepted: its address has
        fewer than C{maxUnauthenticated} connections that have not logged in.
        A penalised address is accepted too, so that its first login can be
        told why it is refused (see L{_LoginGate.watch}); its connections
        count against the same limit.
        """
        limit = self.maxUnauthenticated
        return limit is None or self.unauthenticated.get(host, 0) < limit

    def rootObject(self, broker: wire.LimitedBroker) -> pb.Referenceable:
        # A closing connection's abort runs on the registry's clock, as the
        # login's timers do.
        broker.clock = self.clock
        gate = _LoginGate(self, broker)
        broker.notifyOnDisconnect(gate.gone)
        return gate


class _LoginGate(_RemoteObject):
    """
    The object a client gets as its root: it hands out challenges, and keeps
    the connection's failed logins and its time to log in.
    """

    def __init__(self, root: LoginRoot, broker: wire.LimitedBroker) -> None:
        self.root = root
        self.broker = broker
        self.failures = 0
        self.checking = False
        # Challenges handed out that the client still holds (MAX_CHALLENGES).
        self.challenges = 0
        self._challengesRefused = False
        self._anonymousRefused = False
        #: The source address, if it was penalised when this connection came
        #: or is being turned away: its first call is refused with
        #: L{SourcePenalised}, unless the penalty has drained by then.
        self.penalised: str | None = None
        #: Whether the connection is being closed after a refusal.
        self.closing = False
        self._host: str | None = None
        self._timeout = None
        self._accepted = root.clock.seconds()
        if root.loginTimeout is not None:
            self._timeout = root.clock.callLater(root.loginTimeout, self._timedOut)

    def watch(self, host: str) -> None:
        """
        Count this connection, from C{host}, as not logged in until it is.
        """
        self._host = host
        self.root.unauthenticated[host] = self.root.unauthenticated.get(host, 0) + 1
        self.root.waiting.add(host, self.broker)
        penalties = self.root.penalties
        if penalties is not None and penalties.penalty(host):
            # Accepted only to be told why: a short time to ask, and to read
            # the answer.  The address's penalty was logged once when it
            # began; its connections log nothing each, however many come.
            self.penalised = host
            self.broker.quiet = True  # nor for what it sends
            self._stopTimer()
            timeout = wire.CLOSE_TIMEOUT
            limit = min(timeout, self.root.loginTimeout or timeout)
            self._timeout = self.root.clock.callLater(limit, self._timedOut)

    def remoteMessageReceived(self, broker, message, args, kw):
        if self.penalised is not None and not self.closing:
            self.checkPenalty()
            # Drained since the connection came: it is served as any other,
            # with the rest of its time to log in.
            self.penalised = None
            self.broker.quiet = False
            self._stopTimer()
            if self.root.loginTimeout is not None:
                clock = self.root.clock
                left = self._accepted + self.root.loginTimeout - clock.seconds()
                self._timeout = clock.callLater(max(0.0, left), self._timedOut)
        return super().remoteMessageReceived(broker, message, args, kw)

    def checkPenalty(self) -> None:
        """
        Turn this connection away if its address is penalised now: checked
        at every login, since connections opened before the penalty began
        would otherwise keep all their tries.

        @raise SourcePenalised: if it is.
        """
        penalties = self.root.penalties
        if penalties is None:
            return
        host = sourceOf(self.transport.getPeer())
        left = penalties.penalty(host)
        if left:
            self._turnAway(host, left)

    def _turnAway(self, host: str, left: float) -> NoReturn:
        """
        Answer a login from a penalised address with L{SourcePenalised}, act
        on nothing else the connection sends, log nothing for it (the
        penalty was logged once when it began), and close it once the answer
        is written.
        """
        self.penalised = host
        self.broker.quiet = True
        self._closeAfterAnswer()
        self.root.metrics.logins.labels("refused").inc()
        raise SourcePenalised(left)

    def _closeAfterAnswer(self) -> None:
        """
        Read nothing more (what has arrived included), and close once the
        answer being sent has been written; the broker aborts the connection
        if that takes more than L{wire.CLOSE_TIMEOUT}.
        """
        if self.closing:
            return
        self.closing = True
        self.broker.ignoreInput()
        self.root.clock.callLater(0, self.broker.closeAfterAnswer)

    def _authenticated(self) -> None:
        host, self._host = self._host, None
        if host is not None:
            self.root.waiting.remove(host, self.broker)
            count = self.root.unauthenticated[host] - 1
            if count:
                self.root.unauthenticated[host] = count
            else:
                del self.root.unauthenticated[host]

    def gone(self) -> None:
        self._authenticated()  # it no longer counts either way
        self._stopTimer()

    @property
    def transport(self) -> ITCPTransport:
        # Set before the broker asks for its root object; TCP, UNIX and TLS
        # transports all have getPeer and abortConnection.
        return cast(ITCPTransport, self.broker.transport)

    @property
    def peer(self) -> str:
        return describeAddress(self.transport.getPeer())

    def begin(self) -> None:
        """
        A login starts.  One at a time: a login sent while another is being
        checked counts as a failed one, so that pipelined guesses cannot
        outrun C{maxAuthTries} or queue up password checks.
        """
        if self.checking:
            self.failed()
            raise LoginRefused("one login at a time on a connection")
        self.checking = True

    def succeeded(self) -> None:
        self._authenticated()
        self._stopTimer()

    def failed(self) -> None:
        """
        Count a failed login: against the source, and against the
        connection, which is closed once it has had its tries.
        """
        self.failures += 1
        penalties = self.root.penalties
        if penalties is not None:
            penalties.failed(sourceOf(self.transport.getPeer()))
        limit = self.root.maxAuthTries
        if limit is not None and self.failures == limit and not self.broker.disconnected:
            _log.info(
                "closing the connection from {peer}: {count} refused logins",
                peer=self.peer,
                count=self.failures,
            )
            # Guesses already received are not acted on either.
            self._closeAfterAnswer()

    def _timedOut(self) -> None:
        self._timeout = None  # stopped on a login: this one has none
        if self.broker.disconnected:
            return
        if self.penalised is not None or self.closing:
            # Turned away, about to be, or closing after a refusal that was
            # logged: nothing more to say for each of them.
            self.broker.drop()
        else:
            _log.info(
                "closing the connection from {peer}: no login within {seconds:g} s",
                peer=self.peer,
                seconds=self.root.loginTimeout,
            )
            self.broker.drop()

    def _stopTimer(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def remote_login(self, username: bytes) -> tuple[bytes, _Challenger]:
        """
        Hand out a challenge for C{username}, and the object to respond to.

        @raise LoginRefused: if the connection holds L{MAX_CHALLENGES}
            challenges, or the name is longer than L{MAX_NAME_BYTES}.  Neither
            counts as a failed login: no password was tried.
        """
        self.checkPenalty()
        if isinstance(username, str):
            username = username.encode("utf-8")
        if not isinstance(username, bytes):
            raise BadCredentials()
        if len(username) > MAX_NAME_BYTES:
            raise LoginRefused(f"user names are at most {MAX_NAME_BYTES} bytes")
        if self.challenges >= MAX_CHALLENGES:
            # PB has no way to take back a reference it handed out, so a
            # further challenge is refused rather than replacing the oldest.
            # Logged once per connection: a client asking on is flooding.
            if not self._challengesRefused:
                self._challengesRefused = True
                _log.info(
                    "refusing login challenges to {peer}: it holds {count} already",
                    peer=self.peer,
                    count=self.challenges,
                )
            raise LoginRefused(f"at most {MAX_CHALLENGES} login challenges at once on a connection")
        challenge = secrets.token_hex(16).encode("ascii")
        challenger = _Challenger(self, username, challenge)
        self.challenges += 1
        # PB calls this once the client has dropped its reference to it.
        self.broker._localCleanup[challenger.processUniqueID()] = challenger.released
        return challenge, challenger

    def remote_loginAnonymous(self, mind: object = None) -> NoReturn:
        """
        Refuse an anonymous login (L{twisted.cred.credentials.Anonymous}), as
        a portal without an anonymous checker does: every session belongs to
        a user.

        It counts as a failed login, against the connection's
        C{maxAuthTries} and against its address: no password was guessed,
        but each connection's refusal is a log line, and a penalised address
        makes none.  Logged once per connection.
        """
        self.checkPenalty()
        refusal = AnonymousRefused()
        self.root.metrics.logins.labels("refused").inc()
        if not self._anonymousRefused:
            self._anonymousRefused = True
            _log.info(
                "login refused for an anonymous client from {peer} (realm {realm}): {error}",
                peer=self.peer,
                realm=self.root.registry.realm,
                error=str(refusal),
            )
        self.failed()
        raise refusal

    def remote_loginPassword(
        self, username: bytes, password: bytes, mind: object
    ) -> defer.Deferred:
        """
        Log in with the password itself, which the checker can compare with a
        bcrypt hash; offered only where nobody else can read it.
        """
        self.checkPenalty()
        if not _isPrivate(self.transport):
            raise InsecureLogin()
        if isinstance(username, str):
            username = username.encode("utf-8")
        if isinstance(password, str):
            password = password.encode("utf-8")
        if not isinstance(username, bytes) or not isinstance(password, bytes):
            raise BadCredentials()
        if not isinstance(mind, pb.RemoteReference):
            mind = None
        # The source lets the checker share its bcrypt queue fairly.
        source = sourceOf(self.transport.getPeer())
        credentials = UsernamePasswordFrom(username, password, source)
        return _Login(self, username).run(credentials, mind)


@implementer(IUsernameHashedPassword)
class _Challenger(_RemoteObject):
    """
    One login attempt: the user name and challenge, checked when the client
    responds.  It is the credentials the checker sees.
    """

    def __init__(self, gate: _LoginGate, username: bytes, challenge: bytes) -> None:
        self.gate = gate
        self.username = username
        self.challenge = challenge
        self.response = b""
        self.used = False

    def released(self) -> None:
        """
        The client dropped its reference: the broker has forgotten this.
        """
        self.gate.challenges -= 1

    def checkPassword(self, password: bytes) -> bool:
        return hmac.compare_digest(pb.respond(self.challenge, password), self.response)

    def remote_respond(self, response: bytes, mind: object) -> defer.Deferred:
        # One answer per challenge: more would be free guesses, or several
        # sessions from one login.
        if self.used or not isinstance(response, bytes):
            raise BadCredentials()
        # Before the password is checked: the challenge may have been handed
        # out before the address's penalty began.
        self.gate.checkPenalty()
        self.used = True
        self.response = response
        # Anything but a reference to a client object is no mind at all.
        if not isinstance(mind, pb.RemoteReference):
            mind = None
        return _Login(self.gate, self.username).run(self, mind)


class _Login:
    """
    The steps of one login after the client responded.
    """

    def __init__(self, gate: _LoginGate, username: bytes) -> None:
        self.gate = gate
        self.root = gate.root
        self.broker = gate.broker
        self.username = username
        self.peer = gate.peer
        self.metrics = self.root.metrics
        self.started = self.root.clock.seconds()

    def run(self, credentials: ICredentials, mind: object) -> defer.Deferred:
        self.gate.begin()
        d: defer.Deferred[Any] = defer.maybeDeferred(self.root.checker.requestAvatarId, credentials)
        d.addCallback(self._open, mind)
        # One login at a time covers its admission too, which may wait for
        # a replaced session to go.
        d.addBoth(self._done)
        d.addErrback(self._refused)
        return d

    def _done(self, result: object) -> object:
        self.gate.checking = False
        return result

    def _open(self, avatarId: bytes | str, mind: object) -> defer.Deferred:
        if self.broker.disconnected:
            raise ConnectionGone()
        user = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        d = self.root.registry.admit(user, self.peer, mind, self.broker)
        return d.addCallback(self._requestAvatar, user)

    def _requestAvatar(self, session: Session, user: str) -> defer.Deferred:
        # A realm of ours gets the session's client, which owns every push;
        # any other what the client passed.  (Twisted types avatar ids as
        # bytes; ours are user names as text.)
        realm = self.root.realm
        mind = session.client if ISessionRealm.providedBy(realm) else session.mind
        requestAvatar: Any = realm.requestAvatar
        d = defer.maybeDeferred(requestAvatar, user, mind, pb.IPerspective)
        d.addCallbacks(
            self._attach, self._realmFailed, callbackArgs=(session,), errbackArgs=(session,)
        )
        return d

    def _realmFailed(self, reason: Failure, session: Session) -> Failure:
        session.close("was refused by the realm")
        return reason

    def _attach(self, result: tuple, session: Session) -> pb.Referenceable:
        _, avatar, logout = result
        session.onClose(logout)
        broker = self.broker
        if broker.disconnected:
            session.close("disconnected during login")
            raise ConnectionGone()
        reference = _SessionReference(avatar, session, self.root.clock)
        puid = reference.processUniqueID()

        def loggedOut() -> None:
            session.close("logged out")

        def disconnected() -> None:
            session.close("disconnected")

        def forget() -> None:
            broker._localCleanup.pop(puid, None)
            if broker.disconnects is not None:
                broker.dontNotifyOnDisconnect(disconnected)

        broker._localCleanup[puid] = loggedOut
        broker.notifyOnDisconnect(disconnected)
        session.onClose(forget)
        self.root.registry.activate(session)
        self.gate.succeeded()
        self.metrics.logins.labels("ok").inc()
        self.metrics.loginLatency.observe(self.root.clock.seconds() - self.started)
        return reference

    def _refused(self, reason: Failure) -> Failure | None:
        outcome = _outcome(reason, self.broker)
        self.metrics.logins.labels(outcome).inc()
        if outcome == "bad_credentials":
            self.gate.failed()
        user = _printable(self.username)
        realm = self.root.registry.realm
        if reason.check(ConnectionGone):
            _log.info(
                "login of {user!r} from {peer} abandoned: the client disconnected",
                user=user,
                peer=self.peer,
            )
            return None
        if self.broker.disconnected:
            # Nobody to tell; the reason is all that is left to say.
            _log.info(
                "login of {user!r} from {peer} abandoned: {error}",
                user=user,
                peer=self.peer,
                error=reason.getErrorMessage(),
            )
            return None
        if reason.check(ServerBusy):
            # Free to ask for again and again, as it counts as no failed
            # login: the hasher logs a count now and then instead.
            return reason
        if reason.check(LoginRefused, UnauthorizedLogin):
            if not reason.check(LoginRefused):
                reason = Failure(BadCredentials())
            _log.info(
                "login refused for {user!r} from {peer} (realm {realm}): {error}",
                user=user,
                peer=self.peer,
                realm=realm,
                error=reason.getErrorMessage(),
            )
            return reason
        if reason.check(pb.Error):
            return reason
        _log.failure("login of {user!r} from {peer} failed", reason, user=user, peer=self.peer)
        return Failure(LoginFailed())


def _outcome(reason: Failure, broker: pb.Broker) -> str:
    """
    The C{outcome} label of a login that did not succeed.
    """
    if reason.check(ConnectionGone) or broker.disconnected:
        return "abandoned"
    if reason.check(TooManyConnections):
        return "too_many"
    if reason.check(ServerBusy):
        # The password was not checked: no failed try, no penalty.
        return "busy"
    if reason.check(BadCredentials) or (
        reason.check(UnauthorizedLogin) and not reason.check(LoginRefused)
    ):
        return "bad_credentials"
    if reason.check(pb.Error):
        return "refused"
    return "error"


class _SessionReference(pb.Referenceable):
    """
    What a client holds of its avatar: one per login, so that each login has
    its own entry in the broker's cleanup table even when the avatar is
    shared, and so that the session knows when it was last used.
    """

    def __init__(self, avatar: pb.IPerspective, session: Session, clock) -> None:
        self.avatar = avatar
        self.session = session
        self.clock = clock
        # Avatars shared by sessions may want to know which one calls; looked
        # up once here, not on every call.
        receive = getattr(avatar, "sessionMessageReceived", None)
        self._receive = receive or (lambda session, *call: avatar.perspectiveMessageReceived(*call))

    def remoteMessageReceived(self, broker, message, args, kw):
        session = self.session
        if session.closed:
            raise SessionEnded()
        session.lastCall = self.clock.seconds()
        return self._receive(session, broker, message, args, kw)
