"""
The HTTP site of the metrics endpoint, for a port anyone may reach: caps on
its connections, in all and per address, an idle timeout, and one request
rendered per turn of the reactor.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IDelayedCall, ISystemHandle, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import basic
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from pbrealms.addresses import sourceOf

#: The most HTTP connections open at once on the metrics endpoint.  At it, a
#: new one takes the place of the oldest idle connection of the address that
#: holds the most, if that address holds more than the new one's; otherwise
#: the new one is closed as it is accepted.
MAX_HTTP_CONNECTIONS = 32

#: The most HTTP connections one address may hold on the metrics endpoint;
#: beyond it its new ones are closed as they are accepted.
MAX_HTTP_CONNECTIONS_PER_SOURCE = 4

#: Seconds an HTTP connection may go without sending a whole request, from
#: when it opened or its last answer was sent.  Bytes that do not complete a
#: request do not count: a client trickling a header is closed like an idle
#: one.
HTTP_IDLE_TIMEOUT = 30.0

_SAFE_METHODS = (b"GET", b"HEAD")

#: The kernel's send buffer of an HTTP connection (Linux doubles it).
_SEND_BUFFER = 64 * 1024


class _Channel(http.HTTPChannel):
    """
    An HTTP/1.1 connection to a read-only site, on a port anyone may reach.

      - A request with a body (C{Content-Length} above 0, or any
        C{Transfer-Encoding}) is answered 413, and one with a method other
        than GET or HEAD 405, as soon as its headers say so, and the
        connection is closed: no byte of a body is read, nothing is spooled.
      - One request at a time (as L{http.HTTPChannel}), and nothing read
        from the connection until it is answered.  While the transport holds
        more unsent output than its buffer size (64 KiB), nothing is read and
        no request already read is parsed, until all is sent.  Stock
        L{http.HTTPChannel} keeps reading while it answers, and parses what
        it buffered at once even with the buffer full, so that the answers
        to pipelined requests pile up.
      - The idle timeout (C{timeOut}) runs from the connection or the last
        answer until a request is complete; partial requests do not reset
        it.  At the timeout a connection that still has unsent output (its
        peer stopped reading) is aborted at once; another is closed, and
        aborted C{abortTimeout} seconds later if it is still there.
    """

    abortTimeout = 5
    _refused = False
    #: The address it comes from, as L{sourceOf} gives it.
    source = ""
    #: Set by the site as it builds the channel.
    site: MetricsSite
    # What the site's endpoints give (a TCP or UNIX socket, or TLS over one):
    # each provides ITCPTransport, whose abortConnection this calls.
    transport: ITCPTransport | None
    # A finished request whose connection waits for the transport to drain
    # before it goes on to the next one.
    _held: http.Request | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Linux grows a socket's send buffer up to 4 MiB for a peer that does
        # not read; a fixed one keeps what such a peer holds small.
        system = ISystemHandle(self.transport, None)
        if system is None:
            return  # not a socket of ours (a test transport, say)
        handle = system.getHandle()
        if isinstance(handle, socket.socket):  # TLS's is its OpenSSL connection
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        # Not HTTPChannel.dataReceived: it resets the idle timeout on any byte.
        if not self._refused:
            basic.LineReceiver.dataReceived(self, data)

    def headerReceived(self, line: bytes) -> bool:
        if self._command not in _SAFE_METHODS:
            return self._refuse(405, b"Allow: GET, HEAD\r\n", b"only GET and HEAD are served")
        if not super().headerReceived(line):
            return False
        # Content-Length has set self.length; Transfer-Encoding: chunked set
        # it to None, and any other coding is refused here too.
        if self.length != 0 or self.requests[-1].requestHeaders.hasHeader(b"transfer-encoding"):
            return self._refuse(413, b"", b"requests with a body are not accepted")
        return True

    def allHeadersReceived(self) -> None:
        # A request without headers reaches here without headerReceived.
        if self._command not in _SAFE_METHODS:
            self._refuse(405, b"Allow: GET, HEAD\r\n", b"only GET and HEAD are served")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()
            # Read nothing until it is answered (requestDone resumes): not
            # even the end of a client that half-closed after its request,
            # which would drop it while it waits for its turn.
            self._networkProducer.pauseProducing()

    def _refuse(self, code: int, headers: bytes, why: bytes) -> bool:
        """
        Answer C{code} with the one line C{why}, and close the connection.
        No request is being handled: their headers are parsed only between
        requests.
        """
        self._refused = True
        body = why + b"\n"
        assert self.transport is not None  # called on data received
        self.transport.writeSequence(
            [
                b"HTTP/1.1 %d %s\r\n" % (code, http.RESPONSES[code]),
                b"Connection: close\r\nContent-Type: text/plain; charset=utf-8\r\n",
                b"Content-Length: %d\r\n" % len(body),
                headers,
                b"\r\n",
                body,
            ]
        )
        self.loseConnection()
        return False

    def pauseProducing(self) -> None:
        super().pauseProducing()
        # Stock pauses reading only if no request is being handled.
        self._networkProducer.pauseProducing()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        held, self._held = self._held, None
        if held is not None:
            super().requestDone(held)

    def requestDone(self, request: http.Request) -> None:
        if self.persistent and self._waitingForTransport:
            # Go on once the transport has sent it all (resumeProducing);
            # the wait counts as idle.
            self._held = request
            self._idleFromNow()
            return
        super().requestDone(request)
        if not self.persistent:
            # Closing: a peer that does not read the rest is aborted at the
            # timeout (stock cancels it for the request and never restarts it).
            self._idleFromNow()

    def _idleFromNow(self) -> None:
        if self._savedTimeOut:
            self.setTimeout(self._savedTimeOut)

    def timeoutConnection(self) -> None:
        # Stock logs a line and waits abortTimeout even for a peer known not
        # to read.
        assert self.transport is not None  # the timeout stops when the connection is lost
        if self._waitingForTransport or getattr(self.transport, "disconnecting", False):
            self.transport.abortConnection()
            return
        self._abortingCall = self.callLater(self.abortTimeout, self._abort)
        self.loseConnection()

    def _abort(self) -> None:
        self._abortingCall = None  # called: connectionLost must not cancel it
        assert self.transport is not None  # connectionLost cancels this call
        self.transport.abortConnection()

    @property
    def idle(self) -> bool:
        """
        Whether no request is being answered.  A partial request counts as
        idle, as for the idle timeout.
        """
        return not self._handlingRequest

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.site.closed(self)


class _Request(server.Request):
    """
    A request that waits for its turn on its site (L{MetricsSite.serve})
    before it is rendered.
    """

    #: A channel of L{MetricsSite}, which alone makes these requests.
    channel: _Channel

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        proceed = super().requestReceived
        self.channel.site.serve(self, lambda: proceed(command, path, version))


class MetricsSite(server.Site):
    """
    The site of the metrics endpoint, for an exposed port: it holds at most
    C{maxPerSource} connections (L{_Channel}) from one address and
    C{maxConnections} in all, and renders at most one request per turn of
    the reactor, in the order they came, so that clients of this port cannot
    take the reactor from PB clients, however many requests they pipeline.
    It logs no line per request: a scraper calls every few seconds.

    A new connection beyond its address's cap is closed as it is accepted.
    One at the total cap takes the place of the oldest idle connection of
    the address that holds the most, if that address holds more than the
    new one's (so that a few addresses cannot keep C{/healthz} out);
    otherwise it is closed as it is accepted.

    @ivar channels: the open connections.
    """

    noisy = False
    # Twisted types HTTPFactory.protocol as its HTTP/1.1-or-2 wrapper; a Site
    # takes any HTTPChannel, and this one serves only HTTP/1.1.
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request
    _log = Logger()

    def __init__(
        self,
        root: resource.IResource,
        maxConnections: int = MAX_HTTP_CONNECTIONS,
        timeout: float | None = HTTP_IDLE_TIMEOUT,
        maxPerSource: int = MAX_HTTP_CONNECTIONS_PER_SOURCE,
        **kwargs: object,
    ) -> None:
        super().__init__(root, timeout=timeout, **kwargs)
        self.maxConnections = maxConnections
        self.maxPerSource = maxPerSource
        self.channels: set[_Channel] = set()
        # Each address's connections, oldest first.
        self._bySource: dict[str, list[_Channel]] = {}
        self._turns: deque[tuple[http.Request, Callable[[], object]]] = deque()
        self._nextTurn: IDelayedCall | None = None
        self._refusing = self._refusingSource = False

    # As for protocol: Twisted types the result as its HTTP/1.1-or-2 wrapper.
    def buildProtocol(self, addr: IAddress | None) -> _Channel | None:  # type: ignore[override]
        source = sourceOf(addr)
        held = self._bySource.get(source, [])
        if len(held) >= self.maxPerSource:
            if not self._refusingSource:
                # Once, until the endpoint has been full and half its
                # connections have closed, as below: a client that
                # reconnects does not flood the log.
                self._refusingSource = True
                self._log.warn(
                    "metrics: {source} holds {count} HTTP connections, closing its new ones",
                    source=source,
                    count=self.maxPerSource,
                )
            return None  # closed as it is accepted
        if len(self.channels) >= self.maxConnections:
            if not self._refusing:
                # Once, until half the connections have closed: a client
                # that keeps the endpoint full does not flood the log.
                self._refusing = True
                self._log.warn(
                    "metrics: {count} HTTP connections open, new ones take the place of "
                    "idle ones of the address that holds the most, or are closed",
                    count=self.maxConnections,
                )
            most = max(self._bySource.values(), key=len, default=[])
            idle = [c for c in most if c.idle] if len(most) > len(held) else []
            if not idle:
                return None  # closed as it is accepted
            assert idle[0].transport is not None  # lost ones are untracked
            idle[0].transport.abortConnection()  # idle: no answer is cut short
            self._untrack(idle[0])
        channel = super().buildProtocol(addr)
        channel.source = source
        self.channels.add(channel)
        self._bySource.setdefault(source, []).append(channel)
        return channel

    def closed(self, channel: _Channel) -> None:
        self._untrack(channel)
        if self._refusing and len(self.channels) <= self.maxConnections // 2:
            self._refusing = self._refusingSource = False

    def _untrack(self, channel: _Channel) -> None:
        # Twice for a connection replaced (now, and when it is lost).
        if channel in self.channels:
            self.channels.remove(channel)
            held = self._bySource[channel.source]
            held.remove(channel)
            if not held:
                del self._bySource[channel.source]

    def serve(self, request: http.Request, render: Callable[[], object]) -> None:
        """
        Call C{render} on a later turn of the reactor than any request
        queued before, unless C{request}'s connection has closed by then.
        """
        self._turns.append((request, render))
        if self._nextTurn is None:
            self._nextTurn = self.reactor.callLater(0, self._serveOne)

    def _serveOne(self) -> None:
        # _nextTurn stays set meanwhile: a request that rendering queues (the
        # next one pipelined on its connection) waits for the turn after.
        try:
            while self._turns:
                request, render = self._turns.popleft()
                if request.channel is not None:  # None once its connection is lost
                    render()
                    break
        finally:
            self._nextTurn = self.reactor.callLater(0, self._serveOne) if self._turns else None

    def log(self, request) -> None:
        pass
