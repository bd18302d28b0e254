"""
The C{pbrealms-client} command: its exit statuses, the line it prints for
each failure (L{explain}), and its commands (L{run}, L{watch}, L{main}).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.spread import pb

from pbrealms.client.connection import (
    ClosedBeforeLogin,
    Connection,
    TLSFailed,
    _printable,
    connect,
)
from pbrealms.client.mind import ClientMind, Kicked, _ignore
from pbrealms.client.options import ClientOptions
from pbrealms.client.reconnecting import ReconnectingSession
from pbrealms.errors import ServerBusy, SourcePenalised, TooManyConnections

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

if TYPE_CHECKING:

    class _IReactor(IReactorCore, IReactorTime):
        """
        What the commands use of the reactor, which every reactor provides:
        its shutdown triggers and its timers.
        """


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
    if isinstance(reason.value, TLSFailed):
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


async def run(reactor: _IReactor, options: ClientOptions, out=sys.stdout, err=sys.stderr) -> None:
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
    reactor: _IReactor, options: ClientOptions, out, interruption: _Interruption
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

            def lost() -> None:
                if not done.called:
                    done.errback(pb.PBConnectionLost())

            conn.notifyOnDisconnect(lost)
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
    reactor: _IReactor,
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

    def ended(result: object) -> None:
        if finished.called:
            return
        if isinstance(result, Failure):
            finished.errback(result)
        else:
            finished.callback(None)

    watching.start().addBoth(ended)
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

    async def command(reactor: _IReactor) -> None:
        try:
            await run(reactor, options)
        except CommandFailed as e:
            sys.stderr.write(f"pbrealms-client: {e}\n")
            raise SystemExit(e.status) from None

    task.react(lambda reactor: defer.ensureDeferred(command(reactor)))


if __name__ == "__main__":
    main()
