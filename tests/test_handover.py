"""Reloads and upgrades hand open plain-TCP streams to the new workers: nothing cut, nothing lost, no old
worker pinned by a long-lived stream (issue 28).

Each test runs ``python -m ltcp FILE`` with two workers and drives it with signals, checking every stream
byte for byte on both sides.
"""

import json
import os
import re
import signal
import socket
import threading
import time

import pytest

from ltcp.dataplane.streamrecord import BATCH
from netutil import echo, recv_exactly, wait_for
from test_workers import alive, document, metrics, reload_via_sighup, routers, serving

pytestmark = pytest.mark.timeout(180)


def workers_by_generation(ltcp):
    state = routers(ltcp)
    return {w["pid"]: w["generation"] for w in state["workers"]}


def handed(ltcp, outcome):
    return sum(v for (name, labels), v in metrics(ltcp).items()
               if name == "ltcp_streams_handed_over_total" and ("outcome", outcome) in labels)


def open_streams(port, count):
    streams = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        streams.append(sock)
    return streams


def echoes(sock, payload):
    sock.sendall(payload)
    return recv_exactly(sock, len(payload)) == payload


class Busy(threading.Thread):
    """A stream carrying numbered chunks back and forth without pause, each checked as it comes back."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sent = 0
        self.error = None
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                chunk = b"%08d" % self.sent * 512  # 4 KB, numbered
                self.sock.sendall(chunk)
                assert recv_exactly(self.sock, len(chunk)) == chunk, f"chunk {self.sent} came back wrong"
                self.sent += 1
        except Exception as exc:  # (kept for the test's thread to see)
            self.error = exc


def upgrade(ltcp):
    count = ltcp.log.count("upgrade: generation")
    ltcp.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: ltcp.log.count("upgrade: generation") > count, timeout=60, message="the upgrade to finish")


def test_reloads_and_an_upgrade_hand_idle_and_busy_streams_to_the_new_workers(instances, backends):
    backend = backends(echo)
    config = document(backend)
    config["admin"]["graceSecs"] = 60
    ltcp = instances(config)
    port = ltcp.port
    idle = open_streams(port, 300)
    busy = [Busy(port) for _ in range(4)]
    for stream in busy:
        stream.start()
    for i, sock in enumerate(idle):
        assert echoes(sock, b"hello %d" % i)
    for change in [*(["reload"] * 5), "upgrade"]:
        old = set(serving(ltcp))
        started = time.monotonic()
        reload_via_sighup(ltcp, expect=True) if change == "reload" else upgrade(ltcp)
        # The old workers hand everything over and go, long before graceSecs.
        wait_for(lambda old=old: not any(alive(pid) for pid in old), timeout=10, message="the old workers to exit")
        took = time.monotonic() - started
        assert took < 15, took
        for stream in busy:
            assert stream.error is None, stream.error
        progress = [stream.sent for stream in busy]
        wait_for(lambda progress=progress: all(s.sent > p + 5 for s, p in zip(busy, progress)), timeout=10,
                 message="the busy streams to go on")
        for i, sock in enumerate(idle):
            assert echoes(sock, b"after the %s: %d" % (change.encode(), i))
    for stream in busy:
        stream.stop.set()
        stream.join(10)
        assert stream.error is None, stream.error
    samples = metrics(ltcp)
    assert handed(ltcp, "moved") == 6 * 304 and handed(ltcp, "failed") == 0
    assert samples[("ltcp_accepted_total", (("router", "r"), ("server", f"127.0.0.1:{port}")))] == 304
    assert samples[("ltcp_active_streams", (("router", "r"), ("server", f"127.0.0.1:{port}")))] == 304
    for sock in idle + [s.sock for s in busy]:
        sock.close()
    wait_for(lambda: metrics(ltcp)[("ltcp_active_streams", (("router", "r"), ("server", f"127.0.0.1:{port}")))]
             == 0, timeout=10, message="every stream to be counted closed")


def pour(conn):
    """A backend that sends numbered 4 KB chunks for as long as the client takes them."""
    try:
        for n in range(1_000_000):
            conn.sendall(b"%08d" % n * 512)
    except OSError:
        pass


def read_chunks(sock, count, first=0):
    for n in range(first, first + count):
        assert recv_exactly(sock, 4096) == b"%08d" % n * 512, f"chunk {n}"


def test_a_stream_whose_reader_stalls_stays_with_its_worker_and_loses_nothing(instances, backends):
    backend = backends(pour)
    config = document(backend)
    config["admin"]["graceSecs"] = 60
    ltcp = instances(config)
    stalled = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    read_chunks(stalled, 1)  # flowing; from now on nobody reads: the buffers fill, and ltcp holds unsent bytes
    old = set(serving(ltcp))
    reload_via_sighup(ltcp, expect=True)
    wait_for(lambda: handed(ltcp, "kept") == 1, timeout=10, message="the stalled stream to be kept")
    assert any(alive(pid) for pid in old)  # its worker stays, draining it
    read_chunks(stalled, 2000, first=1)  # every byte, in order, from where it stopped
    stalled.close()
    wait_for(lambda: not any(alive(pid) for pid in old), timeout=10, message="the old worker to exit")
    assert handed(ltcp, "moved") == 0


def test_a_tls_terminated_stream_drains_with_its_worker(instances, backends, certificates):
    identity, _, context, _ = certificates
    backend = backends(echo)
    config = document(backend, servers=[{"port": 0, "dstName": "/svc/a", "tls": {"defaultIdentity": identity}},
                                        {"port": 0, "dstName": "/svc/a"}])
    config["admin"]["graceSecs"] = 60
    ltcp = instances(config)
    tls_port, plain_port = ltcp.ports
    secure = context.wrap_socket(socket.create_connection(("127.0.0.1", tls_port), timeout=10),
                                 server_hostname="web.example.com")
    plain = socket.create_connection(("127.0.0.1", plain_port), timeout=10)
    assert echoes(secure, b"before") and echoes(plain, b"before")
    old = set(serving(ltcp))
    reload_via_sighup(ltcp, expect=True)
    wait_for(lambda: handed(ltcp, "moved") == 1 and handed(ltcp, "kept") == 1, timeout=10,
             message="the plain stream moved and the TLS one kept")
    assert any(alive(pid) for pid in old)
    assert echoes(secure, b"after") and echoes(plain, b"after")
    secure.close()
    wait_for(lambda: not any(alive(pid) for pid in old), timeout=10, message="the old worker to exit")
    assert echoes(plain, b"still")
    plain.close()


def echoes_or_closed(sock, payload):
    """True if ``payload`` comes back whole, False if the stream is closed instead."""
    try:
        sock.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = sock.recv(len(payload) - len(data))
            if not chunk:
                return False
            data += chunk
    except ConnectionError:
        return False
    assert data == payload
    return True


def descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_new_worker_killed_during_a_hand_over_leaves_no_stream_half_owned(instances, backends):
    """Streams it had adopted die with it, like any worker's; the others stay with the old worker, which
    drains them; none hangs, and no descriptor is left behind in the supervisor."""
    backend = backends(echo)
    config = document(backend)
    config["admin"]["graceSecs"] = 60
    ltcp = instances(config)
    idle = open_streams(ltcp.port, 2000)
    for sock in idle:
        assert echoes(sock, b"x")
    old = set(serving(ltcp))
    supervisor_fds = descriptors(ltcp.proc.pid)  # (the admin connection serving() keeps open included)
    ltcp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "hand-over: moving" in ltcp.log, timeout=30, message="a hand-over to begin")
    victim = int(re.search(r"hand-over: moving \d+ streams to workers (\d+)", ltcp.log).group(1))
    os.kill(victim, signal.SIGSTOP)  # (let it go on until it holds some streams, then kill it)
    before = descriptors(victim)
    os.kill(victim, signal.SIGCONT)
    # Each old worker's connection is a descriptor and a batch of streams 200 more; the new worker reads a
    # batch only once it has answered for the one before: past 202, it has adopted streams for certain.
    wait_for(lambda: descriptors(victim) > before + 2 + 2 * BATCH, timeout=10, interval=0.001,
             message="the new worker to adopt streams")
    os.kill(victim, signal.SIGKILL)
    # Each one works or is closed; none is left hanging (a socket timeout fails the test).
    outcomes = [echoes_or_closed(sock, b"after %d" % i) for i, sock in enumerate(idle)]
    assert outcomes.count(True) > 0, "some streams were with the old worker or the other new one"
    assert outcomes.count(False) > 0, "the killed worker had adopted some"
    for sock in idle:
        sock.close()
    wait_for(lambda: not any(alive(pid) for pid in old), timeout=20, message="the old workers to exit")
    wait_for(lambda: len(serving(ltcp)) == 2 and victim not in serving(ltcp), timeout=20,
             message="the killed worker to be replaced")
    wait_for(lambda: descriptors(ltcp.proc.pid) == supervisor_fds, timeout=10,
             message=f"the supervisor back to {supervisor_fds} descriptors")


def test_a_moved_stream_is_logged_once_with_all_its_bytes(instances, backends, tmp_path):
    backend = backends(echo)
    log_path = tmp_path / "access.log"
    config = document(backend, accessLog={"path": str(log_path)})
    ltcp = instances(config)
    sock = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    assert echoes(sock, b"a" * 1000)
    old = set(serving(ltcp))
    reload_via_sighup(ltcp, expect=True)
    wait_for(lambda: not any(alive(pid) for pid in old), timeout=10, message="the old workers to exit")
    assert echoes(sock, b"b" * 500)
    sock.close()
    wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") == 1, timeout=10,
             message="the stream's line")
    (line,) = [json.loads(text) for text in log_path.read_text().splitlines()]
    assert (line["bytes_from_client"], line["bytes_to_client"], line["end"]) == (1500, 1500, "done"), line
    assert handed(ltcp, "moved") == 1


def test_hand_over_can_be_turned_off(instances, backends):
    ltcp = instances(document(backends(echo), handOver=False))
    sock = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    assert echoes(sock, b"before")
    old = set(serving(ltcp))
    reload_via_sighup(ltcp, expect=True)
    assert echoes(sock, b"after")  # served by its old worker, which drains it as before
    assert any(alive(pid) for pid in old) and handed(ltcp, "moved") == 0
    sock.close()
    wait_for(lambda: not any(alive(pid) for pid in old), timeout=10, message="the old workers to exit")


def test_reloads_back_to_back_leave_no_stream_behind(instances, backends):
    """A second reload while the first one's new workers are still adopting: what they refused (draining
    already) goes on to the newest workers, and no old worker stays (found by review: 144 of 3,000 cut)."""
    config = document(backends(echo))
    config["admin"]["graceSecs"] = 60
    ltcp = instances(config)
    idle = open_streams(ltcp.port, 3000)
    for i, sock in enumerate(idle):
        assert echoes(sock, b"x%d" % i)
    count, asked = ltcp.log.count("reload: generation"), ltcp.log.count("received SIGHUP")
    ltcp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: ltcp.log.count("received SIGHUP") > asked, interval=0.001, message="the first reload to begin")
    ltcp.proc.send_signal(signal.SIGHUP)  # (served by one more reload as soon as the first is done)
    wait_for(lambda: ltcp.log.count("reload: generation") == count + 2, timeout=30, message="both reloads")
    newest = set(serving(ltcp))
    every = {int(pid) for pid in re.findall(r"worker (\d+) started", ltcp.log)}
    # (a batch in flight to a worker that drains and goes counts as failed, and is offered to the newest)
    wait_for(lambda: not any(alive(pid) for pid in every - newest), timeout=20,
             message="every worker but the newest to exit")
    assert all(echoes(sock, b"after %d" % i) for i, sock in enumerate(idle))
    for sock in idle:
        sock.close()


def test_a_moved_stream_keeps_its_lifetime_from_its_start(instances, backends):
    """Found by review: a moved stream's limits were counted again from the hand-over."""
    config = document(backends(echo), servers=[{"port": 0, "dstName": "/svc/a", "connectionLifetimeSecs": 3}])
    ltcp = instances(config)
    sock = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    opened = time.monotonic()
    assert echoes(sock, b"x")
    wait_for(lambda: time.monotonic() > opened + 2, timeout=5, message="the stream to be 2 s old")
    reload_via_sighup(ltcp, expect=True)
    wait_for(lambda: handed(ltcp, "moved") == 1, timeout=10, message="the stream to move")
    assert sock.recv(1) == b""  # closed at its lifetime ...
    assert time.monotonic() - opened < 4.5  # ... from its start (from the hand-over it would be 5 s)
    sock.close()
