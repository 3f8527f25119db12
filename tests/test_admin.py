"""The admin server: metrics that match the traffic, live state, errors, drain."""

import concurrent.futures
import json
import os
import re
import select
import signal
import socket
import threading
import time

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from ltcp.admin import server as ltcp_admin
from ltcp.admin import metrics as ltcp_metrics
from ltcp.admin import snapshot as ltcp_snapshot

from netutil import LtcpProcess, echo, named, recv_all, recv_exactly, refused_port, wait_for

http = urllib3.PoolManager(retries=False, timeout=10)


def scrape(url):
    response = http.request("GET", url + "/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.data.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def three_servers(backend_addr, dead_port):
    return {
        "admin": {"port": 0},
        "routers": [{
            "label": "web",
            "interpreter": {"kind": "io.l5d.static", "names": {
                "/svc/echo": [backend_addr], "/svc/dead": [f"127.0.0.1:{dead_port}"]}},
            "servers": [{"port": 0, "dstName": "/svc/echo"},
                        {"port": 0, "dstName": "/svc/none", "connectTimeoutMs": 5000},
                        {"port": 0, "dstName": "/svc/dead", "connectTimeoutMs": 300}],
        }]}


def test_metrics_match_the_traffic(proxies, backends):
    backend = backends(echo)
    holder, dead_port = refused_port()
    proxy = proxies(three_servers(backend.addr, dead_port), admin=True)
    echo_server = proxy.app.listeners[0].display_address
    payload = os.urandom(12345)
    for _ in range(20):
        with proxy.connect(0) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == payload
    live = proxy.connect(0)  # traffic still flowing while we scrape
    live.sendall(b"x" * 1000)
    assert len(recv_exactly(live, 1000)) == 1000
    for _ in range(3):
        with proxy.connect(1) as c:
            assert recv_all(c) == b""
    with proxy.connect(2) as c:
        assert recv_all(c) == b""
    wait_for(lambda: proxy.app.listeners[2].finished == 1 and proxy.app.listeners[0].finished == 20)

    samples = scrape(proxy.admin_url)
    web = {"router": "web", "server": echo_server}
    assert value(samples, "ltcp_accepted_total", **web) == 21
    assert value(samples, "ltcp_closed_total", **web) == 20
    assert value(samples, "ltcp_active_streams", **web) == 1
    assert value(samples, "ltcp_received_bytes_total", **web) == 20 * 12345 + 1000
    assert value(samples, "ltcp_sent_bytes_total", **web) == 20 * 12345 + 1000
    assert value(samples, "ltcp_connect_latency_seconds_count", **web) == 21
    assert value(samples, "ltcp_stream_duration_seconds_count", **web) == 20
    none = {"router": "web", "server": proxy.app.listeners[1].display_address}
    assert value(samples, "ltcp_stream_failures_total", cause="no_endpoints", **none) == 3
    assert value(samples, "ltcp_connect_failures_total", router="web", dst="/svc/none", cause="no_endpoints") == 3
    dead = {"router": "web", "server": proxy.app.listeners[2].display_address}
    assert value(samples, "ltcp_stream_failures_total", cause="timeout", **dead) == 1
    assert value(samples, "ltcp_connect_failures_total", router="web", dst="/svc/dead", cause="refused") >= 1
    assert value(samples, "ltcp_endpoints", router="web", dst="/svc/echo", state="available") == 1
    assert value(samples, "ltcp_destination_streams_total", router="web", dst="/svc/echo") == 21
    assert value(samples, "ltcp_destination_streams_total", router="web", dst="/svc/dead") == 0
    assert value(samples, "ltcp_route_cache_creations_total", router="web") == 3
    assert value(samples, "ltcp_route_cache_hits_total", router="web") == 21 + 3 + 1 - 3
    assert value(samples, "ltcp_reactor_lag_seconds_count") >= 1
    assert value(samples, "process_resident_memory_bytes") > 0  # the names every client library exports
    assert value(samples, "process_open_fds") > 0
    assert not [name for name, _ in samples if name.startswith("ltcp_process")]
    assert value(samples, "ltcp_draining") == 0
    live.close()
    holder.close()


def test_routers_json_follows_discovery_and_ejection(proxies, backends, tmp_path):
    a = backends(named("a"))
    holder, dead_port = refused_port()
    # (the dead endpoint is drawn first but once in a million, so the first stream ejects it)
    (tmp_path / "web").write_text(f"127.0.0.1 {a.port}\n127.0.0.1 {dead_port} 1000000\n")
    proxy = proxies({
        "admin": {"port": 0},
        "routers": [{
            "label": "fs",
            "interpreter": {"kind": "io.l5d.fs", "rootDir": str(tmp_path), "periodSecs": 0.05},
            "servers": [{"port": 0, "dstName": "/svc/web", "connectTimeoutMs": 3000}],
            "client": {"failFast": {"maxConsecutiveFailures": 1, "failurePenaltySecs": 60}},
        }]}, admin=True)
    with proxy.connect() as c:
        assert c.recv(2) == b"a\n"

    def state():
        response = http.request("GET", proxy.admin_url + "/routers.json")
        assert response.status == 200 and response.headers["Content-Type"] == "application/json"
        return json.loads(response.data)

    router = state()["routers"][0]
    assert router["label"] == "fs" and router["interpreter"] == "io.l5d.fs"
    endpoints = {e["address"]: e for e in router["destinations"][0]["endpoints"]}
    assert endpoints[f"127.0.0.1:{dead_port}"]["state"] == "failed"
    assert endpoints[f"127.0.0.1:{dead_port}"]["weight"] == 1_000_000
    assert endpoints[f"127.0.0.1:{a.port}"]["state"] == "available"
    held = proxy.connect()
    assert held.recv(2) == b"a\n"
    (tmp_path / "web").write_text("127.0.0.1 1\n")

    def retired():
        eps = {e["address"]: e for e in state()["routers"][0]["destinations"][0]["endpoints"]}
        return eps.get(f"127.0.0.1:{a.port}", {}).get("state") == "retired" and "127.0.0.1:1" in eps

    wait_for(retired, timeout=5, message="the change in /routers.json")
    held.close()
    holder.close()


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/nope", None, 404),
    ("POST", "/metrics", None, 405),
    ("GET", "/shutdown", None, 405),
    ("DELETE", "/routers.json", None, 405),
    ("HEAD", "/shutdown", None, 405),
    ("POST", "/shutdown", b"x" * (65 * 1024), 413),
])
def test_bad_requests(proxies, backends, method, path, body, status):
    proxy = proxies({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]}, admin=True)
    response = http.request(method, proxy.admin_url + path, body=body)
    assert response.status == status
    if status == 405:
        assert response.headers["Allow"] == ("POST" if path == "/shutdown" else "GET, HEAD")
    assert not proxy.app.draining


