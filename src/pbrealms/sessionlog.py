"""
The log lines and metrics of sessions: an observer of the session registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from pbrealms.metrics import ServerMetrics

if TYPE_CHECKING:
    from pbrealms.session import Session


class SessionLog:
    """
    One log line per login and per end of a session, with the session's id,
    peer and realm; session counts, durations and drops as metrics.  Only
    sessions logged in are told of: one that ends while logging in is a
    refused login, which the login code logs.
    """

    # The namespace the lines had before this observer was split off, which
    # log queries select on.
    _log = Logger(namespace="pbrealms.sessions.SessionRegistry")

    def __init__(
        self, realm: str, count: Callable[[], float], metrics: ServerMetrics, clock: IReactorTime
    ) -> None:
        """
        @param realm: the realm's name, for each line.
        @param count: how many sessions are open, for C{pbrealms_sessions_open}.
        """
        self.realm = realm
        self.metrics = metrics
        self.clock = clock
        metrics.countSessions(realm, count)

    def sessionOpened(self, session: Session) -> None:
        self._log.info(
            "{user} logged in from {peer} (session {session}, realm {realm})",
            user=session.user,
            peer=session.peer,
            session=session.id,
            realm=self.realm,
        )

    def sessionClosed(self, session: Session, reason: str) -> None:
        duration = self.clock.seconds() - session.since
        self.metrics.sessionDuration.observe(duration)
        if session.droppedFor is not None:
            self.metrics.dropped.labels(session.droppedFor).inc()
        fields = dict(
            user=session.user,
            reason=reason,
            peer=session.peer,
            duration=duration,
            session=session.id,
            realm=self.realm,
        )
        if session.successor is None:
            text = (
                "{user} {reason} from {peer} after {duration:.1f} s"
                " (session {session}, realm {realm})"
            )
        else:
            # Two addresses: say which is which.
            text = (
                "{user}'s session {session} from {peer} {reason} from {successor}"
                " after {duration:.1f} s (realm {realm})"
            )
            fields["successor"] = session.successor
        self._log.info(text, **fields)
