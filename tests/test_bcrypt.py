"""
Hashed passwords: bcrypt entries, checked in a bounded thread pool, with the
password sent only over TLS, loopback or a UNIX socket; and pbrealms-passwd.
"""

import stat
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest
import pytest_twisted
import trustme
from conftest import exited
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, endpoints, ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.spread import pb

from pbrealms.checkers import PasswordFile, isHashed
from pbrealms.client import ClientMind, connect
from pbrealms.errors import BadCredentials, InsecureLogin, ServerBusy, localize
from pbrealms.hasher import PasswordHasher
from pbrealms.login import _LoginGate
from pbrealms.tap import Options, makeService

BIN = Path(sys.executable).parent


def hashed(password: bytes, rounds: int = 4) -> str:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds)).decode()


@pytest.fixture
def hashedPasswd(tmp_path: Path) -> Path:
    path = tmp_path / "users.passwd"
    path.write_text(f"carol:{hashed(b'c4r0l')}\nalice:wonderland\n")
    path.chmod(0o600)
    return path


async def avatarId(checker, user: bytes, password: bytes):
    try:
        return await checker.requestAvatarId(UsernamePassword(user, password))
    except UnauthorizedLogin:
        return None


@pytest_twisted.ensureDeferred
async def test_a_bcrypt_entry_checks_the_password_itself(hashedPasswd):
    checker = PasswordFile(str(hashedPasswd))
    assert await avatarId(checker, b"carol", b"c4r0l") == "carol"
    assert await avatarId(checker, b"carol", b"wrong") is None
    assert await avatarId(checker, b"mallory", b"c4r0l") is None
    assert await avatarId(checker, b"alice", b"wonderland") == "alice"  # plain entries too


def test_the_dummy_hash_costs_what_a_real_one_costs():
    from pbrealms.checkers import DUMMY_HASH

    assert isHashed(DUMMY_HASH)
    assert DUMMY_HASH.startswith(b"$2b$12$")  # pbrealms-passwd's default cost


@pytest.mark.timing
@pytest_twisted.ensureDeferred
async def test_the_reactor_stays_responsive_during_eight_hash_checks(reactor, tmp_path):
    path = tmp_path / "users.passwd"
    path.write_text(f"carol:{hashed(b'c4r0l', rounds=12)}\n")
    path.chmod(0o600)
    checker = PasswordFile(str(path))
    gaps: list[float] = []
    last = [time.monotonic()]

    def tick():
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now

    ticker = task.LoopingCall(tick)
    ticker.start(0.01)
    started = time.monotonic()
    try:
        results = [avatarId(checker, b"carol", b"c4r0l") for _ in range(4)]
        results += [avatarId(checker, b"carol", b"nope") for _ in range(2)]
        results += [avatarId(checker, b"mallory", b"c4r0l") for _ in range(2)]
        outcomes = [await r for r in results]
    finally:
        ticker.stop()
    assert outcomes == ["carol"] * 4 + [None] * 4
    assert time.monotonic() - started > 0.2  # the checks took real time...
    assert max(gaps) < 0.1, f"the reactor stalled for {max(gaps) * 1000:.0f} ms"  # ...elsewhere


class FakeBroker:
    disconnects: list = []

    def __init__(self, transport) -> None:
        self.transport = transport
        self.disconnected = False

    def notifyOnDisconnect(self, f):
        pass


def test_the_password_method_is_refused_on_plain_tcp_off_loopback(harness):
    root = harness.makeRoot("cache")
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "192.0.2.1", 8787),
        peerAddress=IPv4Address("TCP", "198.51.100.9", 5555),
    )
    gate = _LoginGate(root, FakeBroker(transport))
    with pytest.raises(InsecureLogin):
        gate.remote_loginPassword(b"alice", b"wonderland", None)


@pytest.fixture
def tlsServer(reactor, tmp_path, hashedPasswd):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    key = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key))
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    options = Options()
    options.parseOptions(
        ["--passwd", str(hashedPasswd), "--realm=tracking",
         # Not about the address's penalty, which would cut the tries to 3.
         "--penalty-exempt", "127.0.0.1",
         "--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={key}"]
    )  # fmt: skip
    server = makeService(options)
    server.privilegedStartService()
    server.startService()
    port = server.getServiceNamed("pb-listener").port.getHost().port
    yield port, caFile
    pytest_twisted.blockon(server.stopService())


def tlsEndpoint(reactor, port: int, caFile: Path):
    trust = ssl.Certificate.loadPEM(caFile.read_bytes())
    return endpoints.wrapClientTLS(
        ssl.optionsForClientTLS("localhost", trustRoot=trust),
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port),
    )


@pytest_twisted.ensureDeferred
async def test_a_hashed_user_logs_in_over_tls(reactor, tlsServer, log):
    port, caFile = tlsServer
    conn = await connect(reactor, tlsEndpoint(reactor, port, caFile), "carol", "c4r0l",
                         ClientMind(), sendPassword=True)  # fmt: skip
    assert await conn.callRemote("greet") == "<1>hello carol"
    assert await conn.callRemote("status") == {
        "realm": "tracking", "user": "carol", "greetings": 1, "sessions": 1,
    }  # fmt: skip
    await conn.disconnect()
    for user, password in (("carol", "wrong"), ("mallory", "c4r0l")):
        with pytest.raises(BadCredentials):
            await connect(reactor, tlsEndpoint(reactor, port, caFile), user, password,
                          sendPassword=True)  # fmt: skip
    refusals = [m for m in log.messages() if "login refused" in m]
    assert len(refusals) == 2 and all("wrong user name or password" in m for m in refusals)


