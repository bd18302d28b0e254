"""
The HTTP endpoint of C{--metrics}: C{/metrics}, C{/healthz} and a read-only
list of sessions, C{/sessions}, on a L{MetricsSite}.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource

from pbrealms.metrics import ServerMetrics
from pbrealms.metricssite import (
    HTTP_IDLE_TIMEOUT,
    MAX_HTTP_CONNECTIONS,
    MAX_HTTP_CONNECTIONS_PER_SOURCE,
    MetricsSite,
)

#: The sessions in one page of C{/sessions}, by default and at most.
SESSIONS_PAGE = 1000


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


#: What C{/sessions} reads: C{(after, limit)} to the page of sessions with an
#: id above C{after}, among the next C{limit}, and the C{after} of the next
#: page (L{None} after the last).  See L{SessionRegistry.describe}.
SessionPages = Callable[[int, int], tuple[list[dict], int | None]]


class _BadQuery(ValueError):
    """
    A query value of C{/sessions} is not one it takes; the message says why
    without quoting it.
    """


def _wholeNumber(
    args: dict[bytes, list[bytes]], name: str, default: int, low: int, high: int
) -> int:
    """
    The query value C{name}, or C{default} if it is not given.

    @raise _BadQuery: unless it is given once, as a number from C{low} to
        C{high}.
    """
    values = args.get(name.encode("ascii"), [])
    if not values:
        return default
    if len(values) > 1:
        raise _BadQuery(f"{name} is given more than once")
    value = values[0]
    # Digits only (int() takes signs, spaces and underscores), and few of
    # them: int() of a long string is slow.
    if not (value.isdigit() and len(value) <= 19) or not low <= int(value) <= high:
        raise _BadQuery(f"{name} must be a whole number from {low} to {high}")
    return int(value)


class _Sessions(resource.Resource):
    """
    C{/sessions}: the open sessions as a JSON array, one per line, in id
    order, a page at a time: C{?limit=N} (1 to L{SESSIONS_PAGE}, the
    default) of them after C{?after=ID}.  Unless the page is the last, a
    C{Link: <?after=ID&limit=N>; rel="next"} header gives the next one.
    """

    isLeaf = True

    def __init__(self, sessions: SessionPages) -> None:
        super().__init__()
        self.sessions = sessions

    def render_GET(self, request) -> bytes:
        try:
            after = _wholeNumber(request.args, "after", 0, 0, 2**63 - 1)
            limit = _wholeNumber(request.args, "limit", SESSIONS_PAGE, 1, SESSIONS_PAGE)
        except _BadQuery as e:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return f"{e}\n".encode("ascii")
        page, following = self.sessions(after, limit)
        request.setHeader(b"content-type", b"application/json")
        if following is not None:
            # A relative reference: it keeps whatever path a proxy serves us on.
            link = f'<?after={following}&limit={limit}>; rel="next"'
            request.setHeader(b"link", link.encode("ascii"))
        if not page:
            return b"[]\n"
        # Without indent, json uses its C encoder: three times as fast.
        return ("[\n" + ",\n".join(map(json.dumps, page)) + "\n]\n").encode("utf-8")


def metricsSite(
    metrics: ServerMetrics,
    isServing: Callable[[], bool],
    sessions: SessionPages,
    *,
    maxConnections: int = MAX_HTTP_CONNECTIONS,
    timeout: float | None = HTTP_IDLE_TIMEOUT,
    maxPerSource: int = MAX_HTTP_CONNECTIONS_PER_SOURCE,
) -> MetricsSite:
    """
    The HTTP site of C{--metrics}: C{/metrics}, C{/healthz} and C{/sessions}.

    @param maxConnections: see L{MetricsSite}; so are C{timeout} and
        C{maxPerSource}.
    """
    root = resource.Resource()
    root.putChild(b"metrics", _Metrics(metrics))
    root.putChild(b"healthz", _Health(isServing))
    root.putChild(b"sessions", _Sessions(sessions))
    return MetricsSite(
        root, maxConnections=maxConnections, timeout=timeout, maxPerSource=maxPerSource
    )
