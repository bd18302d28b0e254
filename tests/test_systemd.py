"""
The systemd units in config/: checked by systemd-analyze, and what they rely
on exercised with the real twistd: socket activation with a named file
descriptor, and the readiness protocol.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import childrenOf, environment, killAndReap, stop, tool, waitFor

from pbrealms.tap import DEFAULT_GRACE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
UNITS = ("pbrealms.socket", "pbrealms.service")
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CLIENT = str(BIN / "pbrealms-client")
#: Where the service unit expects the virtualenv's twistd.
UNIT_TWISTD = "/opt/pbrealms/bin/twistd"
LISTENING = re.compile(r"pbrealms listening on (\S+):(\d+)")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def parseUnit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """
    A unit file's sections, each a list of (key, value) in order: keys may
    repeat, which configparser does not allow.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a setting: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


#: The client command for two clock pushes, a tenth of a second apart.
TWO_TICKS = ("clock", "--period", "0.1", "--ticks", "2")


def asAlice(connect: str, passwordFile, *command: str) -> subprocess.CompletedProcess[str]:
    """
    Run pbrealms-client as alice against C{connect}.
    """
    return subprocess.run(
        [CLIENT, "--connect", connect, "--user", "alice", "--password-file", str(passwordFile),
         *command],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, env=environment(),
    )  # fmt: skip


def settings(path: Path, section: str, key: str) -> list[str]:
    return [v for k, v in parseUnit(path).get(section, []) if k == key]


def setting(path: Path, section: str, key: str) -> str:
    values = settings(path, section, key)
    assert len(values) == 1, f"{path.name} [{section}] {key}=: {values}"
    return values[0]


def freePort(host: str, family: socket.AddressFamily) -> int:
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def assertStoppedCleanly(process: subprocess.Popen, output: Path, within: float) -> float:
    """
    SIGTERM the process; check it exits within C{within} seconds, and
    cleanly. Return how long it took.
    """
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {within} s after SIGTERM") from None
    took = time.monotonic() - started
    text = output.read_text(errors="replace")
    # twistd shuts down, then ends itself with the signal it received.
    assert status in (0, -signal.SIGTERM), text
    assert "Main loop terminated" in text, text
    assert "Traceback" not in text, text
    assert "Unhandled" not in text, text
    return took


# systemd-analyze


@pytest.fixture
def analyze() -> str:
    return tool("systemd-analyze")


def unitRoot(base: Path, withTwistd: bool = True) -> Path:
    """
    A file system root holding what the units name: the units themselves in
    /etc/systemd/system, an executable /opt/pbrealms/bin/twistd (this
    virtualenv's script) and the password file LoadCredential= reads.
    """
    root = base / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(CONFIG / name, units / name)
    if withTwistd:
        twistd = root / UNIT_TWISTD.lstrip("/")
        twistd.parent.mkdir(parents=True)
        shutil.copy(TWISTD, twistd)
        twistd.chmod(0o755)
    passwd = root / "etc/pbrealms/users.passwd"
    passwd.parent.mkdir(parents=True)
    passwd.write_text("alice:wonderland\n")
    passwd.chmod(0o600)
    return root


def verify(analyze: str, root: Path) -> subprocess.CompletedProcess[str]:
    # --root: systemd-analyze looks for units and for ExecStart='s command
    # under this root, as systemd would in a system laid out like it.
    # --recursive-errors=no: any warning about our units fails the command.
    return subprocess.run(
        [analyze, "verify", f"--root={root}", "--recursive-errors=no", "--man=no",
         "--generators=no", *UNITS],
        capture_output=True, text=True, timeout=60, env=environment(),
    )  # fmt: skip


