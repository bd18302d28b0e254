"""
The first minute with a real C{twistd pbrealms}: what a port that cannot be
bound, a bad value, a stray word and C{--version} print, and with what exit
status; and who may connect to the UNIX sockets it creates.
"""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
from importlib.metadata import version as distributionVersion
from pathlib import Path

from processes import BIN, environment, stop, waitFor

import twisted

TWISTD = str(BIN / "twistd")
PREFIX = "twistd pbrealms: error: "
LOOPBACK = "tcp:0:interface=127.0.0.1"


def twistd(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd -n --pidfile= pbrealms ARGS} to its end.
    """
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "pbrealms", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=environment(**env),
    )


def heldPort() -> tuple[socket.socket, int]:
    """
    A loopback TCP port that this test listens on, so twistd cannot.
    """
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held, held.getsockname()[1]


def assertStoppedWithOneLine(result: subprocess.CompletedProcess[str], status: int) -> str:
    """
    twistd exited with C{status} and one line on standard error, which is
    returned without its prefix, and no traceback anywhere.
    """
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert result.stderr.endswith("\n")
    assert lines[0].startswith(PREFIX), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0][len(PREFIX) :]


def test_a_port_in_use_is_one_line_on_stderr_and_exit_1(tmp_path):
    held, port = heldPort()
    with held:
        result = twistd(tmp_path, "--port", f"tcp:{port}:interface=127.0.0.1")
    line = assertStoppedWithOneLine(result, 1)
    assert (
        line == f"cannot listen on tcp:{port}:interface=127.0.0.1 (--port): address already in use"
    )
    # Standard output keeps twistd's start-up lines, and only those.
    assert "starting up" in result.stdout
    assert "cannot listen" not in result.stdout
    assert "listening on" not in result.stdout


def test_a_metrics_port_in_use_names_its_variable(tmp_path):
    held, port = heldPort()
    with held:
        result = twistd(
            tmp_path, "--port", LOOPBACK, PBREALMS_METRICS=f"tcp:{port}:interface=127.0.0.1"
        )
    line = assertStoppedWithOneLine(result, 1)
    assert line == (
        f"cannot listen on tcp:{port}:interface=127.0.0.1 (PBREALMS_METRICS): "
        "address already in use"
    )
    assert "listening on" not in result.stdout


#: Command lines and environments that twistd must refuse, and how its line
#: starts (tests/test_options.py tries every setting in-process).
REFUSED = [
    (
        ["--port", "tcp:notaport"],
        {},
        "bad --port 'tcp:notaport': 'notaport' is not a whole number; expected e.g. ",
    ),
    (["extra", "words"], {}, "unexpected argument 'extra': twistd pbrealms takes only options"),
    (["--pass", "x"], {}, "--pass: give the whole option name (--passwd)"),
    (
        [],
        {"PBREALMS_REALM": "limited", "PBREALMS_MAX": "x"},
        "PBREALMS_MAX must be a whole number, not 'x'",
    ),
]


def test_a_bad_value_is_one_line_and_exit_2_before_anything_is_logged(tmp_path):
    # All at once: each twistd takes a second to start.
    processes = [
        subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pbrealms", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=environment(**env),
        )
        for args, env, _ in REFUSED
    ]
    try:
        for process, (args, env, expected) in zip(processes, REFUSED, strict=True):
            out, err = process.communicate(timeout=30)
            result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
            line = assertStoppedWithOneLine(result, 2)
            assert line.startswith(expected), (args, env, line)
            assert out == "", (args, env)
    finally:
        for process in processes:
            stop(process)


def test_version_names_pbrealms_and_twisted(tmp_path):
    result = twistd(tmp_path, "--version")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"pbrealms {distributionVersion('pbrealms')} (Twisted {twisted.__version__})\n"
    )


def test_unix_sockets(tmp_path):
    pb, metrics = tmp_path / "pb.sock", tmp_path / "metrics.sock"
    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "pbrealms", "--port", f"unix:{pb}",
             "--metrics", f"unix:{metrics}"],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=environment(),
        )  # fmt: skip
        try:

            def listening() -> bool:
                assert process.poll() is None, output.read_text()
                return "pbrealms listening on" in output.read_text()

            waitFor(listening, 15.0, "twistd listening")
            modes = {path.name: path.stat().st_mode for path in (pb, metrics)}
            process.send_signal(signal.SIGTERM)
            process.wait(10.0)
        finally:
            stop(process)
    for name, mode in modes.items():
        assert stat.S_ISSOCK(mode), name
        assert stat.S_IMODE(mode) == 0o660, (name, oct(mode))
