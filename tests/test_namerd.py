"""namerd discovery: answers, streams, polling, failures, thread bounds, shutdown."""

import json
import socket
import threading
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given

from ltcp.config import Address
from ltcp.interpreter.namerd import NamerdError, NamerdInterpreter, ObjectStream, _Name, parse_answer
from ltcp.interpreter.schedule import PollSchedule
from ltcp.testing.namerd import NamerdServer, bound
from netutil import LtcpProcess, client_hello, echo, named, recv_all, recv_exactly, refused_port, wait_for


# -- pure parsing ------------------------------------------------------------------

def test_bound_answer_with_weights():
    state, addresses, problems = parse_answer(bound(["127.0.0.1:80", ("::1", 81, 2.5)]))
    assert state == "bound" and problems == []
    assert addresses == [Address("127.0.0.1", 80, 1.0), Address("::1", 81, 2.5)]


def test_bad_addresses_are_skipped_with_a_reason():
    answer = {"type": "bound", "addrs": [
        {"ip": "db.example", "port": 1}, {"ip": "127.0.0.1", "port": 0}, "nope",
        {"ip": "127.0.0.1", "port": 5, "meta": {"endpoint_addr_weight": -1}},
        {"ip": "127.0.0.1", "port": 6}]}
    state, addresses, problems = parse_answer(answer)
    assert addresses == [Address("127.0.0.1", 6, 1.0)]
    assert problems[0] == "addrs[0]: 'db.example' is not an IP address literal"
    assert len(problems) == 4


@pytest.mark.parametrize("answer, outcome", [
    ({"type": "failed", "reason": "x"}, "failed"),
    ({"type": "bond"}, "malformed"),
    ([], "malformed"),
    ({"type": "bound"}, "malformed"),
])
def test_unusable_answers_raise(answer, outcome):
    with pytest.raises(NamerdError) as info:
        parse_answer(answer)
    assert info.value.outcome == outcome


def test_neg_and_pending():
    assert parse_answer({"type": "neg"})[:2] == ("neg", None)
    assert parse_answer({"type": "pending"})[:2] == ("pending", None)


answers = st.lists(st.builds(lambda ports: bound([f"127.0.0.1:{p}" for p in ports]),
                             st.lists(st.integers(1, 65535), max_size=4)), min_size=1, max_size=5)


@given(answers, st.lists(st.integers(1, 50), max_size=20))
def test_object_stream_reassembles_any_split(objects, cuts):
    data = b"".join(json.dumps(o).encode() + b"\n" for o in objects)
    stream, got, at = ObjectStream(), [], 0
    for cut in cuts:
        got += stream.feed(data[at:at + cut])
        at += cut
    got += stream.feed(data[at:])
    assert got == objects and stream.finish() == []


@given(st.binary(max_size=200))
def test_object_stream_garbage_is_an_error_never_a_crash(data):
    stream = ObjectStream(limit=100)
    try:
        stream.feed(data)
        stream.finish()
    except NamerdError:
        pass


# -- through a live proxy --------------------------------------------------------

@pytest.fixture
def namerd():
    server = NamerdServer().start()
    yield server
    server.close()


def namerd_config(url, watch=True, period=0.5, **server):
    return {"routers": [{
        "label": "mesh",
        "interpreter": {"kind": "io.l5d.namerd.http", "baseUrl": url, "namespace": "default",
                        "periodSecs": period, "watch": watch},
        "servers": [{"port": 0, "dstName": "/svc/web", "connectTimeoutMs": 3000, **server}],
    }]}


def lands(proxy):
    with proxy.connect() as c:
        return c.recv(16).strip().decode()


def test_watch_moves_new_connections_within_200ms(proxies, backends, namerd):
    a, b = backends(named("a")), backends(named("b"))
    namerd.set("/svc/web", [a.addr])
    proxy = proxies(namerd_config(namerd.url))
    assert lands(proxy) == "a"
    wait_for(lambda: namerd.watchers("/svc/web") == 1)
    namerd.set("/svc/web", [b.addr])
    changed = time.monotonic()
    wait_for(lambda: lands(proxy) == "b", timeout=5)
    assert time.monotonic() - changed < 0.2
    assert namerd.requests("/svc/web") == 1  # one watch, no polling


