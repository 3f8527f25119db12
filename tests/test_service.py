"""Living under a service manager: sd_notify messages, JSON log lines, the shipped unit file."""

import configparser
import json
import os
import signal
import socket

import pytest
from netutil import Backend, LtcpProcess, static_config, wait_for

pytestmark = pytest.mark.timeout(60)


class NotifySocket:
    """What a service manager listens on: a datagram socket, read message by message."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(20)

    def next(self):
        """The next message, as a dict of its fields."""
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_reloading_and_stopping_are_told_to_the_service_manager(tmp_path, abstract):
    address = f"\0ltcp-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    manager = NotifySocket(address)
    backend = Backend()
    ltcp = LtcpProcess(static_config({"/svc/a": [backend.addr]}), path=tmp_path / "ltcp.yaml",
                       env={"NOTIFY_SOCKET": "@" + address[1:] if abstract else address})
    try:
        ready = manager.next()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(ltcp.proc.pid)
        assert "serving with 1 workers" in ready["STATUS"]
        with ltcp.connect() as conn:  # READY means serving: the listener answers
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
        ltcp.proc.send_signal(signal.SIGHUP)
        reloading = manager.next()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert manager.next()["READY"] == "1"
        ltcp.proc.send_signal(signal.SIGTERM)
        assert manager.next()["STOPPING"] == "1"
        assert ltcp.stop() == 0
    finally:
        ltcp.stop()
        manager.close()
        backend.close()


def test_a_reload_that_fails_still_ends_in_ready(tmp_path):
    manager = NotifySocket(str(tmp_path / "notify"))
    backend = Backend()
    path = tmp_path / "ltcp.yaml"
    ltcp = LtcpProcess(static_config({"/svc/a": [backend.addr]}), path=path,
                       env={"NOTIFY_SOCKET": str(tmp_path / "notify")})
    try:
        assert manager.next()["READY"] == "1"
        path.write_text("routers: [")  # broken
        ltcp.proc.send_signal(signal.SIGHUP)
        assert manager.next()["RELOADING"] == "1"
        assert manager.next()["READY"] == "1"  # still serving the old configuration
        wait_for(lambda: "reload failed" in ltcp.log, message="the failure logged")
    finally:
        ltcp.stop()
        manager.close()
        backend.close()


def test_json_logs_are_one_object_per_line_from_every_process(tmp_path):
    backend = Backend()
    document = static_config({"/svc/a": [backend.addr]})
    document["workers"] = 2
    ltcp = LtcpProcess(document, args=["--log-format", "json"])
    try:
        with ltcp.connect() as conn:
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
    finally:
        ltcp.stop()
        backend.close()
    entries = [json.loads(line) for line in ltcp.lines]  # (every line: a traceback would fail here)
    assert {"time", "level", "logger", "pid", "message"} <= set(entries[0])
    assert all(e["time"].endswith("Z") and e["level"] in ("debug", "info", "warning", "error") for e in entries)
    assert {e["pid"] for e in entries} >= {ltcp.proc.pid, *ltcp.workers}  # supervisor and both workers


def test_an_unknown_log_format_is_refused(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "ltcp", "--log-format", "xml", "-"], input="",
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "invalid choice: 'xml'" in result.stderr


def test_the_shipped_unit_file_is_a_notify_service_with_hardening():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(os.path.join(os.path.dirname(__file__), "..", "examples", "ltcp.service"))
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "kill -HUP $MAINPID"
    for option in ("NoNewPrivileges", "ProtectSystem", "AmbientCapabilities", "LimitNOFILE"):
        assert option in service
