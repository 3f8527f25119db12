"""Balancing through a live proxy: spread, weights, ejection, discovery changes."""

import collections
import threading

import urllib3

from ltcp.balancer import UPDATE_SLICE, Balancer
from ltcp.balancer.dial import MAX_ATTEMPTS
from ltcp.config import Address, ClientSettings
from ltcp.balancer.endpoint import AVAILABLE, FAILED
from ltcp.dataplane.budget import StreamBudget
from netutil import client_hello, echo, named, recv_all, recv_exactly, refused_port, static_config, wait_for


def landing(proxy, count, hold):
    """Open ``count`` streams, keeping them open in ``hold``; where did each land?"""
    where = collections.Counter()
    for _ in range(count):
        c = proxy.connect()
        where[c.recv(16).strip().decode()] += 1
        hold.append(c)
    return where


def test_p2c_spreads_held_streams_evenly(proxies, backends):
    servers = [backends(named(n)) for n in "abc"]
    proxy = proxies(static_config({"/svc/a": [s.addr for s in servers]}))
    held = []
    try:
        where = landing(proxy, 300, held)
    finally:
        for c in held:
            c.close()
    # Least-loaded of two keeps open streams within a few of each other.
    assert set(where) == {"a", "b", "c"}
    assert max(where.values()) - min(where.values()) <= 6, where


def test_weights_are_respected(proxies, backends):
    light, heavy = backends(named("light")), backends(named("heavy"))
    proxy = proxies(static_config({"/svc/a": [light.addr, {"addr": heavy.addr, "weight": 3}]}))
    held = []
    try:
        where = landing(proxy, 200, held)
    finally:
        for c in held:
            c.close()
    # Loads settle near 1:3, the ratio of the weights.
    assert 40 <= where["light"] <= 60 and 140 <= where["heavy"] <= 160, where


def test_a_serial_client_is_spread_by_weight(proxies, backends):
    """Issue 27: back-to-back connections split 187:213 over weights 1:3, since each pick still saw the
    previous stream (its client gone, its backend not yet) as load.  A stream with a finished side no
    longer steers picks, so a lone client follows the weights: 100 of 400 expected, sd 8.7."""
    light, heavy = backends(named("light")), backends(named("heavy"))
    proxy = proxies(static_config({"/svc/a": [light.addr, {"addr": heavy.addr, "weight": 3}]}))
    where = collections.Counter()
    for _ in range(400):
        with proxy.connect() as c:
            where[c.recv(16).strip().decode()] += 1
    assert 60 <= where["light"] <= 140, where


def test_round_robin_splits_exactly(proxies, backends):
    light, heavy = backends(named("light")), backends(named("heavy"))
    proxy = proxies(static_config({"/svc/a": [light.addr, {"addr": heavy.addr, "weight": 3}]},
                                  client={"loadBalancer": {"kind": "roundRobin"}}))
    where = collections.Counter()
    for _ in range(40):
        with proxy.connect() as c:
            where[c.recv(16).strip().decode()] += 1
    assert where == {"light": 10, "heavy": 30}


def sink(name):
    """A handler that says its name, then reads and drops whatever comes."""
    def handler(conn):
        conn.sendall(name.encode() + b"\n")
        while conn.recv(65536):
            pass
    return handler


def test_ewma_sends_few_new_streams_to_the_endpoint_moving_bulk_data(proxies, backends):
    """Issue 27: 4 streams moving bulk data on one endpoint, 4 idle on the other; with load as open
    streams alone, 60 new streams split about evenly.  ewma counts the bytes."""
    servers = [backends(sink(n)) for n in "ab"]
    proxy = proxies(static_config({"/svc/a": [s.addr for s in servers]},
                                  client={"loadBalancer": {"kind": "ewma", "decayTimeMs": 1000}}), admin=True)
    held, stop = [proxy.connect() for _ in range(8)], threading.Event()
    try:
        names = [c.recv(16).strip().decode() for c in held]
        assert sorted(names) == list("aaaabbbb")  # (the less loaded of two endpoints: they alternate)
        senders = [threading.Thread(target=_pour, args=(c, stop)) for c, name in zip(held, names) if name == "a"]
        for thread in senders:
            thread.start()
        balancer = proxy.balancer("/svc/a")
        bulk = balancer.endpoints[("127.0.0.1", servers[0].port)]
        wait_for(lambda: proxy.call(lambda: bulk.rate_now(balancer.reactor.now, balancer.decay)) > 4e6,
                 timeout=10, message="the bulk endpoint's throughput to be seen")
        new = landing(proxy, 60, held)
        shown = urllib3.PoolManager().request("GET", proxy.admin_url + "/routers.json").json()
    finally:
        stop.set()
        for c in held:
            c.close()
    assert new["a"] <= 15, new
    rows = {e["address"]: e for e in shown["routers"][0]["destinations"][0]["endpoints"]}
    a, b = rows[servers[0].addr], rows[servers[1].addr]
    assert a["throughput"] > 1e6 > b["throughput"], (a, b)
    assert a["score"] > 2 * a["open"], a  # the bulk endpoint's streams count about four times over


