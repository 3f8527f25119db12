"""Fault injection: dying backends, stuck backends, idle and abandoned clients, drains
under load.  After each: no descriptor or thread leak, no unhandled exception
logged, and every accepted stream accounted for (accepted = closed + active)."""

import logging
import os
import signal
import socket
import threading
import time

import pytest

from ltcp.balancer.connector import Connect
from ltcp.dataplane.duplex import Leg
from ltcp.dataplane.intake import Intake
from netutil import (LtcpProcess, SelectEcho, blackhole, closed_without_data, echo, named, open_fds, recv_all,
                     recv_exactly, settled, static_config, wait_for)


@pytest.fixture
def clean(caplog):
    """Check, after the test's own proxies are stopped, that nothing leaked."""
    caplog.set_level(logging.WARNING, logger="ltcp")
    fds, threads = open_fds(), threading.active_count()
    checked = []

    def check(proxy):
        listener = proxy.listener
        wait_for(lambda: proxy.call(lambda: listener.active) == 0, timeout=20, message="streams to end")
        assert listener.accepted == listener.finished + listener.active
        assert proxy.call(settled, proxy.app) == []
        checked.append(proxy)

    yield check
    # Requested first by each test, so this runs after its proxies and backends are gone.
    for proxy in checked:
        proxy.stop()
    wait_for(lambda: open_fds() <= fds, timeout=10, message="descriptors back to the baseline")
    wait_for(lambda: threading.active_count() <= threads, timeout=10, message="threads back to the baseline")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def select_echo():
    server = SelectEcho()
    yield server
    server.close()


def test_backend_dies_mid_stream_with_fin(clean, proxies, backends):
    def half_then_gone(conn):
        conn.recv(5)
        conn.sendall(b"partial answer")
        # returning closes the connection: a FIN with the request half unread

    backend = backends(half_then_gone)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}))
    with proxy.connect() as c:
        c.sendall(b"hello")
        assert recv_exactly(c, 14) == b"partial answer"
        try:
            assert c.recv(10) == b""  # the backend's FIN, passed on
        except ConnectionResetError:
            pass
    clean(proxy)


def test_backend_that_never_reads_holds_memory_down_and_is_reaped(clean, proxies, backends):
    gate = threading.Event()
    backend = backends(lambda conn: gate.wait(30))  # accepts, never reads
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, idleTimeoutMs=1000))
    rss_before = _rss_mb()
    chunk = memoryview(bytearray(1 << 20))
    pushed = []

    def push():
        with proxy.connect() as c:
            try:
                for _ in range(200):  # 200 MB, if anything would take it
                    c.sendall(chunk)
                    pushed.append(len(chunk))
            except OSError:
                pass

    pusher = threading.Thread(target=push)
    pusher.start()
    try:
        wait_for(lambda: proxy.listener.endings["idle"] == 1, timeout=20, message="the idle timeout")
        pusher.join(10)
        assert sum(pushed) < 100 * (1 << 20), "backpressure should stop the client long before 200 MB"
        assert _rss_mb() - rss_before < 50
    finally:
        gate.set()
    clean(proxy)


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_backend_that_never_answers_syns_is_skipped(clean, proxies, backends):
    hole, port, fillers = blackhole()
    good = backends(named("good"))
    try:
        proxy = proxies(static_config(
            {"/svc/a": [{"addr": f"127.0.0.1:{port}", "weight": 100}, good.addr]},
            connectTimeoutMs=5000, client={"connectTimeoutMs": 150}))
        for _ in range(5):
            with proxy.connect() as c:
                assert c.recv(5) == b"good\n"
        balancer = proxy.balancer("/svc/a")
        assert proxy.call(lambda: balancer.connect_failures["timeout"]) >= 1
        clean(proxy)
    finally:
        for s in fillers:
            s.close()
        hole.close()


def test_slowloris_clients_are_reaped_while_others_are_served(clean, proxies, select_echo):
    proxy = proxies(static_config({"/svc/a": [select_echo.addr]}, idleTimeoutMs=1500))
    idle = [proxy.connect() for _ in range(2000)]
    try:
        for _ in range(50):  # meanwhile, real clients get answers
            with proxy.connect() as c:
                c.sendall(b"ping")
                assert recv_exactly(c, 4) == b"ping"
        wait_for(lambda: proxy.listener.endings["idle"] == 2000, timeout=30, message="2000 idle reaped")
    finally:
        for c in idle:
            c.close()
    clean(proxy)


def test_5000_connections_opened_and_abandoned(clean, proxies, select_echo):
    proxy = proxies(static_config({"/svc/a": [select_echo.addr]}))
    for _ in range(10):
        socks = [proxy.connect() for _ in range(500)]
        for i, s in enumerate(socks):
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            s.close()
    wait_for(lambda: proxy.listener.accepted == 5000, timeout=30)
    clean(proxy)
    wait_for(lambda: select_echo.open == 0, timeout=10)


