"""
Limits on what a client may send, enforced while decoding.

Banana, PB's encoding, bounds one string or list length (640 KiB) but not a
message: a client can grow the server's memory without end, nest lists deep
enough to make the log of the resulting error enormous, and each decoding
error is logged as a traceback.  L{LimitedBroker} decodes the same wire format
with a cap on the bytes of one message and on its nesting depth, and answers
any bad input by aborting the connection with one log line.
"""

from __future__ import annotations

import contextlib
import struct

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.spread import pb

from pbrealms.addresses import describeAddress

#: The defaults: the most bytes one incoming message may have, and how deep
#: its lists may nest.
MAX_MESSAGE_BYTES = 1 << 20
MAX_DEPTH = 64
READ_BUDGET = 4 * 1024

_LIST, _INT, _STRING, _NEG, _FLOAT, _LONGINT, _LONGNEG, _VOCAB = range(0x80, 0x88)
#: What a decoded list and a decoded number cost at least, in bytes of memory.
_LIST_COST = 64
_ITEM_COST = 16

_log = Logger()
_NOTHING = object()
_DOUBLE = struct.Struct("!d")


class WireError(Exception):
    """
    A client sent something this server will not decode.
    """


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


class LimitedBroker(pb.Broker):
    """
    A PB broker whose decoder refuses a message larger than C{maxMessageBytes}
    or nested deeper than C{maxDepth}, before building anything from it.

    It reads from a buffer by position, so a large message costs linear time
    (Banana copies the rest of its buffer for every item).
    """

    maxMessageBytes = MAX_MESSAGE_BYTES
    maxDepth = MAX_DEPTH
    #: Bytes decoded in one turn of the reactor; the rest waits for the next
    #: turn, with reading paused, so that one client cannot monopolise it.
    readBudget = READ_BUDGET

    _refused = False
    _paused = False
    _next: IDelayedCall | None = None
    #: Whether the transport's write buffer is full: one-way pushes skip.
    writeBlocked = False

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
        # The transport tells its producer when its write buffer is full, and
        # when it has drained: pushes that need no answer use that to skip.
        self.transport.registerProducer(self, True)
        super().connectionMade()

    def pauseProducing(self) -> None:
        self.writeBlocked = True

    def resumeProducing(self) -> None:
        self.writeBlocked = False

    def stopProducing(self) -> None:
        self.writeBlocked = True

    def closeGracefully(self) -> None:
        """
        Close the connection once what is buffered has been written.  The
        broker stops being its transport's producer first: a transport with
        a producer waits for it (TLS never shuts down, TCP resumes the
        producer instead of closing).
        """
        self.writeBlocked = True
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def registerPageProducer(self, pager) -> None:
        # PB's pages would take the transport's producer slot, which is ours.
        raise NotImplementedError("pbrealms serves no pages")

    def dataReceived(self, chunk: bytes) -> None:
        if self._refused:
            return
        self._pending += chunk
        if self._next is None:
            self._drain()

    def _drain(self) -> None:
        self._next = None
        pending = self._pending
        try:
            used = self._decode(pending, self.readBudget)
        except WireError as e:
            self.refuse(str(e))
            return
        except Exception as e:
            # What Banana or PB raise about a malformed message.
            self.refuse(f"malformed message ({type(e).__name__}: {str(e)[:80]})")
            return
        del pending[:used]
        if self._refused or self.disconnected:
            return
        if used >= self.readBudget and pending:
            from twisted.internet import reactor

            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            self._next = reactor.callLater(0, self._drain)
        elif self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def connectionLost(self, reason) -> None:
        self.ignoreInput()
        super().connectionLost(reason)

    def proto_message(self, requestID, objectID, message, answerRequired, netArgs, netKw):
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
        Decode nothing more from this connection, even what has arrived.
        """
        self._refused = True
        if self._next is not None:
            self._next.cancel()
            self._next = None

    def proto_cachemessage(self, *args) -> None:
        # pbrealms has no Cacheable: a client's cache message is never valid,
        # and PB would log a traceback for each one.
        raise WireError("a message to a cached object")

    def proto_didNotUnderstand(self, command) -> None:
        # PB logs each of these with the peer's text: a way to flood the log.
        pass

    def callExpressionReceived(self, obj) -> None:
        if self.currentDialect is None and obj not in self.knownDialects:
            raise WireError("no dialect that PB speaks")
        super().callExpressionReceived(obj)

    def refuse(self, reason: str) -> None:
        """
        Abort the connection, logging why in one line.
        """
        self.ignoreInput()
        peer = describeAddress(self.transport.getPeer())
        _log.info("closed the connection from {peer}: {reason}", peer=peer, reason=reason)
        self.transport.abortConnection()

    def _decode(self, buf: bytearray, budget: int) -> int:
        """
        Decode the whole items in C{buf}, passing each to L{gotItem}, until
        C{budget} bytes are used.

        Every item counts against C{maxMessageBytes} before it is built,
        and at least what it costs in memory once decoded, not only its few
        bytes on the wire: an empty list is one byte there, and some sixty
        in Python.  A string is refused as soon as its announced length is
        too much, before it arrives.  (The loop keeps everything in local
        names: it runs for every item a client sends.)

        @return: how many bytes were used.
        """
        listStack = self.listStack
        gotItem = self.gotItem
        prefixLimit, sizeLimit = self.prefixLimit, self.sizeLimit
        maxBytes, maxDepth = self.maxMessageBytes, self.maxDepth
        messageBytes = self._messageBytes
        end = len(buf)
        pos = 0
        while pos < end and pos < budget and not self._refused:
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
                cost = pos - start + num
            elif kind == _LIST:
                if num > sizeLimit:
                    raise WireError(f"a list of {num} items")
                if len(listStack) >= maxDepth:
                    raise WireError(f"a message nested deeper than {maxDepth} lists")
                cost = _LIST_COST
            elif kind == _FLOAT:
                cost = pos - start + 8
            else:
                cost = _ITEM_COST
            if messageBytes + cost > maxBytes:
                raise WireError(f"a message larger than {maxBytes} bytes")
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
            if not listStack:
                messageBytes = 0
        self._messageBytes = messageBytes
        return pos
