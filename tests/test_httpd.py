"""The admin HTTP layer: request parsing, the browser protections, and closing with answers in flight."""

import email.message
import socket
import threading

import hypothesis.strategies as st
import pytest
from hypothesis import given

from ltcp.admin.server import exposure_warning, refusal
from ltcp.admin.httpd import MAX_BODY_BYTES, MAX_HEADERS, HttpError, HttpServer, parse_request, plain
from netutil import recv_all, recv_exactly

GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9989\r\nAccept: */*\r\n\r\n"
POST = b"POST /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello"


def test_a_complete_request_and_what_it_took():
    request, used = parse_request(GET + b"GET /next")
    assert (request.method, request.path, request.version, used) == ("GET", "/metrics", "HTTP/1.1", len(GET))
    assert request.headers.get("host") == "127.0.0.1:9989" and request.keep_alive


@pytest.mark.parametrize("data", [POST, GET])
def test_no_prefix_is_ever_a_request(data):
    """A request whose body (or headers) has not all arrived is never acted on."""
    for end in range(len(data)):
        assert parse_request(data[:end]) == (None, 0), data[:end]
    request, used = parse_request(data)
    assert used == len(data) and request.body == (b"hello" if data is POST else b"")


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /x HTTP/2.0\r\n\r\n", 505),
    (b"GET http://evil/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), 413),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 413),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nX: " + b"a" * 70_000, 431),
    (b"GET /x HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * MAX_HEADERS + b"\r\n", 431),  # once 400
    (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),  # RFC 9112 3.2; once accepted
    (b"GET /x HTTP/1.0\r\nHost: a\r\nhost: a\r\n\r\n", 400),
    (b"GET /x HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),  # HTTP/1.1 without Host; once accepted
    (b"GET /x HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),  # a bare CR
    (b"GET /x HTTP/1.1\rHost: a\n\n", 400),
    (b"GET /x HTTP/1.1\r\nHost: a\r\n X: y\r\n\r\n", 400),  # obsolete line folding; once part of Host
    (b"\n" * 9 + b"GET /x HTTP/1.0\n\n", 400),  # too many empty lines first, LF ones too
])
def test_requests_that_can_never_be_served(data, status):
    with pytest.raises(HttpError) as info:
        parse_request(data)
    assert info.value.status == status


@pytest.mark.parametrize("data, host", [
    (b"GET /metrics HTTP/1.1\nHost: a\n\n", "a"),  # bare LF line ends (RFC 9112 2.2); once no answer for 10 s
    (b"GET /metrics HTTP/1.1\r\nHost: a\n\r\n", "a"),  # mixed
    (b"\n\r\nGET /metrics HTTP/1.1\nHost: a\r\n\n", "a"),  # empty lines first
    (b"GET /metrics HTTP/1.0\r\n\r\n", None),  # HTTP/1.0 needs no Host
    (b"GET /metrics HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * (MAX_HEADERS - 1) + b"\r\n", "a"),
])
def test_requests_served(data, host):
    request, used = parse_request(data + b"NEXT")
    assert (request.path, request.headers.get("Host"), used) == ("/metrics", host, len(data))


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_nothing_yet_or_an_http_error(data):
    try:
        request, used = parse_request(data)
    except HttpError as exc:
        assert exc.status in (400, 411, 413, 431, 505)
        return
    assert (request is None) == (used == 0) and used <= len(data)


def headers(**values):
    message = email.message.Message()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


@pytest.mark.parametrize("method, given, refused", [
    ("GET", {"Host": "127.0.0.1:9989"}, False),
    ("GET", {"Host": "localhost:9989"}, False),
    ("GET", {"Host": "[::1]:9989"}, False),
    ("GET", {}, False),  # HTTP/1.0 tools
    ("GET", {"Host": "rebind.attacker.example"}, True),  # DNS rebinding
    ("GET", {"Host": "rebind.attacker.example:9989"}, True),
    ("GET", {"Host": "10.0.0.7:9989"}, True),  # not the address it listens on
    ("POST", {"Host": "127.0.0.1:9989"}, False),  # curl -X POST
    ("POST", {"Host": "127.0.0.1:9989", "Origin": "http://127.0.0.1:9989"}, False),  # its own page
    ("POST", {"Host": "127.0.0.1:9989", "Origin": "http://evil.example"}, True),
    ("POST", {"Host": "127.0.0.1:9989", "Origin": "null"}, True),
    ("POST", {"Host": "127.0.0.1:9989", "Origin": "http://[x"}, True),  # unparsable: once a 500
    ("POST", {"Host": "127.0.0.1:9989", "Origin": "http://localhost:8000"}, True),
    ("POST", {"Host": "127.0.0.1:9989", "Sec-Fetch-Site": "cross-site"}, True),
    ("POST", {"Host": "127.0.0.1:9989", "Sec-Fetch-Site": "same-site"}, True),
    ("POST", {"Host": "127.0.0.1:9989", "Sec-Fetch-Site": "same-origin"}, False),
    ("POST", {"Host": "127.0.0.1:9989", "Sec-Fetch-Site": "none"}, False),  # typed into the address bar
])
def test_browser_protections(method, given, refused):
    assert (refusal(method, headers(**given), "127.0.0.1") is not None) == refused


def test_any_ip_literal_names_a_server_on_all_addresses():
    assert refusal("GET", headers(Host="10.0.0.7:9989"), "0.0.0.0") is None
    assert refusal("GET", headers(Host="admin.example:9989"), "0.0.0.0") is not None


@pytest.mark.parametrize("ip, warned", [("127.0.0.1", False), ("::1", False), ("0.0.0.0", True),
                                        ("::", True), ("10.1.2.3", True)])
def test_a_non_loopback_admin_address_is_warned_about(ip, warned):
    assert (exposure_warning(ip) is not None) == warned


def test_an_answer_ready_when_the_server_closes_is_still_written():
    """POST /shutdown's "draining" was lost when the supervisor finished before the socket thread wrote it."""
    handled = threading.Event()

    def handle(request):
        handled.set()
        return plain(200, "draining")

    server = HttpServer(("127.0.0.1", 0), handle)
    server._take_answers = lambda: None  # the socket thread never gets to it: only close() can write it
    server.start()
    with socket.create_connection(server.address, timeout=5) as client:
        client.sendall(POST)
        assert handled.wait(5)
        server.close()
        assert recv_all(client).startswith(b"HTTP/1.1 200 ")


@pytest.fixture
def hello_server():
    """An HttpServer answering every request with "hello" (what a GET route does)."""
    server = HttpServer(("127.0.0.1", 0), lambda request: plain(200, "hello"))
    server.start()
    yield server
    server.close()


def test_head_is_a_get_without_its_body(hello_server):
    with socket.create_connection(hello_server.address, timeout=5) as client:
        client.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = recv_until(client, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 6\r\n" in head
        # Nothing follows the head but the next answer, whole: the HEAD's had no body.
        get = recv_until(client, b"\r\n\r\n")
        assert get.startswith(b"HTTP/1.1 200 ") and recv_exactly(client, 6) == b"hello\n"


def test_bare_line_feeds_are_answered_at_once(hello_server):
    with socket.create_connection(hello_server.address, timeout=2) as client:
        client.sendall(b"GET / HTTP/1.1\nHost: a\n\n")
        assert recv_until(client, b"\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def recv_until(sock, end):
    """Bytes up to and including ``end``, read one at a time (so nothing after it is taken)."""
    data = b""
    while not data.endswith(end):
        byte = sock.recv(1)
        assert byte, data
        data += byte
    return data


def test_an_answer_ready_at_once_needs_no_handler_thread():
    """A cached page is written by the socket thread itself: served while every handler is busy, HEAD and
    keep-alive rules included; what ``at_once`` does not answer still reaches a handler."""
    release = threading.Event()

    def handle(request):
        release.wait(10)
        return plain(200, "handled")

    server = HttpServer(("127.0.0.1", 0), handle, handlers=1,
                        at_once=lambda request: plain(200, "cached") if request.path == "/cached" else None)
    server.start()
    try:
        with socket.create_connection(server.address, timeout=5) as slow, \
                socket.create_connection(server.address, timeout=5) as fast:
            slow.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")  # takes the one handler until released
            fast.sendall(b"HEAD /cached HTTP/1.1\r\nHost: a\r\n\r\n")
            head = recv_until(fast, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 7\r\n" in head
            fast.sendall(b"GET /cached HTTP/1.1\r\nHost: a\r\n\r\n")  # (the connection stayed open)
            assert recv_until(fast, b"\r\n\r\n").startswith(b"HTTP/1.1 200 ") and recv_exactly(fast, 7) == b"cached\n"
            release.set()
            assert recv_until(slow, b"\r\n\r\n").startswith(b"HTTP/1.1 200 ") and recv_exactly(slow, 8) == b"handled\n"
    finally:
        release.set()
        server.close()


def test_many_pipelined_requests_for_a_ready_answer_are_all_answered():
    """Answered at once, each one's write parsed the next, recursively: 2,000 in one send ran out of stack
    after a few hundred, and the connection was dropped."""
    server = HttpServer(("127.0.0.1", 0), lambda request: plain(200, "handled"),
                        at_once=lambda request: plain(200, "cached"))
    server.start()
    try:
        with socket.create_connection(server.address, timeout=10) as client:
            client.sendall(b"GET /m HTTP/1.1\r\nHost: a\r\n\r\n" * 1999 + b"GET /m HTTP/1.1\r\nHost: a\r\n"
                           b"Connection: close\r\n\r\n")
            assert recv_all(client).count(b"HTTP/1.1 200 ") == 2000
    finally:
        server.close()
