"""
The options of the C{pbrealms-client} command and of each of its commands.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python import usage

from pbrealms.client.connection import DEFAULT_CONNECT, DEFAULT_TIMEOUT
from pbrealms.options import Options as BaseOptions


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

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
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

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
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

    def _tls(self, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        host = _tcpHost(self["connect"])
        if host is None or not isinstance(endpoint, endpoints.TCP4ClientEndpoint):
            raise usage.UsageError("--tls needs --connect tcp:HOST:PORT")
        trust = None
        if self["ca-file"]:
            try:
                with open(self["ca-file"], "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            except Exception as e:
                raise usage.UsageError(f"cannot read --ca-file {self['ca-file']}: {e}") from None
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


def _tcpHost(description: str) -> str | None:
    """
    The host of a C{tcp:} client endpoint description that
    L{endpoints.clientFromString} takes (C{tcp:HOST:PORT}, C{tcp:host=HOST},
    C{tcp:HOST:port=PORT}, with a backslash escaping the character after
    it), or L{None} for a description of another kind.  The endpoint holds
    it only in a private attribute.
    """
    fields: list[tuple[str | None, str]] = []  # (key or None, value)
    key: str | None = None
    text = ""
    characters = iter(description)
    for c in characters:
        if c == "\\":
            text += next(characters, "")
        elif c == "=" and key is None:
            key, text = text, ""
        elif c == ":":
            fields.append((key, text))
            key, text = None, ""
        else:
            text += c
    fields.append((key, text))
    (named, kind), rest = fields[0], fields[1:]
    if named is not None or kind.upper() != "TCP":
        return None
    keywords = {k: v for k, v in rest if k is not None}
    positional = [v for k, v in rest if k is None]
    # As Twisted reads them: with a host= keyword, a lone positional is the port.
    if "host" in keywords and len(positional) < 2:
        return keywords["host"]
    return positional[0] if positional else None
