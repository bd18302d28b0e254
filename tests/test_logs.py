"""
The log observers: JSON lines, and twistd's text lines written faster.
"""

import io
import json
import time

from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from pbrealms.logs import JSONLinesObserver, TextLinesObserver


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


# The text lines observer: twistd's lines, faster.


def events(emit) -> list[dict]:
    captured: list[dict] = []
    emit(Logger(namespace="pbrealms.test", observer=LogPublisher(captured.append)))
    return captured


def textLines(observerFactory, captured: list[dict]) -> str:
    out = io.StringIO()
    observer = observerFactory(out)
    for event in captured:
        observer(event)
    return out.getvalue()


def emitAll(log: Logger) -> None:
    log.info(
        "{user!r} logged in from {peer} (session {session}, realm {realm})",
        user="alice",
        peer="127.0.0.1:5",
        session=7,
        realm="cache",
    )
    log.warn("{user} said {error}", user="zoë", error="two\nlines")
    log.info("{missing} is not there")
    log.info("{call()} only Twisted's formatter reads", call=lambda: "this")
    log.info("a legacy system", log_system="HTTPChannel,0,127.0.0.1")
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.failure("it broke", Failure())


def test_text_lines_are_twisteds_own():
    captured = events(emitAll)
    ours = textLines(TextLinesObserver, captured)
    assert ours == textLines(textFileLogObserver, captured)
    assert ours.count("\n") >= 7
    assert "alice' logged in from 127.0.0.1:5" in ours
    assert "ZeroDivisionError" in ours


def test_text_lines_format_the_time_once_per_second(monkeypatch):
    calls = []
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda *a: calls.append(a) or real(*a))
    captured = events(lambda log: [log.info("line {n}", n=n) for n in range(50)])
    for event in captured:
        event["log_time"] = 1795999999.25
    lines = textLines(TextLinesObserver, captured).splitlines()
    assert len(lines) == 50
    assert len(calls) == 1


def test_text_lines_skip_what_twisted_skips_and_use_flattened_values():
    from twisted.logger import eventAsJSON

    def emit(log: Logger) -> None:
        log.info("")
        log.info("{nothing}", nothing="")

    captured = events(emit)
    values = [1]
    flattened = events(lambda log: log.info("{values}", values=values))
    eventAsJSON(flattened[0])  # flattens it, with the values of now
    values.append(2)
    captured += flattened
    ours = textLines(TextLinesObserver, captured)
    assert ours == textLines(textFileLogObserver, captured)
    assert ours.count("\n") == 1
    assert ours.endswith("[1]\n")
