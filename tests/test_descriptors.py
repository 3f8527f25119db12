"""File descriptors: the stream budget, running out anyway, and recovering."""

import os
import re
import resource
import signal
import socket
import threading

import pytest

from netutil import LtcpProcess, echo, recv_all, wait_for


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
    # A worker's budget: 97 - 32 reserved - 1 listener = 64 descriptors, a quarter of them for
    # 8 splice pipes, the rest for (64 - 16) // 2 = 24 streams (admin and discovery live in the
    # supervisor, and need none of the worker's descriptors).
    ltcp = running(nofile=97)
    assert "at most 24 concurrent streams in this process (8 splice pipes)" in ltcp.log
    clients = [ltcp.connect() for _ in range(50)]
    try:
        assert all(served(c) for c in clients[:24])
        clients[24].settimeout(0.3)
        with pytest.raises(socket.timeout):
            served(clients[24])
        assert ltcp.cpu_over(1.0) < 0.2
        for c in clients[:10]:
            c.close()
        clients[24].settimeout(10)
        assert clients[24].recv(4) == b"ping"
        assert all(served(c) for c in clients[25:34])
        assert "out of descriptors" not in ltcp.log
    finally:
        for c in clients:
            c.close()


def pipes_open(pid):
    """How many pipes a process has open, counted while it is stopped: a listing of /proc/PID/fd taken
    while it runs is no snapshot, and pipes closed and opened meanwhile made it count more than ever
    existed together."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: stopped(pid), timeout=5, interval=0.001, message="the worker to stop")
        targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        return sum(target.startswith("pipe:") for target in targets)
    finally:
        os.kill(pid, signal.SIGCONT)


def stopped(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


def bulk_echo(ltcp, size, seed, results):
    """Send ``size`` bytes through ``ltcp`` to the echo backend and check they all come back as sent."""
    payload = bytes((i * 131 + seed) & 0xFF for i in range(size))
    try:
        with ltcp.connect() as c:
            c.settimeout(30)
            writer = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
            writer.start()
            echoed = recv_all(c)
            writer.join()
        results.append(echoed == payload)
    except OSError as exc:
        results.append(exc)


def test_bulk_streams_beyond_the_budget_never_run_out_of_descriptors(running):
    # 128 - 33 = 95 descriptors: 11 splice pipes, (95 - 22) // 2 = 36 streams. Each stream
    # moving bulk data both ways would take 6 descriptors if every direction got a pipe.
    ltcp = running(nofile=128)
    assert "at most 36 concurrent streams in this process (11 splice pipes)" in ltcp.log
    (worker,) = ltcp.workers
    idle_pipes = pipes_open(worker)
    results, peak = [], []
    clients = [threading.Thread(target=bulk_echo, args=(ltcp, 1 << 20, i, results)) for i in range(60)]
    for client in clients:
        client.start()

    def all_done():
        peak.append(pipes_open(worker) - idle_pipes)
        return len(results) == len(clients)

    wait_for(all_done, timeout=50, message="every bulk stream to finish")
    assert results == [True] * len(clients)
    assert 0 < max(peak) <= 11, "streams splice, through no more pipes than their share"
    assert "out of descriptors" not in ltcp.log


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
        assert ltcp.log.count("stopped accepting: out of descriptors") == 1, "one warning per episode"
        resumed = wait_for(lambda: re.search(r"accepting again after [\d.]+s \(out of descriptors \(accept: .*\); "
                                             r"held back (\d+) more times, not logged\)", ltcp.log),
                           timeout=20, message="the episode's end, with the failures it did not log")
        assert int(resumed.group(1)) >= 1
    finally:
        first.close()
        for c in clients:
            c.close()
