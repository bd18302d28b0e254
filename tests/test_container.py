"""
config/Containerfile without a container engine: its entrypoint run as PID 1
of a new PID namespace, configured as the image configures it, and its build
stage run step by step into a fresh virtualenv, whose plugin cache must then
be one that twistd never needs to rewrite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import childrenOf, environment, killAndReap, stop, tool, waitFor

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "config" / "Containerfile"
BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
CLIENT = str(BIN / "pbrealms-client")
#: The image's virtualenv, and its user.
IMAGE_VENV = "/opt/pbrealms"
IMAGE_UID = 10001
REGENERATE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
UNWRITABLE_CACHE = "Unable to write to plugin cache"
LISTENING = re.compile(r"pbrealms listening on 127\.0\.0\.1:(\d+)")
METRICS_LISTENING = re.compile(r"metrics listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


# The Containerfile


def instructions() -> list[tuple[str, str]]:
    """
    The Containerfile's instructions, as (INSTRUCTION, rest of the line),
    continuation lines joined and comments dropped.
    """
    result = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        line = pending + stripped
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for k, rest in stage if k == keyword]
    assert len(values) == 1, f"{keyword}: {values}"
    return values[0]


def imageEnvironment() -> dict[str, str]:
    """
    The pbrealms settings the image's ENV gives.
    """
    env = {}
    for keyword, rest in stages()[-1]:
        if keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                if key.startswith("PBREALMS_"):
                    env[key] = value
    return env


def entrypoint() -> list[str]:
    return json.loads(only(stages()[-1], "ENTRYPOINT"))


def healthcheck(port: int = 9108) -> list[str]:
    """
    The image's HEALTHCHECK command, run with this Python, against C{port}
    instead of the image's metrics port.
    """
    rest = only(stages()[-1], "HEALTHCHECK")
    _, _, command = rest.partition(" CMD ")
    return [
        sys.executable if arg == f"{IMAGE_VENV}/bin/python" else arg.replace(":9108/", f":{port}/")
        for arg in json.loads(command)
    ]


def test_image_settings():
    """
    Arguments to `docker run` replace CMD: every setting the image needs is
    in ENV, so that `docker run IMAGE --realm=limited` keeps them; CMD holds
    only the default realm.
    """
    final = stages()[-1]
    assert json.loads(only(final, "CMD")) == ["--realm=cache"]
    env = imageEnvironment()
    assert env["PBREALMS_PORT"] == "tcp:8787"
    assert env["PBREALMS_PASSWD"].startswith("/run/secrets/")
    # The health check asks the metrics endpoint.
    assert env["PBREALMS_METRICS"] == "tcp:9108"
    assert "http://127.0.0.1:9108/healthz" in " ".join(healthcheck())
    assert only(final, "USER").split(":")[0] == str(IMAGE_UID)
    assert only(final, "STOPSIGNAL") == "SIGTERM"
    assert set(only(final, "EXPOSE").split()) == {"8787", "9108"}
    assert entrypoint() == [
        "/usr/bin/tini", "--", f"{IMAGE_VENV}/bin/twistd", "--nodaemon", "--pidfile=",
        "--logger=pbrealms.logs.textLogger", "pbrealms",
    ]  # fmt: skip


# Helpers


def waitForLine(process: subprocess.Popen, output: Path, pattern: re.Pattern) -> re.Match:
    def seen() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{output.read_text()}")
        return pattern.search(output.read_text(errors="replace")) is not None

    waitFor(seen, START_TIMEOUT, f"a line matching {pattern.pattern!r}")
    return pattern.search(output.read_text(errors="replace"))


def client(endpoint: str, password: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLIENT, "--connect", endpoint, "--user", "alice", "--password-file", str(password),
         *command],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, env=environment(),
    )  # fmt: skip


# The entrypoint as PID 1


@pytest.fixture(scope="session")
def tini() -> str:
    """
    tini, installed from Debian's package if missing and we may.
    """
    found = shutil.which("tini") or shutil.which("tini", path="/usr/bin:/usr/sbin")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("tini is not installed (Debian package tini)")
    env = environment(DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "tini"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(command)}: not done within 240 s")
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}"
    found = shutil.which("tini", path="/usr/bin:/usr/sbin")
    assert found, "apt-get installed tini, but it is not in /usr/bin"
    return found


@pytest.fixture
def unshare() -> str:
    found = tool("unshare")
    if os.geteuid() != 0:
        pytest.skip("a new PID namespace needs root")
    return found


def test_entrypoint_as_pid1(tini, unshare, tmp_path, pwfile, alicePassword):
    """
    The image's ENTRYPOINT, with the image's ENV and settings of `docker run
    -e`, as PID 1 of a PID namespace; the arguments of `docker run` after the
    image name (here --port and --passwd) win over the image's ENV. `docker
    stop` sends SIGTERM to PID 1, tini, which passes it on to twistd.
    """
    grace = 1.0
    image = entrypoint()
    assert image[0] == "/usr/bin/tini"
    assert image[2] == f"{IMAGE_VENV}/bin/twistd"
    command = [
        tini, *image[1:2], TWISTD, *image[3:],
        "--port=tcp:0:interface=127.0.0.1", f"--passwd={pwfile}",
    ]  # fmt: skip
    env = environment(
        **{
            **imageEnvironment(),
            # docker run -e ...
            "PBREALMS_METRICS": "tcp:0:interface=127.0.0.1",
            "PBREALMS_REALM": "limited",
            "PBREALMS_MAX": "2",
            "PBREALMS_SHUTDOWN_GRACE": f"{grace:g}",
        }
    )
    output = tmp_path / "container.log"
    with output.open("wb") as handle:
        # unshare does not pass SIGTERM on to its child (util-linux 2.38), so
        # the test signals PID 1 itself, as docker does; --kill-child only
        # makes sure that nothing outlives the test.
        process = subprocess.Popen(
            [unshare, "--pid", "--fork", "--mount-proc", "--kill-child", *command],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            cwd=tmp_path, env=env,
        )  # fmt: skip
    pid1 = twistd = None
    try:
        port = int(waitForLine(process, output, LISTENING).group(1))
        metrics = int(waitForLine(process, output, METRICS_LISTENING).group(1))

        (pid1,) = childrenOf(process.pid)
        procStatus = Path(f"/proc/{pid1}/status").read_text()
        assert re.search(r"^NSpid:\s+\d+\s+1$", procStatus, re.MULTILINE), procStatus
        assert Path(f"/proc/{pid1}/exe").resolve() == Path(tini).resolve()
        (twistd,) = childrenOf(pid1)
        assert TWISTD in Path(f"/proc/{twistd}/cmdline").read_text().split("\0")[1]

        endpoint = f"tcp:127.0.0.1:{port}"
        greeted = client(endpoint, alicePassword, "greet")
        assert greeted.returncode == 0, greeted.stderr
        assert greeted.stdout.splitlines() == ["<1>hello alice"]
        shown = client(endpoint, alicePassword, "status")
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert (status["realm"], status["max"], status["greetings"]) == ("limited", 2, 1)

        healthy = subprocess.run(healthcheck(metrics), capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr

        started = time.monotonic()
        os.kill(pid1, signal.SIGTERM)
        try:
            exitStatus = process.wait(grace + 1)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {grace + 1:g} s after SIGTERM:\n{output.read_text()}"
            ) from None
        assert time.monotonic() - started < grace + 1
        text = output.read_text(errors="replace")
        # twistd ends itself with SIGTERM; tini exits 128 + 15 for it.
        assert exitStatus == 128 + signal.SIGTERM, text
        assert "Main loop terminated" in text
        assert "alice logged in" in text
        assert "Traceback" not in text
        for pid in (pid1, twistd):
            assert not Path(f"/proc/{pid}").exists()
    finally:
        # Killing PID 1 kills its namespace; unshare then reaps it and exits.
        killAndReap(process, (twistd, pid1), STOP_TIMEOUT)


def test_healthcheck_fails_without_a_server():
    result = subprocess.run(healthcheck(1), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "Connection refused" in result.stderr


# The build stage and the plugin cache


@pytest.fixture
def publicTmp() -> Iterator[Path]:
    """
    A temporary directory that the image's user (uid 10001) may read:
    pytest's own are private to whoever runs the tests.
    """
    path = Path(tempfile.mkdtemp(prefix="pbrealms-build-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for directory, _, _ in os.walk(path):
            os.chmod(directory, 0o755)
        shutil.rmtree(path)


def imageUserPython() -> str | None:
    """
    A Python that the image's user can run and make virtualenvs with, if we
    are root (and so can become that user) and there is one: this one may
    live in root's home.
    """
    if os.geteuid() != 0:
        return None
    for candidate in (sys._base_executable, "/usr/local/bin/python3", "/usr/bin/python3"):
        try:
            result = subprocess.run(
                [candidate, "-c", "import sys, ensurepip, venv; assert sys.version_info >= (3,11)"],
                capture_output=True, timeout=30, cwd="/", user=IMAGE_UID, group=IMAGE_UID,
                extra_groups=[],
            )  # fmt: skip
        except OSError:
            continue
        if result.returncode == 0:
            return candidate
    return None


def runAll(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """
    Run a command in a process group of its own, killed whole if it takes
    more than C{timeout} seconds (pip starts processes of its own).
    """
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{argv}: not done within {timeout} s") from None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, out


def build(work: Path, python: str) -> Path:
    """
    Run the Containerfile's build stage here: its COPY from the repository
    and its RUN commands, with /src and /opt/pbrealms moved into C{work} and
    C{python} as the image's python. Return the virtualenv.
    """
    src, venv, root, pythonBin = (work / d for d in ("src", "opt-pbrealms", "root", "python"))
    root.mkdir()
    pythonBin.mkdir()
    for name in ("python", "python3"):
        (pythonBin / name).symlink_to(python)

    def moved(text: str) -> str:
        text = re.sub(r"(?<![\w.-])/src\b", str(src), text)
        return text.replace(IMAGE_VENV, str(venv))

    builder = stages()[0]
    assert builder[0][0] == "FROM" and builder[0][1].endswith(" AS builder")
    cwd = root
    ran = []
    # As docker copies, but for bytecode, which pip ignores.
    ignore = shutil.ignore_patterns("__pycache__")
    for keyword, rest in builder[1:]:
        if keyword == "COPY":
            *sources, destination = shlex.split(rest)
            assert not any(s.startswith("--") for s in sources), rest
            target = Path(moved(destination))
            for source in sources:
                path = ROOT / source
                into = target / path.name if destination.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    shutil.copytree(path, into, ignore=ignore)
                else:
                    shutil.copy2(path, into)
        elif keyword == "WORKDIR":
            cwd = root / rest.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "RUN":
            env = environment(PATH=f"{pythonBin}{os.pathsep}{os.environ['PATH']}")
            status, out = runAll(["sh", "-ec", moved(rest)], cwd, env, timeout=300)
            assert status == 0, f"RUN {rest}:\n{out}"
            ran.append(rest)
        else:
            assert keyword in ("ARG", "ENV"), keyword
    installed = next(i for i, command in enumerate(ran) if "pip install" in command)
    assert any(REGENERATE in command for command in ran[installed + 1 :]), (
        "the build stage does not build the plugin cache after pip install"
    )
    return venv


def runServer(venv: Path, work: Path, asImageUser: bool) -> str:
    """
    Start the built twistd on a loopback port, stop it, and return its log.
    """
    output = work / f"server-{time.monotonic_ns()}.log"
    user = {"user": IMAGE_UID, "group": IMAGE_UID, "extra_groups": []} if asImageUser else {}
    with output.open("wb") as handle:
        process = subprocess.Popen(
            [str(venv / "bin" / "twistd"), "--nodaemon", "--pidfile=", "pbrealms",
             "--port=tcp:0:interface=127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, cwd=work / "root",
            env=environment(HOME="/"), **user,
        )  # fmt: skip
    try:
        waitForLine(process, output, LISTENING)
        process.send_signal(signal.SIGTERM)
        process.wait(STOP_TIMEOUT)
        return output.read_text(errors="replace")
    finally:
        stop(process)


def test_plugin_cache_is_fresh_after_the_build(publicTmp):
    """
    After the build stage, twistd finds the plugin cache up to date: it
    neither rewrites it nor, where it cannot, complains. Slow: a fresh
    virtualenv and pip install (20-40 s).
    """
    python = imageUserPython()
    asImageUser = python is not None
    venv = build(publicTmp, python or sys._base_executable)
    (site,) = venv.glob("lib/python3*/site-packages")
    plugins = site / "twisted" / "plugins"
    cache = plugins / "dropin.cache"
    assert cache.is_file()
    assert (plugins / "pbrealms_plugin.py").is_file()
    built = cache.stat().st_mtime_ns
    twistd = str(venv / "bin" / "twistd")

    def helpShown() -> str:
        result = subprocess.run(
            [twistd, "pbrealms", "--help"], capture_output=True, text=True, timeout=60,
            cwd=publicTmp / "root", env=environment(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "--realm" in result.stdout
        return result.stdout + result.stderr

    assert UNWRITABLE_CACHE not in helpShown()
    assert cache.stat().st_mtime_ns == built

    # As deployed: the virtualenv read-only to the server. Root ignores file
    # modes, so as root the server runs as the image's user (given a Python
    # that user can run); the mtime says whether anything was rewritten in
    # any case.
    plugins.chmod(0o555)
    cache.chmod(0o444)
    assert UNWRITABLE_CACHE not in helpShown()
    log = runServer(venv, publicTmp, asImageUser)
    assert "pbrealms listening on" in log
    assert UNWRITABLE_CACHE not in log
    assert cache.stat().st_mtime_ns == built

    # The checks above would see a stale cache: a plugin newer than the
    # cache makes twistd rewrite it, or say that it cannot.
    os.utime(plugins / "pbrealms_plugin.py")
    log = runServer(venv, publicTmp, asImageUser)
    if asImageUser or os.geteuid() != 0:
        assert UNWRITABLE_CACHE in log
    else:
        assert cache.stat().st_mtime_ns != built
