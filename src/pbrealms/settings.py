"""
The coerce column of C{twistd pbrealms}: what one value must be, wherever it
came from (the command line, the environment or the default).  What depends
on other settings is checked in L{pbrealms.tap.Options.postOptions}.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pbrealms.errors import InvalidPeriod
from pbrealms.guard import Network, parseNetworks
from pbrealms.options import BadValue
from pbrealms.push import validatePeriod
from pbrealms.realms import REALMS
from pbrealms.whenfull import WHEN_FULL

MIN_KEEPALIVE = 1.0
MAX_GRACE = 3600.0


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    """
    A coerce function for a C{kind} above 0 (and below 2**31).
    """
    what = "a whole number" if kind is int else "a number"

    def coerce(value: str) -> float:
        number = _parse(value, kind)
        if not 0 < number < 2**31:
            raise BadValue("{setting} must be " + what + " above 0, not {value!r}", value=value)
        return number

    coerce.coerceDoc = f"{what.capitalize()} above 0."  # type: ignore[attr-defined]
    return coerce


def realmName(value: str) -> str:
    """
    The coerce function of --realm: the name of one of L{REALMS}.
    """
    if value not in REALMS:
        raise BadValue(
            "unknown {what} {value!r}: choose one of {choices}",
            value=value,
            choices=", ".join(REALMS),
        )
    return value


def sessionLimit(value: str) -> int:
    """
    The coerce function of --max: a whole number of 1 or more.
    """
    try:
        limit = int(value)
    except ValueError:
        raise BadValue("{setting} must be a whole number, not {value!r}", value=value) from None
    if limit < 1:
        raise BadValue("{setting} must be 1 or more, not {limit}", limit=limit)
    return limit


def whenFull(value: str) -> str:
    """
    The coerce function of --when-full: one of L{WHEN_FULL}.
    """
    if value not in WHEN_FULL:
        raise BadValue(
            "unknown {setting} {value!r}: choose one of {choices}",
            value=value,
            choices=", ".join(WHEN_FULL),
        )
    return value


def keepaliveInterval(value: str) -> float:
    """
    The coerce function of --keepalive: L{MIN_KEEPALIVE} or more seconds,
    or 0 for none.
    """
    seconds = _parse(value)
    # Under a second, pings would be most of the traffic.
    if not (seconds == 0 or MIN_KEEPALIVE <= seconds < 2**31):
        raise BadValue(
            "{setting} must be {least:g} or more seconds, or 0 for none, not {value!r}",
            least=MIN_KEEPALIVE,
            value=value,
        )
    return seconds


def pushPeriod(value: str) -> float:
    """
    The coerce function of --period: seconds from L{MIN_PERIOD} to
    L{MAX_PERIOD}.
    """
    try:
        seconds = float(value)
    except ValueError:
        raise BadValue(
            "{setting} must be a number of seconds, not {value!r}", value=value
        ) from None
    try:
        return validatePeriod(seconds)
    except InvalidPeriod as e:
        # "period must be from ...": name it as it was given.
        raise BadValue("{setting}{rest}", rest=e.args[0].removeprefix("period")) from None


def shutdownGrace(value: str) -> float:
    """
    The coerce function of --shutdown-grace: from 0 to L{MAX_GRACE} seconds.
    """
    seconds = _parse(value)
    if not 0 <= seconds <= MAX_GRACE:
        raise BadValue(
            "{setting} must be from 0 to {most:g} seconds, not {value!r}",
            most=MAX_GRACE,
            value=value,
        )
    return seconds


def exemptNetworks(value: str) -> list[Network]:
    """
    The coerce function of --penalty-exempt: addresses and networks, comma-
    separated.
    """
    try:
        return parseNetworks(value)
    except ValueError as e:
        raise BadValue("{setting}: {reason}", reason=str(e)) from None


def _parse(value: str, kind: type = float) -> float:
    """
    C{value} as a number of C{kind}, or NaN, which no range check admits.
    """
    try:
        return kind(value)
    except ValueError:
        return math.nan
