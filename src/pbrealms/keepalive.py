"""
The keepalive: one sweep pings every connection that has a logged-in session,
and drops the sessions of those that stop answering.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from pbrealms.connection import IConnection
from pbrealms.sessions import Session, SessionRegistry


class Keepalive(service.Service):
    """
    Pings every connection that has a logged-in session once per C{interval}
    and drops the sessions of one that has not answered the previous ping,
    a whole interval later.  PB has no keepalive of its own: without this a
    client behind a dead NAT keeps its sessions until TCP gives up, which
    can take hours.

    One timer serves every connection, whatever their number.
    """

    def __init__(self, registry: SessionRegistry, interval: float, clock: IReactorTime) -> None:
        self.registry = registry
        self.interval = interval
        self._unanswered: set[IConnection] = set()
        self._sweeper = task.LoopingCall(self.sweep)
        self._sweeper.clock = clock

    def startService(self) -> None:
        super().startService()
        self._sweeper.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._sweeper.running:
            self._sweeper.stop()

    def sweep(self) -> None:
        """
        Drop the connections that did not answer the last ping; ping the
        others.
        """
        byConnection: dict[IConnection, list[Session]] = {}
        for session in self.registry:
            if session.active and session.connection is not None:
                byConnection.setdefault(session.connection, []).append(session)
        # A connection stays in _unanswered until its ping is answered or
        # it closes, even while it has no session: cycling sessions between
        # sweeps must not hide that it never answers.
        for connection, sessions in byConnection.items():
            if connection in self._unanswered:
                self._unanswered.discard(connection)
                reason = f"did not answer a keepalive ping within {self.interval:g} s"
                for session in sessions:
                    self.registry.drop(session, reason, "keepalive")
            else:
                self._unanswered.add(connection)
                connection.ping().addCallback(self._answered, connection)

    def _answered(self, alive: bool, connection: IConnection) -> None:
        self._unanswered.discard(connection)
