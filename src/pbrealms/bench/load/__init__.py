"""
The load generator: runs one workload against one PB server and prints its
figures.

C{python -m pbrealms.bench.load WORKLOAD --connect HOST:PORT [options]}
(L{LoadOptions}; a usage error exits 2, with one line on stderr)

Every client logs in with a raw L{pb.PBClientFactory} and
C{login(UsernamePassword(user, password), client=mind)}, PB's standard
challenge and response, whichever server it talks to.  The last line on
stdout is one JSON object: C{workload}, the sizes used and the figures
below.  Progress goes to stderr, at most once a second.  Exit status 0 on
success; 1, with one line on stderr, if the server is unreachable, the
workload fails, or it does not finish within C{--timeout} (save C{storm} and
C{fanout}, which then report what they got).  A login (but a storm's) whose
connection the server has not spoken on within C{--retry-after} seconds
starts over on a new connection; C{login_retries} counts those.  Closing the
connections at the end takes at most L{CLOSE_GRACE} seconds more.

Workloads and their keys (besides C{workload}):
  - greet: C{count}, C{in_flight}, C{sequential_per_s}, C{in_flight_per_s}.
  - logins: C{count}, C{concurrency}, C{users} (0 for one user),
    C{login_retries}, C{sequential_per_s}, C{concurrent_per_s}.
  - storm: C{clients}, C{logged_in}, C{failed}, C{seconds}, C{p50_login_s},
    C{p99_login_s}, C{timed_out}.
  - held: C{sessions}, C{concurrency}, C{logged_in}, C{failed},
    C{login_retries}, C{login_seconds}, and with C{--server-pid}:
    C{rss_before}, C{rss_after}, C{rss_per_session} (bytes).
  - clock: C{sessions}, C{concurrency}, C{logged_in}, C{failed},
    C{login_retries}, C{duration}, C{period}, C{received}, C{expected},
    C{delivered}, C{p50_lateness_s}, C{p99_lateness_s}, C{max_lateness_s},
    and with C{--server-pid}: C{rss_start}, C{rss_end}, C{rss_samples}.
  - fanout: C{sessions}, C{concurrency}, C{logged_in}, C{failed},
    C{login_retries}, C{greetings}, C{deliveries}, C{expected_deliveries},
    C{seconds}, C{deliveries_per_s}, C{complete}.
A percentile or maximum over no values is C{null}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage
from twisted.python.failure import Failure

from pbrealms.bench import raiseFileLimit
from pbrealms.bench.load.clients import Progress, Result, Target, describe, probe
from pbrealms.bench.load.options import PROG, LoadOptions
from pbrealms.bench.load.workloads import WORKLOADS

EXIT_FAILED = 1
EXIT_USAGE = 2


async def run(reactor: IReactorTime, options: LoadOptions) -> Result:
    """
    Check that the server is reachable, then run the workload within
    C{--timeout} seconds.

    @return: the result: C{workload} and the workload's figures.
    @raise Exception: with a one-line message, if either fails.
    """
    try:
        await probe(options["host"], options["port"], options["timeout"])
    except Exception as e:
        raise RuntimeError(f"cannot connect to {options['connect']}: {e}") from e
    progress = Progress()
    reporter = task.LoopingCall(progress.report)
    reporter.clock = reactor
    reporter.start(1.0, now=False)
    target = Target(options["host"], options["port"], options["timeout"], options["retry-after"])
    work = defer.ensureDeferred(WORKLOADS[options["workload"]](options, target, progress))
    # On timeout the workload is cancelled where it waits: storm and fanout
    # catch that and report; the others close their connections and fail.
    work.addTimeout(options["timeout"], reactor)
    try:
        return {"workload": options["workload"], **await work}
    except defer.TimeoutError:
        raise RuntimeError(
            f"timed out after {options['timeout']:g} s in {progress.phase} "
            f"({progress.done}/{progress.total})"
        ) from None
    finally:
        reporter.stop()


def generate(reactor: Any, options: LoadOptions) -> defer.Deferred[None]:
    """
    Run the workload; once the reactor has stopped, print its JSON on
    stdout, or one line of error on stderr, last.

    @return: a L{Deferred} for L{task.react}, which fires with the first of
        a result, an error, or an interruption: L{None} for a result, else
        a L{SystemExit} of L{EXIT_FAILED}.
    """
    outcome: dict[str, object] = {}
    finished: defer.Deferred[None] = defer.Deferred()

    def settle(key: str, value: object) -> None:
        if outcome:
            return
        outcome[key] = value
        if key == "result":
            finished.callback(None)
        else:
            finished.errback(SystemExit(EXIT_FAILED))

    def failed(reason: Failure) -> None:
        assert reason.value is not None  # typed optional; a Failure always has one
        settle("error", describe(reason.value))

    def tell() -> None:
        # After the shutdown, so that the error is the last line on stderr:
        # pbrealms-bench reports that line.
        if "result" in outcome:
            print(json.dumps(outcome["result"]), flush=True)
        else:
            error = outcome.get("error", "interrupted")
            print(f"error: {options['workload']}: {error}", file=sys.stderr, flush=True)

    # A signal stops the reactor, whose shutdown fails what was waiting: no
    # result may come of that.
    reactor.addSystemEventTrigger("before", "shutdown", settle, "error", "interrupted")
    reactor.addSystemEventTrigger("after", "shutdown", tell)
    work = defer.ensureDeferred(run(reactor, options))
    work.addCallbacks(lambda result: settle("result", result), failed)
    return finished


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    Run the workload the command line names, print its JSON, and exit 0;
    print one line of error to stderr and exit 1 if it fails; or exit 2
    with one line if the command line is wrong.
    """
    options = LoadOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    raiseFileLimit()
    task.react(generate, (options,))
