"""
The shape of each PB command a client may send, checked before PB acts on it,
and the errors the server sends, stripped to what a client may know.

PB trusts the shape of what it decodes.  An object id that is a list, an
answer to a question never asked or a decref of nothing ends as a traceback
in the log, once per message; a reference without an id leaves a half-built
L{pb.RemoteReference} whose finaliser fails; a client object whose id is not
an integer cannot be hashed, which breaks every push to it.  The checks here
name what is wrong in a few words, and L{wire.LimitedBroker} closes the
connection with that as its one log line.  (An answer or an error that has
PB's shape but does not decode is not a shape problem: it fails the one call
it answers.)

Each check returns the problem, or L{None} if there is none.  They look at
types only, never at values beyond their type, so that what they say quotes
nothing a client sent.
"""

from __future__ import annotations

from twisted.python import reflect
from twisted.python.failure import Failure
from twisted.spread import pb

#: The commands a client may send, and how many fields follow each.
FIELDS = {
    b"message": 6,
    b"cachemessage": 6,
    b"answer": 2,
    b"error": 2,
    b"decref": 1,
    b"decache": 1,
    b"uncache": 1,
    b"version": 1,
    b"didNotUnderstand": 1,
}

#: The most characters of an error's message that cross the wire, either way.
MAX_ERROR_TEXT = 512
#: The most parent classes an error received from a client may name.
MAX_PARENTS = 64

#: The most references one jelly expression (a call's arguments, its keyword
#: arguments, an answer) may hold.  A client passes one (its client object);
#: each costs the server a RemoteReference and, when it is dropped, a decref
#: written back, so thousands in a message cost far more than their bytes.
MAX_REFERENCES = 16

#: How PB tags a failure on the wire.
FAILURE = reflect.qual(pb.CopyableFailure).encode("ascii")
_INTERNAL = "internal server error (see the server log)"
_ARGUMENTS = (b"tuple", b"list")


def _kind(value: object) -> str:
    return type(value).__name__


def checkCommand(command: object) -> str | None:
    """
    Check that C{command} is a PB command with as many fields as it takes.
    """
    if type(command) is not list or not command:
        return "a command that is not a list"
    name = command[0]
    if type(name) is not bytes or name not in FIELDS:
        return "an unknown command"
    if len(command) - 1 != FIELDS[name]:
        return f"a command {name.decode()!r} with {len(command) - 1} fields, not {FIELDS[name]}"
    return None


def checkMessage(
    requestID: object,
    objectID: object,
    message: object,
    answerRequired: object,
    netArgs: object,
    netKw: object,
) -> str | None:
    """
    Check the fields of a C{message} command: integers for the request id
    and whether an answer is wanted, an integer or a name for the object, a
    UTF-8 method name, a tuple of arguments and a dictionary of keyword
    arguments named by strings, and proper references within them.
    """
    if type(requestID) is not int:
        return f"a message with a request id of type {_kind(requestID)}"
    if type(objectID) is not int and type(objectID) is not bytes:
        return f"a message to an object id of type {_kind(objectID)}"
    if type(message) is not bytes:
        return f"a message with a method name of type {_kind(message)}"
    if not _isUTF8(message):
        return "a message with a method name that is not UTF-8"
    if type(answerRequired) is not int:
        return f"a message with an answer flag of type {_kind(answerRequired)}"
    if type(netArgs) is not list or not netArgs or netArgs[0] not in _ARGUMENTS:
        return "a message whose arguments are not a tuple"
    if type(netKw) is not list or not netKw or netKw[0] != b"dictionary":
        return "a message whose keyword arguments are not a dictionary"
    if len(netKw) == 1:
        # No keyword arguments (most calls): only the arguments to walk.
        return checkJelly(netArgs) if len(netArgs) > 1 else None
    problem = checkJelly(netArgs) or checkJelly(netKw)
    if problem is not None:
        return problem
    for name, _ in netKw[1:]:
        if type(name) is bytes:  # a Python 2 client's
            text = name
        elif type(name) is list and len(name) == 2 and name[0] == b"unicode":
            text = name[1]
        else:
            return "a keyword argument whose name is not a string"
        if type(text) is not bytes:
            return "a keyword argument whose name is not a string"
        if not _isUTF8(text):
            return "a keyword argument whose name is not UTF-8"
    return None


def unicodeNames(netKw: list) -> list:
    """
    C{netKw} (checked by L{checkMessage}) with the names that a Python 2
    client sends as byte strings turned into the strings a Python 3 client
    sends, so that every receiver can pass them as keyword arguments.
    """
    if len(netKw) == 1 or not any(type(name) is bytes for name, _ in netKw[1:]):
        return netKw
    entries = [[[b"unicode", k] if type(k) is bytes else k, v] for k, v in netKw[1:]]
    return [netKw[0], *entries]


def checkReference(expression: list) -> str | None:
    """
    Check a jelly C{remote} or C{local} expression: one id, an integer (or,
    for one of the server's own objects, a name).
    """
    if len(expression) < 2:
        return "a reference without an id"
    if len(expression) > 2:
        return "a reference with more than an id"
    luid = expression[1]
    if type(luid) is int or (expression[0] == b"local" and type(luid) is bytes):
        return None
    return f"a reference with an id of type {_kind(luid)}"