def test_namerd_dying_keeps_the_last_endpoints_serving(clean, proxies, backends):
    from ltcp.testing.namerd import NamerdServer

    a = backends(named("a"))
    namerd = NamerdServer().start()
    proxy = proxies({"routers": [{
        "label": "mesh",
        "interpreter": {"kind": "io.l5d.namerd.http", "baseUrl": namerd.url, "periodSecs": 0.3},
        "servers": [{"port": 0, "dstName": "/svc/web"}]}]})
    namerd.set("/svc/web", [a.addr])
    with proxy.connect() as c:
        assert c.recv(2) == b"a\n"
    namerd.close()
    stats = proxy.app.routers[0].interpreter.stats
    wait_for(lambda: stats.snapshot()["requests"].get("unreachable", 0) >= 1, timeout=10)
    for _ in range(5):
        with proxy.connect() as c:
            assert c.recv(2) == b"a\n"
    clean(proxy)


def test_sigterm_under_load_cuts_no_stream_that_finishes_in_grace(backends):
    backend = SelectEcho()
    ltcp = LtcpProcess({"admin": {"port": 0, "graceSecs": 5}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]})
    stop = threading.Event()
    outcomes = {"intact": 0, "broken": 0, "refused": 0}
    lock = threading.Lock()

    def client():
        while not stop.is_set():
            try:
                c = ltcp.connect()
            except ConnectionRefusedError:
                with lock:
                    outcomes["refused"] += 1
                return
            echoed = b""
            payload = os.urandom(20000)
            try:
                for i in range(0, len(payload), 2000):  # a stream lasting ~0.2 s
                    c.sendall(payload[i:i + 2000])
                    echoed += recv_exactly(c, 2000)
                    time.sleep(0.02)
                c.shutdown(socket.SHUT_WR)
                ok = recv_all(c) == b"" and echoed == payload
            except (OSError, AssertionError):
                ok = False
            finally:
                c.close()
            with lock:
                if ok:
                    outcomes["intact"] += 1
                elif not echoed:  # still in the kernel's backlog when the listener closed
                    outcomes["refused"] += 1
                    return
                else:
                    outcomes["broken"] += 1

    threads = [threading.Thread(target=client) for _ in range(20)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: outcomes["intact"] >= 40, timeout=20, message="traffic under way")
        ltcp.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(20)
        assert ltcp.proc.wait(20) == 0
        assert outcomes["broken"] == 0, outcomes
        assert outcomes["refused"] == 20, outcomes  # after the drain began, nothing new got in
        assert "Traceback" not in ltcp.log
    finally:
        stop.set()
        ltcp.kill()
        backend.close()


def ltcp_errors(caplog):
    return [r for r in caplog.records if r.name.startswith("ltcp") and r.levelno >= logging.ERROR]


def inject(monkeypatch, cls, name, when):
    """Make ``cls.name`` raise whenever ``when(self, *args)`` holds."""
    original = getattr(cls, name)

    def broken(self, *args):
        if when(self, *args):
            raise RuntimeError("an injected bug")
        return original(self, *args)

    monkeypatch.setattr(cls, name, broken)


def _boom_waiting(leg):
    """The bytes that trigger the injected bug wait on this leg's socket."""
    try:
        return leg.sock.recv(4, socket.MSG_PEEK) == b"BOOM"
    except OSError:
        return False


@pytest.mark.allow_errors
@pytest.mark.parametrize("phase", ["duplex", "intake", "connect"])
def test_a_bug_in_a_stream_callback_ends_that_stream_once_and_releases_it(proxies, backends, caplog, monkeypatch,
                                                                          phase):
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, proxyProtocol="accept"))
    header = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 7474\r\n"
    other = proxy.connect()
    other.sendall(header + b"fine")
    assert recv_exactly(other, 4) == b"fine"
    fds = open_fds()
    if phase == "duplex":
        inject(monkeypatch, Leg, "pump", _boom_waiting)
    elif phase == "intake":
        inject(monkeypatch, Intake, "_read_proxy_header", lambda intake: True)
    else:
        inject(monkeypatch, Connect, "on_event", lambda connect, mask: True)
    victim = proxy.connect()
    victim.sendall(header + b"BOOM")
    assert closed_without_data(victim)
    victim.close()
    monkeypatch.undo()
    wait_for(lambda: proxy.call(lambda: proxy.listener.active) == 1, message="the broken stream released")
    counts = proxy.call(lambda: {**proxy.listener.failures, **proxy.listener.endings})
    assert counts.get("bug") == 1, counts
    other.sendall(b"still fine")  # a turn of the loop later: the failed callback has not fired again
    assert recv_exactly(other, 10) == b"still fine"
    assert len(ltcp_errors(caplog)) == 1, [r.getMessage() for r in ltcp_errors(caplog)]
    # (the echo backend's thread closes its end of the victim's upstream when it reads EOF: wait for it)
    wait_for(lambda: open_fds() <= fds, message="no descriptor left behind")
    assert proxy.call(lambda: proxy.app.budget.used) == 1
    other.close()
    wait_for(lambda: proxy.call(lambda: proxy.listener.active) == 0, message="the other stream ended")
    assert proxy.call(settled, proxy.app) == []
