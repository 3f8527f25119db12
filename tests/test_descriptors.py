"""Running out of file descriptors: keep serving, do not spin, recover."""

import os
import re
import resource
import socket
import subprocess
import sys
import time

import yaml

from netutil import echo, wait_for


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_ltcp(document, nofile):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen([sys.executable, "-m", "ltcp", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=limit)
    proc.stdin.write(yaml.safe_dump(document))
    proc.stdin.close()
    line = proc.stderr.readline()
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    return proc, int(match.group(1))


_captured = {}


def _stderr_so_far(proc):
    """Lines ltcp has logged so far (read without blocking)."""
    os.set_blocking(proc.stderr.fileno(), False)
    chunk = proc.stderr.read() or ""
    _captured[proc.pid] = _captured.get(proc.pid, "") + chunk
    return _captured[proc.pid]


def test_emfile_pauses_accepting_without_spinning_and_recovers(backends):
    backend = backends(echo)
    proc, port = start_ltcp({
        "admin": {"port": 0},
        "routers": [{"label": "fd", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
                     "servers": [{"port": 0, "dstName": "/svc/a", "connectTimeoutMs": 20000}]}]}, nofile=48)
    clients = []
    try:
        # Far more streams than 48 descriptors allow (two each): some wait in the backlog.
        for i in range(40):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            clients.append(c)
        served = []
        for c in clients[:10]:
            c.sendall(b"ping")
            served.append(c.recv(4))
        assert served == [b"ping"] * 10
        wait_for(lambda: "cannot accept" in _stderr_so_far(proc), timeout=10, message="EMFILE warning")
        before = cpu_seconds(proc.pid)
        time.sleep(1.0)  # a window to measure CPU use over, not a wait for a condition
        assert cpu_seconds(proc.pid) - before < 0.3, "ltcp spins while out of descriptors"
        # Existing streams still work.
        clients[0].sendall(b"again")
        assert clients[0].recv(5) == b"again"
        # Free descriptors: the streams that waited are accepted and served.
        for c in clients[:25]:
            c.close()
        for c in clients[25:]:
            c.sendall(b"late")
            assert c.recv(4) == b"late"
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
