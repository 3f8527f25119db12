"""File descriptors: the stream budget, running out anyway, and recovering."""

import os
import re
import resource
import socket
import subprocess
import sys
import time

import pytest
import yaml

from netutil import echo, wait_for


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LtcpProcess:
    """ltcp in a subprocess reading its configuration from stdin; its log is collected."""

    def __init__(self, backend, nofile=None):
        document = {
            "admin": {"port": 0},
            "routers": [{"label": "fd",
                         "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
                         "servers": [{"port": 0, "dstName": "/svc/a", "connectTimeoutMs": 20000}]}]}

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen([sys.executable, "-m", "ltcp", "-"], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=limit)
        self.proc.stdin.write(yaml.safe_dump(document))
        self.proc.stdin.close()
        self.log = ""
        while "listening on" not in self.log:
            line = self.proc.stderr.readline()
            assert line, self.log
            self.log += line
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log).group(1))
        os.set_blocking(self.proc.stderr.fileno(), False)

    def read_log(self):
        self.log += self.proc.stderr.read() or ""
        return self.log

    def connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def cpu_over(self, seconds):
        before = cpu_seconds(self.proc.pid)
        time.sleep(seconds)  # a window to measure CPU over, not a wait for a condition
        return cpu_seconds(self.proc.pid) - before

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        return self.proc.returncode


def served(c, message=b"ping"):
    c.sendall(message)
    return c.recv(len(message)) == message


@pytest.fixture
def running(backends):
    started = []

    def start(nofile=None):
        process = LtcpProcess(backends(echo), nofile)
        started.append(process)
        return process

    yield start
    for process in started:
        assert process.stop() == 0


def test_streams_stop_at_the_descriptor_budget_and_resume(running):
    ltcp = running(nofile=64)  # (64 - 32 reserved - 1 listener) // 2 = 15 streams
    assert "at most 15 concurrent streams" in ltcp.log
    clients = [ltcp.connect() for _ in range(30)]
    try:
        assert all(served(c) for c in clients[:15])
        clients[15].settimeout(0.3)
        with pytest.raises(socket.timeout):
            served(clients[15])
        assert ltcp.cpu_over(1.0) < 0.2
        for c in clients[:10]:
            c.close()
        clients[15].settimeout(10)
        assert clients[15].recv(4) == b"ping"
        assert all(served(c) for c in clients[16:25])
        assert "out of descriptors" not in ltcp.read_log()
    finally:
        for c in clients:
            c.close()


def test_emfile_pauses_accepting_without_spinning_and_recovers(running):
    ltcp = running()
    first = ltcp.connect()
    assert served(first)
    # Squeeze the running process: only a few descriptors left.
    in_use = len(os.listdir(f"/proc/{ltcp.proc.pid}/fd"))
    limits = resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE, (in_use + 3, limits[1]))
    clients = [ltcp.connect() for _ in range(20)]
    try:
        wait_for(lambda: "out of descriptors" in ltcp.read_log(), timeout=10, message="the EMFILE warning")
        assert ltcp.cpu_over(1.0) < 0.2, "ltcp spins while out of descriptors"
        assert served(first, b"still here")  # an established stream keeps working
        resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE, limits)
        # Streams refused while short were closed; everything after is served.
        for c in clients:
            try:
                c.sendall(b"x")
                c.recv(1)
            except OSError:
                pass
        late = [ltcp.connect() for _ in range(20)]
        assert all(served(c) for c in late)
        for c in late:
            c.close()
        warnings = ltcp.read_log().count("out of descriptors")
        assert 1 <= warnings <= 12, "one warning per pause, not one per failed accept"
    finally:
        first.close()
        for c in clients:
            c.close()
