"""Failures explain themselves: one DEBUG line per failed stream, prefixed by router and
destination and carrying the errno or TLS reason; reprs that show descriptor and state."""

import logging
import re
import socket
import struct

from netutil import SilentDiscovery, echo, recv_exactly, refused_port, static_config, wait_for


def test_a_stream_nothing_would_take_says_why(proxies, caplog):
    holder, port = refused_port()
    proxy = proxies(static_config({"/svc/a": [f"127.0.0.1:{port}"]}, connectTimeoutMs=3000))
    with caplog.at_level(logging.DEBUG, logger="ltcp"):
        with proxy.connect() as c:
            c.settimeout(10)
            assert c.recv(1) == b""
        wait_for(lambda: proxy.listener.failures["unreachable"] == 1)
    lines = [r.getMessage() for r in caplog.records if "stream from" in r.getMessage()]
    assert len(lines) == 1
    assert re.match(rf"test /svc/a: stream from \('127\.0\.0\.1', \d+\) failed: unreachable "
                    rf"\(127\.0\.0\.1:{port}: refused \(ECONNREFUSED\)\)$", lines[0]), lines[0]
    holder.close()


def test_a_reset_mid_stream_names_its_errno(proxies, backends, caplog):
    def reset_after_hello(conn):
        conn.recv(5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    backend = backends(reset_after_hello)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}))
    with caplog.at_level(logging.DEBUG, logger="ltcp"):
        with proxy.connect() as c:
            c.sendall(b"hello")
            c.settimeout(10)
            try:
                c.recv(1)
            except ConnectionResetError:
                pass
        wait_for(lambda: proxy.listener.endings["error"] == 1)
        # (counted, then logged, on the reactor thread: wait for the line too)
        wait_for(lambda: any(re.match(r"test /svc/a: stream from .* to 127\.0\.0\.1:\d+ ended: error \(ECONNRESET\)$",
                                      r.getMessage()) for r in list(caplog.records)),
                 message="the ending logged with its errno")


def test_reprs_show_descriptor_and_state(proxies, backends):
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}))
    with proxy.connect() as c:
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        duplex = proxy.call(lambda: repr(next(iter(proxy.listener.streams))))
    assert re.match(r"<Duplex test /svc/a \('127\.0\.0\.1', \d+\) -> 127\.0\.0\.1:\d+ open "
                    r"client=<Leg fd=\d+ reading=open writing=open pending=0 piped=0 events=1> "
                    r"upstream=<Leg fd=\d+ reading=open writing=open pending=0 piped=0 events=1>>$", duplex), duplex
    balancer = proxy.call(lambda: repr(proxy.app.routers[0].binder.balancers["/svc/a"]))
    assert balancer.startswith("<Balancer test /svc/a endpoints={'available': 1, 'failed': 0, 'unhealthy': 0, 'retired': 0}")
    binder = proxy.app.routers[0].binder
    proxy.call(lambda: (setattr(binder, "interpreter", SilentDiscovery()), binder.balancers.pop("/svc/a").close()))
    waiting = proxy.connect(timeout=10)  # a fresh balancer, waiting for discovery that never answers
    wait_for(lambda: proxy.call(lambda: len(proxy.listener.dials)) == 1)
    dial = proxy.call(lambda: repr(next(iter(proxy.listener.dials))))
    assert re.match(r"<Dial fd=\d+ test /svc/a waiting tries=0>$", dial), dial
    waiting.close()
