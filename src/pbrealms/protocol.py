"""
The push protocol: what the server may call on the client object a login
passes as its mind, declared once.

The server calls it through L{pbrealms.push.ClientReference}, which owns how
each call is delivered; the client implements it in
L{pbrealms.client.mind.ClientMind}.  On the wire each is a PB call of the
same name (C{notifyTime}, ...), so any PB client, in any language, can serve
them with C{remote_} methods.
"""

from __future__ import annotations

from twisted.cred.portal import IRealm
from zope.interface import Interface


class IClient(Interface):
    """
    What the server may tell a client.  A client object need not know every
    call: one it lacks is answered with PB's error and otherwise ignored.
    """

    def notifyTime(seconds: float) -> object:
        """
        The time, in seconds since the epoch: the clock realm's periodic
        push.  Asks for no answer.
        """

    def notifyGreeting(text: str) -> object:
        """
        Another session of the user was greeted with C{text}.
        """

    def notifySessionOpened(info: dict) -> object:
        """
        Another session of the user opened.  C{info} holds its C{id} (int),
        C{peer} (str) and C{since} (seconds since the epoch).
        """

    def notifySessionClosed(info: dict) -> object:
        """
        Another session of the user closed.  C{info} is as for
        L{notifySessionOpened}, with the C{reason} (str) it ended.
        """

    def notifyKicked(reason: str) -> object:
        """
        A newer login of the user replaced this session, and the server is
        about to close its connection.
        """

    def notifyShutdown(reason: str) -> object:
        """
        The server is shutting down; the connection closes after a grace
        period.
        """


class ISessionRealm(IRealm):
    """
    A realm that pushes through the server's L{IClient} of each session: its
    C{requestAvatar} is given the session's client as its mind (or L{None}),
    not the PB reference the client passed.  Any other realm gets that
    reference, as under Twisted's own portal.
    """
