"""
systemd's readiness messages.
"""

import socket

from pbrealms.notify import notify


def test_without_notify_socket_nothing_happens():
    assert notify("READY=1", environ={}) is False


def test_sends_to_a_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert notify("READY=1", environ={"NOTIFY_SOCKET": path}) is True
        assert sock.recv(64) == b"READY=1"


def test_sends_to_an_abstract_socket():
    name = f"pbrealms-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(64) == b"STOPPING=1"


def test_an_unreachable_socket_is_a_warning_not_a_crash(tmp_path, log):
    missing = str(tmp_path / "gone")
    assert notify("READY=1", environ={"NOTIFY_SOCKET": missing}) is False
    [warning] = [m for m in log.messages() if "service manager" in m]
    assert missing in warning
    assert not log.errors()
