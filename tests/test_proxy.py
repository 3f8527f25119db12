"""End to end through a live proxy: bytes, backpressure, half-close, endings."""

import queue
import socket
import threading
import time

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from ltcp.dataplane.duplex import PIPE_SIZE
from netutil import Backend, Proxy, echo, open_fds, recv_all, static_config, wait_for


def test_bytes_pass_through(proxies, backends):
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}))
    with proxy.connect() as c:
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"hello"
    wait_for(lambda: proxy.listener.finished == 1)
    assert proxy.listener.endings["done"] == 1


def pattern(size, seed):
    block = bytes((i * seed + seed) & 0xFF for i in range(65521))
    return (block * (size // len(block) + 1))[:size]


def test_16mib_each_way_at_once_with_a_slow_reader(proxies, backends):
    """Both directions at full size together; the client reads slowly, so the
    proxy must hold back the upstream instead of buffering it."""
    size = 16 * 1024 * 1024
    up, down = pattern(size, 7), pattern(size, 13)
    received_by_backend = []

    def backend_handler(conn):
        sender = threading.Thread(target=lambda: (conn.sendall(down), conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received_by_backend.append(recv_all(conn))
        sender.join()

    backend = backends(backend_handler)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}))
    peak_pending = []

    def pending_bytes():
        return sum(leg.piped + (len(leg.pending) if leg.pending is not None else 0)
                   for d in proxy.listener.streams for leg in (d.client, d.upstream))

    with proxy.connect(timeout=60) as c:
        writer = threading.Thread(target=lambda: (c.sendall(up), c.shutdown(socket.SHUT_WR)))
        writer.start()
        got = bytearray()
        while True:
            chunk = c.recv(8192)
            if not chunk:
                break
            got += chunk
            if len(got) % (1 << 20) < 8192:
                peak_pending.append(proxy.call(pending_bytes))
                time.sleep(0.002)  # a slow reader
        writer.join()
    assert bytes(got) == down
    wait_for(lambda: received_by_backend)
    assert received_by_backend[0] == up
    # Never more than one buffer's (or one pipe's) worth held per direction.
    assert max(peak_pending) <= 2 * PIPE_SIZE


class ScriptedBackend:
    """Runs one script per connection: send chunks, then close in a given order."""

    def __init__(self):
        self.scripts = queue.Queue()
        self.results = queue.Queue()
        self.backend = Backend(self.handle)

    def handle(self, conn):
        chunks, close_first = self.scripts.get(timeout=10)
        if close_first:
            for chunk in chunks:
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            self.results.put(recv_all(conn))
        else:
            data = recv_all(conn)
            for chunk in chunks:
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            self.results.put(data)


@pytest.fixture(scope="module")
def scripted():
    backend = ScriptedBackend()
    proxy = Proxy(static_config({"/svc/a": [backend.backend.addr]}))
    yield proxy, backend
    proxy.stop()
    backend.backend.close()


chunks = st.lists(st.binary(min_size=1, max_size=70000), max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(up=chunks, down=chunks, server_closes_first=st.booleans(), client_waits=st.booleans())
@pytest.mark.timeout(120)
def test_any_chunking_and_close_order_delivers_exact_bytes(scripted, up, down, server_closes_first, client_waits):
    proxy, backend = scripted
    backend.scripts.put((down, server_closes_first))
    with proxy.connect() as c:
        if client_waits and server_closes_first:
            # Read everything the server says before sending: the server's
            # half-close must reach us while our direction is still open.
            got = recv_all(c)
            for chunk in up:
                c.sendall(chunk)
            c.shutdown(socket.SHUT_WR)
        else:
            sender = threading.Thread(target=lambda: ([c.sendall(x) for x in up], c.shutdown(socket.SHUT_WR)))
            sender.start()
            got = recv_all(c)
            sender.join()
    assert got == b"".join(down)
    assert backend.results.get(timeout=10) == b"".join(up)


def test_half_close_each_way(proxies, backends):
    """The client stops sending and keeps reading; then the reverse."""
    def late_talker(conn):
        data = recv_all(conn)  # until the client's FIN
        conn.sendall(b"after your FIN: " + data)
        conn.shutdown(socket.SHUT_WR)

    first = backends(late_talker)
    proxy = proxies(static_config({"/svc/a": [first.addr]}))
    with proxy.connect() as c:
        c.sendall(b"question")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"after your FIN: question"

    received = queue.Queue()

    def reader_after_fin(conn):
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        received.put(recv_all(conn))

    second = backends(reader_after_fin)
    proxy2 = proxies(static_config({"/svc/a": [second.addr]}))
    with proxy2.connect() as c:
        assert c.recv(3) == b"bye"
        assert c.recv(10) == b""  # the server's FIN came through
        c.sendall(b"still talking")
        c.shutdown(socket.SHUT_WR)
        assert received.get(timeout=10) == b"still talking"
    wait_for(lambda: proxy2.listener.finished == 1)
    assert proxy2.listener.endings["done"] == 1


def test_reset_by_backend_resets_the_client(proxies, backends):
    def resetter(conn):
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()

    backend = backends(resetter)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}))
    with proxy.connect() as c:
        c.sendall(b"x")
        with pytest.raises(ConnectionResetError):
            while c.recv(100):
                pass
    wait_for(lambda: proxy.listener.endings["error"] == 1)


def test_fds_return_to_baseline_after_1000_mixed_streams(proxies, backends):
    def echo_or_hold(conn):
        data = recv_all(conn)
        if data.startswith(b"hold"):
            time.sleep(1.0)  # half-closed pair that never finishes: only the idle timeout ends it
        else:
            conn.sendall(data)

    backend = backends(echo_or_hold)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, idleTimeoutMs=200))
    baseline = open_fds()
    for i in range(1000):
        c = proxy.connect()
        kind = i % 4
        if kind == 0:  # clean FIN both ways
            c.sendall(b"x" * 10)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"x" * 10
        elif kind == 1:  # RST from the client
            c.sendall(b"x" * 10)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        elif kind == 2:  # close without reading the answer
            c.sendall(b"x" * 10)
        else:  # half-close, then the backend goes quiet
            c.sendall(b"hold")
            c.shutdown(socket.SHUT_WR)
        c.close()
    wait_for(lambda: proxy.listener.active == 0, timeout=30, message="all streams to end")
    assert proxy.listener.accepted == 1000 == proxy.listener.finished
    assert proxy.listener.endings["idle"] >= 250
    wait_for(lambda: backend.open == 0, timeout=30, message="backend connections to close")
    wait_for(lambda: open_fds() <= baseline, timeout=10, message="fd count back to baseline")


@pytest.mark.parametrize("server", [{}, {"proxyProtocol": "accept"}])
def test_finished_streams_leave_no_cyclic_garbage(proxies, backends, server):
    """Streams are freed by reference counting as they end; the cyclic GC (and its
    pauses) has nothing to find, however many streams come and go."""
    import gc

    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, idleTimeoutMs=60000, **server))
    preface = b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n" if server else b""

    def streams(n):
        for _ in range(n):
            with proxy.connect() as c:
                c.sendall(preface + b"x")
                c.shutdown(socket.SHUT_WR)
                assert recv_all(c) == b"x"
        wait_for(lambda: proxy.listener.active == 0)

    streams(20)
    gc.collect()
    gc.disable()
    try:
        streams(100)
        assert proxy.call(gc.collect) < 20
    finally:
        gc.enable()
