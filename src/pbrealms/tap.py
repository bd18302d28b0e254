"""
The command line of C{twistd pbrealms}: option parsing and validation, and
the service tree it builds.
"""

from __future__ import annotations

import getopt
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import NoReturn

from twisted.application import internet
from twisted.application.service import IService
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword
from twisted.internet import endpoints, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.spread import jelly

from pbrealms.checkers import (
    PasswordFile,
    PasswordFileError,
    checkPermissions,
    parsePasswords,
)
from pbrealms.descriptors import DEFAULT_MAX_CONNECTIONS, fitConnections
from pbrealms.errors import InvalidPeriod
from pbrealms.guard import Network, SourcePenalties, parseNetworks
from pbrealms.hasher import PasswordHasher
from pbrealms.keepalive import Keepalive
from pbrealms.login import LoginRoot
from pbrealms.metrics import ServerMetrics
from pbrealms.metricsweb import metricsSite
from pbrealms.options import BadValue, coerced, rowCoercion
from pbrealms.options import Options as CommandOptions
from pbrealms.push import MAX_PERIOD, MIN_PERIOD, validatePeriod
from pbrealms.realms import REALMS
from pbrealms.service import (
    GracefulShutdown,
    Listener,
    ListenFailed,
    PBRealmsService,
    PBServerFactory,
)
from pbrealms.sessions import SessionRegistry
from pbrealms.unfinished import MAX_UNFINISHED_BYTES
from pbrealms.whenfull import REFUSE, WHEN_FULL
from pbrealms.wire import MAX_DEPTH, MAX_MESSAGE_BYTES

DEFAULT_PORT = "tcp:8787:interface=127.0.0.1"
DEFAULT_PERIOD = 1.0
DEFAULT_GRACE = 5.0
DEFAULT_KEEPALIVE = 60.0
MIN_KEEPALIVE = 1.0
DEFAULT_PING_TIMEOUT = 10.0
#: The realms that limit sessions per user, with --max.
LIMITING_REALMS = tuple(name for name, strategy in REALMS.items() if strategy.limits)
MAX_GRACE = 3600.0
#: Twisted listens with a backlog of 50, which hangs a storm of logins.
TCP_BACKLOG = 1024
#: Who may connect to a UNIX socket unless its mode= says: its owner and group.
UNIX_SOCKET_MODE = 0o660
#: Authentication types that offer IUsernameHashedPassword but cannot serve
#: PB: C{memory:} keeps str user names and PB sends bytes.
UNUSABLE_AUTH_TYPES = frozenset({"memory"})

#: How twistd pbrealms begins the one line of a refusal to start.
ERROR_PREFIX = "twistd pbrealms: error: "

_log = Logger()


def _realmsTaking(option: str) -> str:
    """
    The C{--realm} values that take C{option}, for help and errors.
    """
    return " or --realm=".join(n for n, s in REALMS.items() if option in s.options)


#: Each limiting realm's limit without --max, for --help.
_LIMITS = ", ".join(
    f"{REALMS[n].defaultMax} for {n}" if REALMS[n].defaultMax else f"no limit for {n}"
    for n in LIMITING_REALMS
)


def environmentName(option: str) -> str:
    """
    The environment variable that sets C{option}: C{PBREALMS_SHUTDOWN_GRACE}
    for C{shutdown-grace}.
    """
    return "PBREALMS_" + option.upper().replace("-", "_")


