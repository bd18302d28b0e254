"""
The JSON lines log observer.
"""

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from pbrealms.logs import JSONLinesObserver


def records(emit) -> list[dict]:
    out = io.StringIO()
    publisher = LogPublisher(JSONLinesObserver(out))
    emit(Logger(namespace="pbrealms.test", observer=publisher))
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_session_event_is_one_line_with_its_fields():
    [record] = records(
        lambda log: log.info(
            "{user} logged in from {peer} (session {session}, realm {realm})",
            user="alice",
            peer="127.0.0.1:5",
            session=7,
            realm="cache",
            avatar=object(),  # not a plain value: left out
        )
    )
    assert record["message"] == "alice logged in from 127.0.0.1:5 (session 7, realm cache)"
    assert (record["level"], record["namespace"]) == ("info", "pbrealms.test")
    assert (record["user"], record["peer"], record["session"], record["realm"]) == (
        "alice",
        "127.0.0.1:5",
        7,
        "cache",
    )
    assert "avatar" not in record
    assert record["time"].endswith("+00:00")


def test_a_failure_carries_its_traceback():
    def emit(log):
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("it broke", Failure())

    [record] = records(emit)
    assert record["level"] == "critical"
    assert record["message"] == "it broke"
    assert "ZeroDivisionError" in record["traceback"]


def test_text_that_is_not_ascii_stays_readable():
    [record] = records(lambda log: log.warn("{user} said {error}", user="zoë", error="ça va"))
    assert record["message"] == "zoë said ça va"
    assert record["level"] == "warn"
