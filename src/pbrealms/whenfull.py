"""
What a login does when its user has as many sessions as allowed: the conflict
policies of C{--when-full}, one class each.

A policy is asked only once the user is full, and only for a policy that
L{replaces}; the registry admits the logins of a replacing user one at a time
and checks the limit again after each step, so a policy only makes room (or
refuses), and never counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from pbrealms.errors import ShuttingDown

if TYPE_CHECKING:
    from pbrealms.connection import IConnection
    from pbrealms.errors import TooManyConnections
    from pbrealms.session import Session

REFUSE, REPLACE_OLDEST, REPLACE_STALE = "refuse", "replace-oldest", "replace-stale"

#: Why a session replaced under L{ReplaceOldest} ended, as its log line,
#: C{notifyKicked} and C{notifySessionClosed} say.
REPLACED = "was replaced by a newer login"


class Admission(Protocol):
    """
    What a policy may do with the registry that asks it.

    @ivar closing: whether the server is shutting down.
    """

    closing: bool

    def full(self, user: str) -> bool:
        """
        Whether C{user} has as many sessions as allowed.
        """

    def stillWanted(self, connection: IConnection | None) -> None:
        """
        @raise ShuttingDown: if the server is shutting down.
        @raise ConnectionGone: if C{connection} has closed.
        """

    def tooMany(self) -> TooManyConnections:
        """
        The refusal of a login beyond the limit.
        """

    def drop(
        self,
        session: Session,
        reason: str,
        why: str,
        keepConnection: bool = False,
        successor: str | None = None,
    ) -> None:
        """
        End C{session} and close its connection, unless C{keepConnection}.
        """


class WhenFull(Protocol):
    """
    A conflict policy.

    @ivar name: what C{--when-full} takes.
    @ivar replaces: whether it may end a session to admit a login; one that
        does not refuses the login at once.
    """

    name: str
    replaces: bool

    async def makeRoom(
        self, registry: Admission, oldest: Session, peer: str, connection: IConnection | None
    ) -> None:
        """
        End C{oldest}, the user's oldest logged-in session, if the policy
        says so, for a login from C{peer} on C{connection}.

        @raise TooManyConnections: the login is refused.
        @raise ShuttingDown: the server began to shut down meanwhile.
        @raise ConnectionGone: C{connection} closed meanwhile.
        """


class Refuse:
    """
    Refuse the login: the sessions there are stay.
    """

    name = REFUSE
    replaces = False

    async def makeRoom(
        self, registry: Admission, oldest: Session, peer: str, connection: IConnection | None
    ) -> None:
        raise registry.tooMany()


class ReplaceOldest:
    """
    Tell the oldest session that it is replaced (C{notifyKicked}), wait up to
    C{pingTimeout} seconds for its answer, then end it.
    """

    name = REPLACE_OLDEST
    replaces = True

    def __init__(self, clock: IReactorTime, pingTimeout: float) -> None:
        self.clock = clock
        self.pingTimeout = pingTimeout

    async def makeRoom(
        self, registry: Admission, oldest: Session, peer: str, connection: IConnection | None
    ) -> None:
        await self._tellReplaced(oldest, peer)
        # Told it is replaced, it goes even if the new login has gone
        # meanwhile: its client stops logging in on that notice.
        if registry.closing:
            raise ShuttingDown()
        if not oldest.closed:
            registry.drop(
                oldest,
                REPLACED,
                "replaced",
                keepConnection=oldest.connection is connection,
                successor=peer,
            )

    def _tellReplaced(self, session: Session, newPeer: str) -> defer.Deferred[bool | None]:
        # Best effort: the session goes either way.
        if session.client is None:
            return defer.succeed(None)
        # The same words as the log line: which session, which newcomer.
        reason = (
            f"{session.user}'s session {session.id} from {session.peer} {REPLACED} from {newPeer}"
        )
        told = session.client.notifyKicked(reason)
        return told.addTimeout(self.pingTimeout, self.clock).addErrback(lambda _: None)


class ReplaceStale:
    """
    Ping the oldest session's connection, and end the session only if it
    does not answer within C{pingTimeout} seconds; otherwise refuse.
    """

    name = REPLACE_STALE
    replaces = True

    def __init__(self, pingTimeout: float) -> None:
        self.pingTimeout = pingTimeout

    async def makeRoom(
        self, registry: Admission, oldest: Session, peer: str, connection: IConnection | None
    ) -> None:
        if await self._answers(oldest):
            registry.stillWanted(connection)
            if registry.full(oldest.user):
                raise registry.tooMany()
        elif not oldest.closed:
            registry.stillWanted(connection)
            registry.drop(oldest, "did not answer a ping, and was replaced", "stale")

    def _answers(self, session: Session) -> defer.Deferred[bool]:
        if session.connection is None:
            return defer.succeed(True)  # nothing to ask: it may be alive
        return session.connection.ping(self.pingTimeout)


#: The policies' names, as C{--when-full} offers them.
WHEN_FULL = (REFUSE, REPLACE_OLDEST, REPLACE_STALE)


def policyNamed(name: str, clock: IReactorTime, pingTimeout: float) -> WhenFull:
    """
    The policy C{--when-full=name} chooses.

    @raise ValueError: for a name not in L{WHEN_FULL}.
    """
    if name == REFUSE:
        return Refuse()
    if name == REPLACE_OLDEST:
        return ReplaceOldest(clock, pingTimeout)
    if name == REPLACE_STALE:
        return ReplaceStale(pingTimeout)
    raise ValueError(f"whenFull must be one of {', '.join(WHEN_FULL)}, not {name!r}")
