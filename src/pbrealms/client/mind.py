"""
The client object passed at login, which the server pushes to, and
L{Kicked}, the reason a session ends when a newer login replaces it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from twisted.spread import pb
from zope.interface import implementer

from pbrealms.protocol import IClient


def _ignore(_: object) -> None:
    pass


class Kicked(Exception):
    """
    The server closed the session because a newer login of the same user
    replaced it, and said so first (C{notifyKicked}).  Logging in again would
    only replace the newer session in turn.

    @ivar reason: the server's words.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@implementer(IClient)
class ClientMind(pb.Referenceable):
    """
    The client object passed at login, which the server pushes to: L{IClient}
    served to PB as C{remote_} methods.  Each push calls the keyword argument
    of the same name, which by default ignores it:

      - C{onTime(seconds)}: C{notifyTime}, the time (in seconds since the
        epoch) that the clock realm pushes once per period;
      - C{onShutdown(reason)}: C{notifyShutdown}, the server is shutting down;
      - C{onGreeting(text)}: C{notifyGreeting}, another session of the user
        was greeted with C{text};
      - C{onSessionOpened(info)}, C{onSessionClosed(info)}:
        C{notifySessionOpened} and C{notifySessionClosed}, another session
        of the user opened or closed; C{info} is a dict of C{id} (int),
        C{peer} (str) and C{since} (seconds since the epoch), and when it
        closed C{reason} (str);
      - C{onKicked(reason)}: C{notifyKicked}, a newer login of the user
        replaced this session, and the server is about to close its
        connection.

    It also remembers which connections were kicked: see L{Connection.kicked}.
    """

    def __init__(
        self,
        onTime: Callable[[float], object] = _ignore,
        onShutdown: Callable[[str], object] = _ignore,
        onGreeting: Callable[[str], object] = _ignore,
        onSessionOpened: Callable[[dict], object] = _ignore,
        onSessionClosed: Callable[[dict], object] = _ignore,
        onKicked: Callable[[str], object] = _ignore,
    ) -> None:
        self.onTime = onTime
        self.onShutdown = onShutdown
        self.onGreeting = onGreeting
        self.onSessionOpened = onSessionOpened
        self.onSessionClosed = onSessionClosed
        self.onKicked = onKicked
        # One mind may be passed on several connections: a kick is recorded
        # for the connection it came on, and forgotten with it.
        self._kicked: weakref.WeakKeyDictionary[pb.Broker, str] = weakref.WeakKeyDictionary()
        self._pushedOn: pb.Broker | None = None

    def kickedReason(self, broker: pb.Broker) -> str | None:
        """
        The reason of the C{notifyKicked} received on C{broker}'s connection,
        or L{None}.
        """
        return self._kicked.get(broker)

    def remoteMessageReceived(self, broker, message, args, kw):
        # PB does not tell a remote_ method which connection called it.
        self._pushedOn = broker
        try:
            return super().remoteMessageReceived(broker, message, args, kw)
        finally:
            self._pushedOn = None

    def notifyTime(self, seconds: float) -> None:
        self.onTime(seconds)

    def notifyShutdown(self, reason: str) -> None:
        self.onShutdown(reason)

    def notifyGreeting(self, text: str) -> None:
        self.onGreeting(text)

    def notifySessionOpened(self, info: dict) -> None:
        self.onSessionOpened(info)

    def notifySessionClosed(self, info: dict) -> None:
        self.onSessionClosed(info)

    def notifyKicked(self, reason: str) -> None:
        reason = str(reason)
        if self._pushedOn is not None:
            self._kicked[self._pushedOn] = reason
        self.onKicked(reason)

    # What PB calls: each push IClient declares, by its name on the wire.  A
    # subclass may override either name.
    def remote_notifyTime(self, seconds: float) -> None:
        self.notifyTime(seconds)

    def remote_notifyShutdown(self, reason: str) -> None:
        self.notifyShutdown(reason)

    def remote_notifyGreeting(self, text: str) -> None:
        self.notifyGreeting(text)

    def remote_notifySessionOpened(self, info: dict) -> None:
        self.notifySessionOpened(info)

    def remote_notifySessionClosed(self, info: dict) -> None:
        self.notifySessionClosed(info)

    def remote_notifyKicked(self, reason: str) -> None:
        self.notifyKicked(reason)
