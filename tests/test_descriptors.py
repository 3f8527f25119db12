"""File descriptors: the stream budget, running out anyway, and recovering."""

import os
import resource
import socket

import pytest

from netutil import LtcpProcess, echo, wait_for


def served(c, message=b"ping"):
    c.sendall(message)
    return c.recv(len(message)) == message


def fd_config(backend):
    return {
        "admin": {"port": 0},
        "routers": [{"label": "fd",
                     "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
                     "servers": [{"port": 0, "dstName": "/svc/a", "connectTimeoutMs": 20000}]}]}


@pytest.fixture
def running(backends):
    started = []

    def start(nofile=None):
        process = LtcpProcess(fd_config(backends(echo)), nofile)
        started.append(process)
        return process

    yield start
    for process in started:
        assert process.stop() == 0


def test_streams_stop_at_the_descriptor_budget_and_resume(running):
    # A worker's budget: (97 - 32 reserved - 1 listener) // 2 = 32 streams (admin and discovery
    # live in the supervisor, and need none of the worker's descriptors).
    ltcp = running(nofile=97)
    assert "at most 32 concurrent streams" in ltcp.log
    clients = [ltcp.connect() for _ in range(50)]
    try:
        assert all(served(c) for c in clients[:32])
        clients[32].settimeout(0.3)
        with pytest.raises(socket.timeout):
            served(clients[32])
        assert ltcp.cpu_over(1.0) < 0.2
        for c in clients[:10]:
            c.close()
        clients[32].settimeout(10)
        assert clients[32].recv(4) == b"ping"
        assert all(served(c) for c in clients[33:42])
        assert "out of descriptors" not in ltcp.log
    finally:
        for c in clients:
            c.close()


def test_emfile_pauses_accepting_without_spinning_and_recovers(running):
    ltcp = running()
    first = ltcp.connect()
    assert served(first)
    # Squeeze the running process: only a few descriptors left.
    (worker,) = ltcp.workers
    in_use = len(os.listdir(f"/proc/{worker}/fd"))
    limits = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (in_use + 3, limits[1]))
    clients = [ltcp.connect() for _ in range(20)]
    try:
        wait_for(lambda: "out of descriptors" in ltcp.log, timeout=10, message="the EMFILE warning")
        assert ltcp.cpu_over(1.0) < 0.2, "ltcp spins while out of descriptors"
        assert served(first, b"still here")  # an established stream keeps working
        resource.prlimit(worker, resource.RLIMIT_NOFILE, limits)
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
        warnings = ltcp.log.count("out of descriptors")
        assert 1 <= warnings <= 12, "one warning per pause, not one per failed accept"
    finally:
        first.close()
        for c in clients:
            c.close()
