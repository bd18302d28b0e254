"""
A PB client as old deployments run it: Python 2.7 and Twisted 20.3, run by
tests/test_py2_clients.py with PYTHONPATH naming where that Twisted is.  It
must stay Python 2 syntax: no f-strings, no annotations.

    python2.7 py2client.py PORT USER PASSWORD MIND

MIND is "full" (a client object with every push), "partial" (only
notifyTime and notifyGreeting: notifySessionOpened, notifySessionClosed,
notifyKicked and notifyShutdown are missing, and answered with PB's "no such
method" error) or "none" (no client object).

It reads commands from standard input, one a line, and prints one line per
event on standard output, flushed at once:

    greet                 -> answer greet <text> | error greet <type> <message>
    setperiod SECONDS     -> setperiod(seconds=SECONDS), a keyword argument
    status                -> answer status <json>
    quit                  -> logs out and exits 0

    logged in             once the login succeeded
    time T                each notifyTime push
    greeting TEXT         each notifyGreeting push
    kicked REASON         the notifyKicked push
    shutdown REASON       the notifyShutdown push
    lost                  the connection closed (then it exits 0)
    login failed ...      (then it exits 1)
"""

import json
import os
import site
import sys

# pip's --target does not run the .pth files that make zope a namespace
# package; addsitedir does.
for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry:
        site.addsitedir(_entry)

from twisted.cred.credentials import UsernamePassword  # noqa: E402
from twisted.internet import reactor, stdio  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402
from twisted.spread import pb  # noqa: E402


def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


class PartialMind(pb.Referenceable):
    def remote_notifyTime(self, seconds):
        say("time", seconds)

    def remote_notifyGreeting(self, text):
        say("greeting", text)


class FullMind(PartialMind):
    def remote_notifyKicked(self, reason):
        say("kicked", reason)

    def remote_notifyShutdown(self, reason):
        say("shutdown", reason)

    def remote_notifySessionOpened(self, info):
        say("opened", info.get("id"))

    def remote_notifySessionClosed(self, info):
        say("closed", info.get("id"))


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, perspective):
        self.perspective = perspective

    def lineReceived(self, line):
        words = line.decode("utf-8").split()
        if not words:
            return
        name = words[0]
        if name == "quit":
            self.perspective.broker.transport.loseConnection()
            return
        if name == "setperiod":
            d = self.perspective.callRemote("setperiod", seconds=float(words[1]))
        else:
            d = self.perspective.callRemote(name, *words[1:])

        def answered(result):
            if isinstance(result, dict):
                result = json.dumps(result, sort_keys=True)
            say("answer", name, result)

        def failed(reason):
            kind = reason.type
            if not isinstance(kind, (str, bytes)):
                kind = kind.__name__
            say("error", name, kind, reason.getErrorMessage())

        d.addCallbacks(answered, failed)

    def connectionLost(self, reason):
        pass


def main(port, user, password, mind):
    mind = {"full": FullMind, "partial": PartialMind}.get(mind, lambda: None)()
    failed = []
    factory = pb.PBClientFactory()
    reactor.connectTCP("127.0.0.1", int(port), factory)

    def lost(_=None):
        say("lost")
        if reactor.running:
            reactor.stop()

    def loggedIn(perspective):
        perspective.notifyOnDisconnect(lost)
        say("logged in")
        stdio.StandardIO(Commands(perspective))

    def refused(reason):
        say("login failed", reason.getErrorMessage())
        failed.append(reason)
        reactor.stop()

    credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
    factory.login(credentials, client=mind).addCallbacks(loggedIn, refused)
    reactor.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
