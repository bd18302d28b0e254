"""
The broker that owns a client's connection: limits on what a client may
send, enforced while decoding, the read budget, output backpressure, ping,
drop and graceful close.

Banana, PB's encoding, bounds one string or list length (640 KiB) but not a
message: a client can grow the server's memory without end, nest lists deep
enough to make the log of the resulting error enormous, and each decoding
error is logged as a traceback.  L{LimitedBroker} decodes the same wire format
(with L{pbrealms.decoder}) with a cap on what one message costs in memory
once decoded and on its nesting depth, and answers any bad input by closing
the connection with one log line.  An answer or an error that is well formed
but does not decode fails only the call it answers (see
L{pbrealms.checkedbroker}).
"""

from __future__ import annotations

import contextlib

from twisted.internet import defer, protocol
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from pbrealms import commands
from pbrealms.addresses import describeAddress
from pbrealms.checkedbroker import CheckedBroker
from pbrealms.connection import IConnection
from pbrealms.decoder import TooLarge, WireError, decode
from pbrealms.errors import MessageTooLarge, PagingRefused, printable
from pbrealms.unfinished import UnfinishedBytes

#: The defaults: the most bytes one incoming message may have, and how deep
#: its lists may nest.
MAX_MESSAGE_BYTES = 1 << 20
MAX_DEPTH = 64
READ_BUDGET = 4 * 1024

#: Seconds a connection being closed has to read its last answer (a
#: refusal) and say goodbye, before it is aborted; also the time a
#: connection from a penalised address has to make its first call.
CLOSE_TIMEOUT = 5.0

# The name pings are sent to.  No client has an object of that name, so
# every PB client answers at once with a "no such object" error, and logs
# nothing: PB has no ping of its own, and this needs no client object.
_PING = b"pbrealms.ping"

_log = Logger()


class IBrokerTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    What a L{LimitedBroker} uses of its transport: TCP's, or TLS's over TCP,
    which also take a producer and pause and resume their reading (as
    Twisted's L{twisted.internet.abstract.FileDescriptor} does).
    """


@implementer(IConnection, IPushProducer)
class LimitedBroker(CheckedBroker):
    """
    A client's connection (L{IConnection}): a PB broker that pings, drops and
    closes its connection for the rest of the server, that is its transport's
    producer (L{IPushProducer}, see L{connectionMade}), and whose decoder
    refuses a message larger than C{maxMessageBytes} or nested deeper than
    C{maxDepth}, before building anything from it (L{decode}), as its base
    (L{CheckedBroker}) refuses a command of the wrong shape.

    Its decoder reads from a buffer by position, so a large message costs
    linear time (Banana copies the rest of its buffer for every item).

    Reading follows one rule (L{_steer}): nothing is decoded once input is
    refused or ignored; otherwise, while the transport's write buffer is full
    (the client does not read its answers), nothing is decoded, not even
    what has arrived, and the transport is read only while less than
    C{readBudget} bytes wait, until the buffer has drained; while a turn's
    budget is used up, the transport is not read and the rest is decoded in
    the next turn; else the transport is read and what arrives is decoded at
    once.
    """

    maxMessageBytes = MAX_MESSAGE_BYTES
    maxDepth = MAX_DEPTH
    #: Bytes decoded in one turn of the reactor; the rest waits for the next
    #: turn, with reading paused, so that one client cannot monopolise it.
    readBudget = READ_BUDGET
    #: The server-wide account of bytes held in unfinished messages, if any.
    unfinished: UnfinishedBytes | None = None

    #: Whether input is refused or ignored: nothing more is decoded.
    _refused = False
    #: Whether input is left that the last turn did not get to.
    _backlog = False
    #: Whether this broker has paused its transport's reading.
    _paused = False
    #: The next decoding turn, while one is due.
    _next: IDelayedCall | None = None
    #: Whether the transport's write buffer is full: one-way pushes skip,
    #: and nothing more is decoded.
    writeBlocked = False
    #: The abort of a connection given time to read its last answer.
    _abort: IDelayedCall | None = None
    #: Where the abort of a closing connection is scheduled; None for the
    #: global reactor.
    clock: IReactorTime | None = None
    #: Whether bad input closes the connection without a log line: set for
    #: a connection that is only being turned away (its address is
    #: penalised), whose each line would be the attacker's to write.
    quiet = False
    #: Bytes that arrived since input was refused, read only to be dropped.
    _discarded = 0
    #: Whether drop() was called: the connection counts as gone at once.
    _dropped = False
    transport: IBrokerTransport | None

    @property
    def _transport(self) -> IBrokerTransport:
        """
        The transport, for what runs once the connection is made: it is set
        before C{connectionMade} and never unset, not even once it is lost.
        """
        assert self.transport is not None
        return self.transport

    def connectionMade(self) -> None:
        self._pending = bytearray()
        self._messageBytes = 0
        # Keepalive, so that the kernel notices a peer that vanished (a dead
        # NAT) even when the server has nothing to send.  No delay, because
        # pushes that ask for no answer would otherwise wait for the
        # client's delayed ACK (up to 40 ms) behind Nagle's algorithm.  Not
        # every transport or socket family has the options; none needs them.
        for option in ("setTcpKeepAlive", "setTcpNoDelay"):
            setOption = getattr(self.transport, option, None)
            if setOption is not None:
                with contextlib.suppress(OSError):
                    setOption(True)
        # The transport tells its producer when its write buffer is full
        # (more than its bufferSize, 64 KiB, beyond what the kernel holds),
        # and when it has drained: reading waits for that, and pushes that
        # need no answer skip.  TLS passes both on from the TCP transport.
        self._transport.registerProducer(self, True)
        super().connectionMade()

    def pauseProducing(self) -> None:
        # Called on every write while the buffer is full: cheap when so.
        self.writeBlocked = True
        self._steer()

    def resumeProducing(self) -> None:
        self.writeBlocked = False
        # What arrived before the pause may hold whole messages.
        self._backlog = bool(self._pending)
        self._steer()

    def stopProducing(self) -> None:
        self.writeBlocked = True
        self._steer()

    #: Whether the transport was made (BaseProtocol sets C{connected}).
    _made = False

    @property  # type: ignore[override]
    def connected(self) -> bool:
        return self._made and not (self.disconnected or self._dropped)

    @connected.setter
    def connected(self, made: bool) -> None:
        self._made = bool(made)

    def ping(self, timeout: float | None = None) -> defer.Deferred[bool]:
        if self.disconnected:
            return defer.succeed(False)
        d = self.remoteForName(_PING).callRemote("ping")
        if timeout is not None:
            d.addTimeout(timeout, self._clock())
        # An error is an answer too; only a lost connection or silence is not.
        return d.addCallbacks(
            lambda _: True,
            lambda f: not f.check(pb.PBConnectionLost, pb.DeadReferenceError, defer.TimeoutError),
        )

    def drop(self) -> None:
        if self._dropped or self.disconnected:
            return
        self._dropped = True
        self.ignoreInput()
        self._transport.abortConnection()

    def _clock(self) -> IReactorTime:
        if self.clock is not None:
            return self.clock
        from twisted.internet import reactor

        return reactor

    def closeGracefully(self) -> None:
        """
        Close the connection once what is buffered has been written, and
        decode nothing more.  The broker stops being its transport's producer
        first: a transport with a producer waits for it (TLS never shuts
        down, TCP resumes the producer instead of closing).
        """
        self.writeBlocked = True
        self.ignoreInput()
        if self.disconnected:
            return  # aborted meanwhile (see dataReceived): TLS has no state left
        self._transport.unregisterProducer()
        self._transport.loseConnection()

    def closeAfterAnswer(self) -> None:
        """
        Close gracefully (L{closeGracefully}), and abort the connection if
        it is still open after L{CLOSE_TIMEOUT} seconds: a peer that neither
        reads what is left nor closes (TLS waits for its close_notify) would
        otherwise hold it for ever.
        """
        if self._abort is None and not self.disconnected:
            self._abort = self._clock().callLater(CLOSE_TIMEOUT, self._transport.abortConnection)
        self.closeGracefully()

    def registerPageProducer(self, pager) -> None:
        # PB's pages would take the transport's producer slot, which is ours
        # (see connectionMade).  Raised in the remote method that made the
        # pager, this answers its caller as a typed error, logged by no one.
        raise PagingRefused()

    def dataReceived(self, chunk: bytes) -> None:
        if self._refused:
            # Read to be dropped, while a graceful close waits for the peer's
            # end (TLS decrypts all that comes before its close_notify): at
            # most the rest of one message, then the connection is aborted.
            self._discarded += len(chunk)
            if self._discarded > self.maxMessageBytes and not self.disconnected:
                self._transport.abortConnection()
            return
        self._pending += chunk
        if self._next is None and not self.writeBlocked:
            self._drain()
            return
        # Decoding waits: for the next turn, or for the write buffer.
        if self.unfinished is not None:
            self.unfinished.hold(self, self._messageBytes + len(self._pending))
        if self.writeBlocked:
            self._steer()

    def _drain(self) -> None:
        """
        One decoding turn: decode up to C{readBudget} bytes of what has
        arrived, tell the server-wide account what is held now, and steer.
        """
        self._next = None
        pending = self._pending
        try:
            used = decode(self, pending, self.readBudget)
        except TooLarge as e:
            self._tooLarge(str(e))
            return
        except WireError as e:
            self.refuse(str(e))
            return
        except Exception as e:
            # What Banana or PB raise about a malformed message.
            self.refuse(f"malformed message ({type(e).__name__}: {printable(str(e), 80)})")
            return
        del pending[:used]
        if self._refused or self.disconnected:
            return
        # Decoding stops early at a full write buffer: the rest waits too.
        self._backlog = bool(pending) and (used >= self.readBudget or self.writeBlocked)
        if self.unfinished is not None:
            self.unfinished.hold(self, self._messageBytes + len(pending))
            if self._refused:
                return  # this connection held the most
        self._steer()

    def _steer(self) -> None:
        """
        Make the transport's reading and the next decoding turn follow the
        state (see the class's docstring): the one place that changes them.
        """
        if self._refused:
            # Read on, decoding nothing: a graceful close (TLS's included)
            # needs to read the peer's end.
            turn, read = False, True
        elif self.writeBlocked:
            # Nothing is decoded; up to a turn's budget more is read, because
            # TLS must read to send (its handshake, before which it holds
            # what is written and says its buffer is full).
            turn, read = False, len(self._pending) < self.readBudget
        else:
            turn, read = self._backlog, not self._backlog
        if turn:
            if self._next is None:
                from twisted.internet import reactor

                self._next = reactor.callLater(0, self._drain)
        elif self._next is not None:
            self._next.cancel()
            self._next = None
        if read == self._paused:
            self._paused = not read
            if read:
                self._transport.resumeProducing()
            else:
                self._transport.pauseProducing()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.ignoreInput()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        super().connectionLost(reason)

    def ignoreInput(self) -> None:
        """
        Decode nothing more from this connection, even what has arrived, and
        let go of that (a new buffer: a turn may be decoding the old one).
        What it holds counts no more; it is gone when the connection is.
        """
        self._refused = True
        self._pending = bytearray()
        # The partial message too, which would otherwise stay uncounted until
        # the connection is gone (a graceful close may take a while).
        self.listStack = []
        self._messageBytes = 0
        if self.unfinished is not None:
            self.unfinished.hold(self, 0)
        self._steer()

    def refuse(self, reason: str) -> None:
        """
        Abort the connection, logging why in one line, unless it is L{quiet}
        or its input was refused already (it is being closed, and that has
        been said): then it is only aborted.
        """
        if not self._silenced():
            peer = describeAddress(self._transport.getPeer())
            _log.info("closed the connection from {peer}: {reason}", peer=peer, reason=reason)
        self.ignoreInput()
        self._transport.abortConnection()

    def _silenced(self) -> bool:
        return self.quiet or self._refused

    def _tooLarge(self, reason: str) -> None:
        """
        Refuse an oversized message, logging why in one line.  If its request
        id is decoded already, and it wants an answer, answer it with
        L{MessageTooLarge} and close once that is written, giving the client
        L{CLOSE_TIMEOUT} seconds to read it: the rest of its message is read
        and dropped meanwhile (up to C{maxMessageBytes} more), never decoded.
        (The stream cannot be resumed mid-message: what follows is its rest,
        of unknown shape.)
        """
        requestID = commands.unfinishedRequest(self.listStack)
        if requestID is None or self._silenced():
            self.refuse(reason)
            return
        self.ignoreInput()
        peer = describeAddress(self._transport.getPeer())
        _log.info("closed the connection from {peer}: {reason}", peer=peer, reason=reason)
        self._sendError(MessageTooLarge(self.maxMessageBytes), requestID)
        self.closeAfterAnswer()
