"""
The Banana decoder of L{pbrealms.wire.LimitedBroker}, and what it charges
for each item: what the item costs in memory once decoded.

Banana's own decoder copies the rest of its buffer for every item, and
bounds only one string's or list's length.  L{decode} reads a buffer by
position, so a large message costs linear time, and charges every item what
it will cost in memory before building it, so that a message beyond
C{maxMessageBytes}, or nested deeper than C{maxDepth}, is refused before it
is built.
"""

from __future__ import annotations

import struct
from typing import Protocol

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

_NOTHING = object()
_DOUBLE = struct.Struct("!d")


class WireError(Exception):
    """
    A client sent something this server will not decode.
    """


class TooLarge(WireError):
    """
    A message would cost more than C{maxMessageBytes} once decoded.
    """


class DecodingBroker(Protocol):
    """
    What L{decode} reads of the broker it decodes for (a
    L{pbrealms.wire.LimitedBroker}), and writes: the cost of the message in
    progress.  What L{gotItem} does with a whole message can change the
    dialect, refuse the input or fill the write buffer, so the loop reads
    those where it needs them, not once.  The two private names are the
    broker's decoding state, which only it and its decoder use.
    """

    #: Banana's unfinished lists: (length, items so far), the innermost last.
    listStack: list[tuple[int, list[object]]]
    #: What the message in progress costs so far (see L{decode}).
    _messageBytes: int

    @property
    def prefixLimit(self) -> int | None: ...
    @property
    def sizeLimit(self) -> int: ...
    @property
    def maxMessageBytes(self) -> int: ...
    @property
    def maxDepth(self) -> int: ...
    @property
    def currentDialect(self) -> bytes | None: ...
    @property
    def incomingVocabulary(self) -> dict[int, bytes]: ...
    @property
    def writeBlocked(self) -> bool: ...
    @property
    def _refused(self) -> bool: ...
    def gotItem(self, item: object) -> None: ...


def decode(broker: DecodingBroker, buf: bytearray, budget: int) -> int:
    """
    Decode the whole items in C{buf}, passing each to C{broker.gotItem},
    until C{budget} bytes are used.

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
    listStack = broker.listStack
    gotItem = broker.gotItem
    prefixLimit, sizeLimit = broker.prefixLimit, broker.sizeLimit
    # Banana's connectionMade sets it, before anything can arrive.
    assert prefixLimit is not None
    maxBytes, maxDepth = broker.maxMessageBytes, broker.maxDepth
    messageBytes = broker._messageBytes
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
            if broker.currentDialect != b"pb" or num not in broker.incomingVocabulary:
                raise WireError(f"unknown vocabulary word {num}")
            item = broker.incomingVocabulary[num]
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
            if broker._refused or broker.writeBlocked:
                break
    broker._messageBytes = messageBytes
    return pos