def withBacklog(description: str) -> str:
    """
    Add a large C{backlog=} to a TCP endpoint description that has none.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and not re.search(r"(?<!\\):backlog=", description):
        description += f":backlog={TCP_BACKLOG}"
    return description


def withSocketMode(description: str) -> str:
    """
    Add C{mode=660} to a UNIX socket endpoint description that has none:
    Twisted's default, 0666, lets every local user connect.
    """
    kind = description.split(":", 1)[0].lower()
    if kind == "unix" and not re.search(r"(?<!\\):mode=", description):
        description += f":mode={UNIX_SOCKET_MODE:o}"
    return description


class _Listening:
    """
    A reactor for one endpoint's C{listen} that listens nowhere: it notes
    the port and interface that the endpoint passes to C{listenTCP} or
    C{listenSSL}.

    @ivar at: the port and interface, once noted.
    """

    def __init__(self) -> None:
        self.at: tuple[int, str] | None = None

    def listenTCP(self, port: int, factory: object, backlog: int = 50, interface: str = "") -> None:
        self.at = (port, interface)

    def listenSSL(
        self,
        port: int,
        factory: object,
        contextFactory: object,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        self.at = (port, interface)


def listeningAt(description: str) -> tuple[int, str] | None:
    """
    The port and interface that a TCP, TCP6 or SSL server endpoint
    description listens on; L{None} for other kinds.  They are what its
    endpoint passes to the reactor as it listens, not read from the text,
    so that no spelling of the description (a repeated or positional
    interface) can disagree with what listens.

    @param description: a description that L{endpoints.serverFromString}
        parses.
    """
    reactor = _Listening()
    endpoint = endpoints.serverFromString(reactor, description)
    if isinstance(
        endpoint,
        (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint, endpoints.SSL4ServerEndpoint),
    ):
        endpoint.listen(protocol.Factory())
    return reactor.at


def isLocalOnly(endpoint: IStreamServerEndpoint, description: str) -> bool:
    """
    Whether an endpoint, parsed from C{description}, listens only where no
    other machine can connect: a UNIX socket, or TCP on a loopback
    interface (see L{listeningAt}).
    """
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return True
    if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return False
    listening = listeningAt(description)
    assert listening is not None  # a TCP endpoint's
    host = listening[1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The coerce column: what one value must be, wherever it came from.  What
# depends on other settings is checked in Options.postOptions.


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """
    A coerce function for a C{kind} above 0 (and below 2**31).
    """
    what = "a whole number" if kind is int else "a number"

    def coerce(value: str) -> float:
        number = _parse(value, kind)
        if not 0 < number < 2**31:
            raise BadValue("{setting} must be " + what + " above 0, not {value!r}", value=value)
        return number

    coerce.coerceDoc = f"{what.capitalize()} above 0."  # type: ignore[attr-defined]
    return coerce


def realmName(value: str) -> str:
    """
    The coerce function of --realm: the name of one of L{REALMS}.
    """
    if value not in REALMS:
        raise BadValue(
            "unknown {what} {value!r}: choose one of {choices}",
            value=value,
            choices=", ".join(REALMS),
        )
    return value


def sessionLimit(value: str) -> int:
    """
    The coerce function of --max: a whole number of 1 or more.
    """
    try:
        limit = int(value)
    except ValueError:
        raise BadValue("{setting} must be a whole number, not {value!r}", value=value) from None
    if limit < 1:
        raise BadValue("{setting} must be 1 or more, not {limit}", limit=limit)
    return limit


def whenFull(value: str) -> str:
    """
    The coerce function of --when-full: one of L{WHEN_FULL}.
    """
    if value not in WHEN_FULL:
        raise BadValue(
            "unknown {setting} {value!r}: choose one of {choices}",
            value=value,
            choices=", ".join(WHEN_FULL),
        )
    return value


def keepaliveInterval(value: str) -> float:
    """
    The coerce function of --keepalive: L{MIN_KEEPALIVE} or more seconds,
    or 0 for none.
    """
    seconds = _parse(value)
    # Under a second, pings would be most of the traffic.
    if not (seconds == 0 or MIN_KEEPALIVE <= seconds < 2**31):
        raise BadValue(
            "{setting} must be {least:g} or more seconds, or 0 for none, not {value!r}",
            least=MIN_KEEPALIVE,
            value=value,
        )
    return seconds


def pushPeriod(value: str) -> float:
    """
    The coerce function of --period: seconds from L{MIN_PERIOD} to
    L{MAX_PERIOD}.
    """
    try:
        seconds = float(value)
    except ValueError:
        raise BadValue(
            "{setting} must be a number of seconds, not {value!r}", value=value
        ) from None
    try:
        return validatePeriod(seconds)
    except InvalidPeriod as e:
        # "period must be from ...": name it as it was given.
        raise BadValue("{setting}{rest}", rest=e.args[0].removeprefix("period")) from None


def shutdownGrace(value: str) -> float:
    """
    The coerce function of --shutdown-grace: from 0 to L{MAX_GRACE} seconds.
    """
    seconds = _parse(value)
    if not 0 <= seconds <= MAX_GRACE:
        raise BadValue(
            "{setting} must be from 0 to {most:g} seconds, not {value!r}",
            most=MAX_GRACE,
            value=value,
        )
    return seconds


def exemptNetworks(value: str) -> list[Network]:
    """
    The coerce function of --penalty-exempt: addresses and networks, comma-
    separated.
    """
    try:
        return parseNetworks(value)
    except ValueError as e:
        raise BadValue("{setting}: {reason}", reason=str(e)) from None


class Options(CommandOptions, strcred.AuthOptionMixin):
    """
    The options of C{twistd pbrealms}.  Every check is made here, so that a
    bad value stops twistd with one line before anything listens: each value
    by its coerce function, whether the command line, the environment or
    the default gave it, and what depends on other settings in
    L{postOptions}.

    @ivar given: where each setting given came from, as its errors name it:
        C{--max} or C{PBREALMS_MAX}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve Twisted's Perspective Broker with the realm strategy of your choice. "
        "Clients log in with pb.PBClientFactory.login(UsernamePassword(user, password)) "
        "or with pbrealms-client. Every option that takes a value, --auth included, can "
        "also be set in the environment as PBREALMS_<OPTION> (PBREALMS_REALM, PBREALMS_MAX, "
        "PBREALMS_SHUTDOWN_GRACE, PBREALMS_AUTH ...), and is checked as on the command "
        "line; an empty variable counts as unset. The command line wins, and --passwd or "
        "--auth there overrides both PBREALMS_PASSWD and PBREALMS_AUTH."
    )
    optParameters = [
        [
            "realm",
            "r",
            "cache",
            "Realm strategy: " + "; ".join(f"{s.name} ({s.help})" for s in REALMS.values()) + ".",
            realmName,
        ],
        [
            "max",
            None,
            None,
            f"With --realm={' or '.join(LIMITING_REALMS)}: the most concurrent sessions "
            f"one user may have (an integer of 1 or more). [default: {_LIMITS}]",
            sessionLimit,
        ],
        [
            "when-full",
            None,
            REFUSE,
            f"With --realm={' or '.join(LIMITING_REALMS)}, once a user has --max sessions: "
            "what a login beyond the limit does. refuse: it is refused (too many "
            "connections). replace-oldest: the user's oldest session is told, closed, "
            "and replaced. replace-stale: the oldest session is pinged, and replaced "
            "only if it does not answer within --ping-timeout.",
            whenFull,
        ],
        [
            "ping-timeout",
            None,
            f"{DEFAULT_PING_TIMEOUT:g}",
            "Seconds to wait for a session that is pinged (replace-stale) or told that "
            "it is replaced (replace-oldest).",
            _positive(float),
        ],
        [
            "keepalive",
            None,
            f"{DEFAULT_KEEPALIVE:g}",
            "Ping every logged-in connection this often, in seconds, and drop those "
            "that have not answered a whole interval later; 0 turns it off.",
            keepaliveInterval,
        ],
        [
            "passwd",
            None,
            None,
            "Password file: one 'username:password' per line, '#' comments allowed. "
            "It must not be writable by group or others; it is reloaded when it "
            "changes. [default: the demo users alice and bob, on loopback only]",
        ],
        [
            "port",
            "p",
            DEFAULT_PORT,
            "Where to listen: a Twisted server endpoint description (tcp:, tcp6:, unix:, "
            f"ssl:, systemd: ...). TCP gets backlog={TCP_BACKLOG} unless you set one.",
        ],
        [
            "period",
            None,
            None,
            f"With --realm={_realmsTaking('period')}: the push period a session starts "
            "with, in seconds, "
            f"from {MIN_PERIOD:g} to {MAX_PERIOD:g}. [default: {DEFAULT_PERIOD:g}]",
            pushPeriod,
        ],
        [
            "shutdown-grace",
            None,
            str(DEFAULT_GRACE),
            "On SIGTERM or SIGINT: the seconds that sessions get to finish their calls "
            "after being told of the shutdown, before their connections are closed.",
            shutdownGrace,
        ],
        [
            "max-message-size",
            None,
            str(MAX_MESSAGE_BYTES),
            "Bytes one incoming message may have, counted as what it costs in memory "
            "once decoded; a larger one closes its connection.",
            _positive(int),
        ],
        [
            "max-depth",
            None,
            str(MAX_DEPTH),
            "How deep the lists of one incoming message may nest.",
            _positive(int),
        ],
        [
            "max-unfinished-bytes",
            None,
            str(MAX_UNFINISHED_BYTES),
            "Bytes that all connections together may hold in messages not yet whole "
            "(decoded so far, or arrived and waiting), at least --max-message-size; "
            "beyond it the connection holding the most is closed.",
            _positive(int),
        ],
        [
            "max-connections",
            None,
            None,
            "PB connections open at once; beyond it new ones are closed as they are "
            "accepted, or take the place of one not logged in from the address that "
            "holds the most. The soft file descriptor limit is raised to hold them and "
            "a reserve; if the hard limit cannot, twistd exits. [default: "
            f"{DEFAULT_MAX_CONNECTIONS}, or fewer, with a warning, if the limit cannot hold them]",
            _positive(int),
        ],
        [
            "max-unauthenticated-per-source",
            None,
            "128",
            "Connections from one address that have not logged in yet; beyond it new "
            "ones from that address are closed as they are accepted.",
            _positive(int),
        ],
        [
            "max-auth-tries",
            None,
            "6",
            "Failed logins a connection may have before it is closed.",
            _positive(int),
        ],
        [
            "login-timeout",
            None,
            "30",
            "Seconds a connection may take to log in before it is closed.",
            _positive(float),
        ],
        [
            "penalty-exempt",
            None,
            None,
            "Addresses and networks whose failed logins are never penalised, comma-"
            "separated (e.g. 10.0.0.0/8,::1). Others are refused for a while after "
            "repeated failures. [default: none]",
            exemptNetworks,
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics (Prometheus), /healthz and /sessions over HTTP on this "
            "server endpoint, e.g. tcp:9108:interface=127.0.0.1. [default: off]",
        ],
    ]
    supportedInterfaces = (IUsernameHashedPassword,)
    compData = usage.Completions(
        optActions={
            "realm": usage.CompleteList(list(REALMS)),
            "when-full": usage.CompleteList(list(WHEN_FULL)),
            "passwd": usage.CompleteFiles(),
        }
    )

    def __init__(self) -> None:
        self.given: dict[str, str] = {}
        super().__init__()

    def _noteGiven(self, arguments: Sequence[str]) -> None:
        """
        Note in L{given} each option that C{arguments} give, by its long
        name, as C{usage.Options} reads them (getopt, then its synonyms).
        Arguments that getopt refuses are left for the parse to report.
        """
        try:
            opts, _ = getopt.getopt(list(arguments), self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return
        for opt, _ in opts:
            spelled = opt[2:] if opt.startswith("--") else opt[1:]
            if spelled not in self.synonyms:
                spelled = spelled.replace("-", "_")
            name = self.synonyms.get(spelled)
            if name is not None:
                self.given[name] = "--" + name

    def _settle(self) -> None:
        """
        Give each value that the command line did not give to its option's
        coerce function too: the environment's, for containers (no shell
        wrapper, which would swallow SIGTERM, is needed to turn them into
        options), else the default, which is text as --help shows it.  An
        empty variable counts as unset.  (PBREALMS_AUTH: see
        L{_credentialsFromEnvironment}.)
        """
        for parameter in self.optParameters:
            # A row is [long, short, default, doc] and perhaps its coerce.
            name: str = parameter[0]
            default: str | None = parameter[2]
            coerce = rowCoercion(parameter)
            if name in self.given:
                continue
            value = os.environ.get(environmentName(name))
            if value:
                self.given[name] = environmentName(name)
                self[name] = coerced(coerce, value, environmentName(name))
            elif isinstance(default, str):
                self[name] = coerce(default)

    def _name(self, option: str) -> str:
        """
        How an error names the setting C{option}: as the environment
        variable that set it, or else as the option.
        """
        return self.given.get(option, "--" + option)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse for twistd, which calls this as the command's entry point: a
        L{usage.UsageError} becomes one line on standard error and exit
        status 2.  (twistd itself would print the whole --help to standard
        output and exit 1.)  Every check below raises L{usage.UsageError}.
        """
        arguments = list(sys.argv[1:] if options is None else options)
        try:
            self._noteGiven(arguments)
            super().parseOptions(arguments)
        except usage.UsageError as e:
            sys.stderr.write(f"{ERROR_PREFIX}{e}\n")
            raise SystemExit(2) from None

    def parseArgs(self, *arguments: str) -> None:
        if arguments:
            raise usage.UsageError(
                f"unexpected argument {arguments[0]!r}: twistd pbrealms takes only options "
                "(see twistd pbrealms --help)"
            )

    def supportsCheckerFactory(self, factory: object) -> bool:
        if getattr(factory, "authType", None) in UNUSABLE_AUTH_TYPES:
            return False
        return super().supportsCheckerFactory(factory)

    def opt_help_auth(self) -> NoReturn:
        """
        Show all authentication methods available.
        """
        # strcred's table, of the types this server takes only
        # (supportsCheckerFactory), where strcred lists every type that
        # offers a supported interface.
        usable = [f for f in strcred.findCheckerFactories() if self.supportsCheckerFactory(f)]
        self.authOutput.write("Usage: --auth AuthType[:ArgString]\n")
        self.authOutput.write("For detailed help: --help-auth-type AuthType\n")
        self.authOutput.write("\n")
        width = max((len(f.authType) for f in usable), default=0)
        row = f"  %-{width}s\t%s\n"
        self.authOutput.write(row % ("AuthType", "ArgString format"))
        self.authOutput.write(row % ("========", "================"))
        for factory in usable:
            self.authOutput.write(row % (factory.authType, factory.argStringFormat))
        self.authOutput.write("\n")
        raise SystemExit(0)

    def opt_auth(self, description: str) -> None:
        """
        Check passwords with a Twisted checker instead of --passwd (see --help-auth).
        """
        setting = self._name("auth")
        kind = description.split(":", 1)[0]
        try:
            usable = self.supportsCheckerFactory(strcred.findCheckerFactory(kind))
        except strcred.InvalidAuthType:
            raise usage.UsageError(f"{setting} {kind}: unknown type; see --help-auth") from None
        if not usable:
            raise usage.UsageError(
                f"{setting} {kind}: cannot answer PB's challenge; see --help-auth"
            )
        if kind == "file":
            self._checkAuthFile(setting, description.partition(":")[2])
        super().opt_auth(description)

    @staticmethod
    def _checkAuthFile(setting: str, path: str) -> None:
        # strcred only warns about a missing file, and every login would fail.
        try:
            warning = checkPermissions(path)
            users = parsePasswords(path)
        except PasswordFileError as e:
            raise usage.UsageError(f"{setting} {e}") from None
        if warning:
            _log.warn("{warning}", warning=warning)
        # Twisted's file checker ends a password at the next colon, where
        # --passwd keeps it whole: refuse what the two would read apart.
        for name, password in users.items():
            if b":" in password:
                raise usage.UsageError(
                    f"{setting} file:{path}: the password of {name.decode()!r} has a ':', "
                    "which Twisted's file checker cuts off; use --passwd for this file"
                )

    opt_a = opt_auth

    def postOptions(self) -> None:
        """
        Coerce what the command line did not give, then check the settings
        against each other and build what they describe: the checker, the
        endpoints and the descriptor limit.
        """
        self._settle()
        name = self["realm"]
        self["max"] = self._maxSessions(name, self["max"])
        self["when-full"] = self._whenFull(name, self["when-full"], self["max"])
        self["period"] = self._period(name, self["period"])
        self._credentialsFromEnvironment()
        self["checker"], self["demo"] = self._checker()
        self["endpoint"] = self._endpoint(self["port"], self._name("port"))
        if self["max-unfinished-bytes"] < self["max-message-size"]:
            # Else one whole message would close its connection.
            raise usage.UsageError(
                f"{self._name('max-unfinished-bytes')} ({self['max-unfinished-bytes']}) must be "
                f"at least {self._name('max-message-size')} ({self['max-message-size']})"
            )
        if self["penalty-exempt"] is None:
            self["penalty-exempt"] = parseNetworks("")
        if self["metrics"] is not None:
            self["metrics-endpoint"] = self._endpoint(self["metrics"], self._name("metrics"))
        if self["demo"] and not isLocalOnly(self["endpoint"], _spelledOut(self["port"])):
            raise usage.UsageError(
                f"refusing to serve the demo users on {self['port']!r}, which is not "
                "loopback-only: give --passwd FILE or --auth, or listen on 127.0.0.1"
            )
        # Last, once the rest is known good: this raises the descriptor limit.
        self["max-connections"] = fitConnections(
            self["max-connections"], self._name("max-connections")
        )

    @staticmethod
    def _endpoint(description: str, setting: str) -> IStreamServerEndpoint:
        from twisted.internet import reactor

        description = _spelledOut(description)
        try:
            endpoint = endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise usage.UsageError(
                f"bad {setting} {description!r}: {endpointError(description, e)}"
            ) from None
        listening = listeningAt(description)
        if listening is not None and not 0 <= listening[0] <= 65535:
            raise usage.UsageError(
                f"bad {setting} {description!r}: the port must be from 0 to 65535, "
                f"not {listening[0]}"
            )
        for complete in (withBacklog, withSocketMode):
            completed = complete(description)
            try:
                endpoint = endpoints.serverFromString(reactor, completed)
            except Exception:
                continue  # a backlog or mode given by position: keep it
            description = completed
        return endpoint

    def _whenFull(self, realm: str, value: str, limit: int | None) -> str:
        if value == REFUSE or limit is not None:
            return value
        setting = f"{self._name('when-full')}={value}"
        if realm in LIMITING_REALMS:
            # A limiting realm without a default limit has none without --max.
            raise usage.UsageError(
                f"{setting} needs --max: --realm={realm} has no limit without it"
            )
        raise usage.UsageError(
            f"{setting} applies to --realm="
            + " or --realm=".join(LIMITING_REALMS)
            + f" only, not {realm!r}"
        )

    def _maxSessions(self, realm: str, value: int | None) -> int | None:
        setting = self._name("max")
        if realm not in LIMITING_REALMS:
            if value is not None:
                raise usage.UsageError(
                    f"{setting} applies to --realm="
                    + " or --realm=".join(LIMITING_REALMS)
                    + f" only, not {realm!r}"
                )
            return None
        if value is None:
            return REALMS[realm].defaultMax
        return value

    def _period(self, realm: str, value: float | None) -> float | None:
        setting = self._name("period")
        if "period" not in REALMS[realm].options:
            if value is not None:
                raise usage.UsageError(
                    f"{setting} applies to --realm={_realmsTaking('period')} only, not {realm!r}"
                )
            return None
        if value is None:
            return DEFAULT_PERIOD
        return value

    def _credentialsFromEnvironment(self) -> None:
        """
        Apply PBREALMS_AUTH, through the checks of --auth, unless the command
        line chose the password source: its --passwd or --auth overrides both
        PBREALMS_PASSWD and PBREALMS_AUTH (a container image may set one).
        """
        fromCommandLine = [n for n in ("passwd", "auth") if self.given.get(n, "").startswith("--")]
        if fromCommandLine:
            if self.given.get("passwd") == environmentName("passwd"):
                self["passwd"] = None
                del self.given["passwd"]
            return
        description = os.environ.get(environmentName("auth"))
        if description:
            self.given["auth"] = environmentName("auth")
            self.opt_auth(description)

    def _checker(self) -> tuple[ICredentialsChecker, bool]:
        checkers = self.get("credCheckers", [])
        if self["passwd"] == "":
            raise usage.UsageError(f"{self._name('passwd')} needs the name of a password file")
        if self["passwd"] and checkers:
            raise usage.UsageError(f"give {self._name('passwd')} or {self._name('auth')}, not both")
        if len(checkers) > 1:
            raise usage.UsageError("give --auth once")
        if checkers:
            return checkers[0], False
        try:
            if self["passwd"]:
                return PasswordFile(self["passwd"]), False
            demo = str(files("pbrealms") / "demo.passwd")
            return PasswordFile(demo, strictModes=False), True
        except PasswordFileError as e:
            # The error names the file; say too which variable named it.
            setting = self._name("passwd")
            text = str(e) if setting.startswith("--") else f"{setting}: {e}"
            raise usage.UsageError(text) from None


def _spelledOut(description: str) -> str:
    """
    C{description} as an endpoint description: a port number alone is TCP's,
    as twistd's old strports allowed.
    """
    return "tcp:" + description if description.isdigit() else description


#: Examples for the kinds of endpoint a TCP example would mislead about.
_EXAMPLES = {"unix": "unix:/run/pbrealms/pb.sock"}


def endpointError(description: str, error: Exception) -> str:
    """
    What is wrong with an endpoint description, for a person, from what
    Twisted raised parsing it (its parsers let int() and argument binding
    speak for them).
    """
    kind = description.split(":", 1)[0]
    text = str(error)
    example = _EXAMPLES.get(kind, DEFAULT_PORT)
    expected = f"; expected e.g. {example} (see Twisted's endpoint syntax)"
    number = re.fullmatch(r"invalid literal for int\(\) with base (\d+): (.*)", text)
    if number:
        what = "an octal" if number[1] == "8" else "a whole"
        return f"{number[2]} is not {what} number{expected}"
    keyword = re.search(r"unexpected keyword argument (\S+)", text)
    if keyword:
        return f"{kind}: has no parameter {keyword[1]}{expected}"
    if re.search(r"positional arguments? but \d+ (was|were) given", text):
        return f"too many fields for {kind}:{expected}"
    if text.startswith("Unknown endpoint type"):
        return f"unknown endpoint type {kind!r}{expected}"
    if isinstance(error, OSError) and error.filename:
        return f"cannot read {error.filename}: {error.strerror}"
    if isinstance(error, IndexError) and kind == "systemd":
        return "systemd passed no socket of that index (see LISTEN_FDS)"
    return text or type(error).__name__


def _parse(value: str, kind: type = float) -> float:
    """
    C{value} as a number of C{kind}, or NaN, which no range check admits.
    """
    try:
        return kind(value)
    except ValueError:
        return math.nan


def wireSecurity() -> jelly.SecurityOptions:
    """
    What clients may send: basic types and references to their own objects
    (a mind) and to ours.  Nothing that builds instances of classes: the
    errors answering our pushes are read from their state alone (see
    L{pbrealms.commands.receivedFailure}).  An object of our own, which no
    import can widen, unlike PB's process-wide default.
    """
    security = jelly.SecurityOptions()
    security.allowBasicTypes()
    security.allowTypes("remote", "local")
    return security


class TwistdService(PBRealmsService):
    """
    The server as twistd starts it, the command's other entry point: a port
    that cannot be listened on (L{ListenFailed}) stops twistd with one line
    on standard error and exit status 1, not a traceback.
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenFailed as e:
            # twistd has sent sys.stderr to the log, which goes to standard
            # output: write to the process's own standard error.
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"{ERROR_PREFIX}{e}\n")
            stderr.flush()
            raise SystemExit(1) from None


