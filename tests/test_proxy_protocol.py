"""PROXY protocol in both directions: pure parsers and a live proxy."""

import ipaddress
import queue
import socket
import struct
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given

from ltcp.names import canonical_ip
from ltcp.protocol.proxyproto import INVALID, NEED_MORE, PARSED, build_v1, build_v2, parse_header
from netutil import closed_without_data, recv_all, recv_exactly, wait_for

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.sampled_from([build_v1, build_v2]))
def test_built_headers_parse_back(ips, sport, dport, build):
    header = build((ips[0], sport), (ips[1], dport))
    parsed = parse_header(header + b"payload")
    assert parsed.status == PARSED and parsed.length == len(header)
    assert parsed.source == (canonical_ip(ips[0]), sport) and parsed.destination == (canonical_ip(ips[1]), dport)
    for cut in range(len(header)):  # every proper prefix asks for more
        assert parse_header(header[:cut]).status == NEED_MORE


def test_v1_examples():
    assert parse_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\nrest")[:4] == (
        PARSED, 38, ("1.2.3.4", 1111), ("5.6.7.8", 2222))
    assert parse_header(b"PROXY UNKNOWN\r\n")[:3] == (PARSED, 15, None)
    assert parse_header(b"PROXY TCP6 ::1 ::2 1 2\r\n").source == ("::1", 1)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1111\r\n",
    b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY " + b"x" * 120,
    b"PROXY TCP4 1.2.3.4\n",
    SIG + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    SIG + b"\x21\x11\x00\x04" + bytes(4),  # too short for IPv4 addresses
    SIG + b"\x21\x11\xff\xff",  # absurd length
    b"PROXY TCP6 fe80::1%x\nPROXY\x1b[31m ::1 1111 2222\r\n",  # a zone id carrying control characters
    b"PROXY TCP6 fe80::1%eth0 ::1 1111 2222\r\n",  # zone ids are nothing to pass on
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\t\r\n",
])
def test_invalid_headers(data):
    assert parse_header(data).status == INVALID


def test_v2_local_and_unspec_keep_the_real_peer():
    assert parse_header(SIG + b"\x20\x00\x00\x00")[:3] == (PARSED, 16, None)
    assert parse_header(SIG + b"\x21\x00\x00\x03abc")[:3] == (PARSED, 19, None)


@given(st.binary(max_size=300))
def test_parser_never_raises(data):
    header = parse_header(data)
    assert header.status in (NEED_MORE, INVALID, PARSED)
    if header.status == PARSED:
        assert 0 < header.length <= len(data)


# -- live ---------------------------------------------------------------------------

def read_v2(conn):
    """Parse a v2 header by hand (independently of ltcp's parser)."""
    head = recv_exactly(conn, 16)
    assert head[:12] == SIG and head[12] == 0x21
    family, length = head[13], struct.unpack("!H", head[14:16])[0]
    body = recv_exactly(conn, length)
    width = 4 if family == 0x11 else 16
    src = str(ipaddress.ip_address(body[:width]))
    sport = struct.unpack("!H", body[2 * width:2 * width + 2])[0]
    return src, sport


def read_v1(conn):
    line = b""
    while not line.endswith(b"\r\n"):
        line += recv_exactly(conn, 1)
    return line


def config(backend_addr, accept=True, send=None):
    server = {"port": 0, "dstName": "/svc/a", "connectTimeoutMs": 2000}
    if accept:
        server["proxyProtocol"] = "accept"
    router = {"label": "pp", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend_addr]}},
              "servers": [server]}
    if send:
        router["client"] = {"proxyProtocol": send}
    return {"routers": [router]}


@pytest.fixture
def headers_seen(backends):
    seen = queue.Queue()

    def start(reader):
        def handler(conn):
            seen.put(reader(conn))
            conn.sendall(recv_all(conn))
        return backends(handler)

    return seen, start


def test_v1_in_v2_out(proxies, headers_seen):
    seen, start = headers_seen
    backend = start(read_v2)
    proxy = proxies(config(backend.addr, send="v2"))
    with proxy.connect() as c:
        c.sendall(b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 7474\r\npayload")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"payload"  # the incoming header was consumed, not forwarded
    assert seen.get(timeout=5) == ("203.0.113.7", 40000)


def test_v2_in_v1_out_split_across_writes(proxies, headers_seen):
    seen, start = headers_seen
    backend = start(read_v1)
    proxy = proxies(config(backend.addr, send="v1"))
    header = build_v2(("2001:db8::7", 5555), ("2001:db8::1", 443))
    with proxy.connect() as c:
        c.sendall(header[:10])
        time.sleep(0.03)  # the header arrives in two segments on purpose
        c.sendall(header[10:] + b"data")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"data"
    assert seen.get(timeout=5) == b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n"


def test_without_accept_the_real_client_is_sent(proxies, headers_seen):
    seen, start = headers_seen
    backend = start(read_v1)
    proxy = proxies(config(backend.addr, accept=False, send="v1"))
    with proxy.connect() as c:
        port = c.getsockname()[1]
        c.sendall(b"x")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"x"
    assert seen.get(timeout=5) == f"PROXY TCP4 127.0.0.1 127.0.0.1 {port} {proxy.port()}\r\n".encode()


@pytest.mark.parametrize("data", [b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 x y\r\n", SIG + b"\x31"])
def test_bad_or_missing_headers_close_the_stream(proxies, backends, data):
    backend = backends(lambda conn: conn.recv(1))
    proxy = proxies(config(backend.addr))
    with proxy.connect() as c:
        c.sendall(data + bytes(20))
        assert closed_without_data(c)
    wait_for(lambda: proxy.listener.failures["proxy_protocol"] == 1)
    assert backend.accepted == 0


def test_server_speaks_first_behind_a_proxy_header_without_waiting(proxies, backends):
    """A MariaDB-style greeting once waited half the connect timeout for a ClientHello peek."""
    backend = backends(lambda conn: (conn.sendall(b"greeting\n"), conn.recv(1)))
    server = {"port": 0, "dstName": "/svc/a", "proxyProtocol": "accept", "connectTimeoutMs": 10000}
    proxy = proxies({"routers": [{"label": "pp", "interpreter": {"kind": "io.l5d.static",
                                                                 "names": {"/svc/a": [backend.addr]}},
                                  "servers": [server]}]})
    with proxy.connect() as c:
        started = time.monotonic()
        c.sendall(build_v2(("203.0.113.7", 40000), ("198.51.100.1", 3306)))
        assert recv_exactly(c, 9) == b"greeting\n"
        assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("header", [b"PROXY TCP4 203.0.113.7 198.51.10", SIG + b"\x21\x11\x00\x0c\x01"])
def test_a_truncated_header_then_fin_is_released_at_once(proxies, backends, header):
    backend = backends(lambda conn: conn.recv(1))
    proxy = proxies(config(backend.addr))  # connectTimeoutMs 2000
    with proxy.connect() as c:
        started = time.monotonic()
        c.sendall(header)
        time.sleep(0.05)  # the header is looked at, found incomplete, and left to wait
        c.shutdown(socket.SHUT_WR)
        assert closed_without_data(c)
        assert time.monotonic() - started < 0.5
    wait_for(lambda: proxy.listener.failures["proxy_protocol"] == 1)
    assert proxy.call(lambda: proxy.listener.active) == 0 and backend.accepted == 0