def test_polling_honours_period(proxies, backends, namerd):
    a = backends(named("a"))
    namerd.set("/svc/web", [a.addr])
    proxy = proxies(namerd_config(namerd.url, watch=False, period=0.2))
    start = time.monotonic()
    assert lands(proxy) == "a"
    wait_for(lambda: namerd.requests("/svc/web") >= 5, timeout=5)
    # One request at once, then one per period: four periods must have passed.
    assert time.monotonic() - start >= 0.8 - 0.05
    assert namerd.watchers("/svc/web") == 0


def test_namerd_down_at_startup_then_up(proxies, backends):
    a = backends(named("a"))
    with socket.socket() as probe:  # a port where nothing listens yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = proxies(namerd_config(f"http://127.0.0.1:{port}", period=0.3))
    client = proxy.connect()
    stats = proxy.app.routers[0].interpreter.stats
    wait_for(lambda: stats.snapshot()["requests"].get("unreachable", 0) >= 2, message="failed attempts against nothing")
    late = NamerdServer(port)
    try:
        late.set("/svc/web", [a.addr])
        late.start()
        assert client.recv(16) == b"a\n"
        client.close()
    finally:
        late.close()


def test_flapping_settles_on_the_last_state(proxies, backends, namerd):
    a, b, c = backends(named("a")), backends(named("b")), backends(named("c"))
    namerd.set("/svc/web", [a.addr])
    proxy = proxies(namerd_config(namerd.url))
    assert lands(proxy) == "a"
    for _ in range(50):
        namerd.set("/svc/web", [b.addr])
        namerd.set("/svc/web", [a.addr])
    namerd.set("/svc/web", [c.addr])
    wait_for(lambda: lands(proxy) == "c", timeout=5)
    assert all(lands(proxy) == "c" for _ in range(10))


@pytest.mark.parametrize("trouble", ["garbage", "failed", "drop", "http_error"])
def test_trouble_keeps_the_last_good_set(proxies, backends, namerd, trouble):
    a, b = backends(named("a")), backends(named("b"))
    namerd.set("/svc/web", [a.addr])
    proxy = proxies(namerd_config(namerd.url, period=0.2))
    assert lands(proxy) == "a"
    stats = proxy.app.routers[0].interpreter.stats
    if trouble == "http_error":
        namerd.http_error("/svc/web", 500)
        namerd.drop("/svc/web")  # end the current watch so the next request meets the 500
        wait_for(lambda: stats.snapshot()["requests"].get("http_500", 0) >= 1, timeout=5)
    else:
        getattr(namerd, trouble)("/svc/web")
        expected = {"garbage": "malformed", "failed": "failed", "drop": "dropped"}[trouble]
        wait_for(lambda: stats.snapshot()["requests"].get(expected, 0) >= 1, timeout=5)
    assert all(lands(proxy) == "a" for _ in range(5))
    namerd.set("/svc/web", [b.addr])
    wait_for(lambda: lands(proxy) == "b", timeout=5)


def test_split_objects_and_stalls(proxies, backends, namerd):
    a, b, c = backends(named("a")), backends(named("b")), backends(named("c"))
    namerd.split("/svc/web", [a.addr])
    proxy = proxies(namerd_config(namerd.url, period=0.2))
    assert lands(proxy) == "a"
    namerd.split("/svc/web", [b.addr])
    wait_for(lambda: lands(proxy) == "b", timeout=5)
    namerd.stall("/svc/web")
    namerd.drop("/svc/web")  # the reconnect meets the stall
    wait_for(lambda: namerd.requests("/svc/web") >= 2, timeout=5)
    assert all(lands(proxy) == "b" for _ in range(5))  # stalled namerd: last set still serves
    namerd.set("/svc/web", [c.addr])  # ends the stall
    wait_for(lambda: lands(proxy) == "c", timeout=5)


