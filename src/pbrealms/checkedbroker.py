"""
PB's commands checked before PB acts on them (see L{pbrealms.commands}): PB
logs a traceback for each one it cannot handle, or leaves what waits for an
answer unfired.
"""

from __future__ import annotations

from typing import cast

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.spread import jelly, pb

from pbrealms import commands
from pbrealms.decoder import WireError
from pbrealms.errors import UndecodableAnswer, printable


class _Unanswered:
    """
    A local object called by a client that wants no answer.
    """

    def __init__(self, target) -> None:
        self.target = target

    def remoteMessageReceived(self, broker, message, args, kw):
        result = self.target.remoteMessageReceived(broker, message, args, kw)
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda _: None)
        return result


def _undecodable(what: str, error: Exception) -> Failure:
    """
    The failure of a call whose C{what} ("an answer", "an error") did not
    decode, saying why in one line (the error's text may quote the peer).
    """
    if isinstance(error, jelly.InsecureJelly):
        # Jelly names a refused tag by itself, as bytes: b'module'.
        refused = error.args[0] if error.args else ""
        detail = printable(refused, 80)
        return Failure(UndecodableAnswer(f"{what} of a type the server refuses ({detail})"))
    detail = printable(str(error), 80)
    name = type(error).__name__
    return Failure(UndecodableAnswer(f"{what} that cannot be decoded ({name}: {detail})"))


class CheckedBroker(pb.Broker):
    """
    A PB broker that raises L{WireError} for a command of a shape that PB
    never builds, or that pbrealms does not take (a cached object's), before
    PB acts on it: whoever decodes (L{pbrealms.wire.LimitedBroker}) closes
    the connection for it.  An answer or an error that is well formed but
    does not decode fails only the call it answers.  The failures it sends
    carry only their type, parents and message.
    """

    @property
    def _waiting(self) -> dict[int, defer.Deferred[object]] | None:
        """
        PB's calls that wait for an answer, by request id, from
        C{connectionMade} until C{connectionLost} (L{None} outside).
        """
        # pb.Broker declares it None in its class and sets it in methods
        # without annotations, so mypy sees only None.
        return cast("dict[int, defer.Deferred[object]] | None", self.waitingForAnswers)

    def proto_message(self, requestID, objectID, message, answerRequired, netArgs, netKw):
        # PB logs a traceback for a field of the wrong type, once per message.
        problem = commands.checkMessage(
            requestID, objectID, message, answerRequired, netArgs, netKw
        )
        if problem is not None:
            raise WireError(problem)
        netKw = commands.unicodeNames(netKw)
        # A call that wants no answer (pbanswer=False) and fails would end as
        # an "Unhandled error in Deferred" traceback: its failure has been
        # dealt with (a refused login is logged), so let it go.
        find = self.localObjectForID if answerRequired else self._unanswered
        self._recvMessage(find, requestID, objectID, message, answerRequired, netArgs, netKw)

    def _unanswered(self, objectID):
        target = self.localObjectForID(objectID)
        return None if target is None else _Unanswered(target)

    def proto_cachemessage(self, *args) -> None:
        # pbrealms has no Cacheable: a client's cache message is never valid,
        # and PB would log a traceback for each one.
        raise WireError("a message to a cached object")

    def proto_didNotUnderstand(self, command) -> None:
        # PB logs each of these with the peer's text: a way to flood the log.
        pass

    # What follows checks each command's shape before PB acts on it (see
    # pbrealms.commands): PB logs a traceback for each one it cannot handle,
    # or leaves what waits for an answer unfired.

    def proto_answer(self, requestID, netResult) -> None:
        waiting = self._question(requestID, "an answer")
        self._checkReply(netResult)
        answered = waiting.pop(requestID)
        try:
            result = self.unserialize(netResult)
        except Exception as e:
            answered.errback(_undecodable("an answer", e))
        else:
            answered.callback(result)

    def proto_error(self, requestID, fail) -> None:
        waiting = self._question(requestID, "an error")
        self._checkReply(fail)
        waiting.pop(requestID).errback(self._receivedError(fail))

    def _question(self, requestID: object, what: str) -> dict[int, defer.Deferred[object]]:
        """
        The calls waiting for an answer, if C{requestID} is one of them;
        else raise L{WireError}.
        """
        waiting = self._waiting
        # None only once the connection is lost, when nothing is decoded.
        if waiting is None or type(requestID) is not int or requestID not in waiting:
            raise WireError(f"{what} to no question")
        return waiting

    def _checkReply(self, expression: object) -> None:
        # Only a shape that PB never builds closes the connection; what a
        # peer's PB builds but this side cannot decode (a Copyable, an old
        # Twisted's failure) fails the one call it answers.
        problem = commands.checkJelly(expression)
        if problem is not None:
            raise WireError(problem)

    def _receivedError(self, fail: object) -> Failure:
        """
        The failure that an C{error} command's C{fail} stands for: the
        peer's error as a L{pb.CopiedFailure} holding only its type, message
        and parents (see L{commands.receivedFailure}), or an
        L{UndecodableAnswer} if it is not one.  Python 2 peers send their
        failures' state with byte strings for keys: it decodes the same.
        """
        if not commands.isFailure(fail):
            # Stock PB sends a Copyable error as itself, not as a failure:
            # the jelly options refuse its class, as they refuse any other.
            try:
                self.unserialize(fail)
            except Exception as e:
                return _undecodable("an error", e)
            return Failure(UndecodableAnswer("an error that is not a failure"))
        try:
            # isFailure checked that it is [FAILURE, [b"dictionary", ...]].
            state = self.unserialize(cast("list[object]", fail)[1])
        except Exception as e:
            return _undecodable("an error", e)
        reason = commands.receivedFailure(state)
        if reason is None:
            return Failure(UndecodableAnswer("an error that is not a failure"))
        return reason

    def proto_decref(self, objectID) -> None:
        # The server's named objects (the root) are not counted.
        if type(objectID) is not int or objectID not in self.localObjects:
            raise WireError("a decref of no reference")
        super().proto_decref(objectID)

    def proto_decache(self, objectID) -> None:
        raise WireError("a decache of a cached object")

    def proto_uncache(self, objectID) -> None:
        raise WireError("an uncache of a cached object")

    def proto_version(self, vnum) -> None:
        if type(vnum) is not int or vnum != self.version:
            raise WireError(f"a PB version other than {self.version}")

    def _sendError(self, fail, requestID) -> None:
        # The one place PB sends errors: each carries only its type, parents
        # and message, whatever PB would copy of it (see
        # commands.failureState).
        state = commands.failureState(fail)
        self.sendCall(b"error", requestID, [commands.FAILURE, self.serialize(state)])

    def callExpressionReceived(self, obj) -> None:
        if self.currentDialect is None:
            if obj not in self.knownDialects:
                raise WireError("no dialect that PB speaks")
        else:
            problem = commands.checkCommand(obj)
            if problem is not None:
                raise WireError(problem)
        super().callExpressionReceived(obj)