@pytest.mark.parametrize("path", ["/", "/metrics", "/routers.json", "/api/v1/state", "/nope"])
def test_head_answers_as_get_would_without_the_body(proxies, path):
    proxy = proxies({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]}, admin=True)
    get = http.request("GET", proxy.admin_url + path)
    head = http.request("HEAD", proxy.admin_url + path)
    assert (head.status, head.headers["Content-Type"], head.data) == (get.status, get.headers["Content-Type"], b"")
    if path in ("/", "/nope"):  # (the others change from one rendering to the next)
        assert head.headers["Content-Length"] == str(len(get.data))
    else:
        assert int(head.headers["Content-Length"]) > 0


def test_shutdown_drains_in_process(proxies, backends):
    backend = backends(echo)
    proxy = proxies({"admin": {"port": 0, "graceSecs": 5}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]}, admin=True)
    c = proxy.connect()
    c.sendall(b"before")
    assert c.recv(6) == b"before"
    start = time.monotonic()
    response = http.request("POST", proxy.admin_url + "/shutdown")
    assert response.status == 200 and time.monotonic() - start < 1
    wait_for(lambda: proxy.app.draining)
    with pytest.raises(ConnectionRefusedError):
        proxy.connect()
    c.sendall(b"during")
    assert c.recv(6) == b"during"
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c) == b""
    c.close()
    proxy.thread.join(5)  # the drain ends the reactor once the last stream is done
    assert not proxy.thread.is_alive()


# -- the real process: signals and /abort -------------------------------------------

def drain_config(backend_addr, grace):
    return {"admin": {"port": 0, "graceSecs": grace}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend_addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]}


