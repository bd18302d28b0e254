"""
The command line of C{twistd pbrealms}: option parsing and validation, and
the service tree it builds.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from importlib.resources import files

from twisted.application import internet, service
from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword
from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.reflect import qual
from twisted.spread import jelly, pb

from pbrealms.checkers import PasswordFile, PasswordFileError, checkPermissions, parsePasswords
from pbrealms.errors import InvalidPeriod
from pbrealms.login import LoginRoot
from pbrealms.push import MAX_PERIOD, MIN_PERIOD, validatePeriod
from pbrealms.realms import REALMS, ClockRealm
from pbrealms.sessions import SessionRegistry

DEFAULT_PORT = "tcp:8787:interface=127.0.0.1"
DEFAULT_PERIOD = 1.0
#: Twisted listens with a backlog of 50, which hangs a storm of logins.
TCP_BACKLOG = 1024
#: Authentication types that offer IUsernameHashedPassword but cannot serve
#: PB: C{memory:} keeps str user names and PB sends bytes.
UNUSABLE_AUTH_TYPES = frozenset({"memory"})

_log = Logger()


def withBacklog(description: str) -> str:
    """
    Add a large C{backlog=} to a TCP endpoint description that has none.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and not re.search(r"(?<!\\):backlog=", description):
        description += f":backlog={TCP_BACKLOG}"
    return description


def isLocalOnly(endpoint: IStreamServerEndpoint) -> bool:
    """
    Whether an endpoint listens only where no other machine can connect: a
    UNIX socket, or TCP on a loopback interface.
    """
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return True
    if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return False
    # Read from the parsed endpoint, not the text, so that no spelling of the
    # description (a repeated or positional interface) can disagree with it.
    host = endpoint._interface
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    The options of C{twistd pbrealms}.  Every check is made here, so that a
    bad value stops twistd with one line before anything listens.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve Twisted's Perspective Broker with the realm strategy of your choice. "
        "Clients log in with pb.PBClientFactory.login(UsernamePassword(user, password)) "
        "or with pbrealms-client."
    )
    optParameters = [
        ["realm", "r", "cache", "Realm strategy: " + ", ".join(REALMS) + "."],
        [
            "max",
            None,
            None,
            "With --realm=limited: the most concurrent sessions one user may have "
            "(an integer of 1 or more). [default: 1]",
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
            f"With --realm=clock: the push period a session starts with, in seconds, "
            f"from {MIN_PERIOD:g} to {MAX_PERIOD:g}. [default: {DEFAULT_PERIOD:g}]",
        ],
    ]
    supportedInterfaces = (IUsernameHashedPassword,)
    compData = usage.Completions(
        optActions={
            "realm": usage.CompleteList(list(REALMS)),
            "passwd": usage.CompleteFiles(),
        }
    )

    def parseOptions(self, options: list[str] | None = None) -> None:
        # twistd answers a usage error with its whole --help; one line is kinder.
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"twistd pbrealms: error: {e}\n")
            raise SystemExit(2) from None

    def supportsCheckerFactory(self, factory: object) -> bool:
        if getattr(factory, "authType", None) in UNUSABLE_AUTH_TYPES:
            return False
        return super().supportsCheckerFactory(factory)

    def _checkerFactoriesForOptHelpAuth(self):
        return (
            f
            for f in super()._checkerFactoriesForOptHelpAuth()
            if f.authType not in UNUSABLE_AUTH_TYPES
        )

    def opt_auth(self, description: str) -> None:
        """
        Check passwords with a Twisted checker instead of --passwd (see --help-auth).
        """
        kind = description.split(":", 1)[0]
        try:
            usable = self.supportsCheckerFactory(strcred.findCheckerFactory(kind))
        except strcred.InvalidAuthType:
            raise usage.UsageError(f"--auth {kind}: unknown type; see --help-auth") from None
        if not usable:
            raise usage.UsageError(f"--auth {kind}: cannot answer PB's challenge; see --help-auth")
        if kind == "file":
            # strcred only warns about a missing file, and every login would fail.
            path = description.partition(":")[2]
            try:
                checkPermissions(path)
                parsePasswords(path)
            except PasswordFileError as e:
                raise usage.UsageError(f"--auth {e}") from None
        super().opt_auth(description)

    opt_a = opt_auth

    def postOptions(self) -> None:
        name = self["realm"]
        if name not in REALMS:
            raise usage.UsageError(f"unknown realm {name!r}: choose one of " + ", ".join(REALMS))
        self["max"] = self._maxSessions(name, self["max"])
        self["period"] = self._period(name, self["period"])
        self["checker"], self["demo"] = self._checker()
        self["endpoint"] = self._endpoint(self["port"])
        if self["demo"] and not isLocalOnly(self["endpoint"]):
            raise usage.UsageError(
                f"refusing to serve the demo users on {self['port']!r}, which is not "
                "loopback-only: give --passwd FILE or --auth, or listen on 127.0.0.1"
            )

    @staticmethod
    def _endpoint(description: str) -> IStreamServerEndpoint:
        from twisted.internet import reactor

        if description.isdigit():
            description = "tcp:" + description  # as twistd's old strports allowed
        try:
            endpoint = endpoints.serverFromString(reactor, description)
        except Exception as e:
            raise usage.UsageError(f"bad --port {description!r}: {e}") from None
        try:
            return endpoints.serverFromString(reactor, withBacklog(description))
        except Exception:
            # A backlog given by position: keep what was asked for.
            return endpoint

    @staticmethod
    def _maxSessions(realm: str, value: str | None) -> int | None:
        if realm != "limited":
            if value is not None:
                raise usage.UsageError(f"--max applies to --realm=limited only, not {realm!r}")
            return None
        if value is None:
            return 1
        try:
            limit = int(value)
        except ValueError:
            raise usage.UsageError(f"--max must be a whole number, not {value!r}") from None
        if limit < 1:
            raise usage.UsageError(f"--max must be 1 or more, not {limit}")
        return limit

    @staticmethod
    def _period(realm: str, value: str | None) -> float | None:
        if realm != "clock":
            if value is not None:
                raise usage.UsageError(f"--period applies to --realm=clock only, not {realm!r}")
            return None
        if value is None:
            return DEFAULT_PERIOD
        try:
            seconds = float(value)
        except ValueError:
            raise usage.UsageError(f"--period must be a number of seconds, not {value!r}") from None
        try:
            return validatePeriod(seconds)
        except InvalidPeriod as e:
            raise usage.UsageError(f"--{e.args[0]}") from None

    def _checker(self) -> tuple[ICredentialsChecker, bool]:
        checkers = self.get("credCheckers", [])
        if self["passwd"] and checkers:
            raise usage.UsageError("give --passwd or --auth, not both")
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
            raise usage.UsageError(str(e)) from None


