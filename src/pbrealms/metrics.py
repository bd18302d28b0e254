"""
The server's Prometheus metrics.  The HTTP endpoint that serves them is
L{pbrealms.metricsweb}.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: How a login can end, as the C{outcome} label of C{pbrealms_logins_total}.
OUTCOMES = ("ok", "bad_credentials", "too_many", "busy", "refused", "abandoned", "error")

#: Why the server ended a session, as the C{why} label of
#: C{pbrealms_sessions_dropped_total}: replaced by a newer login, replaced as
#: stale, or silent on keepalive.
DROPPED = ("replaced", "stale", "keepalive")

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LONG = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 7 * 24 * 3600)


class ServerMetrics:
    """
    Every figure the server keeps, in a Prometheus registry of its own (not
    the process-wide one, so that two servers in one process never mix).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.logins = Counter("pbrealms_logins", "Logins, by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.logins.labels(outcome)
        self.loginLatency = Histogram(
            "pbrealms_login_latency_seconds",
            "From the client's response to the challenge until its session is open.",
            buckets=_FAST,
            registry=r,
        )
        self.sessionDuration = Histogram(
            "pbrealms_session_duration_seconds",
            "How long sessions lasted, counted when they end.",
            buckets=_LONG,
            registry=r,
        )
        self.dropped = Counter(
            "pbrealms_sessions_dropped",
            "Sessions the server ended, by why.",
            ["why"],
            registry=r,
        )
        for why in DROPPED:
            self.dropped.labels(why)
        self.sessionsOpen = Gauge(
            "pbrealms_sessions_open", "Sessions open now, by realm.", ["realm"], registry=r
        )
        self.connectionsOpen = Gauge(
            "pbrealms_connections_open", "PB connections open now.", registry=r
        )
        self.pushes = Counter(
            "pbrealms_pushes", "Pushes to clients, by result.", ["result"], registry=r
        )
        # Bound once: pushes are counted on the clock's hot path.
        self._sent, self._failed = self.pushes.labels("sent"), self.pushes.labels("failed")
        self._skipped = self.pushes.labels("skipped")
        self.pushLateness = Histogram(
            "pbrealms_clock_push_lateness_seconds",
            "How late the timers of clock pushes ran (one observation per timer, which "
            "serves every session due in its 10 ms slot).",
            buckets=_FAST,
            registry=r,
        )

    def pushed(self, delivered: bool) -> bool:
        """
        Count a push's result, and pass it on.
        """
        (self._sent if delivered else self._failed).inc()
        return delivered

    def notified(self, sent: bool) -> bool:
        """
        Count a one-way push, sent or skipped, and pass its result on.
        """
        (self._sent if sent else self._skipped).inc()
        return sent

    def countSessions(self, realm: str, count: Callable[[], float]) -> None:
        self.sessionsOpen.labels(realm).set_function(count)

    def countConnections(self, count: Callable[[], float]) -> None:
        self.connectionsOpen.set_function(count)
