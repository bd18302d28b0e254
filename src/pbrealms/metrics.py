"""
The server's Prometheus metrics, and the HTTP endpoint that serves them with
a health check and a read-only list of sessions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource, server

#: How a login can end, as the C{outcome} label of C{pbrealms_logins_total}.
OUTCOMES = ("ok", "bad_credentials", "too_many", "refused", "abandoned", "error")

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


class _Metrics(resource.Resource):
    isLeaf = True

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics.registry)


class _Health(resource.Resource):
    isLeaf = True

    def __init__(self, isServing: Callable[[], bool]) -> None:
        super().__init__()
        self.isServing = isServing

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.isServing():
            return b"ok\n"
        request.setResponseCode(503)
        return b"not serving: stopping or not listening\n"


class _Sessions(resource.Resource):
    isLeaf = True

    def __init__(self, sessions: Callable[[], Iterable[dict]]) -> None:
        super().__init__()
        self.sessions = sessions

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(list(self.sessions()), indent=1).encode("utf-8") + b"\n"


class MetricsSite(server.Site):
    """
    A site that logs no line per request: a scraper calls every few seconds.
    """

    noisy = False

    def log(self, request) -> None:
        pass


def metricsSite(
    metrics: ServerMetrics,
    isServing: Callable[[], bool],
    sessions: Callable[[], Iterable[dict]],
) -> server.Site:
    """
    The HTTP site of C{--metrics}: C{/metrics}, C{/healthz} and C{/sessions}.
    """
    root = resource.Resource()
    root.putChild(b"metrics", _Metrics(metrics))
    root.putChild(b"healthz", _Health(isServing))
    root.putChild(b"sessions", _Sessions(sessions))
    return MetricsSite(root)
