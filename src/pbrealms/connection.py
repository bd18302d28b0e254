"""
What the rest of the server may do with a client's connection, declared once.

L{pbrealms.wire.LimitedBroker} owns each connection and implements this: the
registry pings and drops sessions' connections through it, the login code
closes refused ones through it, and pushes ask it whether they can be sent.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import Attribute, Interface


class IConnection(Interface):
    """
    One client's connection.
    """

    connected = Attribute(
        "Whether the connection is open and not being dropped: false at once"
        " on drop(), not only once it has closed."
    )
    writeBlocked = Attribute(
        "Whether its transport's write buffer is full: one-way pushes are"
        " skipped, and nothing more is read, until it drains."
    )

    def ping(timeout: float | None = None) -> defer.Deferred[bool]:
        """
        Ask the client for an answer, which any PB client gives without an
        object of its own.  The L{Deferred} fires with C{True} if it answers
        (an error is an answer too), C{False} if the connection is lost first
        or C{timeout} seconds pass; it never fails.
        """

    def drop() -> None:
        """
        Close the connection at once, whatever is left unsent, and read
        nothing more, what has arrived included.  Safe to call more than
        once.
        """

    def closeAfterAnswer() -> None:
        """
        Read nothing more, close once what is being sent has been written,
        and abort if the peer takes longer than a few seconds to read it.
        """