class PBListener(service.Service):
    """
    Listens on an endpoint, says where, and stops listening when stopped.

    A failure to listen is raised from L{privilegedStartService}, so twistd
    exits instead of running without a port.
    """

    _log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: pb.PBServerFactory, description: str
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        failed = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failed.append)
        if failed:
            raise SystemExit(
                f"pbrealms: cannot listen on {self.description}: {failed[0].getErrorMessage()}"
            )

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        where = getattr(address, "port", None)
        host = getattr(address, "host", None) or getattr(address, "name", address)
        self._log.info(
            "pbrealms listening on {host}{sep}{port}",
            host=host,
            sep=":" if where is not None else "",
            port=where or "",
        )

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()


def wireSecurity() -> jelly.SecurityOptions:
    """
    What clients may send: basic types, references to their own objects (a
    mind) and to ours, and errors answering our pushes.  Nothing that builds
    instances of arbitrary classes, and an object of our own that no import
    can widen, unlike PB's process-wide default.
    """
    security = jelly.SecurityOptions()
    security.allowBasicTypes()
    security.allowTypes("remote", "local", qual(pb.CopyableFailure))
    return security


def makeService(options: Options) -> service.MultiService:
    """
    Build the server: a PB listener and, for a password file, its watcher.
    """
    from twisted.internet import reactor

    name = options["realm"]
    registry = SessionRegistry(reactor, realm=name, maxPerUser=options["max"])
    if REALMS[name] is ClockRealm:
        realm = ClockRealm(registry, reactor, options["period"])
    else:
        realm = REALMS[name](registry, reactor)
    checker = options["checker"]
    root = LoginRoot(checker, realm, registry)
    factory = pb.PBServerFactory(root, unsafeTracebacks=False, security=wireSecurity())
    factory.noisy = False

    server = service.MultiService()
    server.setName("pbrealms")
    listener = PBListener(options["endpoint"], factory, options["port"])
    listener.setName("pb-listener")
    listener.setServiceParent(server)
    if isinstance(checker, PasswordFile):
        if options["demo"]:
            _log.warn(
                "serving the demo users {users} from {path}; give --passwd FILE for real ones",
                users=", ".join(checker.users),
                path=checker.path,
            )
        else:
            watcher = internet.TimerService(1.0, checker.reloadIfChanged)
            watcher.setName("password-file-watcher")
            watcher.setServiceParent(server)
    return server