def checkJelly(expression: object) -> str | None:
    """
    Check that C{expression} is built as jelly builds it: every list starts
    with its type's name, the entries of a dictionary are pairs, the keys of
    back references are integers, and every reference has a proper id.
    Which types are allowed is for the jelly security options to say.

    The walk keeps its own stack: a message may nest as deep as the wire
    limit allows.
    """
    pending = [expression]
    references = 0
    while pending:
        item = pending.pop()
        if type(item) is not list:
            continue  # a number or a byte string
        if not item or type(item[0]) is not bytes:
            return "a jelly expression without a type"
        tag = item[0]
        if tag == b"remote" or tag == b"local":
            problem = checkReference(item)
            if problem is not None:
                return problem
            references += 1
            if references > MAX_REFERENCES:
                return f"more than {MAX_REFERENCES} references in one expression"
        elif tag == b"dictionary":
            for entry in item[1:]:
                if type(entry) is not list or len(entry) != 2:
                    return "a dictionary entry that is not a pair"
                pending.extend(entry)
        elif tag == b"reference":
            if len(item) != 3 or type(item[1]) is not int:
                return "a malformed back reference"
            pending.append(item[2])
        elif tag == b"dereference":
            if len(item) != 2 or type(item[1]) is not int:
                return "a malformed back reference"
        else:
            pending.extend(item[1:])
    return None


def isFailure(expression: object) -> bool:
    """
    Whether C{expression} (checked by L{checkJelly}) is jellied as PB jellies
    a failure: its tag and a dictionary of its state.
    """
    return (
        type(expression) is list
        and len(expression) == 2
        and expression[0] == FAILURE
        and type(expression[1]) is list
        and bool(expression[1])
        and expression[1][0] == b"dictionary"
    )


def unfinishedRequest(listStack: list) -> int | None:
    """
    The request id of the call whose decoding stopped midway, with the
    lists Banana has open (C{listStack}, the outermost first), if enough of
    it was decoded to say that it is a C{message} that wants an answer.
    """
    if not listStack:
        return None
    fields = listStack[0][1]
    if len(fields) < 5 or fields[0] != b"message":
        return None
    requestID, objectID, method, answerRequired = fields[1:5]
    if (
        type(requestID) is not int
        or type(objectID) not in (int, bytes)
        or type(method) is not bytes
        or type(answerRequired) is not int
        or not answerRequired
    ):
        return None
    return requestID


def receivedFailure(state: object) -> Failure | None:
    """
    The failure a client sent, from its decoded state, or L{None} if it is
    not one.

    Only its type, message and parent classes are kept, as strings, the
    message cut to L{MAX_ERROR_TEXT} characters: a client may set any other
    attribute, and those that code handling a failure reads (its frames,
    its traceback) must not be the client's.  Python 2 clients send byte
    strings throughout; they become the strings a Python 3 client sends.
    """
    if type(state) is not dict:
        return None
    fields = {_text(key): value for key, value in state.items() if isinstance(key, (bytes, str))}
    kind, value, parents = fields.get("type"), fields.get("value"), fields.get("parents")
    if (
        not isinstance(kind, (bytes, str))
        or not isinstance(value, (bytes, str))
        or not isinstance(parents, (list, tuple))
        or len(parents) > MAX_PARENTS
        or not all(isinstance(parent, (bytes, str)) for parent in parents)
    ):
        return None
    failure = pb.CopiedFailure.__new__(pb.CopiedFailure)
    failure.setCopyableState(
        _copyableState(
            _text(kind).encode("utf-8"),
            _text(value)[:MAX_ERROR_TEXT],
            [_text(parent) for parent in parents],
        )
    )
    return failure


def failureState(fail: Failure | BaseException) -> dict:
    """
    What a client is told of an error: the state of a PB failure holding its
    type, its parent classes and its message, cut to L{MAX_ERROR_TEXT}
    characters, and no traceback.  An error that is not a L{pb.Error} is the
    server's fault, and logged: its message is not sent either, as it may
    name anything of the server's.

    PB copies a failure's whole C{__dict__}; in Twisted 26.10 that holds the
    frames (function names, file paths, line numbers) even with
    C{unsafeTracebacks} off.  The empty C{tb}, C{frames}, C{stack} and
    C{captureVars} are there because the clients' L{Failure} code reads them.
    """
    if not isinstance(fail, Failure):
        fail = Failure(fail)
    if fail.check(pb.Error) is None:
        message = _INTERNAL
    else:
        message = reflect.safe_str(fail.value)[:MAX_ERROR_TEXT]
    # Not a type in a failure copied from a PB peer: there it is the name of one.
    kind = reflect.qual(fail.type) if isinstance(fail.type, type) else _text(fail.type)
    parents = [_text(p) if isinstance(p, (bytes, str)) else reflect.qual(p) for p in fail.parents]
    return _copyableState(kind.encode("utf-8"), message, parents)


def _copyableState(kind: bytes, message: str, parents: list[str]) -> dict:
    return {
        "type": kind,
        "value": message,
        "parents": parents,
        "traceback": "Traceback unavailable\n",
        "tb": None,
        "frames": [],
        "stack": [],
        "captureVars": False,
    }


def _text(value: bytes | str | object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else reflect.safe_str(value)


def _isUTF8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
