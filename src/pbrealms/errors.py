"""
Every error that crosses the wire.

Each class derives from L{pb.Error}, so PB sends it to the client as a typed
error with its message and without logging a traceback on the server.  Login
refusals also derive from L{UnauthorizedLogin}, so a client that only knows
Twisted can still tell a refusal from a failure with
C{failure.check(UnauthorizedLogin)}.
"""

import inspect
import math
from collections.abc import Callable

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


class UndecodableAnswer(pb.Error):
    """
    The peer answered a call with a value or an error that this side cannot
    decode: of a type its jelly options refuse (a L{pb.Copyable}), not valid
    UTF-8, or an error that is not a failure.  Only that call fails, with
    this; the connection stays.
    """


class MessageTooLarge(pb.Error):
    """
    A message would have cost the server more memory once decoded than
    C{--max-message-size} allows.  The server answers the call with this (if
    it had decoded the call's request id) and closes the connection, whose
    stream it cannot resume mid-message.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the message would cost more than {limit} bytes of the server's memory once "
            "decoded (its --max-message-size); the server closes the connection"
        )
        self.limit = limit


class PagingRefused(pb.Error):
    """
    PB paging (L{twisted.spread.util.Pager}) is not served: its pages would
    take the transport's producer, which the broker holds for its own write
    backpressure.
    """

    def __init__(self) -> None:
        super().__init__(
            "PB paging (twisted.spread.util.Pager) is not supported by this server: "
            "send the data as the answers of several calls instead"
        )


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
            raise BadArguments(f"{message} {_misfit(method, len(bound), args, kw, e)}") from None
        raise
    return broker.serialize(result, perspective)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _misfit(
    method: Callable[..., object], hidden: int, args: list | tuple, kw: dict, error: TypeError
) -> str:
    """
    Why C{args} and C{kw} do not fit C{method}, counted as the client sees
    the method: Python's own text counts C{self} and the C{hidden}
    parameters that L{dispatch} passes first (C{bound}), which the client
    never passes.  Keywords are named only in part: a client's may be huge.
    """
    try:
        parameters = list(inspect.signature(method).parameters.values())[hidden:]
    except (TypeError, ValueError):
        return printable(str(error).partition("() ")[2] or str(error))
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    if len(args) > len(positional) and not varargs:
        required = sum(p.default is p.empty for p in positional)
        if not parameters:
            takes = "no arguments"
        elif not positional:
            takes = "no positional arguments"
        elif required < len(positional):
            takes = f"from {required} to {len(positional)} positional arguments"
        else:
            takes = _plural(len(positional), "positional argument")
        given = "1 was given" if len(args) == 1 else f"{len(args)} were given"
        return f"takes {takes} but {given}"
    names = {p.name for p in parameters if p.kind is not p.POSITIONAL_ONLY}
    varkw = any(p.kind is p.VAR_KEYWORD for p in parameters)
    for name in kw:
        if name not in names and not varkw:
            return f"got an unexpected keyword argument {printable(name, 64)!r}"
    for p in positional[: len(args)]:
        if p.name in kw:
            return f"got multiple values for argument {p.name!r}"
    missing = [
        p.name
        for i, p in enumerate(parameters)
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and not (i < len(args) and p in positional)
        and p.name not in kw
    ]
    if missing:
        return f"is missing {_plural(len(missing), 'required argument')}: " + ", ".join(
            repr(name) for name in missing
        )
    return printable(str(error).partition("() ")[2] or str(error))


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
    UndecodableAnswer,
    MessageTooLarge,
    PagingRefused,
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