def _pour(conn, stop):
    """Send 64 KB every 20 ms (up to about 3 MB/s) until ``stop``."""
    chunk = bytes(65536)
    while not stop.wait(0.02):
        try:
            conn.sendall(chunk)
        except OSError:
            return


def test_refusing_endpoint_is_ejected_and_returns_after_the_penalty(proxies, backends):
    good = backends(named("good"))
    holder, dead_port = refused_port()
    try:
        proxy = proxies(static_config(
            {"/svc/a": [good.addr, f"127.0.0.1:{dead_port}"]},
            client={"failFast": {"maxConsecutiveFailures": 2, "failurePenaltySecs": 0.5}}))
        for _ in range(30):  # every stream still lands: failed attempts move on
            with proxy.connect() as c:
                assert c.recv(16) == b"good\n"
        balancer = proxy.balancer("/svc/a")
        dead = proxy.call(lambda: balancer.endpoints[("127.0.0.1", dead_port)])
        assert proxy.call(lambda: dead.state) is FAILED
        failures_when_ejected = proxy.call(lambda: dead.connect_failures)
        assert failures_when_ejected == 2
        # The penalty ends; the endpoint is tried again (and fails again at once).
        wait_for(lambda: proxy.call(lambda: dead.state) is AVAILABLE, timeout=5)
        wait_for(lambda: _stream_lands(proxy) and proxy.call(lambda: dead.connect_failures) > 2, timeout=5)
        assert proxy.call(lambda: dead.state) is FAILED
    finally:
        holder.close()


def _stream_lands(proxy):
    with proxy.connect() as c:
        return c.recv(16) == b"good\n"


def test_all_failed_endpoints_are_still_used(proxies, backends):
    holder, port = refused_port()
    proxy = proxies(static_config(
        {"/svc/a": [f"127.0.0.1:{port}"]}, connectTimeoutMs=500,
        client={"failFast": {"maxConsecutiveFailures": 1, "failurePenaltySecs": 60}}))
    with proxy.connect() as c:  # refused until the deadline: closed
        assert recv_all(c) == b""
    balancer = proxy.balancer("/svc/a")
    assert proxy.call(lambda: balancer.endpoints[("127.0.0.1", port)].state) is FAILED
    holder.close()
    backends(named("revived"), port=port)
    with proxy.connect() as c:  # ejected, but the only one: used anyway
        assert c.recv(16) == b"revived\n"


def test_fs_discovery_add_remove_reweight_delete(proxies, backends, tmp_path):
    a, b = backends(named("a")), backends(named("b"))
    disco = tmp_path / "disco"
    disco.mkdir()
    (disco / "web").write_text(f"127.0.0.1 {a.port}\n")
    proxy = proxies({
        "routers": [{
            "label": "fs",
            "interpreter": {"kind": "io.l5d.fs", "rootDir": str(disco), "periodSecs": 0.05},
            "servers": [{"port": 0, "dstName": "/svc/web", "connectTimeoutMs": 2000}],
        }]})

    def lands():
        with proxy.connect() as c:
            return c.recv(16).strip().decode()

    assert lands() == "a"
    held = proxy.connect()
    assert held.recv(16) == b"a\n"
    (disco / "web").write_text(f"127.0.0.1 {b.port} 2\n")
    wait_for(lambda: lands() == "b", timeout=5, message="b to replace a")
    # The stream to the removed endpoint is still alive and echoing.
    held.sendall(b"ping")
    assert held.recv(16) == b"ping"
    balancer = proxy.balancer("/svc/web")
    assert proxy.call(lambda: balancer.endpoints[("127.0.0.1", b.port)].weight) == 2.0
    assert proxy.call(lambda: [e.address for e in balancer.retired.values()]) == [f"127.0.0.1:{a.port}"]
    held.close()
    wait_for(lambda: not proxy.call(lambda: dict(balancer.retired)), timeout=5)
    (disco / "web").unlink()
    wait_for(lambda: proxy.call(lambda: not balancer.endpoints), timeout=5)
    with proxy.connect() as c:  # resolves to nothing: closed at once
        assert recv_all(c) == b""
    assert proxy.listener.failures["no_endpoints"] >= 1


