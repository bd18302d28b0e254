"""
The pbrealms-bench command: its options, its table and targets (from
hand-made results), and a small real run of the servers and the load
generator, which must leave no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from processes import childrenOf, environment, stop, waitFor
from twisted.internet import defer
from twisted.python import usage

from pbrealms.bench import cli, runs, servers
from pbrealms.bench.cli import failures, main
from pbrealms.bench.load.clients import inParallel
from pbrealms.bench.load.options import LoadOptions
from pbrealms.bench.options import BenchOptions
from pbrealms.bench.report import evaluate, formatTable, plot, roundsNote
from pbrealms.bench.runs import bestOf, runWorkload
from pbrealms.bench.servers import BenchError, writePasswords
from pbrealms.bench.workloads import AUTH_FILE, BASELINE, PBREALMS, WORKLOADS


def parsed(*args: str) -> BenchOptions:
    options = BenchOptions()
    options.parseOptions(list(args))
    return options


def usageError(capsys, *args: str) -> str:
    """
    Run the command with bad C{args}: the one line it says, having exited 2.
    """
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("pbrealms-bench: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--greet-count", "0"], "--greet-count"),
        (["--rounds", "0"], "--rounds"),
        (["--login-count", "many"], "--login-count"),
        (["--users", "-5"], "--users"),
        (["--held-sessions", "1.5"], "--held-sessions"),
        (["--clock-duration", "0"], "--clock-duration"),
        (["--timeout", "soon"], "--timeout"),
        (["--period", "0.001"], "--period"),
        (["--scale", "1000,,5000"], "--scale"),
        (["--only", "greet,nap"], "'nap'"),
        (["--only", ","], "--only"),
        (["--connect", "localhost"], "--connect"),
        (["--connect", "localhost:99999"], "--connect"),
        (["--server-pid", "12"], "--connect"),
        (["--json", "/no/such/dir/out.json"], "--json"),
        (["--bogus"], "bogus"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(capsys, args, problem):
    assert problem in usageError(capsys, *args)


def test_plot_without_matplotlib_stops_before_anything_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    def nothing(*args, **kw):
        raise AssertionError("ran something")

    monkeypatch.setattr(cli, "bench", nothing)
    line = usageError(capsys, "--plot", str(tmp_path / "curves.png"))
    assert "pip install 'pbrealms[bench]'" in line


def test_defaults():
    options = parsed()
    assert options["only"] == list(WORKLOADS)
    assert options["users"] == 100000
    assert options["rounds"] == 3
    assert (options["greet-count"], options["login-count"]) == (10000, 500)
    assert options["period"] == 1.0
    assert options["scale"] == [1000, 2500, 5000, 10000]
    assert options["timeout"] is None
    assert options["connect"] is None


def test_only_keeps_the_table_order():
    assert parsed("--only", "held, greet")["only"] == ["greet", "held"]


def test_logins_gives_users_to_pbrealms_only():
    options = parsed("--login-count", "20", "--users", "1000", "--contrast-count", "5")
    arguments = WORKLOADS["logins"].arguments
    assert arguments(options, PBREALMS) == [
        "--concurrency", "50", "--count", "20", "--users", "1000"
    ]  # fmt: skip
    assert arguments(options, BASELINE) == ["--concurrency", "50", "--count", "20"]
    assert arguments(options, AUTH_FILE)[:4] == ["--concurrency", "50", "--count", "5"]


def test_the_clock_arguments():
    options = parsed("--clock-sessions", "20", "--clock-duration", "2.5", "--period", "0.5")
    assert WORKLOADS["clock"].arguments(options, BASELINE) == [
        "--sessions", "20", "--duration", "2.5", "--period", "0.5", "--concurrency", "200"
    ]  # fmt: skip


def test_the_password_file(tmp_path):
    path = writePasswords(tmp_path / "passwd", 3)
    assert path.read_text().split() == ["bench:bench", "user2:pw2", "user1:pw1", "user0:pw0"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ---------------------------------------------------------------------------
# Rounds


def test_only_the_throughput_workloads_run_in_rounds():
    assert [w.name for w in WORKLOADS.values() if w.throughput] == ["greet", "logins"]


def test_the_best_round_of_each_figure():
    rounds = [
        {"count": 10, "sequential_per_s": 900.0, "in_flight_per_s": 2100.0},
        {"count": 10, "sequential_per_s": 1000.0, "in_flight_per_s": 1900.0},
        {"count": 10, "sequential_per_s": 950.0, "in_flight_per_s": None},
    ]
    best = bestOf(rounds, ("sequential_per_s", "in_flight_per_s"))
    assert best == {
        "count": 10,
        "sequential_per_s": 1000.0,
        "in_flight_per_s": 2100.0,
        "rounds": rounds,
    }
    assert bestOf([{"count": 1}], ("sequential_per_s",))["sequential_per_s"] is None


@pytest.fixture
def fakeRuns(monkeypatch):
    """
    Servers and load generator runs that only say what happened, in order;
    the load gives what C{figures} holds for the server, one per round.
    """
    said: list[str] = []
    figures: dict[str, list[object]] = {}

    @contextlib.contextmanager
    def server(kind, workload, options, work):
        said.append(f"start {kind}")
        yield f"{kind}:1", None
        said.append(f"stop {kind}")

    def runLoad(workload, kind, where, pid, options):
        said.append(f"run {where}")
        figure = figures.get(kind, [1.0]).pop(0)
        if isinstance(figure, Exception):
            raise figure
        return {"sequential_per_s": figure, "concurrent_per_s": figure}

    monkeypatch.setattr(runs, "server", server)
    monkeypatch.setattr(runs, "runLoad", runLoad)
    return said, figures


def test_rounds_take_turns_on_servers_started_once(fakeRuns, tmp_path):
    said, figures = fakeRuns
    figures[PBREALMS] = [5.0, 7.0, 6.0]
    figures[BASELINE] = [8.0, 4.0, 3.0]
    results = runWorkload(WORKLOADS["logins"], parsed(), tmp_path)
    assert said == [
        "start pbrealms", "start baseline",
        "run pbrealms:1", "run baseline:1",
        "run pbrealms:1", "run baseline:1",
        "run pbrealms:1", "run baseline:1",
        "stop baseline", "stop pbrealms",
        "start auth-file", "run auth-file:1", "stop auth-file",
    ]  # fmt: skip
    assert list(results) == [PBREALMS, BASELINE, AUTH_FILE]
    assert results[PBREALMS]["sequential_per_s"] == 7.0
    assert [r["sequential_per_s"] for r in results[PBREALMS]["rounds"]] == [5.0, 7.0, 6.0]
    assert results[BASELINE]["concurrent_per_s"] == 8.0
    assert "rounds" not in results[AUTH_FILE]


def test_other_workloads_run_once(fakeRuns, tmp_path):
    said, _ = fakeRuns
    runWorkload(WORKLOADS["held"], parsed("--rounds", "5"), tmp_path)
    assert said == [
        "start pbrealms", "run pbrealms:1", "stop pbrealms",
        "start baseline", "run baseline:1", "stop baseline",
    ]  # fmt: skip


def test_a_failed_round_sits_out_the_rest(fakeRuns, tmp_path, capsys):
    said, figures = fakeRuns
    figures[BASELINE] = [2.0, BenchError("no answer within 5 s")]
    results = runWorkload(WORKLOADS["greet"], parsed("--rounds", "3"), tmp_path)
    assert said.count("run baseline:1") == 2
    assert said.count("run pbrealms:1") == 3
    assert results[BASELINE]["error"] == "no answer within 5 s"
    assert [r["sequential_per_s"] for r in results[BASELINE]["rounds"]] == [2.0]
    assert "greet: baseline failed: no answer within 5 s" in capsys.readouterr().err
    assert failures({"workloads": {"greet": results}}) == ["greet/baseline"]


def test_the_rounds_footnote():
    assert roundsNote(parsed()) == (
        "greet, logins: each figure is the best of 3 interleaved rounds against pbrealms "
        "and bare PB; the --auth file: contrast is one round."
    )
    assert roundsNote(parsed("--only", "greet", "--rounds", "2")) == (
        "greet: each figure is the best of 2 interleaved rounds against pbrealms and bare PB."
    )
    assert roundsNote(parsed("--only", "held,clock")) == ""
    assert roundsNote(parsed("--rounds", "1")) == ""


# ---------------------------------------------------------------------------
# The table, from hand-made results


def lines(name: str, results: dict, *args: str) -> list[dict]:
    return evaluate(WORKLOADS[name], results, parsed(*args))


def test_ratios_and_targets():
    greet = lines(
        "greet",
        {
            PBREALMS: {"sequential_per_s": 960.0, "in_flight_per_s": 1800.0},
            BASELINE: {"sequential_per_s": 1000.0, "in_flight_per_s": 2000.0},
        },
    )
    assert [line["ratio"] for line in greet] == [0.96, 0.9]
    assert [line["met"] for line in greet] == [True, False]
    assert greet[1]["figure"] == "greet: calls/s, 50 in flight"
    assert greet[0]["cells"] == ["960", "1,000", "0.96"]
    table = formatTable(greet)
    assert "ratio ≥ 0.95: met" in table
    assert "ratio ≥ 0.95: MISSED" in table


def test_lower_is_better_targets():
    held = lines(
        "held",
        {PBREALMS: {"rss_per_session": 14000}, BASELINE: {"rss_per_session": 10000}},
    )
    assert held[0]["better"] == "lower"
    assert held[0]["met"] is True
    clock = lines(
        "clock",
        {
            PBREALMS: {
                "delivered": 0.9995,
                "p99_lateness_s": 0.040,
                "rss_start": 100,
                "rss_end": 105,
            },
            BASELINE: {
                "delivered": 0.98,
                "p99_lateness_s": 0.030,
                "rss_start": 100,
                "rss_end": 300,
            },
        },
    )
    delivered, lateness, rss = clock
    assert delivered["cells"][:2] == ["99.95 %", "98.00 %"]
    assert delivered["met"] is True
    # Under 100 ms but later than the baseline.
    assert lateness["cells"][0] == "40.0"
    assert lateness["met"] is False
    assert rss["met"] is True
    assert rss["cells"][2] == "n/a"


def test_a_storm_that_timed_out():
    storm = lines(
        "storm",
        {
            PBREALMS: {"clients": 3000, "logged_in": 3000, "seconds": 4.25},
            BASELINE: {"clients": 3000, "logged_in": 2100, "seconds": 60.0, "timed_out": True},
        },
    )
    seconds, loggedIn = storm
    assert seconds["cells"] == ["4.2", "timed out after 60 s (2,100 of 3,000)", "n/a"]
    assert loggedIn["cells"] == ["3,000 of 3,000", "2,100 of 3,000", "1.43"]


def test_no_baseline_and_failures():
    fanout = lines("fanout", {PBREALMS: {"deliveries_per_s": 12345.6}})
    assert fanout[0]["cells"] == ["12,346", "—", "n/a"]
    logins = lines(
        "logins",
        {
            PBREALMS: {"error": "boom"},
            BASELINE: {"sequential_per_s": 500.0, "concurrent_per_s": 900.0},
            AUTH_FILE: {"sequential_per_s": 20.0, "concurrent_per_s": 21.0},
        },
    )
    assert [line["cells"][0] for line in logins] == ["failed", "failed", "20"]
    assert [line["met"] for line in logins] == [None, None, None]
    assert logins[2]["ratio"] == 0.04
    assert "ratio ≥ 0.9: n/a" in formatTable(logins)


def test_the_table_is_markdown_that_lines_up():
    rows = lines("greet", {PBREALMS: {"sequential_per_s": 1.0, "in_flight_per_s": 2.0}})
    table = formatTable(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert len({len(line) for line in table}) == 1
    assert all(line.startswith("| ") and line.endswith(" |") for line in table)
    assert set(table[1]) <= set("|-: ")
    header = [cell.strip() for cell in table[0].split("|")[1:-1]]
    assert header == ["figure", "pbrealms", "bare PB", "pbrealms/bare", "better when", "target"]


def test_failures_name_the_runs():
    report = {
        "workloads": {"greet": {PBREALMS: {"sequential_per_s": 1.0}, BASELINE: {"error": "x"}}},
        "scaling": {
            "sessions": [10, 20],
            "clock": {PBREALMS: [{}, {"error": "x"}], BASELINE: [{}, {}]},
            "held": {PBREALMS: [{}, {}], BASELINE: [{}, {}]},
        },
    }
    assert failures(report) == ["greet/baseline", "clock with 20 sessions/pbrealms"]


def test_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    clock = {"p99_lateness_s": 0.01, "delivered": 1.0}
    curves = {
        "sessions": [10, 20],
        "clock": {PBREALMS: [clock, clock], BASELINE: [clock, {"error": "x"}]},
        "held": {PBREALMS: [{"rss_per_session": 5000}] * 2, BASELINE: [{}, {}]},
    }
    plot(curves, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------
# The load generator's parts


def loadOptions(*args: str) -> LoadOptions:
    options = LoadOptions()
    options.parseOptions(list(args))
    return options


def test_the_load_generator_takes_the_workload_anywhere_with_its_defaults():
    first = loadOptions("logins", "--connect", "h:1", "--in-flight=7")
    last = loadOptions("--connect", "h:1", "--in-flight", "7", "logins")
    for options in (first, last):
        assert (options["workload"], options["host"], options["port"]) == ("logins", "h", 1)
        assert (options["count"], options["concurrency"], options["in-flight"]) == (1000, 50, 7)
    fanout = loadOptions("fanout", "--connect", "h:1", "--count", "-5")
    assert (fanout["count"], fanout["concurrency"], fanout["sessions"]) == (-5, 200, 1000)
    assert fanout["timeout"] == 120.0 and fanout["users"] is None


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ([], "the following arguments are required: workload, --connect"),
        (["greet", "--connect", "h:1", "--coun", "5"], "unrecognized arguments: --coun 5"),
        (["nap", "--connect", "h:1"], "argument workload: invalid choice: 'nap'"),
        (["greet", "--connect", "h:1", "--count"], "argument --count: expected one argument"),
        (["greet", "--connect", "localhost"], "--connect wants HOST:PORT, not 'localhost'"),
    ],
)
def test_the_load_generators_usage_errors(args, problem):
    with pytest.raises(usage.UsageError) as refused:
        loadOptions(*args)
    assert str(refused.value).startswith(problem)


def test_in_parallel_keeps_to_its_width_and_stops_when_cancelled():
    started: list[int] = []
    pending: list[defer.Deferred[None]] = []

    async def job(i: int) -> None:
        started.append(i)
        d: defer.Deferred[None] = defer.Deferred()
        pending.append(d)
        await d

    running = defer.ensureDeferred(inParallel(1000, 3, job))
    assert started == [0, 1, 2]
    pending[1].callback(None)
    assert started == [0, 1, 2, 3]
    running.cancel()
    # No waiting job starts, and the running ones are cancelled.
    assert started == [0, 1, 2, 3]
    assert all(d.called for d in pending)
    failures: list[type] = []
    running.addErrback(lambda f: failures.append(f.type))
    assert failures == [defer.CancelledError]


def test_in_parallel_raises_the_first_failure_as_itself():
    async def job(i: int) -> None:
        if i == 3:
            raise ValueError("three")

    failed: list[BaseException] = []
    defer.ensureDeferred(inParallel(10, 2, job)).addErrback(lambda f: failed.append(f.value))
    assert [str(e) for e in failed] == ["three"]


# ---------------------------------------------------------------------------
# Real runs


@pytest.fixture
def noChildrenLeft():
    before = set(childrenOf(os.getpid()))
    yield
    assert set(childrenOf(os.getpid())) - before == set()


def test_a_small_real_run(capsys, tmp_path, noChildrenLeft):
    report = tmp_path / "bench.json"
    main(
        [
            "--only", "greet,logins,held,clock",
            "--greet-count", "50", "--login-count", "20", "--users", "1000",
            "--contrast-count", "5", "--held-sessions", "50", "--hold-concurrency", "10",
            "--clock-sessions", "20", "--clock-duration", "2", "--period", "0.5",
            "--rounds", "2", "--json", str(report),
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    table = [line for line in out.splitlines() if line.startswith("| ")]
    figures = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table[2:]}
    for figure in (
        "greet: sequential calls/s",
        "greet: calls/s, 50 in flight",
        "logins: sequential logins/s",
        "logins: logins/s, 50 concurrent",
        "held: 50 sessions, RSS bytes per session",
        "clock: 20 sessions, pushes delivered %",
        "clock: p99 lateness ms",
    ):
        mine, base, ratio, _, _ = (cell.strip() for cell in figures[figure])
        for cell in (mine, base, ratio):
            assert cell and cell[0].isdigit(), (figure, cell)
    assert (
        figures["logins via --auth file: (contrast), sequential logins/s"][0].strip()[0].isdigit()
    )
    assert "[clock pbrealms]" in err
    assert "best of 2 interleaved rounds" in out.splitlines()[-1]
    assert "greet: round 2 of 2 against baseline" in err

    written = json.loads(report.read_text())
    assert written["machine"]["cores"] == os.cpu_count()
    assert written["machine"]["twisted"]
    assert set(written["workloads"]) == {"greet", "logins", "held", "clock"}
    assert set(written["workloads"]["logins"]) == {PBREALMS, BASELINE, AUTH_FILE}
    greet = written["workloads"]["greet"][PBREALMS]
    assert len(greet["rounds"]) == 2
    assert greet["sequential_per_s"] == max(r["sequential_per_s"] for r in greet["rounds"]) > 0
    assert len(written["workloads"]["logins"][BASELINE]["rounds"]) == 2
    assert "rounds" not in written["workloads"]["logins"][AUTH_FILE]
    assert "rounds" not in written["workloads"]["held"][PBREALMS]
    assert written["workloads"]["held"][BASELINE]["sessions"] == 50
    rows = {row["figure"]: row for row in written["rows"]}
    assert rows["greet: sequential calls/s"]["ratio"] > 0
    assert rows["greet: sequential calls/s"]["met"] in (True, False)


def test_an_interrupted_run_stops_its_servers(capsys, monkeypatch, noChildrenLeft):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "runLoad", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["--only", "greet"])
    assert exited.value.code == 130
    assert "pbrealms server listening" in capsys.readouterr().err


def test_an_interrupted_stop_still_kills_everything(capsys, monkeypatch, noChildrenLeft):
    def interrupted(process):
        raise KeyboardInterrupt

    monkeypatch.setattr(servers, "stopProcess", interrupted)
    monkeypatch.setattr(runs, "runLoad", lambda *args: {})
    with pytest.raises(SystemExit) as exited:
        main(["--only", "greet"])
    assert exited.value.code == 130


def test_a_failed_load_is_reported_and_exits_1(capsys, monkeypatch, tmp_path, noChildrenLeft):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def failing(workload, kind, *args, **kw):
        if kind == BASELINE:
            raise BenchError("no answer within 5 s")
        return {"sequential_per_s": 10.0, "in_flight_per_s": 20.0}

    monkeypatch.setattr(runs, "runLoad", failing)
    with pytest.raises(SystemExit) as exited:
        main(["--only", "greet"])
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    greet = [line for line in out.splitlines() if line.startswith("| greet: sequential")]
    assert [cell.strip() for cell in greet[0].split("|")[2:4]] == ["10", "failed"]
    assert "greet: baseline failed: no answer within 5 s" in err
    # Nothing is kept in the temporary directory: it says how to see the logs.
    assert "run again with --logs DIR" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# What a run leaves behind: only what the user named

BENCH = str(Path(sys.executable).parent / "pbrealms-bench")
QUICK = ["--only", "greet", "--greet-count", "20", "--in-flight", "5", "--rounds", "1"]


def benchProcess(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path, Path]:
    """
    Start pbrealms-bench in an empty directory, with TMPDIR an empty one of
    its own: the process, its stderr file, that directory and TMPDIR.
    """
    cwd, temp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    temp.mkdir()
    err = tmp_path / "bench.err"
    with err.open("wb") as errors:
        process = subprocess.Popen(
            [BENCH, *args],
            cwd=cwd,
            env=environment(TMPDIR=str(temp)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            # As from a terminal: a background job would ignore SIGINT.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    return process, err, cwd, temp


def runningFrom(directory: Path) -> list[str]:
    """
    The command lines of the processes that name C{directory}: the servers
    the bench started name their password file in it.
    """
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(directory) in (entry / "cmdline").read_text():
                found.append((entry / "cmdline").read_text().replace("\0", " "))
    return found


def test_a_run_writes_only_the_files_it_is_asked_for(tmp_path):
    process, err, cwd, temp = benchProcess(tmp_path, *QUICK, "--json", "out.json", "--logs", ".")
    try:
        assert process.wait(120) == 0, err.read_text()
    finally:
        stop(process)
    assert list(temp.iterdir()) == []
    assert sorted(p.name for p in cwd.iterdir()) == [
        "baseline-greet.out", "out.json", "pbrealms-greet.out"
    ]  # fmt: skip
    assert "pbrealms listening on 127.0.0.1:" in (cwd / "pbrealms-greet.out").read_text()
    assert json.loads((cwd / "out.json").read_text())["workloads"]["greet"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_nothing_behind(tmp_path, sig):
    # Long enough to be interrupted in the middle.
    process, err, cwd, temp = benchProcess(tmp_path, *QUICK, "--greet-count", "10000000")
    try:
        waitFor(lambda: "round 1 of 1 against pbrealms" in err.read_text(), 60, "greeting")
        process.send_signal(sig)
        assert process.wait(60) == 128 + sig, err.read_text()
    finally:
        stop(process)
    assert list(temp.iterdir()) == []
    assert list(cwd.iterdir()) == []
    assert runningFrom(temp) == []
