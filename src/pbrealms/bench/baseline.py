"""
The baseline: a bare Perspective Broker server as Twisted's documentation
teaches it, to compare pbrealms with.

C{python -m pbrealms.bench.baseline [--port N] [--user U] [--password P]
[--realm cache|clock] [--period S]} serves one user on 127.0.0.1 with
Twisted's defaults (backlog 50 included), prints exactly one line,
C{listening on 127.0.0.1:PORT}, once listening, logs nothing else, and exits
0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

from twisted.cred import checkers, portal
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.spread import pb
from zope.interface import Interface, implementer

from pbrealms.options import versionText

_T = TypeVar("_T")


class ArgumentParser(argparse.ArgumentParser):
    """
    L{argparse.ArgumentParser} as every pbrealms command behaves (see
    L{pbrealms.options.Options}): whole option names only, a C{--version}
    that names pbrealms, and an error in one line that names its option.
    """

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(**kw)
        self.add_argument(
            "--version",
            action="version",
            version=versionText(),
            help="print the versions of pbrealms and Twisted, and exit",
        )

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --port: 'x': must be ..." (see typed).
        message = re.sub(r"^argument (\S+): (?=')", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def typed(kind: Callable[[str], _T], what: str) -> Callable[[str], _T]:
    """
    An argument type converting with C{kind}, whose error says that the
    value must be C{what}: C{--port 'x': must be a whole number}.
    """

    def convert(value: str) -> _T:
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: must be {what}") from None

    return convert


class CachedAvatar(pb.Avatar):
    """
    One user's perspective, shared by all the user's sessions.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.greetings = 0

    def perspective_greet(self) -> str:
        self.greetings += 1
        return f"<{self.greetings}>hello {self.name}"

    def perspective_status(self) -> dict[str, object]:
        return {"user": self.name, "greetings": self.greetings}


@implementer(portal.IRealm)
class CachingRealm:
    """
    The howto's realm that caches one avatar per user.
    """

    def __init__(self) -> None:
        self.avatars: dict[bytes, CachedAvatar] = {}

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], CachedAvatar, Callable[[], None]]:
        # The checker's user names; () is for anonymous logins, which it has none of.
        assert isinstance(avatarId, bytes)
        if avatarId not in self.avatars:
            self.avatars[avatarId] = CachedAvatar(avatarId.decode())
        return pb.IPerspective, self.avatars[avatarId], lambda: None


@implementer(portal.IRealm)
class ClockRealm:
    """
    A new avatar per session, pushing C{notifyTime(time.time())} to the
    session's mind every C{period} seconds until it logs out.
    """

    def __init__(self, period: float) -> None:
        self.period = period

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], CachedAvatar, Callable[[], None]]:
        assert isinstance(avatarId, bytes)  # as in CachingRealm
        # The client's object: the clock workloads log in with one.
        remote = cast(pb.RemoteReference, mind)

        def notify() -> None:
            remote.callRemote("notifyTime", time.time()).addErrback(lambda _: None)

        ticker = task.LoopingCall(notify)
        ticker.start(self.period, now=True)
        return pb.IPerspective, CachedAvatar(avatarId.decode()), ticker.stop


def main() -> None:
    """
    Parse the command line and serve until signalled.
    """
    parser = ArgumentParser(
        prog="python -m pbrealms.bench.baseline", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument("--port", type=typed(int, "a whole number"), default=0)
    parser.add_argument("--user", default="bench")
    parser.add_argument("--password", default="bench")
    parser.add_argument("--realm", choices=["cache", "clock"], default="cache")
    parser.add_argument("--period", type=typed(float, "a number"), default=1.0)
    args = parser.parse_args()

    checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(args.user.encode(), args.password.encode())
    realm = CachingRealm() if args.realm == "cache" else ClockRealm(args.period)
    factory = pb.PBServerFactory(portal.Portal(realm, [checker]))
    # Twisted types listenTCP's factory as making protocols with a typed
    # factory attribute, which PB's Broker (factory = None) does not match.
    port = reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    address = port.getHost()
    assert isinstance(address, IPv4Address)  # listenTCP on an IPv4 address
    print(f"listening on 127.0.0.1:{address.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
