"""TLS termination and origination, SNI routing (terminated and passthrough)."""

import gc
import os
import socket
import ssl
import threading

import pytest
import trustme

from ltcp.protocol.tls import routing_name
from netutil import LtcpProcess, client_hello, closed_without_data, echo, named, recv_exactly, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and certificates for a few names, written to files."""
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    files = {"ca": str(root / "ca.pem")}
    for name in ["default.example.com", "api.example.com", "web.example.com", "backend.example.com"]:
        cert = ca.issue_cert(name)
        key, crt = root / f"{name}.key", root / f"{name}.crt"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(crt))
        files[name] = {"privateKey": str(key), "certs": [str(crt)]}
    return files


def client_context(pki, alpn=None):
    context = ssl.create_default_context(cafile=pki["ca"])
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def tls_connect(port, pki, server_name, alpn=None):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    context = client_context(pki, alpn)
    if server_name is None:
        context.check_hostname = False
    return context.wrap_socket(raw, server_hostname=server_name)


def peer_names(sock):
    return [value for kind, value in sock.getpeercert().get("subjectAltName", ()) if kind == "DNS"]


def server_tls(pki, alpn=("h2", "http/1.1")):
    return {"defaultIdentity": pki["default.example.com"],
            "identities": {"api.example.com": pki["api.example.com"], "web.example.com": pki["web.example.com"]},
            "alpnProtocols": list(alpn)}


def sni_config(names, tls=None, **server):
    document = {"routers": [{
        "label": "sni",
        "interpreter": {"kind": "io.l5d.static", "names": names},
        "servers": [{"port": 0, "dstName": "/svc/{sni}", "connectTimeoutMs": 2000, **server}],
    }]}
    if tls:
        document["routers"][0]["servers"][0]["tls"] = tls
    return document


def test_terminated_tls_routes_by_sni_with_identities_and_alpn(proxies, backends, pki):
    a, b, c = backends(named("a")), backends(named("b")), backends(named("c"))
    proxy = proxies(sni_config({"/svc/api.example.com": [a.addr], "/svc/web.example.com": [b.addr],
                                "/svc/fallback": [c.addr]}, tls=server_tls(pki), defaultDstName="/svc/fallback"))
    with tls_connect(proxy.port(), pki, "api.example.com", alpn=["h2"]) as s:
        assert peer_names(s) == ["api.example.com"]
        assert s.selected_alpn_protocol() == "h2"
        assert s.recv(2) == b"a\n"
        s.sendall(b"over tls")
        assert s.recv(8) == b"over tls"
    with tls_connect(proxy.port(), pki, "WEB.example.com", alpn=["http/1.1"]) as s:
        assert peer_names(s) == ["web.example.com"]
        assert s.selected_alpn_protocol() == "http/1.1"
        assert s.recv(2) == b"b\n"
    with tls_connect(proxy.port(), pki, None) as s:  # no SNI: default identity, fallback route
        assert peer_names(s) == ["default.example.com"]
        assert s.recv(2) == b"c\n"
    assert proxy.listener.fallbacks["no_sni"] == 1


def test_terminated_tls_moves_megabytes_both_ways_exactly(proxies, backends, pki):
    backend = backends(echo)
    proxy = proxies(sni_config({"/svc/api.example.com": [backend.addr]}, tls=server_tls(pki)))
    payload = os.urandom(3 * 1024 * 1024)
    with tls_connect(proxy.port(), pki, "api.example.com") as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        got = bytearray()
        while len(got) < len(payload):
            got += s.recv(1 << 16)
        sender.join()
    assert bytes(got) == payload


def test_failed_handshakes_are_counted_and_harmless(proxies, backends, pki):
    a = backends(named("a"))
    proxy = proxies(sni_config({"/svc/api.example.com": [a.addr]}, tls=server_tls(pki)))
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plaintext to a TLS port
        assert closed_without_data(c)
    untrusting = ssl.create_default_context()  # does not know our CA
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(raw, server_hostname="api.example.com")
    wait_for(lambda: proxy.listener.failures["tls"] == 2)
    with tls_connect(proxy.port(), pki, "api.example.com") as s:  # still serving
        assert s.recv(2) == b"a\n"


def tls_backend(backends, pki, name, handler):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki[name]["certs"][0], pki[name]["privateKey"])

    def serve(conn):
        with context.wrap_socket(conn, server_side=True) as tls_conn:
            handler(tls_conn)

    return backends(serve)


def test_passthrough_routes_by_peeked_sni_and_backends_terminate(proxies, backends, pki):
    api = tls_backend(backends, pki, "api.example.com", named("api"))
    web = tls_backend(backends, pki, "web.example.com", named("web"))
    proxy = proxies(sni_config({"/svc/api.example.com": [api.addr], "/svc/web.example.com": [web.addr]}))
    for name in ["api", "web"]:
        with tls_connect(proxy.port(), pki, f"{name}.example.com") as s:
            assert peer_names(s) == [f"{name}.example.com"]  # verified end to end, not by ltcp
            assert s.recv(4) == name.encode() + b"\n"
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"


def test_passthrough_without_a_usable_name(proxies, backends, pki):
    seen = []

    def first_bytes(conn):
        seen.append(conn.recv(5))

    fallback = backends(first_bytes)
    web = tls_backend(backends, pki, "web.example.com", named("web"))
    names = {"/svc/web.example.com": [web.addr], "/svc/fallback": [fallback.addr]}
    with_default = proxies(sni_config(names, defaultDstName="/svc/fallback", connectTimeoutMs=600))
    without = proxies(sni_config(names))
    for proxy in (with_default, without):
        with pytest.raises((ssl.SSLError, OSError)):
            with tls_connect(proxy.port(), pki, None):  # no SNI at all
                pass
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as c:
            c.sendall(b"hello plaintext\n")
            assert closed_without_data(c)
        with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10):
            # Says nothing (a server-speaks-first protocol): after half the connect
            # timeout it goes to the fallback, or is refused without one.
            wait_for(lambda proxy=proxy: proxy.listener.fallbacks["slow"] + proxy.listener.failures["slow"] == 1)
    wait_for(lambda: len(seen) == 3)
    assert seen[0][:1] == b"\x16" and seen[1] == b"hello" and seen[2] == b""
    assert with_default.listener.fallbacks == {"no_sni": 1, "not_tls": 1, "slow": 1}
    wait_for(lambda: without.listener.finished == 3)
    assert without.listener.failures == {"no_sni": 1, "not_tls": 1, "slow": 1}


def test_client_tls_verifies_the_backend(proxies, backends, pki):
    backend = tls_backend(backends, pki, "backend.example.com", echo)
    document = {"routers": [{
        "label": "origin",
        "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a", "connectTimeoutMs": 1000}],
        "client": {"tls": {"dnsName": "backend.example.com", "trustCerts": [pki["ca"]]}},
    }]}
    proxy = proxies(document)
    with proxy.connect() as c:
        c.sendall(b"plain in, TLS out")
        assert recv_exactly(c, 17) == b"plain in, TLS out"
    document["routers"][0]["client"]["tls"]["dnsName"] = "wrong.example.com"
    wrong = proxies(document)
    with wrong.connect() as c:
        assert closed_without_data(c)
    balancer = wrong.balancer("/svc/a")
    assert wrong.call(lambda: balancer.connect_failures["tls"]) >= 1
    assert wrong.listener.failures["timeout"] == 1




def handshake_in_pieces(sock, context, server_name, first_piece):
    """Drive a TLS client over ``sock`` by hand, sending its ClientHello in two TCP
    writes a moment apart, and return the SSLObject once the handshake is done."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    sock.sendall(hello[:first_piece])
    threading.Event().wait(0.05)  # the gap between segments is the point of this test
    sock.sendall(hello[first_piece:])
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    sock.sendall(outgoing.read())
    return tls, incoming, outgoing


