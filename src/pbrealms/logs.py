"""
JSON lines logs, for Loki, ELK and other log stores:

    twistd --logger=pbrealms.logs.jsonLogger --nodaemon --pidfile= pbrealms ...

Each event is one line: its time, level, namespace and rendered message, the
session fields it has (user, peer, session, realm, ...), and a traceback for
a failure.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

#: Event fields copied to the JSON record when they hold plain values.
FIELDS = ("user", "peer", "session", "realm", "reason", "duration", "error", "where")


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each log event as one line of JSON.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level") or (LogLevel.error if event.get("isError") else None)
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": level.name if level else "info",
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for field in FIELDS:
            value = event.get(field)
            if isinstance(value, (str, int, float, bool)):
                record[field] = value
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


def jsonLogger() -> ILogObserver:
    """
    The factory for C{twistd --logger}: JSON lines on standard output.
    """
    return JSONLinesObserver(sys.stdout)
