"""Connect deadline, per-attempt timeout, idle and lifetime limits, maxConcurrency."""

import socket
import struct
import time

import pytest

from ltcp.config import Address
from netutil import SilentDiscovery, blackhole, echo, named, recv_all, settled, static_config, wait_for


@pytest.fixture
def hole():
    sock, port, fillers = blackhole()
    yield port
    for s in fillers:
        s.close()
    sock.close()


def closed_after(c, limit=10):
    """Seconds until the proxy closes ``c`` (EOF or reset)."""
    start = time.monotonic()
    c.settimeout(limit)
    try:
        while c.recv(1024):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_connect_deadline_closes_the_client(proxies, hole):
    proxy = proxies(static_config({"/svc/a": [f"127.0.0.1:{hole}"]}, connectTimeoutMs=300,
                                  client={"connectTimeoutMs": 5000}))
    with proxy.connect() as c:
        elapsed = closed_after(c)
    assert 0.3 <= elapsed < 1.5
    wait_for(lambda: proxy.listener.failures["timeout"] == 1)


def test_connect_deadline_includes_waiting_for_discovery(proxies):
    proxy = proxies(static_config({"/svc/a": ["127.0.0.1:9"]}, connectTimeoutMs=300))
    proxy.call(setattr, proxy.app.routers[0].binder, "interpreter", SilentDiscovery())
    with proxy.connect() as c:
        elapsed = closed_after(c)
    assert 0.3 <= elapsed < 1.5
    assert proxy.listener.failures["timeout"] == 1
    balancer = proxy.balancer("/svc/a")
    assert proxy.call(lambda: len(balancer.waiters)) == 0


def test_max_waiters_bounds_streams_waiting_for_discovery(proxies):
    proxy = proxies(static_config({"/svc/a": ["127.0.0.1:9"]}, connectTimeoutMs=5000,
                                  client={"maxWaiters": 2}))
    proxy.call(setattr, proxy.app.routers[0].binder, "interpreter", SilentDiscovery())
    waiting = [proxy.connect(), proxy.connect()]
    wait_for(lambda: proxy.listener.accepted == 2)
    with proxy.connect() as c:  # the third has no room to wait: closed at once
        assert closed_after(c) < 1
    assert proxy.listener.failures["no_endpoints"] == 1
    balancer = proxy.balancer("/svc/a")
    assert proxy.call(lambda: len(balancer.waiters)) == 2
    for c in waiting:
        c.close()


def test_per_attempt_timeout_moves_to_a_healthy_endpoint(proxies, backends, hole):
    good = backends(named("good"))
    proxy = proxies(static_config(
        {"/svc/a": [{"addr": f"127.0.0.1:{hole}", "weight": 1000}, good.addr]},
        connectTimeoutMs=5000, client={"connectTimeoutMs": 100}))
    start = time.monotonic()
    with proxy.connect() as c:
        assert c.recv(16) == b"good\n"
    assert time.monotonic() - start < 2
    balancer = proxy.balancer("/svc/a")
    assert proxy.call(lambda: balancer.connect_failures["timeout"]) >= 1


def test_idle_timeout_fires_when_idle_and_not_before(proxies, backends):
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, idleTimeoutMs=300))
    with proxy.connect() as c:
        # Activity every 100 ms for 0.9 s keeps it open past three idle periods.
        for _ in range(9):
            time.sleep(0.1)
            c.sendall(b"k")
            assert c.recv(1) == b"k"
        elapsed = closed_after(c)  # measured from the last byte
    assert 0.3 <= elapsed < 1.0
    wait_for(lambda: proxy.listener.endings["idle"] == 1)


def test_idle_timeout_reaps_half_closed_pairs(proxies, backends):
    def never_finishes(conn):
        recv_all(conn)  # reads to EOF, then neither writes nor closes
        time.sleep(5)

    backend = backends(never_finishes)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, idleTimeoutMs=200))
    with proxy.connect() as c:
        c.shutdown(socket.SHUT_WR)
        assert closed_after(c) < 2
    wait_for(lambda: proxy.listener.endings["idle"] == 1)


def test_lifetime_ends_a_busy_stream(proxies, backends):
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, connectionLifetimeSecs=0.5))
    start = time.monotonic()
    with proxy.connect() as c:
        with pytest.raises((ConnectionError, AssertionError, OSError)):
            while True:
                c.sendall(b"busy")
                assert c.recv(4) == b"busy"
                time.sleep(0.02)
    assert 0.5 <= time.monotonic() - start < 2
    wait_for(lambda: proxy.listener.endings["lifetime"] == 1)


def test_max_concurrency_holds_and_accepting_resumes(proxies, backends):
    backend = backends(named("b"))
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, maxConcurrency=5))
    held = [proxy.connect() for _ in range(5)]
    for c in held:
        assert c.recv(2) == b"b\n"
    extra = proxy.connect()  # the kernel completes the handshake; ltcp must not accept
    extra.settimeout(0.3)
    with pytest.raises(socket.timeout):
        extra.recv(2)
    assert proxy.listener.accepted == 5 and backend.accepted == 5
    held.pop().close()
    extra.settimeout(5)
    assert extra.recv(2) == b"b\n"
    assert proxy.listener.accepted == 6
    for c in held + [extra]:
        c.close()


def reset(c):
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


@pytest.mark.parametrize("waiting_for", ["connect", "discovery"])
def test_clients_that_reset_while_waiting_are_released_at_once(proxies, hole, waiting_for):
    """200 resets during a backend connect once held their descriptors until the deadline."""
    proxy = proxies(static_config({"/svc/a": [f"127.0.0.1:{hole}"]}, connectTimeoutMs=4000,
                                  client={"connectTimeoutMs": 4000}))
    if waiting_for == "discovery":
        proxy.call(setattr, proxy.app.routers[0].binder, "interpreter", SilentDiscovery())
    clients = [proxy.connect() for _ in range(200)]
    wait_for(lambda: proxy.call(lambda: len(proxy.listener.dials)) == 200, message="200 streams waiting")
    started = time.monotonic()
    for c in clients:
        reset(c)
    wait_for(lambda: proxy.call(lambda: proxy.listener.active) == 0, timeout=2, message="every stream released")
    assert time.monotonic() - started < 1
    assert proxy.listener.failures["closed"] == 200
    assert proxy.call(settled, proxy.app) == []


def test_a_client_that_half_closes_while_waiting_still_gets_its_answer(proxies, backends):
    slow = backends(lambda conn: (time.sleep(0.3), conn.sendall(b"late answer"), conn.recv(1)))
    proxy = proxies(static_config({"/svc/a": [slow.addr]}, connectTimeoutMs=3000))
    proxy.call(setattr, proxy.app.routers[0].binder, "interpreter", SilentDiscovery())
    with proxy.connect() as c:
        c.shutdown(socket.SHUT_WR)  # nothing to say, and waits for the server's greeting
        wait_for(lambda: proxy.call(lambda: len(proxy.listener.dials)) == 1)
        time.sleep(0.1)  # the half-close has been seen while the stream waited for discovery
        balancer = proxy.balancer("/svc/a")
        proxy.call(balancer.update, [Address("127.0.0.1", slow.port)])
        assert recv_all(c) == b"late answer"
