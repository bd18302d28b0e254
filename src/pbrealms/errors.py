"""
Every error that crosses the wire.

Each class derives from L{pb.Error}, so PB sends it to the client as a typed
error with its message and without logging a traceback on the server.  Login
refusals also derive from L{UnauthorizedLogin}, so a client that only knows
Twisted can still tell a refusal from a failure with
C{failure.check(UnauthorizedLogin)}.
"""

import math

from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure
from twisted.spread import jelly, pb

#: The most characters of what a client sent that one error message or log
#: line quotes: a client must not make the server's answers or log lines
#: as large as its own messages.
QUOTE_LIMIT = 200


def printable(data: object, limit: int = QUOTE_LIMIT) -> str:
    """
    What a client sent, made safe to quote in one error message or log line.

    @return: text (bytes decoded as UTF-8) cut to C{limit} characters, with
        C{...} where it was cut and control characters escaped; an integer's
        digits unless it has more than about C{limit} of them (it is then
        described, as Python refuses to print integers of over 4,300
        digits); a float, a bool or L{None} as Python prints it; anything
        else by its type.
    """
    if isinstance(data, bytes):
        # Decode no more than can be shown: a client's strings can be large.
        data = data[: limit * 4 + 4].decode("utf-8", "replace")
    if isinstance(data, str):
        cut = "..." if len(data) > limit else ""
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in data[:limit]) + cut
    if isinstance(data, int) and not isinstance(data, bool):
        bits = data.bit_length()
        # A decimal digit holds over 3 bits: under C{limit} digits, far
        # below Python's own limit.
        return str(data) if bits <= 3 * limit else f"<an integer of {bits} bits>"
    if data is None or isinstance(data, (bool, float)):
        return repr(data)
    return f"<{type(data).__name__}>"


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


class ServerBusy(LoginRefused):
    """
    The server has as many password checks waiting as it allows (or this
    source already held its share of them); the password was not checked.
    Retrying a little later makes sense.
    """

    def __init__(self) -> None:
        super().__init__("the server is busy checking passwords; retry in a moment")


class AnonymousRefused(LoginRefused):
    """
    An anonymous login: every session belongs to a user.
    """

    def __init__(self) -> None:
        super().__init__("anonymous login is not allowed")


class SourcePenalised(LoginRefused):
    """
    The client's address failed to log in too often of late, and is refused
    until its penalty drains (see L{pbrealms.guard}).
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"too many failed logins from this address: try again in {max(1, math.ceil(seconds))} s"
        )


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
        raise UnknownMethod(f"no such method: {printable(message)!r}")
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
            # The text names the client's keywords, which may be huge.
            detail = str(e).partition("() ")[2] or str(e)
            raise BadArguments(f"{message}: {printable(detail)}") from None
        raise
    return broker.serialize(result, perspective)


# Most specific first: Failure.check answers with the first class that matches.
_WIRE_ERRORS: tuple[type[pb.Error], ...] = (
    BadCredentials,
    TooManyConnections,
    MindRequired,
    InsecureLogin,
    ShuttingDown,
    ServerBusy,
    AnonymousRefused,
    SourcePenalised,
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
