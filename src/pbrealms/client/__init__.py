"""
The client library: L{connect} logs in and returns a L{Connection};
L{ClientMind} is the client object the server pushes to; a
L{ReconnectingSession} stays logged in.  The C{pbrealms-client} command is
L{pbrealms.client.cli}.

    >>> conn = await connect(reactor, "tcp:127.0.0.1:8787", "alice", "wonderland")
    >>> await conn.perspective.callRemote("greet")
    '<1>hello alice'
    >>> await conn.disconnect()

A session that stays connected, logging in again whenever the connection is
lost, and doing again what C{onLogin} does (here: subscribing to the time):

    >>> session = ReconnectingSession(
    ...     reactor, "tcp:127.0.0.1:8787", "alice", "wonderland", ClientMind(onTime=print),
    ...     onLogin=lambda conn: conn.callRemote("setperiod", 5),
    ... )
    >>> stopped = session.start()  # fails with Kicked, BadCredentials ... if it gives up
    >>> if session.connection is not None:  # None while it is not logged in
    ...     await session.connection.callRemote("greet")
    '<2>hello alice'
    >>> await session.stop()
"""

from pbrealms.client.connection import (
    DEFAULT_CONNECT,
    DEFAULT_TIMEOUT,
    ClosedBeforeLogin,
    Connection,
    TLSFailed,
    connect,
    isPrivate,
)
from pbrealms.client.mind import ClientMind, Kicked
from pbrealms.client.reconnecting import ReconnectingSession, penaltySeconds, retryable

__all__ = [
    "DEFAULT_CONNECT",
    "DEFAULT_TIMEOUT",
    "ClientMind",
    "ClosedBeforeLogin",
    "Connection",
    "Kicked",
    "ReconnectingSession",
    "TLSFailed",
    "connect",
    "isPrivate",
    "penaltySeconds",
    "retryable",
]