def test_neg_fails_waiting_clients_at_once(proxies, namerd):
    namerd.neg("/svc/web")
    proxy = proxies(namerd_config(namerd.url, connectTimeoutMs=10000))
    start = time.monotonic()
    with proxy.connect() as c:
        assert recv_all(c) == b""
    assert time.monotonic() - start < 1
    assert proxy.listener.failures["no_endpoints"] == 1


def test_pending_keeps_clients_waiting_until_bound(proxies, backends, namerd):
    a = backends(named("a"))
    namerd.pending("/svc/web")
    proxy = proxies(namerd_config(namerd.url, connectTimeoutMs=10000))
    client = proxy.connect()
    wait_for(lambda: namerd.watchers("/svc/web") == 1)
    namerd.set("/svc/web", [a.addr])
    assert client.recv(16) == b"a\n"
    client.close()


def test_a_burst_of_1000_updates_does_not_stall_the_data_plane(proxies, backends, namerd):
    servers = [backends(named(str(i))) for i in range(4)]
    namerd.set("/svc/web", [servers[0].addr])
    proxy = proxies(namerd_config(namerd.url))
    assert lands(proxy) == "0"
    reactor = proxy.app.reactor
    lateness = []
    probing = threading.Event()
    probing.set()

    def probe(expected):
        lateness.append(reactor.time() - expected)
        if probing.is_set():
            reactor.call_later(0.01, probe, reactor.time() + 0.01)

    proxy.call(lambda: reactor.call_later(0.01, probe, reactor.time() + 0.01))
    wait_for(lambda: len(lateness) >= 5)
    before_burst = len(lateness)
    for i in range(1000):
        namerd.set("/svc/web", [s.addr for s in servers[: 1 + i % 4]])
    namerd.set("/svc/web", [servers[3].addr])
    wait_for(lambda: lands(proxy) == "3", timeout=10)
    wait_for(lambda: len(lateness) >= before_burst + 10)
    probing.clear()
    assert max(lateness) < 0.25, f"reactor lag up to {max(lateness):.3f}s"
    balancer = proxy.balancer("/svc/web")
    assert proxy.call(lambda: len(balancer.endpoints)) == 1


def test_300_names_stay_within_the_thread_bound_and_converge(namerd):
    names = [f"/svc/n{i}" for i in range(300)]
    for i, name in enumerate(names):
        namerd.set(name, [f"127.0.0.1:{1000 + i}"])
    interpreter = NamerdInterpreter(namerd.url, "default", 0.2, watch=True)
    latest = {}
    lock = threading.Lock()

    def deliver_for(name):
        def deliver(addresses):
            with lock:
                latest[name] = addresses
        return deliver

    interpreter.start()
    try:
        for name in names:
            interpreter.watch(name, deliver_for(name))
        wait_for(lambda: len(latest) == 300, timeout=20, message="all 300 names resolved")
        for i, name in enumerate(names):
            namerd.set(name, [f"127.0.0.1:{2000 + i}"])
        wait_for(lambda: all(latest[n] == [Address("127.0.0.1", 2000 + i)] for i, n in enumerate(names)),
                 timeout=20, message="all 300 names converged")
        namerd_threads = [t for t in threading.enumerate() if t.name.startswith("ltcp-namerd")]
        assert len(namerd_threads) == interpreter.max_streams + interpreter.poll_workers == 24
        assert sum(namerd.watchers(n) for n in names) == 16
    finally:
        interpreter.close()


def test_close_stops_every_worker_within_a_second(namerd):
    namerd.set("/svc/streamed", ["127.0.0.1:1"])
    namerd.stall("/svc/stalled")
    interpreter = NamerdInterpreter(namerd.url, "default", 5, watch=True, max_streams=2)
    interpreter.start()
    seen = threading.Event()
    interpreter.watch("/svc/streamed", lambda addresses: seen.set())
    interpreter.watch("/svc/stalled", lambda addresses: None)  # stuck waiting for headers
    interpreter.watch("/svc/polled", lambda addresses: None)
    assert seen.wait(5)
    wait_for(lambda: namerd.requests("/svc/stalled") == 1)
    start = time.monotonic()
    interpreter.close()
    assert time.monotonic() - start < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("ltcp-namerd")]


