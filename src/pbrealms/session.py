"""
One session: one login of one user, from its admission until it ends, and
what observes sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

from twisted.logger import Logger
from twisted.spread import pb

from pbrealms.connection import IConnection
from pbrealms.metrics import ServerMetrics
from pbrealms.push import ClientReference

# As before Session had a module of its own (log queries select on it).
_log = Logger(namespace="pbrealms.sessions.SessionRegistry")


class SessionObserver(Protocol):
    """
    Told when sessions open and close; realms are.
    """

    def sessionOpened(self, session: Session) -> None: ...

    def sessionClosed(self, session: Session, reason: str) -> None: ...


class SessionTable(Protocol):
    """
    What a session needs of the table that holds it (the registry).
    """

    metrics: ServerMetrics

    def forget(self, session: Session, reason: str) -> None:
        """
        Take C{session}, which has just ended, out of the table.
        """

    def settled(self, session: Session) -> None:
        """
        C{session} has logged in or ended.
        """


class Session:
    """
    One login of one user, from its admission until it ends.

    @ivar id: a number unique in this process.
    @ivar user: the user name.
    @ivar peer: the client's address, as text.
    @ivar since: when the session was admitted, in seconds since the epoch.
    @ivar mind: what the client passed to login as its client object, or
        L{None}.
    @ivar client: its mind as L{pbrealms.protocol.IClient}, what the server pushes through;
        L{None} without a mind.
    @ivar connection: the connection the session came on, or L{None}.
    @ivar lastCall: when the client last called its avatar (or logged in).
    @ivar successor: once it has ended, the address of the login that
        replaced it, if one did.
    @ivar droppedFor: once it has ended, why the server dropped it (a label
        of C{pbrealms_sessions_dropped_total}), if it did.
    """

    __slots__ = (
        "_onClose",
        "_registry",
        "active",
        "client",
        "closed",
        "connection",
        "droppedFor",
        "id",
        "lastCall",
        "peer",
        "since",
        "successor",
        "user",
    )

    def __init__(
        self,
        registry: SessionTable,
        id: int,
        user: str,
        peer: str,
        since: float,
        mind: object,
        connection: IConnection | None = None,
    ) -> None:
        self._registry = registry
        self.id = id
        self.user = user
        self.peer = peer
        self.since = since
        self.client: ClientReference | None = None
        if mind is not None:
            # A client may pass anything as its mind: pushes to one that is
            # not a reference fail as an error answer would.
            reference = cast(pb.RemoteReference, mind)
            # A bound method, not a partial: thousands of sessions hold one.
            self.client = ClientReference(reference, registry.metrics, self._disconnected)
        self.connection = connection
        self.lastCall = since
        self.successor: str | None = None
        self.droppedFor: str | None = None
        self.active = False
        self.closed = False
        self._onClose: list[Callable[[], object]] = []

    @property
    def mind(self) -> object:
        # Kept once, by the client that pushes to it.
        return None if self.client is None else self.client.mind

    def onClose(self, callback: Callable[[], object]) -> None:
        """
        Call C{callback} when this session ends; at once if it has ended.
        Callbacks run in the reverse order of registration.
        """
        if self.closed:
            callback()
        else:
            self._onClose.append(callback)

    def _disconnected(self) -> None:
        self.close("disconnected")

    def close(self, reason: str = "logged out", successor: str | None = None) -> None:
        """
        End this session.  Only the first call has an effect, so every path
        that ends a session may call it.

        @param reason: completes "USER ... from PEER" in the log line.
        @param successor: the address of the login that replaced this
            session, if one did: the log line names both addresses.
        """
        if self.closed:
            return
        self.closed = True
        self.successor = successor
        self._registry.forget(self, reason)
        if self.client is not None:
            self.client.forget()
        callbacks, self._onClose = self._onClose, []
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception:
                _log.failure(
                    "error while closing session {id} of {user}", id=self.id, user=self.user
                )
        self._registry.settled(self)

    def info(self) -> dict[str, object]:
        """
        What the user's other sessions are told of this one.
        """
        return {"id": self.id, "peer": self.peer, "since": self.since}

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.user} from {self.peer}>"