def test_unknown_static_name_fails_fast(proxies):
    proxy = proxies(static_config({"/svc/other": ["127.0.0.1:9"]}, connectTimeoutMs=30000))
    with proxy.connect() as c:
        c.settimeout(5)
        assert recv_all(c) == b""
    assert proxy.listener.failures["no_endpoints"] == 1


def test_min_connections_are_pre_established_and_replaced(proxies, backends):
    backend = backends(named("pooled"))
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, client={"minConnections": 3}))
    with proxy.connect() as c:  # the first stream creates the balancer and its pool
        assert c.recv(16) == b"pooled\n"
    wait_for(lambda: backend.accepted >= 4, message="pool of 3 plus one stream")
    accepted = backend.accepted
    with proxy.connect() as c:  # served from the pool: no new connect is needed first
        assert c.recv(16) == b"pooled\n"
    balancer = proxy.balancer("/svc/a")
    wait_for(lambda: proxy.call(lambda: len(balancer.pool)) == 3, message="pool refilled")
    wait_for(lambda: backend.accepted == accepted + 1, message="one replacement")
    assert proxy.call(lambda: balancer.pool.connecting) == 0


def test_attempts_per_stream_are_bounded_when_every_endpoint_refuses(proxies):
    """One client once made 55,481 attempts in 8 s against 60,000 refusing endpoints."""
    holders = [refused_port() for _ in range(200)]
    names = {"/svc/a": [f"127.0.0.1:{port}" for _, port in holders]}
    proxy = proxies(static_config(names, connectTimeoutMs=8000,
                                  client={"failFast": {"maxConsecutiveFailures": 1000}}))
    with proxy.connect() as c:
        c.settimeout(10)
        assert recv_all(c) == b""
    balancer = proxy.balancer("/svc/a")
    assert proxy.call(lambda: balancer.connect_failures["refused"]) == MAX_ATTEMPTS
    assert proxy.listener.failures["unreachable"] == 1
    for sock, _ in holders:
        sock.close()


def test_pooled_connections_stay_within_their_share_as_sni_multiplies_pools(proxies, backends, tmp_path):
    """minConnections: 10 with 1,000 SNI names once opened 10,000 idle connections."""
    backend = backends(named("pooled"))
    for i in range(60):
        (tmp_path / f"n{i}.example").write_text(f"127.0.0.1 {backend.port}\n")
    proxy = proxies({"routers": [{
        "label": "sni", "interpreter": {"kind": "io.l5d.fs", "rootDir": str(tmp_path)},
        "servers": [{"port": 0, "dstName": "/svc/{sni}"}],
        "client": {"minConnections": 10}}]})
    budget = proxy.app.budget
    binder = proxy.app.routers[0].binder
    proxy.call(lambda: (setattr(budget.pool, "capacity", 40), setattr(binder, "capacity", 20)))
    for i in range(60):
        with proxy.connect() as c:
            c.sendall(client_hello(f"n{i}.example"))
            assert c.recv(7) == b"pooled\n"
        assert proxy.call(lambda: budget.pool.used) <= 40
    wait_for(lambda: backend.open <= 40, message="idle pooled connections within their share")

    def pools():
        return budget.pool.used, sum(len(b.pool) + b.pool.connecting for b in binder.balancers.values())

    counted, held = proxy.call(pools)
    assert counted == held <= 40  # evicted balancers' pools were closed and returned their share


def test_a_huge_update_is_merged_a_slice_per_turn(reactor):
    balancer = Balancer(reactor, "/svc/big", ClientSettings(), StreamBudget(10))
    huge = [Address("127.0.0.1", port) for port in range(1024, 1024 + 5 * UPDATE_SLICE)]
    balancer.update(huge)
    assert balancer.endpoints == {} and not balancer.resolved  # one slice merged, none applied yet
    steps = 1
    while reactor._ready:
        fn, args = reactor._ready.popleft()
        fn(*args)
        steps += 1
    assert steps == 5 and len(balancer.endpoints) == len(huge) and len(balancer.set.picker.candidates) == len(huge)