# -- discovery at SNI scale: slots, first answers, slow names, eviction --------------

class Latest:
    """What an interpreter delivered per name, and when each name first got an answer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latest, self.first = {}, {}

    def deliver_for(self, name):
        def deliver(addresses):
            with self.lock:
                self.latest[name] = addresses
                self.first.setdefault(name, time.monotonic())
        return deliver

    def has(self, name):
        with self.lock:
            return name in self.latest


@pytest.fixture
def interpreters():
    started = []

    def start(url, period=0.5, watch=True, **options):
        interpreter = NamerdInterpreter(url, "default", period, watch=watch, **options)
        interpreter.start()
        started.append(interpreter)
        return interpreter

    yield start
    for interpreter in started:
        interpreter.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ltcp-namerd")]


def test_unwatching_a_streamed_name_frees_its_slot_and_connection_at_once(namerd, interpreters):
    for name in ("/svc/a", "/svc/b", "/svc/c"):
        namerd.set(name, ["127.0.0.1:1"])
    interpreter = interpreters(namerd.url, period=5, max_streams=2, poll_workers=1)
    got = Latest()
    interpreter.watch("/svc/a", got.deliver_for("/svc/a"))
    interpreter.watch("/svc/b", got.deliver_for("/svc/b"))
    wait_for(lambda: namerd.watchers("/svc/a") == namerd.watchers("/svc/b") == 1, timeout=5)
    interpreter.unwatch("/svc/a")
    wait_for(lambda: namerd.watchers("/svc/a") == 0, timeout=1, message="the evicted watch closed")
    interpreter.watch("/svc/c", got.deliver_for("/svc/c"))
    wait_for(lambda: namerd.watchers("/svc/c") == 1, timeout=1, message="the freed slot streams the next name")
    assert got.has("/svc/c") and namerd.requests("/svc/c") == 1


def test_a_name_after_sni_churn_resolves_at_once(proxies, backends, namerd):
    """1,000 ClientHellos with distinct names once left every streaming slot on an evicted name."""
    good = backends(named("good"))
    namerd.set("/svc/good.example", [good.addr])
    proxy = proxies(namerd_config(namerd.url, period=2, dstName="/svc/{sni}", connectTimeoutMs=3000))
    proxy.call(lambda: setattr(proxy.app.routers[0].binder, "capacity", 50))  # evict after 50 names

    def hello(name):
        with proxy.connect() as c:
            c.sendall(client_hello(name))
            try:
                return c.recv(16)
            except ConnectionResetError:  # refused with the hello unread
                return b""

    assert hello("good.example").startswith(b"good")
    for i in range(300):
        hello(f"churn{i}.example")  # namerd says neg: each fails at once
    for _ in range(3):
        started = time.monotonic()
        assert hello("good.example").startswith(b"good")
        assert time.monotonic() - started < 0.5
    interpreter = proxy.app.routers[0].interpreter
    watched = proxy.call(lambda: interpreter.watched)
    wait_for(lambda: sum(namerd.watchers(f"/svc/churn{i}.example") for i in range(300))
             + namerd.watchers("/svc/good.example") <= min(watched, 16), timeout=2,
             message="no watch left open for an evicted name")


def test_a_polled_name_gets_its_first_answer_at_once(namerd, interpreters):
    names = [f"/svc/n{i}" for i in range(400)]
    for i, name in enumerate(names):
        namerd.set(name, [f"127.0.0.1:{1000 + i}"])
    interpreter = interpreters(namerd.url, period=1, watch=False)
    got = Latest()
    for name in names:
        interpreter.watch(name, got.deliver_for(name))
    wait_for(lambda: all(got.has(n) for n in names), timeout=10, message="400 names resolved")
    slowest = 0.0
    for i in range(20):  # fresh names while the rotation of 400 goes on
        name = f"/svc/fresh{i}"
        namerd.set(name, ["127.0.0.1:9"])
        started = time.monotonic()
        interpreter.watch(name, got.deliver_for(name))
        wait_for(lambda name=name: got.has(name), timeout=5)
        slowest = max(slowest, got.first[name] - started)
        time.sleep(0.05)  # spread them over the rotation
    assert slowest < 0.3, f"a fresh name waited {slowest:.3f}s for its first answer"


def test_names_namerd_never_answers_delay_only_themselves(namerd, interpreters):
    for i in range(3):
        namerd.stall(f"/svc/hang{i}")
    namerd.set("/svc/good", ["127.0.0.1:1"])
    interpreter = interpreters(namerd.url, period=1, watch=False)
    got = Latest()
    for i in range(3):
        interpreter.watch(f"/svc/hang{i}", got.deliver_for(f"/svc/hang{i}"))
    wait_for(lambda: all(namerd.requests(f"/svc/hang{i}") == 1 for i in range(3)), timeout=5)
    started = time.monotonic()
    interpreter.watch("/svc/good", got.deliver_for("/svc/good"))
    wait_for(lambda: got.has("/svc/good"), timeout=5)
    assert got.first["/svc/good"] - started < 0.5
    threads = [t for t in threading.enumerate() if t.name.startswith("ltcp-namerd")]
    assert len(threads) == interpreter.poll_workers  # concurrent, and bounded


def test_a_hanging_poll_times_out_and_is_retried(namerd, interpreters, monkeypatch):
    monkeypatch.setattr("ltcp.interpreter.namerd.POLL_TIMEOUT", 0.3)
    namerd.stall("/svc/slow")
    interpreter = interpreters(namerd.url, period=0.2, watch=False, poll_workers=1)
    got = Latest()
    interpreter.watch("/svc/slow", got.deliver_for("/svc/slow"))
    wait_for(lambda: interpreter.stats.snapshot()["requests"].get("timeout", 0) >= 1, timeout=5)
    namerd.set("/svc/slow", ["127.0.0.1:7"])  # ends the stall
    wait_for(lambda: got.has("/svc/slow"), timeout=5)
    assert got.latest["/svc/slow"] == [Address("127.0.0.1", 7)]


def test_unwatched_names_leave_the_rotation_even_with_a_first_answer_pending(namerd, interpreters):
    namerd.stall("/svc/pending")
    namerd.set("/svc/rotating", ["127.0.0.1:1"])
    interpreter = interpreters(namerd.url, period=0.1, watch=False, poll_workers=2)
    got = Latest()
    interpreter.watch("/svc/pending", got.deliver_for("/svc/pending"))
    interpreter.watch("/svc/rotating", got.deliver_for("/svc/rotating"))
    wait_for(lambda: namerd.requests("/svc/pending") == 1 and namerd.requests("/svc/rotating") >= 3, timeout=5)
    interpreter.unwatch("/svc/pending")  # its first answer is still on its way
    interpreter.unwatch("/svc/rotating")
    namerd.set("/svc/pending", ["127.0.0.1:2"])  # the pending request now answers
    wait_for(lambda: len(interpreter._schedule) == 0, timeout=2, message="the rotation emptied")
    rotating = namerd.requests("/svc/rotating")
    time.sleep(0.5)  # five periods in which no request may be made
    assert namerd.requests("/svc/rotating") == rotating
    assert namerd.requests("/svc/pending") == 1
    assert not got.has("/svc/pending")
    assert interpreter.watched == 0


def test_a_60000_endpoint_answer_does_not_stall_other_routers(backends, namerd):
    """Such an answer once stalled an unrelated router's streams for 325 ms."""
    holder, refused = refused_port()
    huge = [("127.0.0.1", port) for port in range(1024, 61_024)]  # never connected to
    namerd.set("/svc/web", [("127.0.0.1", refused)])
    document = namerd_config(namerd.url)
    document["admin"] = {"port": 0}
    document["routers"].append({"label": "other", "interpreter": {
        "kind": "io.l5d.static", "names": {"/svc/echo": [backends(echo).addr]}},
        "servers": [{"port": 0, "dstName": "/svc/echo"}]})
    ltcp = LtcpProcess(document)
    try:
        with ltcp.connect(0) as c:  # makes the balancer for /svc/web; its one endpoint refuses
            c.settimeout(5)
            assert recv_all(c) == b""
        probe = ltcp.connect(1)
        round_trips = []

        def ping():
            started = time.monotonic()
            probe.sendall(b"ping")
            assert recv_exactly(probe, 4) == b"ping"
            round_trips.append(time.monotonic() - started)

        for _ in range(50):
            ping()
        namerd.set("/svc/web", huge)
        while "/svc/web: 60000 endpoints" not in ltcp.log:
            ping()
        worst = max(round_trips[50:])
        print(f"worst round trip on another router while a 60,000-endpoint answer landed: {worst * 1000:.0f} ms "
              f"(before it: {max(round_trips[:50]) * 1000:.1f} ms)")
        assert worst < 0.25, f"a round trip took {worst:.3f}s"  # 67-90 ms alone on 2 cores; 143-215 ms before
        probe.close()
    finally:
        assert ltcp.stop() == 0
        holder.close()


