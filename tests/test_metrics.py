"""
/metrics, /healthz and /sessions, scraped over real HTTP while real clients
log in, push and leave.
"""

import json
import re

import pytest
import pytest_twisted
from conftest import USERS, Arrivals, nextLogout
from twisted.internet import defer
from twisted.web.client import Agent, readBody

from pbrealms.client import ClientMind, connect
from pbrealms.errors import BadCredentials
from pbrealms.tap import Options, makeService

# Twisted's own HTTP client transport, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


class Running:
    def __init__(self, reactor, server) -> None:
        self.reactor = reactor
        self.server = server
        pb = server.getServiceNamed("pb-listener").port.getHost().port
        http = server.getServiceNamed("metrics-http").port.getHost().port
        self.endpoint = f"tcp:127.0.0.1:{pb}"
        self.url = f"http://127.0.0.1:{http}"
        self.connections = []

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await Agent(self.reactor).request(b"GET", (self.url + path).encode())
        return response.code, await readBody(response)

    async def metric(self, name: str, **labels: str) -> float:
        _, body = await self.get("/metrics")
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        line = re.escape(name + (f"{{{wanted}}}" if labels else "")) + r" (\S+)"
        found = re.search("^" + line + "$", body.decode(), re.MULTILINE)
        assert found, f"{name} {labels} not in /metrics"
        return float(found.group(1))

    async def login(self, user="alice", password=None, mind=None):
        conn = await connect(self.reactor, self.endpoint, user, password or USERS[user], mind)
        self.connections.append(conn)
        return conn


@pytest_twisted.async_yield_fixture()
async def running(reactor, passwd):
    options = Options()
    options.parseOptions(
        [
            "--passwd", str(passwd), "--realm=clock", "--period=0.05",
            "--port", "tcp:0:interface=127.0.0.1",
            "--metrics", "tcp:0:interface=127.0.0.1", "--shutdown-grace=0.5",
        ]
    )  # fmt: skip
    server = makeService(options)
    server.privilegedStartService()
    server.startService()
    served = Running(reactor, server)
    yield served
    for conn in served.connections:
        await conn.disconnect()
    if server.running:
        await server.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_move_with_logins_pushes_and_logouts(running, reactor):
    m = running.metric
    assert await m("pbrealms_logins_total", outcome="ok") == 0
    assert await m("pbrealms_sessions_open", realm="clock") == 0
    assert await m("pbrealms_connections_open") == 0

    times = Arrivals()
    first = await running.login(mind=ClientMind(times))
    await running.login("bob", mind=ClientMind())
    with pytest.raises(BadCredentials):
        await running.login(password="wrong", mind=ClientMind())
    await times.waitFor(reactor, 3)

    assert await m("pbrealms_logins_total", outcome="ok") == 2
    assert await m("pbrealms_logins_total", outcome="bad_credentials") == 1
    assert await m("pbrealms_logins_total", outcome="too_many") == 0
    assert await m("pbrealms_sessions_open", realm="clock") == 2
    assert await m("pbrealms_login_latency_seconds_count") == 2
    assert await m("pbrealms_pushes_total", result="sent") >= 3
    assert await m("pbrealms_pushes_total", result="failed") == 0
    assert await m("pbrealms_clock_push_lateness_seconds_count") >= 3
    connections = await m("pbrealms_connections_open")
    assert connections in (2, 3)  # the refused one may still be closing

    registry = running.server.getServiceNamed("graceful-shutdown").registry
    logout = nextLogout(reactor, registry)
    await first.disconnect()
    await logout
    assert len(list(registry)) == 1
    assert await m("pbrealms_sessions_open", realm="clock") == 1
    assert await m("pbrealms_session_duration_seconds_count") == 1


@pytest_twisted.ensureDeferred
async def test_sessions_lists_who_is_logged_in(running):
    code, body = await running.get("/sessions")
    assert (code, json.loads(body)) == (200, [])
    await running.login(mind=ClientMind())
    conn = await running.login("bob", mind=ClientMind())
    await conn.callRemote("greet")
    code, body = await running.get("/sessions")
    sessions = json.loads(body)
    assert code == 200
    assert sorted(s["user"] for s in sessions) == ["alice", "bob"]
    for s in sessions:
        assert set(s) == {"user", "session", "peer", "since", "idle"}
        assert s["peer"].startswith("127.0.0.1:")
        assert 0 <= s["idle"] < 5


@pytest_twisted.ensureDeferred
async def test_health_is_ok_while_serving_and_503_while_shutting_down(running, reactor):
    code, body = await running.get("/healthz")
    assert (code, body) == (200, b"ok\n")

    class Slow(ClientMind):
        def remote_notifyShutdown(self, reason):
            return defer.Deferred()  # hold the shutdown for its grace period

    await running.login(mind=Slow())
    stopping = running.server.stopService()
    code, _ = await running.get("/healthz")
    assert code == 503
    await stopping
