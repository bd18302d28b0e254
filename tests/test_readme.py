"""
The README's commands, run as shown: its C{sh} blocks, and the C{$ } lines of
its transcripts, in a copy of the clone (its tracked files, with the modes a
fresh clone gets) whose C{.venv} is the virtualenv running the tests.  The
examples listen on the README's fixed ports, 8787 and 9108, so they run in a
network namespace of their own, where nothing else can hold those ports.

A command is either run by a test here or listed in L{NOT_RUN} with its
reason: a new example that is neither fails L{test_every_command_is_run_or_listed}.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from processes import BIN, environment, stop

from pbrealms.realms import REALMS
from pbrealms.tap import Options

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# The quick start installs and then runs; the install is the one .ci/run's nox
# sessions make (a fresh virtualenv, pip install '.[test]'), and runs this file.
INSTALL_SERVER = "python3 -m venv .venv && .venv/bin/pip install . && "
INSTALL_TESTS = "python3 -m venv .venv && .venv/bin/pip install '.[test]' && "

QUICK_SERVER = INSTALL_SERVER + ".venv/bin/twistd -n --pidfile= pbrealms"
QUICK_CLIENT = "PBREALMS_PASSWORD=wonderland .venv/bin/pbrealms-client --user alice greet --count 2"
COPY_PASSWD = "install -m 600 config/users.passwd users.passwd"
SERVER = ".venv/bin/twistd -n --pidfile= pbrealms --realm=limited --max=2 --passwd=users.passwd"
BAD_MAX = ".venv/bin/twistd -n --pidfile= pbrealms --realm=limited --max=0"
BAD_PORT = ".venv/bin/twistd -n --pidfile= pbrealms --port tcp:notaport"
BAD_ENV = "PBREALMS_MAX=x .venv/bin/twistd -n --pidfile= pbrealms --realm=limited"
PORT_IN_USE = ".venv/bin/twistd -n --pidfile= pbrealms --port tcp:8787:interface=127.0.0.1"
PASSWD_STDIN = (
    'echo "$PASSWORD" | .venv/bin/pbrealms-passwd users.passwd carol  # or the first line of stdin'
)
LOGGERS = [
    f".venv/bin/twistd --logger=pbrealms.logs.{name} -n --pidfile= pbrealms --passwd=users.passwd"
    for name in ("textLogger", "jsonLogger")
]
SCRAPE = "curl -s 127.0.0.1:9108/metrics | grep ^pbrealms | grep -v -e _bucket -e _created"
ALICE_PW = "(umask 077 && echo wonderland > alice.pw)    # the password, where ps cannot see it"
CLIENT = ".venv/bin/pbrealms-client --user alice --password-file alice.pw "
CLIENT_GREET = CLIENT + "greet --count 2"
CLIENT_STATUS = CLIENT + "status"
CLIENT_CLOCK = CLIENT + "clock --period 0.5 --ticks 3"
CLIENT_WATCH = CLIENT + "watch --period 0.5 --count 3"

#: Commands the tests below run (or, for the quick start's, run after its install).
RUN = {
    QUICK_SERVER,
    QUICK_CLIENT,
    COPY_PASSWD,
    SERVER,
    BAD_MAX,
    BAD_PORT,
    BAD_ENV,
    PORT_IN_USE,
    PASSWD_STDIN,
    *LOGGERS,
    SCRAPE,
    ALICE_PW,
    CLIENT_GREET,
    CLIENT_STATUS,
    CLIENT_CLOCK,
    CLIENT_WATCH,
}

_TESTS = "this suite: .ci/run's nox sessions run it so, in a fresh virtualenv per Python"
_SYSTEMD = "installs into /opt and /etc as root and needs systemd (tests/test_systemd.py)"
_DOCKER = "no container engine here (tests/test_container.py runs the image's entrypoint)"
_TLS = "a server with a certificate for pb.example.org (tests/test_bcrypt.py runs TLS logins)"

#: Commands not run here, each with why.
NOT_RUN = {
    INSTALL_TESTS + ".venv/bin/pytest": _TESTS,
    ".venv/bin/pytest                 # the tests": _TESTS,
    ".venv/bin/ruff check . && .venv/bin/ruff format --check .": "CI's lint session runs it",
    ".venv/bin/mypy                   # the types (configured in pyproject.toml)": (
        "CI's lint session runs it"
    ),
    "bash .ci/run                     # what CI runs (below)": "CI itself",
    ".venv/bin/pbrealms-passwd /etc/pbrealms/users.passwd carol      # asks twice, without echo": (
        "asks on a terminal and writes to /etc (tests/test_bcrypt.py runs pbrealms-passwd)"
    ),
    ".venv/bin/twistd -n --pidfile= pbrealms --passwd users.passwd \\\n"
    "  --port ssl:8787:privateKey=/etc/pbrealms/key.pem:certKey=/etc/pbrealms/cert.pem": _TLS,
    ".venv/bin/pbrealms-client --connect tcp:pb.example.org:8787 --tls --ca-file ca.pem \\\n"
    "  --user carol --password-file carol.pw greet": _TLS,
    **dict.fromkeys(
        [
            "sudo python3 -m venv /opt/pbrealms",
            "sudo /opt/pbrealms/bin/pip install .",
            'sudo /opt/pbrealms/bin/python -I -c "from twisted.plugin import IPlugin, getPlugins;'
            ' list(getPlugins(IPlugin))"',
            "sudo install -d -m 755 /etc/pbrealms",
            "sudo install -m 600 users.passwd /etc/pbrealms/users.passwd",
            "sudo install -m 644 config/pbrealms.socket config/pbrealms.service"
            " /etc/systemd/system/",
            "sudo systemctl daemon-reload",
            "sudo systemctl enable --now pbrealms.socket",
            "systemd-socket-activate --fdname=pbrealms -l 127.0.0.1:8787 \\\n"
            "  /opt/pbrealms/bin/twistd --nodaemon --pidfile= pbrealms \\\n"
            "  --port=systemd:domain=INET:name=pbrealms --passwd users.passwd",
        ],
        _SYSTEMD,
    ),
    **dict.fromkeys(
        [
            "docker build -f config/Containerfile -t pbrealms ."
            "            # podman: add --format=docker to keep HEALTHCHECK",
            "chmod 600 users.passwd && sudo chown 10001 users.passwd"
            "       # the image runs as uid 10001",
            "docker run -d --name pbrealms -p 8787:8787 -p 127.0.0.1:9108:9108 \\\n"
            "  --read-only --cap-drop=ALL --security-opt=no-new-privileges \\\n"
            '  -v "$PWD/users.passwd:/run/secrets/pbrealms-users:ro" \\\n'
            "  pbrealms --realm=limited --max=2",
        ],
        _DOCKER,
    ),
    ".venv/bin/pbrealms-client --user alice --password-file alice.pw watch": (
        "a narrated session that a login from another machine replaces (tests/test_e2e.py)"
    ),
    "python3 -m venv .venv && .venv/bin/pip install '.[bench]' && .venv/bin/pbrealms-bench"
    " --json bench.json --plot bench.png": (
        "takes 7 minutes (tests/test_bench.py runs the bench on small sizes)"
    ),
}


def blocks() -> list[tuple[str, list[str]]]:
    """
    The README's fenced blocks: each one's info string and lines.
    """
    found, fence, lines = [], None, []
    for line in README.read_text().splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, lines = stripped[3:], []
        elif fence is not None and stripped == "```":
            found.append((fence, lines))
            fence = None
        elif fence is not None:
            lines.append(line)
    return found


def _joined(lines: list[str]) -> Iterator[str]:
    # A line ending in a backslash goes on in the next one.
    command: list[str] = []
    for line in lines:
        command.append(line)
        if not line.endswith("\\"):
            yield "\n".join(command)
            command = []


def commands() -> list[str]:
    """
    Every command of the README: each of an C{sh} block's (but comment lines),
    and each C{$ } line of a transcript (one that starts with such a line).
    """
    found = []
    for fence, lines in blocks():
        if fence == "sh":
            found += [c for c in _joined(lines) if c.strip() and not c.startswith("#")]
        elif lines and lines[0].lstrip().startswith("$ "):
            found += [line.lstrip()[2:] for line in lines if line.lstrip().startswith("$ ")]
    return found


def transcript(command: str) -> list[str]:
    """
    What the README shows a command printing: the lines after its C{$ } line,
    up to the next one.
    """
    for _, lines in blocks():
        stripped = [line.strip() for line in lines]
        if stripped and stripped[0].startswith("$ ") and f"$ {command}" in stripped:
            after = stripped[stripped.index(f"$ {command}") + 1 :]
            ends = [i for i, line in enumerate(after) if line.startswith("$ ")]
            return after[: ends[0]] if ends else after
    raise AssertionError(f"no transcript of {command!r} in the README")


def _python() -> list[list[str]]:
    return [lines for fence, lines in blocks() if fence == "python"]


def programs() -> list[str]:
    """
    The README's Python programs: its C{python} blocks but modules.
    """
    return ["\n".join(lines) + "\n" for lines in _python() if not lines[0].startswith("# src/")]


def modules() -> dict[str, str]:
    """
    The README's new modules: each C{python} block whose first line names
    its path in the repository, by that path.
    """
    return {
        lines[0][2:]: "\n".join(lines[1:]) + "\n"
        for lines in _python()
        if lines[0].startswith("# src/")
    }


def test_every_command_is_run_or_listed():
    # test_the_client runs the one program, test_the_worked_realm the one
    # module: a new one needs a test too.
    assert len(programs()) == 1
    assert list(modules()) == ["src/pbrealms/realms/whoami.py"]
    found = commands()
    new = [c for c in found if c not in RUN and c not in NOT_RUN]
    assert not new, (
        f"README commands neither run by tests/test_readme.py nor listed in NOT_RUN: {new}"
    )
    gone = [c for c in [*RUN, *NOT_RUN] if c not in found]
    assert not gone, f"tests/test_readme.py names commands the README no longer has: {gone}"


def test_the_quick_start_is_two_commands():
    fence, lines = blocks()[0]
    assert fence == "sh"
    assert list(_joined(lines)) == [QUICK_SERVER, INSTALL_TESTS + ".venv/bin/pytest"]


class Clone:
    """
    A copy of the clone, with this virtualenv as its C{.venv}, and a network
    namespace to run its commands in.
    """

    def __init__(self, path: Path, namespace: subprocess.Popen) -> None:
        self.path = path
        self.namespace = namespace
        self.servers: list[subprocess.Popen] = []

    def _argv(self, command: str, shown: bool) -> list[str]:
        # shown=False: a variant of a README command, as the README's text describes it.
        assert command in RUN or not shown, f"not a README command: {command!r}"
        if command.startswith(INSTALL_SERVER):
            command = command[len(INSTALL_SERVER) :]
        return ["nsenter", f"--net=/proc/{self.namespace.pid}/ns/net", "bash", "-c", command]

    def run(self, command: str, shown: bool = True, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._argv(command, shown),
            cwd=self.path,
            env=environment(**env),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def serve(
        self, command: str, *options: str, shown: bool = True, ports: tuple[int, ...] = (8787,)
    ) -> subprocess.Popen:
        """
        Start a server example (with C{options} added), and wait until its
        C{ports} listen.
        """
        argv = self._argv(command, shown and not options)
        # exec: the process is twistd itself, so that signals reach it.
        argv[-1] = " ".join(["exec", argv[-1], *options])
        log = (self.path / f"server-{len(self.servers)}.log").open("w+")
        server = subprocess.Popen(
            argv, cwd=self.path, env=environment(), stdout=log, stderr=subprocess.STDOUT
        )
        server.log = log
        self.servers.append(server)
        probe = " && ".join(f"(exec 3<>/dev/tcp/127.0.0.1/{port})" for port in ports)
        listening = subprocess.run(
            [
                *argv[:2],
                "bash",
                "-c",
                f"for i in $(seq 300); do {{ {probe}; }} 2>/dev/null && exit 0;"
                f" kill -0 {server.pid} || exit 1; sleep 0.05; done; exit 1",
            ],
            timeout=30,
        )
        assert listening.returncode == 0, f"{command} did not listen:\n{self.output(server)}"
        assert server.poll() is None
        return server

    def output(self, server: subprocess.Popen) -> str:
        server.log.seek(0)
        return server.log.read()

    def stop(self, server: subprocess.Popen, sig: signal.Signals) -> int:
        server.send_signal(sig)
        try:
            return server.wait(15)
        finally:
            stop(server)


def _copyOfTheClone(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-s", "-z"], capture_output=True, check=True
    ).stdout
    for entry in listed.decode().split("\0"):
        if not entry:
            continue
        info, name = entry.split("\t", 1)
        mode = int(info.split()[0], 8)
        source, target = ROOT / name, destination / name
        if not stat.S_ISREG(mode) or not source.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        # What a checkout gives with the usual umask of 022.
        target.chmod(0o755 if mode & 0o111 else 0o644)


@pytest.fixture
def clone(tmp_path) -> Iterator[Clone]:
    if os.geteuid() != 0:
        pytest.skip("the README's examples run in a network namespace, which needs root")
    if not (BIN / "twistd").exists():
        pytest.skip(f"{BIN} is not a virtualenv with pbrealms installed")
    _copyOfTheClone(tmp_path)
    (tmp_path / ".venv").symlink_to(BIN.parent)
    namespace = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep 600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    made = Clone(tmp_path, namespace)
    try:
        assert namespace.stdout.readline() == "up\n", "no network namespace"
        yield made
    finally:
        for server in made.servers:
            stop(server)
            server.log.close()
        stop(namespace)
        namespace.stdout.close()


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.args[-1], result.returncode, result.stderr)
    return result.stdout


def test_quick_start(clone):
    """
    The quick start's server, its client, and Ctrl-C: twistd ends itself
    with SIGINT (the shell's 130).
    """
    server = clone.serve(QUICK_SERVER)
    assert ok(clone.run(QUICK_CLIENT)).splitlines() == ["<1>hello alice", "<2>hello alice"]
    assert clone.stop(server, signal.SIGINT) == -signal.SIGINT


def test_running_the_server(clone):
    """
    The example password file, copied as the README says, draws no warning;
    bad options are the README's one line each and status 2, a port in use
    its one line and status 1; pbrealms-passwd adds a hashed user from stdin;
    SIGTERM ends twistd with SIGTERM (143).
    """
    from pbrealms.checkers import checkPermissions

    ok(clone.run(COPY_PASSWD))
    passwd = clone.path / "users.passwd"
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    assert checkPermissions(passwd) is None
    server = clone.serve(SERVER)
    # A warning about the file starts with its name (see checkers.checkPermissions).
    assert "users.passwd:" not in clone.output(server), "the password file drew a warning"

    for command in (BAD_MAX, BAD_PORT, BAD_ENV):
        bad = clone.run(command)
        assert (bad.returncode, bad.stdout) == (2, ""), command
        assert bad.stderr.splitlines() == transcript(command)
    # The server above holds 8787.
    taken = clone.run(PORT_IN_USE)
    assert taken.returncode == 1
    assert taken.stderr.splitlines() == transcript(PORT_IN_USE)

    ok(clone.run(PASSWD_STDIN, PASSWORD="c4r0l-n3w"))
    assert re.search(r"^carol:\$2b\$\d\d\$", passwd.read_text(), re.M)
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600

    assert clone.stop(server, signal.SIGTERM) == -signal.SIGTERM


def test_loggers(clone):
    ok(clone.run(COPY_PASSWD))
    text, jsonLines = LOGGERS
    server = clone.serve(text)
    ok(clone.run(QUICK_CLIENT))
    clone.stop(server, signal.SIGTERM)
    assert re.search(r"alice logged in from 127\.0\.0\.1:\d+ ", clone.output(server))

    server = clone.serve(jsonLines)
    ok(clone.run(QUICK_CLIENT))
    clone.stop(server, signal.SIGTERM)
    events = [json.loads(line) for line in clone.output(server).splitlines() if line]
    logins = [e for e in events if "alice logged in" in e["message"]]
    assert len(logins) == 1
    (sample,) = (lines for fence, lines in blocks() if fence == "json")
    assert set(json.loads(sample[0])) <= set(logins[0])


def test_the_metrics_sample_is_a_real_scrape(clone):
    """
    The README's scrape, after the logins it names: the same lines, with the
    same values but for the sums of times.
    """
    ok(clone.run(COPY_PASSWD))
    server = clone.serve(SERVER, "--metrics tcp:9108:interface=127.0.0.1", ports=(8787, 9108))
    ok(clone.run(QUICK_CLIENT))
    bob = QUICK_CLIENT.replace("wonderland", "builder").replace("alice", "bob")
    ok(clone.run(bob, shown=False))
    assert clone.run(QUICK_CLIENT.replace("wonderland", "wrong"), shown=False).returncode == 3

    def values(lines: list[str]) -> list[tuple[str, str]]:
        pairs = [tuple(line.rsplit(" ", 1)) for line in lines]
        return [(name, "..." if name.endswith("_sum") else value) for name, value in pairs]

    # The README's fail2ban filter matches the wrong password's log line.
    (failregex,) = (
        lines for fence, lines in blocks() if fence == "ini" and lines[0] == "[Definition]"
    )
    patterns = [failregex[1].split("=", 1)[1].strip(), *(x.strip() for x in failregex[2:])]
    patterns = [re.compile(x.replace("<HOST>", r"(?P<host>\S+?)")) for x in patterns]
    refusals = [
        line.split("] ", 1)[1]
        for line in clone.output(server).splitlines()
        if "login refused for " in line
    ]
    assert refusals, "the wrong password was not logged"
    for line in refusals:
        found = [m for m in (x.search(line) for x in patterns) if m]
        assert found and found[0]["host"] == "127.0.0.1", line

    expected = values(transcript(SCRAPE))
    for _ in range(50):
        # The clients' connections close on the server a moment after they exit.
        scraped = values(ok(clone.run(SCRAPE)).splitlines())
        if scraped == expected:
            break
    assert scraped == expected
    clone.stop(server, signal.SIGTERM)


def test_the_client(clone):
    """
    The client's examples, against the clock realm, which pushes the time.
    """
    ok(clone.run(COPY_PASSWD))
    clone.serve(SERVER.replace("--realm=limited --max=2", "--realm=clock"), shown=False)
    ok(clone.run(ALICE_PW))
    assert stat.S_IMODE((clone.path / "alice.pw").stat().st_mode) == 0o600
    assert ok(clone.run(CLIENT_GREET)).splitlines() == ["<1>hello alice", "<2>hello alice"]
    status = json.loads(ok(clone.run(CLIENT_STATUS)))
    assert status["realm"] == "clock" and status["user"] == "alice"
    assert len(ok(clone.run(CLIENT_CLOCK)).splitlines()) == 3
    assert len(ok(clone.run(CLIENT_WATCH)).splitlines()) == 3
    (program,) = programs()
    (clone.path / "reconnecting.py").write_text(program)
    printed = ok(clone.run(".venv/bin/python reconnecting.py", shown=False)).splitlines()
    assert len(printed) == 1 and re.fullmatch(r"<\d+>hello alice", printed[0]), printed


@pytest_twisted.ensureDeferred
async def test_the_worked_realm(harness, monkeypatch):
    """
    Development's new realm, as its module and its line in C{REALMS}:
    C{--realm} takes it, and it serves its avatar's new method.
    """
    ((path, source),) = modules().items()
    module = types.ModuleType("pbrealms.realms.whoami")
    exec(compile(source, path, "exec"), module.__dict__)
    monkeypatch.setitem(REALMS, "whoami", module.STRATEGY)
    options = Options()
    options.parseOptions(["--realm=whoami"])
    assert (options["realm"], options["max"], options["period"]) == ("whoami", None, None)
    served = await harness.serve("whoami")
    conn = await served.login("alice")
    assert await conn.callRemote("whoami") == "alice"
    assert await conn.callRemote("greet") == "<1>hello alice"
    assert (await conn.callRemote("status"))["realm"] == "whoami"