@pytest.mark.parametrize("first_piece", [3, 40, 200])
def test_passthrough_hello_split_across_segments(proxies, backends, pki, first_piece):
    web = tls_backend(backends, pki, "web.example.com", named("web"))
    proxy = proxies(sni_config({"/svc/web.example.com": [web.addr]}))
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as sock:
        tls, incoming, outgoing = handshake_in_pieces(sock, client_context(pki), "web.example.com", first_piece)
        while True:
            try:
                assert tls.read(4) == b"web\n"
                break
            except ssl.SSLWantReadError:
                incoming.write(sock.recv(65536))


def test_stalled_handshakes_leave_nothing_behind(proxies, pki):
    """Each round of half-finished handshakes once left its SNI record behind."""
    proxy = proxies(sni_config({}, tls=server_tls(pki), connectTimeoutMs=300))
    clients = []
    for i in range(200):  # a hello, then silence: the server's answer is never read
        c = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
        c.sendall(client_hello(f"n{i}.example.com"))
        clients.append(c)
    wait_for(lambda: proxy.listener.failures["timeout"] == 200, timeout=10, message="every handshake timed out")
    gc.collect()  # only to make the count below exact; nothing here needs the collector
    assert proxy.call(lambda: len(proxy.listener.tls.names)) == 0
    for c in clients:
        c.close()


@pytest.mark.parametrize("sent, cause", [
    (b"127.0.0.1", "no_sni"),  # an IP literal is not a name (RFC 6066); wrk sends one
    (b"bad name!", "malformed"),  # not a DNS name
])
def test_passthrough_server_names_that_are_no_destination(proxies, pki, sent, cause):
    proxy = proxies(sni_config({"/svc/127.0.0.1": ["127.0.0.1:9"]}))
    hello = client_hello("a.example").replace(b"a.example", sent)  # same length, so still well formed
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as c:
        c.sendall(hello)
        assert closed_without_data(c)
    wait_for(lambda: proxy.listener.failures[cause] == 1)
    assert proxy.call(lambda: list(proxy.app.routers[0].binder.balancers)) == []


@pytest.mark.parametrize("server_name, expected", [
    (None, (None, "no_sni")),
    ("", (None, "no_sni")),
    ("127.0.0.1", (None, "no_sni")),
    ("::1", (None, "no_sni")),
    ("[::1]", (None, "no_sni")),
    ("bad name!", (None, "malformed")),
    ("a..b", (None, "malformed")),
    ("API.Example.com.", ("api.example.com", None)),
])
def test_routing_name(server_name, expected):
    assert routing_name(server_name) == expected


def test_hellos_in_tiny_records_cost_no_cpu(backends):
    """200 connections sending hellos cut into 1-byte records once held the reactor at 100% CPU."""
    ltcp = LtcpProcess({"admin": {"port": 0}, "routers": [{
        "label": "sni", "interpreter": {"kind": "io.l5d.static", "names": {}},
        "servers": [{"port": 0, "dstName": "/svc/{sni}", "connectTimeoutMs": 10000}]}]})
    slow = b"\x16\x03\x01\x00\x04\x01\x00\x3e\x80" + b"\x16\x03\x01\x00\x01\x00" * 2700  # claims 16,000 bytes
    clients = []
    try:
        for _ in range(100):
            c = ltcp.connect()
            c.sendall(slow)
            clients.append(c)
        assert ltcp.cpu_over(1.0) < 0.3
        wait_for(lambda: all(closed_without_data(c, 5) for c in clients), timeout=10, message="all refused")
    finally:
        for c in clients:
            c.close()
        assert ltcp.stop() == 0
