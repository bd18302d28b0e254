"""
The running server: the listener, its connections, readiness, and the
graceful shutdown.
"""

from __future__ import annotations

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from pbrealms.addresses import describeAddress, sourceOf
from pbrealms.descriptors import MAKING_ROOM
from pbrealms.hasher import PasswordHasher
from pbrealms.login import LoginRoot
from pbrealms.notify import notify
from pbrealms.sessions import SessionRegistry
from pbrealms.unfinished import MAX_UNFINISHED_BYTES, UnfinishedBytes
from pbrealms.wire import MAX_DEPTH, MAX_MESSAGE_BYTES, LimitedBroker

_log = Logger()


class PBServerFactory(pb.PBServerFactory):
    """
    PB's server factory, with brokers that limit what clients may send
    (L{LimitedBroker}), keeping the connections it made so that they can be
    counted and closed, and closing those that the login root does not
    admit as they are accepted (see L{LoginRoot.admits}).

    @ivar brokers: the open connections.
    @ivar unfinished: the bytes they hold in unfinished messages, against
        the server's budget for them.
    """

    noisy = False
    protocol = LimitedBroker
    # pb.PBServerFactory keeps IPBRoot(root): the root itself, which provides it.
    root: LoginRoot

    def __init__(
        self,
        root: LoginRoot,
        security,
        maxConnections: int | None = None,
        maxMessageBytes: int = MAX_MESSAGE_BYTES,
        maxDepth: int = MAX_DEPTH,
        maxUnfinishedBytes: int = MAX_UNFINISHED_BYTES,
    ) -> None:
        super().__init__(root, unsafeTracebacks=False, security=security)
        self.maxConnections = maxConnections
        self.maxMessageBytes = maxMessageBytes
        self.maxDepth = maxDepth
        self.unfinished = UnfinishedBytes(maxUnfinishedBytes)
        self.brokers: set[LimitedBroker] = set()

    def buildProtocol(self, addr: IAddress | None) -> LimitedBroker | None:
        # Returning None closes the connection as it is accepted.
        host = sourceOf(addr)
        if not self.root.admits(host):
            return None
        if self.maxConnections is not None and len(self.brokers) >= self.maxConnections:
            # At the cap, a newcomer may take the place of a connection that
            # has not logged in (see WaitingRoom); those closing keep their
            # descriptor until the next turn, so few at a time.
            full = len(self.brokers) >= self.maxConnections + MAKING_ROOM
            if full or not self.root.waiting.makeRoom(host):
                return None
        broker: LimitedBroker = super().buildProtocol(addr)
        broker.maxMessageBytes, broker.maxDepth = self.maxMessageBytes, self.maxDepth
        broker.unfinished = self.unfinished
        broker.localObjectForID(b"root").watch(host)  # the login gate
        self.brokers.add(broker)
        broker.notifyOnDisconnect(lambda: self.brokers.discard(broker))
        return broker


@implementer(IStreamServerEndpoint)
class _Reporting:
    """
    A L{Listener}'s endpoint: the one it was given, whose listening it
    reports to the listener before Twisted's service sees the result.

    @ivar wrapped: the endpoint given.
    """

    def __init__(self, wrapped: IStreamServerEndpoint, listener: Listener) -> None:
        self.wrapped = wrapped
        self.listener = listener

    def listen(self, factory: IProtocolFactory) -> defer.Deferred:
        listening = self.wrapped.listen(factory)
        # The same Deferred, so that stopService can cancel a pending listen.
        return listening.addCallbacks(self.listener._listened, self.listener._failed)