def test_a_pooled_connection_serves_a_client_that_speaks_first(proxies, backends):
    """A pooled connection handed to a stream once kept the pool's callback: the answer never came."""
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, client={"minConnections": 2}))
    balancer = proxy.call(proxy.app.routers[0].binder.bind, "/svc/a")
    wait_for(lambda: proxy.call(lambda: len(balancer.pool)) == 2, message="the pool filled")
    for _ in range(3):
        with proxy.connect() as c:
            c.sendall(b"hello")
            assert recv_exactly(c, 5) == b"hello"
    assert backend.accepted <= 5  # the streams were served from the pool, which was refilled


def test_updates_during_a_merge_wait_their_turn_and_the_newest_wins(reactor):
    balancer = Balancer(reactor, "/svc/big", ClientSettings(), StreamBudget(10))
    sets = [[Address("127.0.0.1", port) for port in range(base, base + 3 * UPDATE_SLICE)]
            for base in (1024, 20_000, 40_000)]
    merged_per_turn = []
    balancer.update(sets[0])
    for later in sets[1:]:  # big updates arriving while one is being merged
        fn, args = reactor._ready.popleft()
        fn(*args)
        balancer.update(later)
    while reactor._ready:  # one reactor turn: what was ready when it began
        before = len(balancer.merging[2]) if balancer.merging else 0
        for _ in range(len(reactor._ready)):
            fn, args = reactor._ready.popleft()
            fn(*args)
        if balancer.merging:
            merged_per_turn.append(len(balancer.merging[2]) - before)
    assert max(merged_per_turn) <= UPDATE_SLICE
    assert sorted(balancer.endpoints) == [(a.ip, a.port) for a in sets[2]]  # the first set, then the newest


def test_a_new_endpoint_starts_slowly_and_then_takes_its_share(proxies, backends, tmp_path):
    a, b = backends(named("a")), backends(named("b"))
    disco = tmp_path / "disco"
    disco.mkdir()
    (disco / "web").write_text(f"127.0.0.1 {a.port}\n")
    proxy = proxies({"routers": [{
        "label": "fs",
        "interpreter": {"kind": "io.l5d.fs", "rootDir": str(disco), "periodSecs": 0.05},
        "servers": [{"port": 0, "dstName": "/svc/web"}],
        "client": {"slowStartSecs": 2},
    }]})
    held = []
    try:
        assert landing(proxy, 10, held) == {"a": 10}
        (disco / "web").write_text(f"127.0.0.1 {a.port}\n127.0.0.1 {b.port}\n")
        balancer = proxy.balancer("/svc/web")
        wait_for(lambda: proxy.call(lambda: len(balancer.endpoints)) == 2, timeout=5, message="b to be discovered")
        newcomer = proxy.call(lambda: balancer.endpoints[("127.0.0.1", b.port)])
        early = landing(proxy, 10, held)
        # Without slow start b, at load 0 against 10, would take all ten.
        assert early["b"] <= 4, early
        wait_for(lambda: proxy.call(lambda: newcomer.effective == newcomer.weight), timeout=5,
                 message="the slow start to end")
        late = landing(proxy, 20, held)
        assert late["b"] >= 14, late  # at full weight it catches up on the streams it did not take
    finally:
        for c in held:
            c.close()


def test_streams_wait_for_an_endpoint_below_its_limit(proxies, backends):
    servers = [backends(named(n)) for n in "ab"]
    proxy = proxies(static_config({"/svc/a": [s.addr for s in servers]}, connectTimeoutMs=10_000,
                                  client={"maxConnectionsPerEndpoint": 2, "maxWaiters": 1}))
    held = []
    try:
        assert landing(proxy, 4, held) == {"a": 2, "b": 2}
        waiting = proxy.connect()
        held.append(waiting)
        balancer = proxy.balancer("/svc/a")
        wait_for(lambda: proxy.call(lambda: len(balancer.queue)) == 1, timeout=5, message="a stream to wait")
        with proxy.connect() as overflow:  # maxWaiters already wait: closed at once
            assert recv_all(overflow) == b""
        assert proxy.listener.failures["full"] == 1
        held.pop(0).close()
        assert waiting.recv(16).strip() in (b"a", b"b")  # served once a stream ended
        assert proxy.call(lambda: (balancer.queued, len(balancer.queue))) == (1, 0)
        assert proxy.call(lambda: sorted(e.in_use for e in balancer.endpoints.values())) == [2, 2]
    finally:
        for c in held:
            c.close()
