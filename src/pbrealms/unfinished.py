"""
The server-wide budget for bytes held in messages not yet whole, shared by
all connections (L{pbrealms.wire.LimitedBroker}s).
"""

from __future__ import annotations

from typing import Protocol

#: The default budget for bytes held in unfinished messages, all connections
#: together: the default per-address cap of connections not logged in (128)
#: times the default message size, so one address at its cap fits, while
#: 16,384 connections could otherwise hold 16 GiB.
MAX_UNFINISHED_BYTES = 128 << 20


class Holder(Protocol):
    """
    A connection that holds bytes in an unfinished message: a
    L{pbrealms.wire.LimitedBroker}.
    """

    def refuse(self, reason: str) -> None:
        """
        Abort the connection, logging why in one line.
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
        self._held: dict[Holder, int] = {}

    def held(self, broker: Holder) -> int:
        """
        The bytes C{broker} holds, as it last said.
        """
        return self._held.get(broker, 0)

    def hold(self, broker: Holder, held: int) -> None:
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