class Listener(internet.StreamServerEndpointService):
    """
    Twisted's endpoint service, which also says where it listens, keeps its
    port for whoever asks whether it listens, and reports a failure in one
    line.  Like Twisted's, it cancels a listen still pending when stopped.

    A failure to listen at once raises L{ListenFailed} from
    L{privilegedStartService} (twistd's start then stops with its one line,
    see L{pbrealms.servicetree.TwistdService}), instead of running without
    a port.  A failure later is logged in one line.

    @ivar port: the listening port, from when it listens until the stop.
    @ivar label: what listens, for the log line.
    @ivar option: the option that gave the endpoint, for the error.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        description: str,
        label: str = "pbrealms",
        option: str = "--port",
    ) -> None:
        super().__init__(_Reporting(endpoint, self), factory)
        self.description = description
        self.label = label
        self.option = option
        self.port: IListeningPort | None = None
        self._starting = False
        self._failedAtStart: Failure | None = None

    def privilegedStartService(self) -> None:
        self._starting = True
        try:
            super().privilegedStartService()
        finally:
            self._starting = False
        failed, self._failedAtStart = self._failedAtStart, None
        if failed is not None:
            raise ListenFailed(
                f"cannot listen on {self.description} ({self.option}): {listenError(failed)}"
            )

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        from twisted.internet import reactor

        # Said once the reactor runs, when a signal can stop the server cleanly.
        reactor.callWhenRunning(
            _log.info,
            "{label} listening on {where}",
            label=self.label,
            where=describeAddress(port.getHost()),
        )
        return port

    def _failed(self, reason: Failure) -> Failure | None:
        if reason.check(defer.CancelledError):
            return reason  # stopped while pending: Twisted's service drops it
        if self._starting:
            self._failedAtStart = reason
            return None
        _log.error(
            "{label}: cannot listen on {where} ({option}): {error}",
            label=self.label,
            where=self.description,
            option=self.option,
            error=listenError(reason),
        )
        return None

    def stopService(self) -> defer.Deferred:
        self.port = None
        return super().stopService()


class ListenFailed(Exception):
    """
    A L{Listener} could not listen as it started.  Its one argument is the
    line for a person: where, which option gave it, and the system's reason.
    """


def listenError(failure: Failure) -> str:
    """
    Why listening failed (C{failure}), as the system said it: C{address
    already in use}, without Twisted's repetition of the address.
    """
    error = failure.value
    if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
        # "Address already in use" reads as part of the line; "IPv6 ..." keeps its case.
        return reason[0].lower() + reason[1:] if reason[1:2].islower() else reason
    return str(error) or type(error).__name__


class GracefulShutdown(service.Service):
    """
    On stop: tell every session that has a mind that the server is shutting
    down, give the answers (and so the calls before them) up to C{grace}
    seconds, then close every connection.  Each session then ends through its
    disconnect, exactly once.
    """

    reason = "the server is shutting down"

    def __init__(
        self,
        clock: IReactorTime,
        registry: SessionRegistry,
        factory: PBServerFactory,
        grace: float,
        hasher: PasswordHasher | None = None,
    ) -> None:
        """
        @param hasher: closed as the stop begins, so that the password checks
            not yet started are dropped, and those under way have the grace
            to finish.
        """
        self.clock = clock
        self.registry = registry
        self.factory = factory
        self.grace = grace
        self.hasher = hasher

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self.registry.closing = True
        if self.hasher is not None:
            self.hasher.close()
        clients = [s.client for s in self.registry if s.client is not None]
        if clients:
            _log.info(
                "shutting down: telling {told} session{s}, waiting up to {grace:g} s for answers",
                told=len(clients),
                s="" if len(clients) == 1 else "s",
                grace=self.grace,
            )
        # Best effort: a client object need not know notifyShutdown.
        told = defer.DeferredList([client.notifyShutdown(self.reason) for client in clients])
        told.addTimeout(self.grace, self.clock)
        told.addErrback(lambda f: f.trap(defer.TimeoutError))
        yield told
        yield self._closeConnections()

    def _closeConnections(self) -> defer.Deferred:
        brokers = list(self.factory.brokers)
        closed = []
        for broker in brokers:
            d: defer.Deferred = defer.Deferred()
            broker.notifyOnDisconnect(lambda d=d: d.callback(None))
            closed.append(d)
            # A peer that stopped reading would never let loseConnection finish.
            # (Each broker here is connected: it leaves the set as it is lost.)
            assert broker.transport is not None
            broker.transport.abortConnection()
        return defer.gatherResults(closed)


class PBRealmsService(service.MultiService):
    """
    The whole server.  It tells systemd (when started by it) that it is ready
    once its port listens, and that it is stopping when it stops.  Its
    children stop one after the other, last added first: the PB listener is
    added last, so that it stops accepting first, and the metrics endpoint
    first, so that its health check answers 503 for the whole shutdown.

    @ivar stopping: whether a stop has begun; health checks fail from then on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setName("pbrealms")
        self.stopping = False

    @property
    def listening(self) -> bool:
        listener = self.getServiceNamed("pb-listener")
        return listener.port is not None and not self.stopping

    def startService(self) -> None:
        from twisted.internet import reactor

        super().startService()
        # Ready once the reactor runs: before, twistd has no SIGTERM handler
        # yet, and a stop would kill the process instead of shutting it down.
        reactor.callWhenRunning(self._ready)

    def _ready(self) -> None:
        if self.listening:
            notify("READY=1")

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True
        notify("STOPPING=1")
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                yield child.stopService()
            except Exception:
                _log.failure("error while stopping {name}", name=child.name)