def test_sigterm_drains_finishes_short_streams_and_cuts_long_ones(backends):
    backend = backends(echo)
    ltcp = LtcpProcess(drain_config(backend.addr, grace=1.5))
    short, long_ = ltcp.connect(), ltcp.connect()
    try:
        for c in (short, long_):
            c.sendall(b"hi")
            assert c.recv(2) == b"hi"
        ltcp.proc.send_signal(signal.SIGTERM)
        drained_at = time.monotonic()

        def refused():
            try:
                ltcp.connect().close()
                return False
            except ConnectionResetError:  # caught in the backlog as the listener closed
                return False
            except ConnectionRefusedError:
                return True

        wait_for(refused, timeout=5, message="listener closed")
        short.sendall(b"finishing")  # a stream that ends within graceSecs completes intact
        assert recv_exactly(short, 9) == b"finishing"
        short.shutdown(socket.SHUT_WR)
        assert recv_all(short) == b""
        long_.settimeout(10)
        try:
            assert recv_all(long_) == b""
        except ConnectionResetError:
            pass
        assert 1.4 <= time.monotonic() - drained_at < 4
        assert ltcp.proc.wait(10) == 0
        ltcp.reader.join(5)
        log = ltcp.log
        # (a probe above may have been accepted just before the drain, and ended at once)
        assert re.search(r"drain started: [23] streams open", log)
        assert "grace period over: closing 1 streams" in log
        assert "Traceback" not in log
    finally:
        short.close()
        long_.close()
        ltcp.kill()


def test_abort_exits_1_at_once(backends):
    backend = backends(echo)
    ltcp = LtcpProcess(drain_config(backend.addr, grace=30))
    held = ltcp.connect()
    try:
        response = http.request("POST", ltcp.admin + "/abort")
        assert response.status == 200
        assert ltcp.proc.wait(5) == 1
    finally:
        held.close()
        ltcp.kill()


def test_second_sigint_exits_at_once(backends):
    backend = backends(echo)
    ltcp = LtcpProcess(drain_config(backend.addr, grace=30))
    held = ltcp.connect()
    try:
        held.sendall(b"hi")
        assert held.recv(2) == b"hi"
        ltcp.proc.send_signal(signal.SIGINT)
        wait_for(lambda: "drain started" in ltcp.log, message="drain to start")
        ltcp.proc.send_signal(signal.SIGINT)
        assert ltcp.proc.wait(5) == 130
    finally:
        held.close()
        ltcp.kill()


# -- the admin server against browsers, slow clients and frequent scrapes ----------

def raw_request(address, data, timeout=5):
    """Send bytes to the admin port; the status code it answers (None if it closes without one)."""
    with socket.create_connection(address, timeout=timeout) as c:
        c.sendall(data)
        answer = recv_all(c)
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


def test_cross_site_requests_cannot_stop_ltcp(backends):
    backend = backends(echo)
    ltcp = LtcpProcess(drain_config(backend.addr, grace=1))
    try:
        address = ("127.0.0.1", int(ltcp.admin.rsplit(":", 1)[1]))
        host = f"Host: {address[0]}:{address[1]}\r\n".encode()
        form = b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\na=b"
        text = b"Content-Type: text/plain\r\nContent-Length: 3\r\n\r\nx=y"
        attacks = [
            b"POST /shutdown HTTP/1.1\r\n" + host + b"Origin: http://evil.example\r\n" + form,
            b"POST /abort HTTP/1.1\r\n" + host + b"Origin: http://evil.example\r\n" + text,
            b"POST /abort HTTP/1.1\r\n" + host + b"Sec-Fetch-Site: cross-site\r\n" + text,
            b"GET /routers.json HTTP/1.1\r\nHost: rebind.attacker.example\r\n\r\n",
            b"POST /shutdown HTTP/1.1\r\nHost: rebind.attacker.example:9989\r\n" + form,
        ]
        # A page rendered a moment ago is answered without a handler thread, under the same protections.
        assert raw_request(address, b"GET /routers.json HTTP/1.1\r\n" + host + b"Connection: close\r\n\r\n") == 200
        assert [raw_request(address, attack) for attack in attacks] == [403] * len(attacks)
        with ltcp.connect() as c:  # still serving, not draining
            c.sendall(b"alive")
            assert recv_exactly(c, 5) == b"alive"
        assert ltcp.proc.poll() is None and "drain started" not in ltcp.log
        same_origin = b"POST /shutdown HTTP/1.1\r\n" + host + f"Origin: {ltcp.admin}\r\n".encode() + form
        assert raw_request(address, same_origin) == 200  # the admin server's own page may
        assert ltcp.proc.wait(10) == 0
    finally:
        ltcp.kill()


