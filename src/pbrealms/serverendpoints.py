"""
The server endpoint descriptions that C{twistd pbrealms} takes, for --port
and --metrics: parsed and completed (a TCP backlog, a UNIX socket's mode),
where they listen, and what is wrong with a bad one, for a person.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet import endpoints, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python import usage

DEFAULT_PORT = "tcp:8787:interface=127.0.0.1"
#: Twisted listens with a backlog of 50, which hangs a storm of logins.
TCP_BACKLOG = 1024
#: Who may connect to a UNIX socket unless its mode= says: its owner and group.
UNIX_SOCKET_MODE = 0o660


def withBacklog(description: str) -> str:
    """
    Add a large C{backlog=} to a TCP endpoint description that has none.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and not re.search(r"(?<!\\):backlog=", description):
        description += f":backlog={TCP_BACKLOG}"
    return description


def withSocketMode(description: str) -> str:
    """
    Add C{mode=660} to a UNIX socket endpoint description that has none:
    Twisted's default, 0666, lets every local user connect.
    """
    kind = description.split(":", 1)[0].lower()
    if kind == "unix" and not re.search(r"(?<!\\):mode=", description):
        description += f":mode={UNIX_SOCKET_MODE:o}"
    return description


class _Listening:
    """
    A reactor for one endpoint's C{listen} that listens nowhere: it notes
    the port and interface that the endpoint passes to C{listenTCP} or
    C{listenSSL}.

    @ivar at: the port and interface, once noted.
    """

    def __init__(self) -> None:
        self.at: tuple[int, str] | None = None

    def listenTCP(self, port: int, factory: object, backlog: int = 50, interface: str = "") -> None:
        self.at = (port, interface)

    def listenSSL(
        self,
        port: int,
        factory: object,
        contextFactory: object,
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        self.at = (port, interface)


def listeningAt(description: str) -> tuple[int, str] | None:
    """
    The port and interface that a TCP, TCP6 or SSL server endpoint
    description listens on; L{None} for other kinds.  They are what its
    endpoint passes to the reactor as it listens, not read from the text,
    so that no spelling of the description (a repeated or positional
    interface) can disagree with what listens.

    @param description: a description that L{endpoints.serverFromString}
        parses.
    """
    reactor = _Listening()
    endpoint = endpoints.serverFromString(reactor, description)
    if isinstance(
        endpoint,
        (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint, endpoints.SSL4ServerEndpoint),
    ):
        endpoint.listen(protocol.Factory())
    return reactor.at


def isLocalOnly(endpoint: IStreamServerEndpoint, description: str) -> bool:
    """
    Whether an endpoint, parsed from C{description}, listens only where no
    other machine can connect: a UNIX socket, or TCP on a loopback
    interface (see L{listeningAt}).
    """
    if isinstance(endpoint, endpoints.UNIXServerEndpoint):
        return True
    if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)):
        return False
    listening = listeningAt(description)
    assert listening is not None  # a TCP endpoint's
    host = listening[1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def spelledOut(description: str) -> str:
    """
    C{description} as an endpoint description: a port number alone is TCP's,
    as twistd's old strports allowed.
    """
    return "tcp:" + description if description.isdigit() else description


#: Examples for the kinds of endpoint a TCP example would mislead about.
_EXAMPLES = {"unix": "unix:/run/pbrealms/pb.sock"}


def endpointError(description: str, error: Exception) -> str:
    """
    What is wrong with an endpoint description, for a person, from what
    Twisted raised parsing it (its parsers let int() and argument binding
    speak for them).
    """
    kind = description.split(":", 1)[0]
    text = str(error)
    example = _EXAMPLES.get(kind, DEFAULT_PORT)
    expected = f"; expected e.g. {example} (see Twisted's endpoint syntax)"
    number = re.fullmatch(r"invalid literal for int\(\) with base (\d+): (.*)", text)
    if number:
        what = "an octal" if number[1] == "8" else "a whole"
        return f"{number[2]} is not {what} number{expected}"
    keyword = re.search(r"unexpected keyword argument (\S+)", text)
    if keyword:
        return f"{kind}: has no parameter {keyword[1]}{expected}"
    if re.search(r"positional arguments? but \d+ (was|were) given", text):
        return f"too many fields for {kind}:{expected}"
    if text.startswith("Unknown endpoint type"):
        return f"unknown endpoint type {kind!r}{expected}"
    if isinstance(error, OSError) and error.filename:
        return f"cannot read {error.filename}: {error.strerror}"
    if isinstance(error, IndexError) and kind == "systemd":
        return "systemd passed no socket of that index (see LISTEN_FDS)"
    return text or type(error).__name__


def serverEndpoint(description: str, setting: str) -> IStreamServerEndpoint:
    from twisted.internet import reactor

    description = spelledOut(description)
    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(
            f"bad {setting} {description!r}: {endpointError(description, e)}"
        ) from None
    listening = listeningAt(description)
    if listening is not None and not 0 <= listening[0] <= 65535:
        raise usage.UsageError(
            f"bad {setting} {description!r}: the port must be from 0 to 65535, not {listening[0]}"
        )
    for complete in (withBacklog, withSocketMode):
        completed = complete(description)
        try:
            endpoint = endpoints.serverFromString(reactor, completed)
        except Exception:
            continue  # a backlog or mode given by position: keep it
        description = completed
    return endpoint
