"""
C{twistd pbrealms}'s plugin points (see C{twisted/plugins/pbrealms_plugin.py}):
L{Options}, its options checked against each other, and L{makeService},
which builds the service tree they describe (L{pbrealms.servicetree}).
What one value must be is in L{pbrealms.settings}, the environment's part
in L{pbrealms.environment}, the credentials checker's in
L{pbrealms.authoptions}, and the endpoints' in L{pbrealms.serverendpoints}.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from twisted.python import usage

from pbrealms.authoptions import AuthOptions
from pbrealms.descriptors import DEFAULT_MAX_CONNECTIONS, fitConnections
from pbrealms.guard import parseNetworks
from pbrealms.push import MAX_PERIOD, MIN_PERIOD
from pbrealms.realms import REALMS
from pbrealms.serverendpoints import (
    DEFAULT_PORT,
    TCP_BACKLOG,
    isLocalOnly,
    serverEndpoint,
    spelledOut,
)
from pbrealms.servicetree import ERROR_PREFIX, makeService
from pbrealms.settings import (
    exemptNetworks,
    keepaliveInterval,
    positive,
    pushPeriod,
    realmName,
    sessionLimit,
    shutdownGrace,
    whenFull,
)
from pbrealms.unfinished import MAX_UNFINISHED_BYTES
from pbrealms.whenfull import REFUSE, WHEN_FULL
from pbrealms.wire import MAX_DEPTH, MAX_MESSAGE_BYTES

__all__ = ["Options", "makeService"]

DEFAULT_PERIOD = 1.0
DEFAULT_GRACE = 5.0
DEFAULT_KEEPALIVE = 60.0
DEFAULT_PING_TIMEOUT = 10.0
#: The realms that limit sessions per user, with --max.
LIMITING_REALMS = tuple(name for name, strategy in REALMS.items() if strategy.limits)


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


class Options(AuthOptions):
    """
    The options of C{twistd pbrealms}.  Every check is made here, so that a
    bad value stops twistd with one line before anything listens: each value
    by its coerce function (L{pbrealms.settings}), whether the command line,
    the environment (L{pbrealms.environment.EnvironmentOptions}) or the
    default gave it, and what depends on other settings in L{postOptions}.
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
            positive(float),
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
            positive(int),
        ],
        [
            "max-depth",
            None,
            str(MAX_DEPTH),
            "How deep the lists of one incoming message may nest.",
            positive(int),
        ],
        [
            "max-unfinished-bytes",
            None,
            str(MAX_UNFINISHED_BYTES),
            "Bytes that all connections together may hold in messages not yet whole "
            "(decoded so far, or arrived and waiting), at least --max-message-size; "
            "beyond it the connection holding the most is closed.",
            positive(int),
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
            positive(int),
        ],
        [
            "max-unauthenticated-per-source",
            None,
            "128",
            "Connections from one address that have not logged in yet; beyond it new "
            "ones from that address are closed as they are accepted.",
            positive(int),
        ],
        [
            "max-auth-tries",
            None,
            "6",
            "Failed logins a connection may have before it is closed.",
            positive(int),
        ],
        [
            "login-timeout",
            None,
            "30",
            "Seconds a connection may take to log in before it is closed.",
            positive(float),
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
    compData = usage.Completions(
        optActions={
            "realm": usage.CompleteList(list(REALMS)),
            "when-full": usage.CompleteList(list(WHEN_FULL)),
            "passwd": usage.CompleteFiles(),
        }
    )

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
        self["endpoint"] = serverEndpoint(self["port"], self._name("port"))
        if self["max-unfinished-bytes"] < self["max-message-size"]:
            # Else one whole message would close its connection.
            raise usage.UsageError(
                f"{self._name('max-unfinished-bytes')} ({self['max-unfinished-bytes']}) must be "
                f"at least {self._name('max-message-size')} ({self['max-message-size']})"
            )
        if self["penalty-exempt"] is None:
            self["penalty-exempt"] = parseNetworks("")
        if self["metrics"] is not None:
            self["metrics-endpoint"] = serverEndpoint(self["metrics"], self._name("metrics"))
        if self["demo"] and not isLocalOnly(self["endpoint"], spelledOut(self["port"])):
            raise usage.UsageError(
                f"refusing to serve the demo users on {self['port']!r}, which is not "
                "loopback-only: give --passwd FILE or --auth, or listen on 127.0.0.1"
            )
        # Last, once the rest is known good: this raises the descriptor limit.
        self["max-connections"] = fitConnections(
            self["max-connections"], self._name("max-connections")
        )

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