def test_a_plain_post_like_curl_still_shuts_down(backends):
    backend = backends(echo)
    ltcp = LtcpProcess(drain_config(backend.addr, grace=1))
    try:
        assert http.request("POST", ltcp.admin + "/shutdown").status == 200
        assert ltcp.proc.wait(10) == 0
    finally:
        ltcp.kill()


def admin_threads():
    return [t for t in threading.enumerate() if t.name.startswith("ltcp-admin")]


def test_slowloris_costs_sockets_not_threads_and_nothing_half_sent_is_run(proxies, backends):
    backend = backends(echo)
    proxy = proxies(drain_config(backend.addr, grace=5), admin=True)
    served = []
    handle = proxy.admin._http.handle
    proxy.admin._http.handle = lambda request: served.append(request.path) or handle(request)
    threads_before = len(admin_threads())
    drippers = []
    for i in range(600):  # more than the server keeps: the longest waiting make room
        c = socket.create_connection(proxy.admin.address, timeout=5)
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: " if i % 2 else
                  b"POST /shutdown HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nhalf!")
        drippers.append(c)
    started = time.monotonic()
    scrape(proxy.admin_url)  # a real scrape is served at once, during the attack
    assert time.monotonic() - started < 1
    with proxy.connect() as c:  # and the data plane does not notice
        started = time.monotonic()
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping" and time.monotonic() - started < 0.5
    assert len(admin_threads()) == threads_before
    for c in drippers:
        c.close()
    assert http.request("GET", proxy.admin_url + "/routers.json").status == 200  # after every close was seen
    assert served == ["/metrics", "/routers.json"]
    assert not proxy.app.draining


def test_a_request_has_one_deadline_however_slowly_it_drips(proxies, backends, monkeypatch):
    monkeypatch.setattr("ltcp.admin.httpd.DEADLINE", 0.5)
    backend = backends(echo)
    proxy = proxies(drain_config(backend.addr, grace=5), admin=True)
    c = socket.create_connection(proxy.admin.address, timeout=5)
    started = time.monotonic()
    closed = False
    for byte in b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: yes\r\n\r\n":
        try:
            c.send(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.05)  # each read arrives well within any per-read timeout
    if not closed:
        closed = recv_all(c) == b""
    c.close()
    assert closed and time.monotonic() - started < 1.5


def test_scrapes_share_snapshots_and_never_walk_the_streams(proxies, backends, monkeypatch):
    backend = backends(echo)
    proxy = proxies(drain_config(backend.addr, grace=5), admin=True)
    held = [proxy.connect() for _ in range(50)]
    for c in held:
        c.sendall(b"x")
        assert c.recv(1) == b"x"

    class Unwalkable(set):
        def __iter__(self):
            raise AssertionError("a snapshot walked every live stream")

    proxy.call(lambda: setattr(proxy.listener, "streams", Unwalkable(proxy.listener.streams)))
    snapshots = []
    taken = ltcp_admin.snapshot
    monkeypatch.setattr(ltcp_admin, "snapshot", lambda app, listed: snapshots.append(1) or taken(app, listed))
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: scrape(proxy.admin_url), range(20)))
    assert len(snapshots) <= 2, f"{len(snapshots)} snapshots for 20 concurrent scrapes"
    web = {"router": "r", "server": proxy.listener.display_address}
    assert all(value(r, "ltcp_received_bytes_total", **web) == 50 for r in results)
    proxy.call(lambda: setattr(proxy.listener, "streams", set(proxy.listener.streams)))  # set() does not iterate
    for c in held:
        c.close()


def test_dropping_the_longest_waiting_never_kills_the_server(proxies, backends, monkeypatch):
    """Closing the oldest connection while it had an event in the same batch once ended the reading thread."""
    monkeypatch.setattr("ltcp.admin.httpd.MAX_CONNECTIONS", 2)
    proxy = proxies(drain_config(backends(echo).addr, grace=5), admin=True)
    held = []
    for _ in range(50):
        oldest = socket.create_connection(proxy.admin.address, timeout=5)
        held.append(oldest)
        held.append(socket.create_connection(proxy.admin.address, timeout=5))
        oldest.send(b"G")  # an event for the connection the next accept drops
        held.append(socket.create_connection(proxy.admin.address, timeout=5))
    for c in held:
        c.close()
    assert http.request("GET", proxy.admin_url + "/routers.json").status == 200