@pytest_twisted.ensureDeferred
async def test_a_hashed_user_cannot_answer_a_challenge(reactor, tlsServer):
    port, caFile = tlsServer
    with pytest.raises(BadCredentials):
        await connect(reactor, tlsEndpoint(reactor, port, caFile), "carol", "c4r0l",
                      sendPassword=False)  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_pbrealms_client_over_tls(reactor, tlsServer, tmp_path):
    port, caFile = tlsServer
    pw = tmp_path / "carol.pw"
    pw.write_text("c4r0l\n")
    args = [
        str(BIN / "pbrealms-client"), "--connect", f"tcp:localhost:{port}", "--tls",
        "--ca-file", str(caFile), "--user", "carol", "--password-file", str(pw), "greet",
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The reactor serves it meanwhile.
    await exited(process, 30)
    out, err = process.communicate()
    assert process.returncode == 0, err
    assert out == "<1>hello carol\n"


def runPasswd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pbrealms-passwd"), *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_pbrealms_passwd_adds_and_updates_users(tmp_path):
    path = tmp_path / "users.passwd"
    path.write_text("# the team\nalice:wonderland\n")
    path.chmod(0o600)
    added = runPasswd("--rounds", "4", str(path), "carol", stdin="c4r0l\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"pbrealms-passwd: added carol in {path}\n"
    changed = runPasswd("--rounds", "4", str(path), "alice", stdin="n3w\n")
    assert changed.stdout == f"pbrealms-passwd: changed the password of alice in {path}\n"
    lines = path.read_text().splitlines()
    assert lines[0] == "# the team"
    entries = dict(line.split(":", 1) for line in lines[1:])
    assert sorted(entries) == ["alice", "carol"]
    assert bcrypt.checkpw(b"n3w", entries["alice"].encode())
    assert bcrypt.checkpw(b"c4r0l", entries["carol"].encode())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["users.passwd"]  # no temporary left
    PasswordFile(str(path))  # and pbrealms reads it


@pytest.mark.parametrize(
    ("args", "stdin", "words"),
    [
        (["FILE", "bad:name"], "x\n", "user name"),
        (["FILE"], "x\n", "error"),
        (["--rounds", "40", "FILE", "carol"], "x\n", "--rounds"),
        (["FILE", "carol"], "\n", "empty"),
    ],
)
def test_pbrealms_passwd_refuses_bad_input(tmp_path, args, stdin, words):
    args = [str(tmp_path / "f") if a == "FILE" else a for a in args]
    result = runPasswd(*args, stdin=stdin)
    assert result.returncode != 0
    assert words in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "f").exists()


@pytest_twisted.ensureDeferred
async def test_a_password_longer_than_bcrypt_reads_is_just_wrong(hashedPasswd, log):
    checker = PasswordFile(str(hashedPasswd))
    assert await avatarId(checker, b"carol", b"c4r0l" + b"x" * 80) is None
    assert await avatarId(checker, b"mallory", b"y" * 100) is None
    assert not log.errors()


@pytest_twisted.ensureDeferred
async def test_the_hash_queue_is_bounded():
    from pbrealms.hasher import PasswordHasher

    hasher = PasswordHasher(threads=1, maxPending=2)
    slow = hashed(b"pw", rounds=10).encode()
    checks = [hasher.check(b"pw", slow) for _ in range(3)]
    with pytest.raises(ServerBusy):  # refused at once, as busy, not as a wrong password
        await checks[2]
    assert hasher.pending == 2
    assert [await c for c in checks[:2]] == [True, True]
    assert hasher.pending == 0
    hasher.stop()


@pytest_twisted.ensureDeferred
async def test_the_dummy_hash_has_the_files_cost(hashedPasswd):
    checker = PasswordFile(str(hashedPasswd))  # its hashes have cost 4
    checked: list[bytes] = []

    def run(password: bytes, hashed: bytes) -> defer.Deferred[bool]:
        checked.append(hashed)
        return defer.succeed(False)

    checker.hasher = PasswordHasher(threads=1, run=run)
    # An unknown user is checked against the dummy hash.
    assert await avatarId(checker, b"mallory", b"c4r0l") is None
    (dummy,) = checked
    assert dummy.startswith(b"$2b$04$")


def test_pbrealms_passwd_keeps_other_lines_and_the_files_mode(tmp_path):
    import os

    path = tmp_path / "users.passwd"
    path.write_bytes("erin:pa\u2028ss\nfrank:a\x0cb\nalice:wonderland\n".encode())
    path.chmod(0o640)
    result = runPasswd("--rounds", "4", str(path), "alice", stdin="n3w\n")
    assert result.returncode == 0, result.stderr
    lines = path.read_bytes().split(b"\n")
    assert lines[:2] == ["erin:pa\u2028ss".encode(), b"frank:a\x0cb"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_uid == os.getuid()
    assert runPasswd(str(path), "#eve", stdin="x\n").returncode == 2


@pytest_twisted.ensureDeferred
async def test_a_tls_connection_is_closed_after_its_tries(reactor, tlsServer):
    # The broker is its transport's producer, for pushes; TLS does not shut
    # down while a producer is registered, so the close must unregister it.
    port, caFile = tlsServer
    factory = pb.PBClientFactory()
    broker = await tlsEndpoint(reactor, port, caFile).connect(factory)
    closed: defer.Deferred = defer.Deferred()
    broker.notifyOnDisconnect(lambda: closed.callback(None))
    for _ in range(6):  # --max-auth-tries
        with pytest.raises(BadCredentials):
            await factory.login(UsernamePassword(b"carol", b"guess")).addErrback(localize)
    await closed.addTimeout(3, reactor)