def makeService(options: Options) -> PBRealmsService:
    """
    Build the server: a PB listener, the graceful shutdown of its sessions,
    and, as asked, the metrics endpoint and the password file's watcher.
    """
    from twisted.internet import reactor

    name = options["realm"]
    metrics = ServerMetrics()
    registry = SessionRegistry(
        reactor,
        realm=name,
        maxPerUser=options["max"],
        metrics=metrics,
        whenFull=options["when-full"],
        pingTimeout=options["ping-timeout"],
    )
    realm = REALMS[name].realm.build(registry, reactor, options)
    checker = options["checker"]
    penalties = SourcePenalties(reactor, exempt=options["penalty-exempt"])
    root = LoginRoot(
        checker,
        realm,
        registry,
        maxAuthTries=options["max-auth-tries"],
        loginTimeout=options["login-timeout"],
        penalties=penalties,
        maxUnauthenticated=options["max-unauthenticated-per-source"],
    )
    factory = PBServerFactory(
        root,
        wireSecurity(),
        maxConnections=options["max-connections"],
        maxMessageBytes=options["max-message-size"],
        maxDepth=options["max-depth"],
        maxUnfinishedBytes=options["max-unfinished-bytes"],
    )
    metrics.countConnections(lambda: len(factory.brokers))

    server = TwistdService()
    # Started in this order, stopped in the reverse one (see PBRealmsService).
    children: list[tuple[str, IService]] = []
    if options["metrics"] is not None:
        site = metricsSite(metrics, isServing=lambda: server.listening, sessions=registry.describe)
        where, option = options["metrics"], options._name("metrics")
        listener = Listener(options["metrics-endpoint"], site, where, "metrics", option)
        children.append(("metrics-http", listener))
    hasher = None
    if isinstance(checker, PasswordFile):
        # This server's own hash threads: closed as the shutdown begins (see
        # GracefulShutdown), stopped after the grace.
        checker.hasher = hasher = PasswordHasher()
        children.append(("password-hasher", hasher))
        if options["demo"]:
            _log.warn(
                "serving the demo users {users} from {path}; give --passwd FILE for real ones",
                users=", ".join(checker.users),
                path=checker.path,
            )
        else:
            watcher = internet.TimerService(1.0, checker.reloadIfChanged)
            children.append(("password-file-watcher", watcher))
    if options["keepalive"]:
        children.append(("keepalive", Keepalive(registry, options["keepalive"])))
    shutdown = GracefulShutdown(
        reactor, registry, factory, options["shutdown-grace"], hasher=hasher
    )
    children.append(("graceful-shutdown", shutdown))
    listener = Listener(options["endpoint"], factory, options["port"], option=options._name("port"))
    children.append(("pb-listener", listener))
    for childName, child in children:
        child.setName(childName)
        child.setServiceParent(server)
    return server