def test_a_server_that_does_not_speak_http_costs_no_thread(interpreters):
    """A non-HTTP answer (baseUrl aimed at the wrong port) once killed each streaming thread for good."""
    garbage = socket.create_server(("127.0.0.1", 0))

    def answer_garbage():
        while True:
            try:
                conn, _ = garbage.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + b"x" * 100 + b"\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    interpreter = interpreters(f"http://127.0.0.1:{garbage.getsockname()[1]}", period=0.2,
                               max_streams=1, poll_workers=1)
    interpreter.watch("/svc/streamed", lambda addresses: None)
    interpreter.watch("/svc/polled", lambda addresses: None)
    wait_for(lambda: interpreter.stats.snapshot()["requests"].get("malformed", 0) >= 6, timeout=5,
             message="repeated, counted failures from both kinds of worker")
    assert sum(t.is_alive() for t in interpreter._threads) == 2
    garbage.close()


def test_a_trickled_poll_answer_is_cut_at_its_deadline(interpreters, monkeypatch):
    monkeypatch.setattr("ltcp.interpreter.namerd.POLL_TIMEOUT", 0.5)
    trickler = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        conn, _ = trickler.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            while not stop.wait(0.1):  # a byte well within any per-read timeout
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    interpreter = interpreters(f"http://127.0.0.1:{trickler.getsockname()[1]}", period=5, watch=False,
                               poll_workers=1)
    started = time.monotonic()
    interpreter.watch("/svc/slow", lambda addresses: None)
    wait_for(lambda: interpreter.stats.snapshot()["requests"].get("timeout", 0) == 1, timeout=5)
    assert time.monotonic() - started < 1.0
    stop.set()
    trickler.close()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def entry(name):
    return _Name(name, lambda addresses: None, streamed=False)


def test_first_answers_go_ahead_of_the_rotation_without_starving_it():
    clock = FakeClock()
    schedule = PollSchedule(clock)
    due_soon, overdue = entry("/svc/soon"), entry("/svc/overdue")
    schedule.add(due_soon, 0.0)
    schedule.add(overdue, -5.0)  # waited far longer than a first answer's head start
    schedule.add_first(entry("/svc/new"))
    assert [schedule.take().name for _ in range(3)] == ["/svc/overdue", "/svc/new", "/svc/soon"]


def test_forgotten_names_are_dropped_and_compacted_away():
    schedule = PollSchedule(FakeClock())
    entries = [entry(f"/svc/{i}") for i in range(10)]
    for e in entries:
        schedule.add(e, 1.0)
    for e in entries[:6]:
        e.stop()
        schedule.forget(e)
    assert len(schedule) == 4 and len(schedule._heap) <= 5  # compacted once stale entries were half
    assert entries[0].deliver is not entries[9].deliver  # a stopped name holds no balancer any more