def test_units_verify(analyze, tmp_path):
    result = verify(analyze, unitRoot(tmp_path))
    ours = [line for line in result.stderr.splitlines() if "pbrealms" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


def test_verify_sees_the_command_under_the_root(analyze, tmp_path):
    """
    The check above is a real one: without /opt/pbrealms/bin/twistd under
    the root, the same verification fails, naming it.
    """
    result = verify(analyze, unitRoot(tmp_path, withTwistd=False))
    assert result.returncode != 0
    assert f"{UNIT_TWISTD} is not executable" in result.stderr


def test_service_sandbox_exposure(analyze, tmp_path):
    # systemd's own scale: 0 is fully locked down, 10 not at all.
    result = subprocess.run(
        [analyze, "security", "--offline=yes", f"--root={unitRoot(tmp_path)}",
         "--threshold=20", "pbrealms.service"],
        capture_output=True, text=True, timeout=60, env=environment(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Overall exposure level for pbrealms\.service: [01]\.\d", result.stdout)


def test_units_agree():
    """
    What the two units must agree on, and what the server needs from them.
    """
    service, sock = CONFIG / "pbrealms.service", CONFIG / "pbrealms.socket"
    argv = shlex.split(setting(service, "Service", "ExecStart"))
    assert argv[:5] == [
        UNIT_TWISTD,
        "--nodaemon",
        "--pidfile=",
        "--logger=pbrealms.logs.textLogger",
        "pbrealms",
    ]
    name = setting(sock, "Socket", "FileDescriptorName")
    assert f"--port=systemd:domain=INET6:name={name}" in argv
    assert "--passwd=${CREDENTIALS_DIRECTORY}/users.passwd" in argv
    assert setting(service, "Service", "LoadCredential").startswith("users.passwd:")
    assert setting(sock, "Socket", "Service") == service.name
    assert setting(sock, "Socket", "ListenStream") == "8787"
    assert setting(service, "Service", "Type") == "notify"
    # twistd has no SIGHUP handler: a reload by signal would kill it.
    assert settings(service, "Service", "ExecReload") == []
    assert setting(service, "Service", "RestartPreventExitStatus") == "2"
    timeout = setting(service, "Service", "TimeoutStopSec")
    assert float(timeout.removesuffix("s")) > DEFAULT_GRACE + 2
    assert sock.name in settings(service, "Unit", "Requires")
    assert sock.name in settings(service, "Unit", "After")[0].split()


# Socket activation


@pytest.fixture
def socketActivate() -> str:
    return tool("systemd-socket-activate")


def unitCommand(credentials: Path) -> list[str]:
    """
    The service's ExecStart= as systemd runs it: ${CREDENTIALS_DIRECTORY}
    expanded, with this virtualenv's twistd.
    """
    line = setting(CONFIG / "pbrealms.service", "Service", "ExecStart")
    argv = [a.replace("${CREDENTIALS_DIRECTORY}", str(credentials)) for a in shlex.split(line)]
    assert argv[0] == UNIT_TWISTD
    return [TWISTD, *argv[1:]]


def credentialsDirectory(tmp_path: Path, pwfile: Path) -> Path:
    """
    A copy of the password file laid out as LoadCredential= lays it out:
    a directory of mode 0500 holding it with mode 0400.
    """
    directory = tmp_path / "credentials"
    directory.mkdir()
    copy = directory / "users.passwd"
    shutil.copy(pwfile, copy)
    copy.chmod(0o400)
    directory.chmod(0o500)
    return directory


@pytest.mark.parametrize(
    "family",
    [
        pytest.param("INET", id="ipv4-brief-command"),
        pytest.param("INET6", id="ipv6-unit-execstart"),
    ],
)
def test_socket_activation(family, socketActivate, tmp_path, pwfile, alicePassword):
    """
    systemd-socket-activate holds the socket and starts twistd on the first
    connection, passing the socket as file descriptor 3 named "pbrealms".
    The INET6 case runs the service unit's own command line.
    """
    if family == "INET":
        host, connect = "127.0.0.1", "tcp:127.0.0.1:{}"
        port = freePort(host, socket.AF_INET)
        listen = f"{host}:{port}"
        command = [TWISTD, "--nodaemon", "--pidfile=", "pbrealms",
                   "--port=systemd:domain=INET:name=pbrealms", "--passwd", str(pwfile)]  # fmt: skip
    else:
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        host, connect = "::1", r"tcp:\:\:1:{}"
        try:
            port = freePort(host, socket.AF_INET6)
        except OSError as e:
            pytest.skip(f"cannot bind [::1]: {e}")
        listen = f"[{host}]:{port}"
        command = unitCommand(credentialsDirectory(tmp_path, pwfile))

    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            [socketActivate, "--fdname=pbrealms", "-l", listen, *command],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=environment(),
        )  # fmt: skip
    try:
        # It binds the socket at once, but starts twistd only when a client
        # connects: the client's connection waits in the backlog meanwhile.
        def bound() -> bool:
            assert process.poll() is None, output.read_text()
            return f"Listening on {listen} as 3." in output.read_text()

        waitFor(bound, START_TIMEOUT, "systemd-socket-activate listening")
        assert LISTENING.search(output.read_text()) is None
        result = asAlice(connect.format(port), alicePassword, "greet")
        assert result.returncode == 0, result.stderr + output.read_text()
        assert result.stdout.splitlines() == ["<1>hello alice"]
        log = output.read_text()
        match = LISTENING.search(log)
        assert match is not None, log
        assert (match.group(1).strip("[]"), int(match.group(2))) == (host, port)
        assert "alice logged in" in log
        assertStoppedCleanly(process, output, STOP_TIMEOUT)
    finally:
        stop(process)


# Readiness


@pytest.fixture(params=["path", "abstract"])
def notifySocket(request, tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """
    A datagram socket standing in for systemd's notification socket, and the
    $NOTIFY_SOCKET that names it.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if request.param == "path":
            path = str(tmp_path / "notify")
            sock.bind(path)
            name = path
        else:
            name = f"@pbrealms-test-{secrets.token_hex(8)}"
            sock.bind("\0" + name[1:])
        yield sock, name
    finally:
        sock.close()


def receive(sock: socket.socket, process: subprocess.Popen, output: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    sock.settimeout(0.1)
    while True:
        try:
            return sock.recv(4096).decode("utf-8")
        except TimeoutError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"twistd exited with {process.returncode}: {output.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no notification within {timeout} s: {output.read_text()}")


def test_readiness(notifySocket, tmp_path, pwfile):
    """
    READY=1 comes once the PB port accepts connections; STOPPING=1 comes on
    SIGTERM, and twistd exits within the grace period.
    """
    sock, name = notifySocket
    grace = 1.0
    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "pbrealms",
             "--port=tcp:0:interface=127.0.0.1", "--passwd", str(pwfile),
             f"--shutdown-grace={grace:g}"],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=environment(NOTIFY_SOCKET=name),
        )  # fmt: skip
    try:
        message = receive(sock, process, output, START_TIMEOUT)
        # At this very moment the port must take connections.
        match = LISTENING.search(output.read_text())
        assert match is not None, output.read_text()
        with socket.create_connection(("127.0.0.1", int(match.group(2))), timeout=1):
            pass
        assert message.splitlines() == ["READY=1"]

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert receive(sock, process, output, STOP_TIMEOUT).splitlines() == ["STOPPING=1"]
        remaining = grace + 1 - (time.monotonic() - started)
        try:
            status = process.wait(max(remaining, 0))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"twistd still running {grace + 1:g} s after SIGTERM") from None
        text = output.read_text()
        assert status in (0, -signal.SIGTERM), text
        assert "Main loop terminated" in text
        assert "Traceback" not in text
    finally:
        stop(process)


# MemoryDenyWriteExecute=


#: Runs its arguments under the kernel's own form of MemoryDenyWriteExecute=
#: (prctl PR_SET_MDWE, Linux 6.3 and later, which newer systemd uses too): no
#: memory may become writable and executable, across exec too.
MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"unsupported: prctl(PR_SET_MDWE): {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def underMDWE(*argv: str) -> list[str]:
    return [sys.executable, "-c", MDWE, *argv]


@pytest.fixture
def mdwe() -> None:
    probe = subprocess.run(
        underMDWE(sys.executable, "-c",
                  "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if "unsupported:" in probe.stderr:
        pytest.skip(probe.stderr.strip())
    # The emulation is a real one: a writable and executable mapping fails.
    assert probe.returncode != 0
    assert "PermissionError" in probe.stderr


def test_runs_under_memory_deny_write_execute(mdwe, tmp_path, pwfile, alicePassword):
    """
    The service's MemoryDenyWriteExecute=yes leaves pbrealms working: logins,
    calls, clock pushes, the metrics endpoint and a clean stop.
    """
    output = tmp_path / "twistd.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            underMDWE(TWISTD, "--nodaemon", "--pidfile=", "pbrealms", "--realm=clock",
                      "--port=tcp:0:interface=127.0.0.1", "--passwd", str(pwfile),
                      "--metrics=tcp:0:interface=127.0.0.1"),
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=environment(),
        )  # fmt: skip
    try:
        metricsListening = re.compile(r"metrics listening on 127\.0\.0\.1:(\d+)")

        def listening() -> bool:
            assert process.poll() is None, output.read_text()
            text = output.read_text()
            return LISTENING.search(text) is not None and metricsListening.search(text) is not None

        waitFor(listening, START_TIMEOUT, "twistd listening")
        text = output.read_text()
        port = LISTENING.search(text).group(2)
        metrics = metricsListening.search(text).group(1)
        result = asAlice(f"tcp:127.0.0.1:{port}", alicePassword, *TWO_TICKS)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as response:
            assert b'pbrealms_logins_total{outcome="ok"} 1.0' in response.read()
        assertStoppedCleanly(process, output, STOP_TIMEOUT)
    finally:
        stop(process)


# SystemCallFilter=


def filterGroup(analyze: str, group: str, seen: set[str] | None = None) -> set[str]:
    """
    The system calls in one of systemd's groups (@system-service ...), with
    the groups it includes, as this systemd lists them.
    """
    seen = set() if seen is None else seen
    seen.add(group)
    listing = subprocess.run(
        [analyze, "syscall-filter", group], capture_output=True, text=True, timeout=30, check=True
    ).stdout.splitlines()
    names: set[str] = set()
    for line in listing[1:]:
        word = line.strip().split(" ")[0]
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                names |= filterGroup(analyze, word, seen)
        else:
            names.add(word)
    assert names, f"{group}: no system calls listed"
    return names


def serviceFilter(analyze: str) -> set[str]:
    """
    The system calls that the service's SystemCallFilter= lines allow.
    """
    allowed: set[str] = set()
    for value in settings(CONFIG / "pbrealms.service", "Service", "SystemCallFilter"):
        deny = value.startswith("~")
        names: set[str] = set()
        for word in value.removeprefix("~").split():
            names |= filterGroup(analyze, word) if word.startswith("@") else {word}
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_system_calls_within_the_service_filter(
    analyze, socketActivate, tmp_path, pwfile, alicePassword
):
    """
    Every system call that twistd makes, socket-activated and notifying as
    under the service, while serving logins, calls, clock pushes, metrics
    and the password file's checks, and while stopping, is one that the
    service's SystemCallFilter= allows.
    """
    strace = tool("strace")
    allowed = serviceFilter(analyze)
    assert "execve" in allowed and "reboot" not in allowed and "setuid" not in allowed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = str(tmp_path / "notify")
    sock.bind(name)
    port = freePort("127.0.0.1", socket.AF_INET)
    trace, output = tmp_path / "trace", tmp_path / "twistd.log"
    with output.open("wb") as handle:
        process = subprocess.Popen(
            [strace, "-f", "-qq", "-o", str(trace), socketActivate, "--fdname=pbrealms",
             "-l", f"127.0.0.1:{port}", f"--setenv=NOTIFY_SOCKET={name}",
             "--setenv=PBREALMS_METRICS=tcp:0:interface=127.0.0.1",
             TWISTD, "--nodaemon", "--pidfile=", "pbrealms", "--realm=clock",
             "--port=systemd:domain=INET:name=pbrealms", f"--passwd={pwfile}"],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=environment(),
        )  # fmt: skip
    try:
        waitFor(lambda: "Listening on" in output.read_text(), START_TIMEOUT, "socket bound")
        result = asAlice(f"tcp:127.0.0.1:{port}", alicePassword, *TWO_TICKS)
        assert result.returncode == 0, result.stderr + output.read_text()
        assert receive(sock, process, output, START_TIMEOUT) == "READY=1"
        metrics = re.search(r"metrics listening on 127\.0\.0\.1:(\d+)", output.read_text())
        assert metrics is not None, output.read_text()
        for path in ("metrics", "healthz", "sessions"):
            url = f"http://127.0.0.1:{metrics.group(1)}/{path}"
            with urllib.request.urlopen(url, timeout=5) as response:
                assert response.status == 200
        time.sleep(1.2)  # the password file's check, once a second
        # strace does not pass signals on: SIGTERM twistd itself, which
        # systemd-socket-activate became.
        (twistd,) = childrenOf(process.pid)
        os.kill(twistd, signal.SIGTERM)
        assert receive(sock, process, output, STOP_TIMEOUT) == "STOPPING=1"
        process.wait(STOP_TIMEOUT)
    finally:
        # A tracee outlives a killed strace: kill it, and let strace reap it.
        killAndReap(process, childrenOf(process.pid), STOP_TIMEOUT)
        sock.close()
    text = output.read_text()
    assert "Main loop terminated" in text, text
    used: set[str] = set()
    started = False
    for line in trace.read_text().splitlines():
        call = re.match(r"\d+\s+([a-z0-9_]+)\(", line)
        if call is None:
            continue
        # systemd-socket-activate's own calls come before it execs twistd.
        started = started or (call.group(1) == "execve" and TWISTD in line)
        if started:
            used.add(call.group(1))
    assert {"accept4", "sendto", "epoll_wait"} <= used, sorted(used)
    assert sorted(used - allowed) == []
