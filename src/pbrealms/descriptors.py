"""
File descriptors: the limit raised at start to hold C{--max-connections},
the descriptors kept out of reach of PB connections, and, at the connection
cap, room made for a newcomer from an address that holds few connections.
"""

from __future__ import annotations

import os
import resource
from typing import Protocol

from twisted.logger import Logger
from twisted.python import usage

#: PB connections open at once when C{--max-connections} is not given.
DEFAULT_MAX_CONNECTIONS = 16384
#: Descriptors that PB connections never use: the metrics port's own
#: connections (32 at most) and its listening socket, the PB listening
#: socket, the connection being accepted, log files, the password file while
#: it is reloaded, and what Twisted and Python open on their own (the
#: reactor's waker, a resolver's sockets, a thread pool's pipes).
DESCRIPTOR_RESERVE = 128
#: Connections closed to make room for a newcomer keep their descriptor
#: until the reactor's next turn: PB may hold this many beyond its cap, and
#: no more newcomers take a place in one turn.
MAKING_ROOM = 16

_log = Logger()


def openDescriptors() -> int:
    """
    How many file descriptors this process has open, or 0 if no system
    directory lists them.
    """
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # The listing's own descriptor is listed too.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return 0


def overhead(inUse: int) -> int:
    """
    The descriptors that PB connections cannot have when C{inUse} are open:
    those, the reserve, and those of connections being closed to make room.
    """
    return inUse + DESCRIPTOR_RESERVE + MAKING_ROOM


def fitConnections(requested: int | None, setting: str = "--max-connections") -> int:
    """
    Raise the soft C{RLIMIT_NOFILE} toward the hard limit, as far as
    C{requested} connections (or L{DEFAULT_MAX_CONNECTIONS}) need and no
    further, and return how many PB connections to allow.

    An explicit C{requested} that still does not fit is an error: the
    operator asked for it, and running with fewer would break that promise
    silently.  The default is lowered to what fits, with one warning line.

    @param setting: what set C{requested}, for the error: the option or
        its environment variable.
    @raise usage.UsageError: C{requested} does not fit, or not even one
        connection does; the message is one line naming the numbers.
    """
    wanted = DEFAULT_MAX_CONNECTIONS if requested is None else requested
    inUse = openDescriptors()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + overhead(inUse)
    if soft != resource.RLIM_INFINITY and soft < need:
        # No further than needed: a limit in the millions slows down what
        # walks every descriptor number (closing them before an exec).
        target = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (ValueError, OSError):
                pass  # a system maximum below the hard one, or a filter
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - overhead(inUse)
    if room >= wanted:
        return wanted
    held = (
        f"the file descriptor limit is {soft} (hard {_show(hard)}), {inUse} are open and "
        f"{DESCRIPTOR_RESERVE + MAKING_ROOM} kept in reserve"
    )
    if requested is not None or room < 1:
        raise usage.UsageError(
            f"{setting}={wanted} does not fit: {held}, which leaves room for "
            f"{max(room, 0)}; raise the limit (LimitNOFILE=, ulimit -n) or lower "
            f"{setting}"
        )
    _log.warn(
        "allowing {room} PB connections, not {wanted}: {held}; raise the limit "
        "(LimitNOFILE=, ulimit -n) to allow more",
        room=room,
        wanted=wanted,
        held=held,
    )
    return room


def _show(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


class Waiting(Protocol):
    """
    A connection that has not logged in, as L{WaitingRoom} keeps it.
    """

    def drop(self) -> None:
        """
        Close the connection at once.
        """


class WaitingRoom:
    """
    The connections that have not logged in, by source address, ranked so
    that the source holding the most is found at once.

    At the connection cap, a newcomer takes the place of the oldest waiting
    connection of the source holding the most, if that source holds at
    least two more than the newcomer's: the swap never leaves the newcomer's
    source holding more than the other, so an address with one connection
    is never closed for another's, and addresses that fill the server
    cannot keep a new one out.  Logged-in connections are never closed.
    """

    def __init__(self) -> None:
        self._bySource: dict[str, dict[Waiting, None]] = {}
        # Sources by how many they hold, each in the order it got there.
        self._byCount: dict[int, dict[str, None]] = {}
        self._most = 0

    def count(self, source: str) -> int:
        """
        How many waiting connections C{source} holds.
        """
        return len(self._bySource.get(source, ()))

    def add(self, source: str, connection: Waiting) -> None:
        """
        Count C{connection}, from C{source}, as waiting until it is removed.
        """
        members = self._bySource.setdefault(source, {})
        if connection in members:
            return
        members[connection] = None
        held = len(members)
        self._rank(source, held)
        if held > 1:
            self._unrank(source, held - 1)

    def remove(self, source: str, connection: Waiting) -> None:
        """
        Stop counting C{connection}: it logged in or is gone.  Removing one
        that is not counted does nothing.
        """
        members = self._bySource.get(source)
        if members is None or connection not in members:
            return
        held = len(members)
        del members[connection]
        if members:
            self._rank(source, held - 1)
        else:
            del self._bySource[source]
        self._unrank(source, held)

    def makeRoom(self, source: str) -> bool:
        """
        Close the connection whose place a newcomer from C{source} may take
        (see the class), and say whether there was one.
        """
        if self._most < self.count(source) + 2:
            return False
        fullest = next(iter(self._byCount[self._most]))
        oldest = next(iter(self._bySource[fullest]))
        # Removed now, not when its close completes: the next newcomer, in
        # the same turn, must not pick it again.
        self.remove(fullest, oldest)
        oldest.drop()
        return True

    def _rank(self, source: str, held: int) -> None:
        self._byCount.setdefault(held, {})[source] = None
        self._most = max(self._most, held)

    def _unrank(self, source: str, held: int) -> None:
        # Called after the source is ranked at its new count, so that the
        # most moves down by one step at most.
        bucket = self._byCount[held]
        del bucket[source]
        if not bucket:
            del self._byCount[held]
            while self._most and self._most not in self._byCount:
                self._most -= 1
