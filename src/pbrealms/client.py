"""
The client library and the C{pbrealms-client} command.

    >>> conn = await connect(reactor, "tcp:127.0.0.1:8787", "alice", "wonderland")
    >>> await conn.perspective.callRemote("greet")
    '<1>hello alice'
    >>> await conn.disconnect()
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, endpoints, error, ssl, task
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.addresses import isLocal
from pbrealms.errors import TooManyConnections, localize

DEFAULT_CONNECT = "tcp:127.0.0.1:8787"
DEFAULT_TIMEOUT = 10.0


class Connection:
    """
    A logged-in PB connection.

    @ivar perspective: the remote reference to the avatar.
    """

    def __init__(self, factory: pb.PBClientFactory, perspective: pb.RemoteReference) -> None:
        self._factory = factory
        self.perspective = perspective

    def callRemote(self, method: str, *args: object, **kw: object) -> defer.Deferred:
        """
        Call C{method} on the avatar.
        """
        return self.perspective.callRemote(method, *args, **kw).addErrback(localize)

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


class ClientMind(pb.Referenceable):
    """
    The client object passed at login, which the server pushes to: it calls
    C{onTime(seconds)} for every C{notifyTime} (the clock realm) and
    C{onShutdown(reason)} when the server says it is shutting down.
    """

    def __init__(
        self,
        onTime: Callable[[float], object] = _ignore,
        onShutdown: Callable[[str], object] = _ignore,
    ) -> None:
        self.onTime = onTime
        self.onShutdown = onShutdown

    def remote_notifyTime(self, seconds: float) -> None:
        self.onTime(seconds)

    def remote_notifyShutdown(self, reason: str) -> None:
        self.onShutdown(reason)


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
    """
    if isinstance(endpoint, str):
        endpoint = endpoints.clientFromString(reactor, endpoint)
    factory = pb.PBClientFactory()

    async def attempt() -> pb.RemoteReference:
        broker = await endpoint.connect(factory)
        loggingIn = defer.ensureDeferred(logIn(broker))
        outcome: defer.Deferred = defer.Deferred()
        loggingIn.addBoth(lambda result: outcome.called or outcome.callback(result))

        def closed() -> None:
            # PB's factory would wait for its root object for ever.
            if not outcome.called:
                reason = error.ConnectError(string="the server closed the connection")
                outcome.errback(reason)

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
    return Connection(factory, perspective)


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


class GreetOptions(usage.Options):
    synopsis = "Usage: pbrealms-client [options] greet [--count N]"
    optParameters = [["count", "n", 1, "How many greetings to ask for.", int]]

    def postOptions(self) -> None:
        if self["count"] < 1:
            raise usage.UsageError("--count must be 1 or more")


class StatusOptions(usage.Options):
    synopsis = "Usage: pbrealms-client [options] status"


class ClockOptions(usage.Options):
    synopsis = "Usage: pbrealms-client [options] clock [--period SECONDS] [--ticks K]"
    optParameters = [
        ["period", None, None, "Ask the server for this push period, in seconds.", float],
        ["ticks", "k", None, "Stop after K times. [default: run until interrupted]", int],
    ]

    def postOptions(self) -> None:
        if self["ticks"] is not None and self["ticks"] < 1:
            raise usage.UsageError("--ticks must be 1 or more")


class ClientOptions(usage.Options):
    synopsis = (
        "Usage: pbrealms-client --user NAME [--password-file FILE] [--connect ENDPOINT] "
        "COMMAND [options]"
    )
    longdesc = (
        "Log in to a pbrealms server and call it. The password is read from "
        "--password-file or from the PBREALMS_PASSWORD environment variable, "
        "never from the command line. Exit status: 0 success, 1 error, 2 bad "
        "usage, 3 login refused, 4 too many connections, 5 cannot connect, "
        "6 timed out."
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
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("give a command: greet, status or clock")
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


def explain(reason: Failure, where: str, timeout: float) -> CommandFailed:
    """
    One line and an exit status for a failure to connect, log in or call.
    """
    if reason.check(TooManyConnections):
        return CommandFailed(f"login refused: {reason.getErrorMessage()}", EXIT_TOO_MANY)
    if reason.check(UnauthorizedLogin):
        return CommandFailed(f"login refused: {reason.getErrorMessage()}", EXIT_REFUSED)
    if reason.check(defer.TimeoutError, defer.CancelledError):
        return CommandFailed(f"timed out after {timeout:g} s connecting to {where}", EXIT_TIMEOUT)
    if reason.check(error.ConnectError, error.DNSLookupError):
        return CommandFailed(f"cannot connect to {where}: {_why(reason)}", EXIT_UNREACHABLE)
    if reason.check(pb.PBConnectionLost, error.ConnectionLost, error.ConnectionDone):
        return CommandFailed(f"lost the connection to {where}", EXIT_ERROR)
    return CommandFailed(f"the server answered: {reason.getErrorMessage()}", EXIT_ERROR)


def _why(reason: Failure) -> str:
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    return reason.getErrorMessage()


async def run(reactor: IReactorCore, options: ClientOptions, out=sys.stdout) -> None:
    """
    Run the command in C{options}, printing to C{out}.

    @raise CommandFailed: with the line to print and the exit status.
    """
    command, sub = options.subCommand, options.subOptions
    done: defer.Deferred[None] = defer.Deferred()
    ticks = 0

    def onTime(seconds: float) -> None:
        nonlocal ticks
        ticks += 1
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
        print(f"{stamp}.{int(seconds % 1 * 1000):03d} UTC", file=out, flush=True)
        if sub["ticks"] is not None and ticks >= sub["ticks"] and not done.called:
            done.callback(None)

    # Every command passes a client object, so that it can log in to any realm.
    def onShutdown(reason: str) -> None:
        if not done.called:
            done.errback(CommandFailed(f"the server stopped: {reason}", EXIT_ERROR))

    mind = ClientMind(onTime if command == "clock" else _ignore, onShutdown)
    try:
        conn = await connect(
            reactor,
            options["endpoint"],
            options["user"],
            options["password"],
            mind,
            options["timeout"],
            sendPassword=True if options["tls"] else None,
        )
    except Exception:
        raise explain(Failure(), options["connect"], options["timeout"]) from None
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
            conn.perspective.broker.notifyOnDisconnect(
                lambda: done.called or done.errback(pb.PBConnectionLost())
            )
            await done
    except CommandFailed:
        raise
    except Exception:
        raise explain(Failure(), options["connect"], options["timeout"]) from None
    finally:
        await conn.disconnect()


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
