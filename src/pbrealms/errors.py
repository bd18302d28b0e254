"""
Every error that crosses the wire.

Each class derives from L{pb.Error}, so PB sends it to the client as a typed
error with its message and without logging a traceback on the server.  Login
refusals also derive from L{UnauthorizedLogin}, so a client that only knows
Twisted can still tell a refusal from a failure with
C{failure.check(UnauthorizedLogin)}.
"""

from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure
from twisted.spread import jelly, pb


class LoginRefused(pb.Error, UnauthorizedLogin):
    """
    The server refused a login; the message says why.
    """


class BadCredentials(LoginRefused):
    """
    The user name or password is wrong.  The message never says which.
    """

    def __init__(self) -> None:
        super().__init__("wrong user name or password")


class TooManyConnections(LoginRefused):
    """
    The user already has as many sessions as the server allows.
    """

    def __init__(self, limit: int) -> None:
        plural = "session" if limit == 1 else "sessions"
        super().__init__(f"too many connections: at most {limit} {plural} per user")
        self.limit = limit


class MindRequired(LoginRefused):
    """
    The realm pushes to its clients, so a login must pass a client object.
    """

    def __init__(self, realm: str) -> None:
        super().__init__(
            f"the {realm} realm needs a client object: "
            "log in with login(credentials, client=referenceable)"
        )


class InsecureLogin(LoginRefused):
    """
    The password itself may only be sent over TLS, loopback or a UNIX socket.
    """

    def __init__(self) -> None:
        super().__init__(
            "this connection is neither TLS nor local: log in with PB's challenge "
            "(login), or connect over TLS to send the password"
        )


class ShuttingDown(LoginRefused):
    """
    The server is shutting down and admits no new session.
    """

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class LoginFailed(pb.Error):
    """
    The login failed for a reason that is the server's fault; the server logged
    it.  Nothing about the cause crosses the wire.
    """

    def __init__(self) -> None:
        super().__init__("login failed: internal server error (see the server log)")


class InvalidPeriod(pb.Error):
    """
    A push period was not a number within the allowed range.
    """


class SessionEnded(pb.Error):
    """
    The session this reference belongs to has ended (it was replaced, or
    dropped by the keepalive); log in again.
    """

    def __init__(self) -> None:
        super().__init__("this session has ended; log in again")


class UnknownMethod(pb.Error):
    """
    There is no remote method of that name.
    """


class BadArguments(pb.Error):
    """
    A remote method was called with arguments it does not take.
    """


def dispatch(
    broker: pb.Broker,
    target: object,
    prefix: str,
    message: str | bytes,
    args: object,
    kw: object,
    perspective: object = None,
    bound: tuple = (),
) -> object:
    """
    Answer a remote call: unserialize the arguments, call C{target}'s method
    C{prefix + message}, and serialize its result.

    PB answers an unknown method, arguments that do not fit, or arguments of
    a refused type with an untyped error and a traceback in the server log;
    this answers with L{UnknownMethod} or L{BadArguments} and logs nothing.

    @param bound: passed to the method before the client's arguments.
    """
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    method = getattr(target, prefix + message, None)
    if method is None:
        raise UnknownMethod(f"no such method: {message[:64]!r}")
    try:
        args = broker.unserialize(args, perspective)
        kw = broker.unserialize(kw, perspective)
    except jelly.InsecureJelly:
        raise BadArguments(f"{message}: arguments of a type this server refuses") from None
    except Exception:
        raise BadArguments(f"{message}: arguments that cannot be decoded") from None
    if not isinstance(args, (list, tuple)) or not isinstance(kw, dict):
        raise BadArguments(f"{message}: arguments that cannot be decoded")
    try:
        result = method(*bound, *args, **kw)
    except TypeError as e:
        # Raised by the call itself (not from inside the method): the
        # arguments do not fit the signature.
        if e.__traceback__ is not None and e.__traceback__.tb_next is None:
            detail = str(e).partition("() ")[2] or str(e)
            raise BadArguments(f"{message}: {detail}") from None
        raise
    return broker.serialize(result, perspective)


# Most specific first: Failure.check answers with the first class that matches.
_WIRE_ERRORS: tuple[type[pb.Error], ...] = (
    BadCredentials,
    TooManyConnections,
    MindRequired,
    InsecureLogin,
    ShuttingDown,
    LoginRefused,
    LoginFailed,
    InvalidPeriod,
    SessionEnded,
    UnknownMethod,
    BadArguments,
)


def localize(reason: Failure) -> Failure:
    """
    Turn a pbrealms error received from the server back into its own class,
    with the server's message, so that client code can catch it by type.
    Other failures pass through unchanged.
    """
    if not isinstance(reason, pb.CopiedFailure):
        return reason
    cls = reason.check(*_WIRE_ERRORS)
    if cls is None:
        return reason
    error = cls.__new__(cls)
    Exception.__init__(error, reason.getErrorMessage())
    return Failure(error)