def test_clients_that_never_read_their_answers_hold_no_handler(proxies, backends):
    proxy = proxies(drain_config(backends(echo).addr, grace=5), admin=True)
    greedy = []
    for _ in range(8):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(proxy.admin.address)
        c.setblocking(False)
        try:
            for _ in range(400):  # pipelined scrapes whose answers are never read
                c.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        except BlockingIOError:
            pass
        greedy.append(c)
    wait_for(lambda: all(select.select([c], [], [], 0)[0] for c in greedy), message="answers on their way")
    for _ in range(5):  # while the greedy clients' buffers are full
        started = time.monotonic()
        scrape(proxy.admin_url)
        assert time.monotonic() - started < 1
    for c in greedy:
        c.close()


def test_a_flood_of_empty_lines_is_refused_at_once(proxies, backends):
    proxy = proxies(drain_config(backends(echo).addr, grace=5), admin=True)
    with socket.create_connection(proxy.admin.address, timeout=5) as c:
        try:
            c.sendall(b"\r\n" * 100_000)
            answer = recv_all(c)
        except (ConnectionResetError, BrokenPipeError):  # refused while still sending
            answer = None
    assert answer is None or answer.startswith(b"HTTP/1.1 400 ")
    assert http.request("GET", proxy.admin_url + "/routers.json").status == 200


def test_running_out_of_descriptors_does_not_spin_the_admin_server(backends):
    ltcp = LtcpProcess(drain_config(backends(echo).addr, grace=1), nofile=96)
    address = ("127.0.0.1", int(ltcp.admin.rsplit(":", 1)[1]))
    clients = []
    try:
        for _ in range(150):  # more than ltcp has descriptors for
            clients.append(socket.create_connection(address, timeout=5))
        assert ltcp.cpu_over(1.0) < 0.3
        assert "out of descriptors" in ltcp.log
    finally:
        for c in clients:
            c.close()
        ltcp.stop()


def test_routers_json_lists_a_bounded_number_of_endpoints_and_counts_them_all(proxies, backends, monkeypatch):
    """69,578 endpoints once made a 20 MB page that held the reactor for over a second."""
    monkeypatch.setattr("ltcp.admin.server.MAX_LISTED_ENDPOINTS", 3)
    backend = backends(echo)
    addresses = [backend.addr] + [f"127.0.0.1:{port}" for port in range(2000, 2009)]
    proxy = proxies({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": addresses}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]}, admin=True)
    proxy.call(proxy.app.routers[0].binder.bind, "/svc/a")
    destination = json.loads(http.request("GET", proxy.admin_url + "/routers.json").data)["routers"][0][
        "destinations"][0]
    assert len(destination["endpoints"]) == 3
    assert destination["endpoint_states"] == {"available": 10, "failed": 0, "unhealthy": 0, "retired": 0}
    samples = scrape(proxy.admin_url)
    assert value(samples, "ltcp_endpoints", router="r", dst="/svc/a", state="available") == 10


def test_merged_snapshots_add_up_exactly(proxies, backends):
    """What the process-model supervisor will do with its workers' snapshots: sum the counts."""
    backend = backends(echo)
    proxy = proxies(drain_config(backend.addr, grace=5), admin=True)
    for _ in range(3):
        with proxy.connect() as c:
            c.sendall(b"x" * 100)
            assert recv_exactly(c, 100) == b"x" * 100
    wait_for(lambda: proxy.listener.finished == 3)
    one = proxy.call(ltcp_snapshot.snapshot, proxy.app)  # as if two workers had seen the same
    single = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in ltcp_metrics.render(one) for s in family.samples}
    merged = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in ltcp_metrics.render(ltcp_snapshot.merge([one, one])) for s in family.samples}
    assert merged.keys() == single.keys()
    for key, count in single.items():
        if key[0] in ("ltcp_discovery_last_update_timestamp_seconds", "ltcp_endpoints"):
            assert merged[key] == count, key  # the latest time; the same endpoints, not twice as many
        elif key[0] != "ltcp_draining":
            assert merged[key] == 2 * count, key
    web = (("router", "r"), ("server", proxy.listener.display_address))
    assert merged[("ltcp_accepted_total", web)] == 6 and merged[("ltcp_received_bytes_total", web)] == 600
