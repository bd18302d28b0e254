"""
Limits on what a client may send, enforced while decoding.

Banana, PB's encoding, bounds one string or list length (640 KiB) but not a
message: a client can grow the server's memory without end, nest lists deep
enough to make the log of the resulting error enormous, and each decoding
error is logged as a traceback.  L{LimitedBroker} decodes the same wire format
with a cap on what one message costs in memory once decoded and on its
nesting depth, and answers any bad input by closing the connection with one
log line.  An answer or an error that is well formed but does not decode
fails only the call it answers.
"""

from __future__ import annotations

import contextlib
import struct
from typing import cast

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
from twisted.spread import jelly, pb
from zope.interface import implementer

from pbrealms import commands
from pbrealms.addresses import describeAddress
from pbrealms.connection import IConnection
from pbrealms.errors import MessageTooLarge, PagingRefused, UndecodableAnswer, printable

#: The defaults: the most bytes one incoming message may have, and how deep
#: its lists may nest.
MAX_MESSAGE_BYTES = 1 << 20
MAX_DEPTH = 64
READ_BUDGET = 4 * 1024

#: The default budget for bytes held in unfinished messages, all connections
#: together: the default per-address cap of connections not logged in (128)
#: times the default message size, so one address at its cap fits, while
#: 16,384 connections could otherwise hold 16 GiB.
MAX_UNFINISHED_BYTES = 128 << 20

#: Seconds a connection being closed has to read its last answer (a
#: refusal) and say goodbye, before it is aborted; also the time a
#: connection from a penalised address has to make its first call.
CLOSE_TIMEOUT = 5.0

_LIST, _INT, _STRING, _NEG, _FLOAT, _LONGINT, _LONGNEG, _VOCAB = range(0x80, 0x88)
# What a decoded item costs in memory, charged before it is built: CPython
# 3.11, 64-bit, the objects' sizes as sys.getsizeof gives them, and each
# block rounded up to 16 bytes as pymalloc does (tests/test_unfinished.py
# checks the charges against tracemalloc's blocks).
#: Every item's pointer in the list that holds it: 8 bytes, and 1 more for
#: the eighth that a growing list allocates ahead (list_resize).
_SLOT = 9
#: A string of n bytes costs ((n + _STRING_BASE) & -16) + _SLOT: its object
#: is 33 + n bytes (getsizeof(b"") == 33), rounded up to 16.  (Beyond
#: pymalloc's 512-byte blocks, malloc adds up to 16 bytes: under 3.4 %.)
_STRING_BASE = 33 + 15
#: A number whose item is n bytes on the wire (its type byte and n - 1
#: digits of 7 bits) costs ((n + _NUMBER_BASE) & -16) + _SLOT: an int is 28
#: bytes (getsizeof(1000)) and 4 more per 30 bits (at most 1 per digit), a
#: float 24 (getsizeof(1.0)).  Ints up to 256 are shared, as are
#: vocabulary words: those cost only their slot.
_NUMBER_BASE = 28 - 1 + 15
_SMALL_INT = 256
#: A list: its object (getsizeof([]) == 56 with the collector's header: a
#: block of 64), its array of pointers beyond the slots charged for its
#: items (list_resize allocates 4 slots at first and 6 ahead later: 48 bytes
#: cover it), and its slot.
_LIST_COST = 64 + 48 + _SLOT
#: What an unfinished list costs besides, until its last item: its entry on
#: listStack, a tuple (number, list) of 56 bytes (a block of 64), the
#: number (an int, 32), and the entry's pointer in listStack.
_OPEN_COST = 64 + 32 + 8

# The name pings are sent to.  No client has an object of that name, so
# every PB client answers at once with a "no such object" error, and logs
# nothing: PB has no ping of its own, and this needs no client object.
_PING = b"pbrealms.ping"

_log = Logger()
_NOTHING = object()
_DOUBLE = struct.Struct("!d")


class IBrokerTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    What a L{LimitedBroker} uses of its transport: TCP's, or TLS's over TCP,
    which also take a producer and pause and resume their reading (as
    Twisted's L{twisted.internet.abstract.FileDescriptor} does).
    """


class WireError(Exception):
    """
    A client sent something this server will not decode.
    """


class TooLarge(WireError):
    """
    A message would cost more than C{maxMessageBytes} once decoded.
    """


class UnfinishedBytes:
    """
    The bytes that a server's connections hold in messages not yet whole
    (what is decoded so far, at what it costs in memory, and what has
    arrived and waits to be decoded), against one budget for them all.

    Each connection stays within C{maxMessageBytes}, but many together could
    still hold more memory than the server has.  Beyond C{limit}, the
    connection holding the most is closed: it is the one that costs the
    most, and a client with a small message in progress is not hurt by
    another's large ones.

    @ivar total: the bytes held by all connections together.
    """

    def __init__(self, limit: int = MAX_UNFINISHED_BYTES) -> None:
        self.limit = limit
        self.total = 0
        self._held: dict[LimitedBroker, int] = {}

    def held(self, broker: LimitedBroker) -> int:
        """
        The bytes C{broker} holds, as it last said.
        """
        return self._held.get(broker, 0)

    def hold(self, broker: LimitedBroker, held: int) -> None:
        """
        Record that C{broker} now holds C{held} bytes (once per decoding turn,
        not per item); while all together hold more than C{limit}, close the
        connection holding the most, with one log line.
        """
        if not held and broker not in self._held:
            return  # nothing changes (and a closing broker says so again)
        before = self._held.pop(broker, 0)
        if held:
            self._held[broker] = held
        self.total += held - before
        while self.total > self.limit and self._held:
            # Only connections with a message in progress are listed: few,
            # unless the server is under attack, and then rarely.
            biggest = max(self._held, key=self._held.__getitem__)
            most = self._held.pop(biggest)
            self.total -= most
            biggest.refuse(
                f"unfinished messages held more than the server's {self.limit} bytes "
                f"(--max-unfinished-bytes), this connection the most ({most} bytes)"
            )


class _Unanswered:
    """
    A local object called by a client that wants no answer.
    """

    def __init__(self, target) -> None:
        self.target = target

    def remoteMessageReceived(self, broker, message, args, kw):
        result = self.target.remoteMessageReceived(broker, message, args, kw)
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda _: None)
        return result


def _undecodable(what: str, error: Exception) -> Failure:
    """
    The failure of a call whose C{what} ("an answer", "an error") did not
    decode, saying why in one line (the error's text may quote the peer).
    """
    if isinstance(error, jelly.InsecureJelly):
        # Jelly names a refused tag by itself, as bytes: b'module'.
        refused = error.args[0] if error.args else ""
        detail = printable(refused, 80)
        return Failure(UndecodableAnswer(f"{what} of a type the server refuses ({detail})"))
    detail = printable(str(error), 80)
    name = type(error).__name__
    return Failure(UndecodableAnswer(f"{what} that cannot be decoded ({name}: {detail})"))


@implementer(IConnection, IPushProducer)
class LimitedBroker(pb.Broker):
    """
    A client's connection (L{IConnection}): a PB broker that pings, drops and
    closes its connection for the rest of the server, that is its transport's
    producer (L{IPushProducer}, see L{connectionMade}), and whose decoder
    refuses a message larger than C{maxMessageBytes} or nested deeper than
    C{maxDepth}, before building anything from it.

    It reads from a buffer by position, so a large message costs linear time
    (Banana copies the rest of its buffer for every item).

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

    @property
    def _waiting(self) -> dict[int, defer.Deferred[object]] | None:
        """
        PB's calls that wait for an answer, by request id, from
        C{connectionMade} until C{connectionLost} (L{None} outside).
        """
        # pb.Broker declares it None in its class and sets it in methods
        # without annotations, so mypy sees only None.
        return cast("dict[int, defer.Deferred[object]] | None", self.waitingForAnswers)

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
            used = self._decode(pending, self.readBudget)
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

    def proto_message(self, requestID, objectID, message, answerRequired, netArgs, netKw):
        # PB logs a traceback for a field of the wrong type, once per message.
        problem = commands.checkMessage(
            requestID, objectID, message, answerRequired, netArgs, netKw
        )
        if problem is not None:
            raise WireError(problem)
        netKw = commands.unicodeNames(netKw)
        # A call that wants no answer (pbanswer=False) and fails would end as
        # an "Unhandled error in Deferred" traceback: its failure has been
        # dealt with (a refused login is logged), so let it go.
        find = self.localObjectForID if answerRequired else self._unanswered
        self._recvMessage(find, requestID, objectID, message, answerRequired, netArgs, netKw)

    def _unanswered(self, objectID):
        target = self.localObjectForID(objectID)
        return None if target is None else _Unanswered(target)

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

    def proto_cachemessage(self, *args) -> None:
        # pbrealms has no Cacheable: a client's cache message is never valid,
        # and PB would log a traceback for each one.
        raise WireError("a message to a cached object")

    def proto_didNotUnderstand(self, command) -> None:
        # PB logs each of these with the peer's text: a way to flood the log.
        pass

    # What follows checks each command's shape before PB acts on it (see
    # pbrealms.commands): PB logs a traceback for each one it cannot handle,
    # or leaves what waits for an answer unfired.

    def proto_answer(self, requestID, netResult) -> None:
        waiting = self._question(requestID, "an answer")
        self._checkReply(netResult)
        answered = waiting.pop(requestID)
        try:
            result = self.unserialize(netResult)
        except Exception as e:
            answered.errback(_undecodable("an answer", e))
        else:
            answered.callback(result)

    def proto_error(self, requestID, fail) -> None:
        waiting = self._question(requestID, "an error")
        self._checkReply(fail)
        waiting.pop(requestID).errback(self._receivedError(fail))

    def _question(self, requestID: object, what: str) -> dict[int, defer.Deferred[object]]:
        """
        The calls waiting for an answer, if C{requestID} is one of them;
        else raise L{WireError}.
        """
        waiting = self._waiting
        # None only once the connection is lost, when nothing is decoded.
        if waiting is None or type(requestID) is not int or requestID not in waiting:
            raise WireError(f"{what} to no question")
        return waiting

    def _checkReply(self, expression: object) -> None:
        # Only a shape that PB never builds closes the connection; what a
        # peer's PB builds but this side cannot decode (a Copyable, an old
        # Twisted's failure) fails the one call it answers.
        problem = commands.checkJelly(expression)
        if problem is not None:
            raise WireError(problem)

    def _receivedError(self, fail: object) -> Failure:
        """
        The failure that an C{error} command's C{fail} stands for: the
        peer's error as a L{pb.CopiedFailure} holding only its type, message
        and parents (see L{commands.receivedFailure}), or an
        L{UndecodableAnswer} if it is not one.  Python 2 peers send their
        failures' state with byte strings for keys: it decodes the same.
        """
        if not commands.isFailure(fail):
            # Stock PB sends a Copyable error as itself, not as a failure:
            # the jelly options refuse its class, as they refuse any other.
            try:
                self.unserialize(fail)
            except Exception as e:
                return _undecodable("an error", e)
            return Failure(UndecodableAnswer("an error that is not a failure"))
        try:
            # isFailure checked that it is [FAILURE, [b"dictionary", ...]].
            state = self.unserialize(cast("list[object]", fail)[1])
        except Exception as e:
            return _undecodable("an error", e)
        reason = commands.receivedFailure(state)
        if reason is None:
            return Failure(UndecodableAnswer("an error that is not a failure"))
        return reason

    def proto_decref(self, objectID) -> None:
        # The server's named objects (the root) are not counted.
        if type(objectID) is not int or objectID not in self.localObjects:
            raise WireError("a decref of no reference")
        super().proto_decref(objectID)

    def proto_decache(self, objectID) -> None:
        raise WireError("a decache of a cached object")

    def proto_uncache(self, objectID) -> None:
        raise WireError("an uncache of a cached object")

    def proto_version(self, vnum) -> None:
        if type(vnum) is not int or vnum != self.version:
            raise WireError(f"a PB version other than {self.version}")

    def _sendError(self, fail, requestID) -> None:
        # The one place PB sends errors: each carries only its type, parents
        # and message, whatever PB would copy of it (see
        # commands.failureState).
        state = commands.failureState(fail)
        self.sendCall(b"error", requestID, [commands.FAILURE, self.serialize(state)])

    def callExpressionReceived(self, obj) -> None:
        if self.currentDialect is None:
            if obj not in self.knownDialects:
                raise WireError("no dialect that PB speaks")
        else:
            problem = commands.checkCommand(obj)
            if problem is not None:
                raise WireError(problem)
        super().callExpressionReceived(obj)

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

    def _decode(self, buf: bytearray, budget: int) -> int:
        """
        Decode the whole items in C{buf}, passing each to L{gotItem}, until
        C{budget} bytes are used.

        Every item counts against C{maxMessageBytes} before it is built, by
        what it costs in memory once decoded (see L{_SLOT} and the others),
        not by its few bytes on the wire: a 2-byte string is 4 bytes there,
        and 57 in Python.  A string is refused as soon as its announced
        length is too much, before it arrives.  Decoding stops after a whole
        message if the input is refused or the write buffer is full: only a
        whole message can be answered.  (The loop keeps everything in local
        names: it runs for every item a client sends.)

        @return: how many bytes were used.
        """
        listStack = self.listStack
        gotItem = self.gotItem
        prefixLimit, sizeLimit = self.prefixLimit, self.sizeLimit
        # Banana's connectionMade sets it, before anything can arrive.
        assert prefixLimit is not None
        maxBytes, maxDepth = self.maxMessageBytes, self.maxDepth
        messageBytes = self._messageBytes
        end = len(buf)
        pos = 0
        while pos < end and pos < budget:
            start = scan = pos
            stop = min(end, pos + prefixLimit + 1)
            while scan < stop and buf[scan] < 0x80:
                scan += 1
            if scan == end:
                if scan - pos > prefixLimit:
                    raise WireError(f"a number longer than {prefixLimit} bytes")
                break  # the type byte has not arrived yet
            if scan - pos > prefixLimit:
                raise WireError(f"a number longer than {prefixLimit} bytes")
            if scan - pos == 1:
                num = buf[pos]
            else:
                num = 0
                for shift, digit in enumerate(buf[pos:scan]):
                    num |= digit << (7 * shift)
            kind = buf[scan]
            pos = scan + 1
            if kind == _STRING:
                if num > sizeLimit:
                    raise WireError(f"a string of {num} bytes")
                cost = ((num + _STRING_BASE) & -16) + _SLOT
            elif kind == _LIST:
                if num > sizeLimit:
                    raise WireError(f"a list of {num} items")
                if len(listStack) >= maxDepth:
                    raise WireError(f"a message nested deeper than {maxDepth} lists")
                cost = _LIST_COST + _OPEN_COST
            elif (kind == _INT and num <= _SMALL_INT) or kind == _VOCAB:
                cost = _SLOT
            else:
                cost = ((pos - start + _NUMBER_BASE) & -16) + _SLOT
            if messageBytes + cost > maxBytes:
                raise TooLarge(
                    f"a message that would cost more than {maxBytes} bytes of memory once "
                    "decoded (--max-message-size)"
                )
            if kind == _STRING:
                if end - pos < num:
                    pos = start  # wait for the rest of the string
                    break
                item: object = bytes(buf[pos : pos + num])
                pos += num
            elif kind == _LIST:
                listStack.append((num, []))
                item = _NOTHING
            elif kind == _INT or kind == _LONGINT:
                item = num
            elif kind == _NEG or kind == _LONGNEG:
                item = -num
            elif kind == _FLOAT:
                if end - pos < 8:
                    pos = start
                    break
                (item,) = _DOUBLE.unpack_from(buf, pos)
                pos += 8
            elif kind == _VOCAB:
                if self.currentDialect != b"pb" or num not in self.incomingVocabulary:
                    raise WireError(f"unknown vocabulary word {num}")
                item = self.incomingVocabulary[num]
            else:
                raise WireError(f"unknown type byte {kind:#04x}")
            messageBytes += cost
            if item is not _NOTHING:
                gotItem(item)
            while listStack and len(listStack[-1][1]) == listStack[-1][0]:
                gotItem(listStack.pop()[1])
                messageBytes -= _OPEN_COST  # its entry on listStack is gone
            if not listStack:
                messageBytes = 0
                if self._refused or self.writeBlocked:
                    break
        self._messageBytes = messageBytes
        return pos
