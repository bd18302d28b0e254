"""
The service tree of C{twistd pbrealms}, built from its checked options: the
PB listener, the graceful shutdown of its sessions, and, as asked, the
metrics endpoint, the password hasher and the password file's watcher.
"""

from __future__ import annotations

import sys

from twisted.application import internet
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.spread import jelly

from pbrealms.checkers import PasswordFile
from pbrealms.environment import EnvironmentOptions
from pbrealms.guard import SourcePenalties
from pbrealms.hasher import PasswordHasher
from pbrealms.keepalive import Keepalive
from pbrealms.login import LoginRoot
from pbrealms.metrics import ServerMetrics
from pbrealms.metricsweb import metricsSite
from pbrealms.realms import REALMS
from pbrealms.service import (
    GracefulShutdown,
    Listener,
    ListenFailed,
    PBRealmsService,
    PBServerFactory,
)
from pbrealms.sessions import SessionRegistry

#: How twistd pbrealms begins the one line of a refusal to start.
ERROR_PREFIX = "twistd pbrealms: error: "

_log = Logger()


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


def makeService(options: EnvironmentOptions) -> PBRealmsService:
    """
    Build the server: a PB listener, the graceful shutdown of its sessions,
    and, as asked, the metrics endpoint and the password file's watcher.
    C{twistd pbrealms}'s entry point (see L{pbrealms.tap}).

    @param options: a L{pbrealms.tap.Options}, parsed and checked.
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
        reactor,
        metrics,
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
        children.append(("keepalive", Keepalive(registry, options["keepalive"], reactor)))
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
