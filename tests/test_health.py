"""Active health checks: endpoints judged by checks of their own, before and beside client traffic."""

import json
import time
import urllib.request

import pytest
from netutil import (first_line, Backend, Deliveries, LtcpProcess, blackhole, client_hello, named, recv_exactly, refused_port,
                     static_config, wait_for)

from ltcp.balancer import health
from ltcp.config import Address, HealthCheckConfig
from ltcp.balancer.health import HealthChecked, Target
from ltcp.interpreter.stats import DiscoveryStats

pytestmark = pytest.mark.timeout(60)

FAST = {"intervalMs": 100, "timeoutMs": 300, "unhealthyThreshold": 2, "healthyThreshold": 2}


def checked_config(names, check=None, **server):
    return static_config(names, client={"healthCheck": {**FAST, **(check or {})}}, **server)


def states(proxy, name="/svc/a"):
    """Each endpoint's shown state, by address."""
    def read():
        balancer = proxy.app.routers[0].binder.balancers.get(name)
        return {e.address: e.shown_state for e in balancer.endpoints.values()} if balancer else {}
    return proxy.call(read)




def checker(proxy):
    interpreter = proxy.app.routers[0].interpreter
    assert isinstance(interpreter, HealthChecked)
    return interpreter


# -- the verdicts, pure -----------------------------------------------------------------

@pytest.mark.parametrize("results, healthy", [
    ([False], False),  # the first check decides
    ([True], True),
    ([True, False], True),  # one failure is not enough (threshold 2)
    ([True, False, False], False),
    ([True, False, True, False], True),  # failures must be in a row
    ([False, True], False),  # and so must successes
    ([False, True, True], True),
])
def test_thresholds_count_results_in_a_row_after_the_first(results, healthy):
    target = Target("127.0.0.1", 1, HealthCheckConfig(unhealthy_threshold=2, healthy_threshold=2))
    for ok in results:
        target.record(ok)
    assert target.healthy is healthy


# -- against real sockets ----------------------------------------------------------------

def test_a_dead_endpoint_is_unhealthy_before_any_client_is_sent_there(proxies, backends):
    live = backends(named("live"))
    refused = [refused_port() for _ in range(4)]  # four dead to one live: luck cannot pass this
    dead = [f"127.0.0.1:{port}" for _, port in refused]
    try:
        proxy = proxies(checked_config({"/svc/a": [live.addr, *dead]}))
        assert [first_line(proxy) for _ in range(20)] == ["live"] * 20
        assert states(proxy) == {live.addr: "available", **{address: "unhealthy" for address in dead}}
        balancer = proxy.balancer("/svc/a")
        assert proxy.call(lambda: dict(balancer.connect_failures)) == {}  # no client met them
        assert proxy.call(balancer.set.counts) == {"available": 1, "failed": 0, "unhealthy": 4, "retired": 0}
    finally:
        for holder, _ in refused:
            holder.close()


def test_an_endpoint_comes_back_once_it_answers_again_after_healthy_threshold_checks(proxies, backends):
    live = backends(named("live"))
    holder, port = refused_port()
    proxy = proxies(checked_config({"/svc/a": [live.addr, f"127.0.0.1:{port}"]}, {"healthyThreshold": 3}))
    assert first_line(proxy) == "live"
    wait_for(lambda: states(proxy).get(f"127.0.0.1:{port}") == "unhealthy", message="marked unhealthy")
    holder.close()
    revived_at = time.monotonic()
    backends(named("revived"), port)
    wait_for(lambda: states(proxy).get(f"127.0.0.1:{port}") == "available", message="healthy again")
    assert time.monotonic() - revived_at >= 2 * 0.1 * 0.9  # three successes: two intervals at least
    seen = set()
    wait_for(lambda: seen.add(first_line(proxy)) or seen == {"live", "revived"}, message="traffic to both")


def test_it_takes_unhealthy_threshold_failures_to_take_a_live_endpoint_out(proxies):
    first, second = Backend(named("first")), Backend(named("second"))
    port = second.port
    proxy = proxies(checked_config({"/svc/a": [first.addr, second.addr]}, {"unhealthyThreshold": 4}))
    try:
        assert first_line(proxy) in ("first", "second")
        wait_for(lambda: set(states(proxy).values()) == {"available"}, message="both checked healthy")
        second.close()
        stopped_at = time.monotonic()
        wait_for(lambda: states(proxy).get(f"127.0.0.1:{port}") == "unhealthy", message="marked unhealthy")
        assert time.monotonic() - stopped_at >= 3 * 0.1 * 0.9  # four failures in a row: three intervals
        assert [first_line(proxy) for _ in range(10)] == ["first"] * 10
    finally:
        first.close()


def ping_server(answer):
    """A backend that reads a PING line and answers ``answer`` (None: never answers)."""
    def handler(conn):
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = conn.recv(100)
            if not chunk:
                return
            data += chunk
        if answer is None:
            conn.recv(100)  # hold the connection until the checker gives up
            return
        conn.sendall(answer)
    return handler


def test_send_and_expect_judge_what_the_endpoint_answers(proxies, backends):
    good, wrong, silent = (backends(ping_server(answer)) for answer in (b"+PONG\r\n", b"-ERR no\r\n", None))
    proxy = proxies(checked_config({"/svc/a": [good.addr, wrong.addr, silent.addr]},
                                   {"send": "PING\r\n", "expect": "+PONG", "timeoutMs": 1000}))
    with proxy.connect() as conn:  # the first client starts discovery, and so the checks
        conn.sendall(b"PING\r\n")
        assert recv_exactly(conn, 7) == b"+PONG\r\n"  # (held until the first checks: only good is left)
    assert states(proxy) == {good.addr: "available", wrong.addr: "unhealthy", silent.addr: "unhealthy"}


def test_every_endpoint_unhealthy_means_trying_them_all_as_when_all_have_failed(proxies, backends):
    speaker = backends(named("speaker"))  # connects work, but it never says the expected words
    proxy = proxies(checked_config({"/svc/a": [speaker.addr]}, {"expect": "HELLO"}))
    assert first_line(proxy) == "speaker"
    assert states(proxy) == {speaker.addr: "unhealthy"}


def test_checks_stop_for_a_destination_the_route_cache_evicted(proxies, backends):
    evicted, kept = backends(named("evicted")), backends(named("kept"))
    proxy = proxies(checked_config({"/svc/a": [evicted.addr], "/svc/b": [kept.addr]}, dstName="/svc/{sni}"))
    binder = proxy.app.routers[0].binder
    proxy.call(setattr, binder, "capacity", 1)

    def route(name, expected):
        with proxy.connect() as conn:
            conn.sendall(client_hello(name))
            assert recv_exactly(conn, len(expected)) == expected

    route("a", b"evicted\n")
    wait_for(lambda: proxy.call(lambda: proxy.listener.active) == 0, message="the stream ended")
    route("b", b"kept\n")  # the cache holds one name: /svc/a goes
    assert proxy.call(lambda: list(binder.balancers)) == ["/svc/b"]
    checks = checker(proxy)
    counted = checks.checks
    wait_for(lambda: checks.checks >= counted + 3, message="a few more checks")  # let one land in flight
    accepted = evicted.accepted
    wait_for(lambda: checks.checks >= counted + 10, message="ten more checks of /svc/b")
    assert evicted.accepted == accepted


@pytest.mark.timeout(90)
def test_with_two_workers_checks_run_once_and_both_workers_see_the_verdict(backends, tmp_path):
    live = backends(named("live"))
    holder, dead_port = refused_port()
    document = checked_config({"/svc/a": [live.addr, f"127.0.0.1:{dead_port}"]}, {"intervalMs": 200})
    document["workers"] = 2
    ltcp = LtcpProcess(document)
    try:
        for _ in range(10):
            with ltcp.connect() as conn:
                assert recv_exactly(conn, 5) == b"live\n"
        def endpoint_states():
            with urllib.request.urlopen(f"{ltcp.admin}/routers.json", timeout=10) as response:
                destinations = json.load(response)["routers"][0]["destinations"]
            return {e["address"]: e["state"] for d in destinations for e in d["endpoints"]}

        wait_for(lambda: endpoint_states().get(f"127.0.0.1:{dead_port}") == "unhealthy", message="shown unhealthy")
        accepted, started = live.accepted, time.monotonic()
        time.sleep(1.0)  # a window to count checks in: about five intervals
        per_second = (live.accepted - accepted) / (time.monotonic() - started)
        assert 2.5 <= per_second <= 7.5, per_second  # one checker (5/s), not one per worker (10/s)
        with urllib.request.urlopen(f"{ltcp.admin}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'ltcp_endpoints{dst="/svc/a",router="test",state="unhealthy"} 1.0' in metrics
    finally:
        ltcp.stop()
        holder.close()


class Answers:
    """An interpreter the test answers by hand (and a deliver that records what came out)."""

    KIND = "test"

    def __init__(self):
        self.stats = DiscoveryStats()
        self.delivers = {}

    def start(self):
        pass

    def watch(self, name, deliver):
        self.delivers[name] = deliver

    def unwatch(self, name):
        self.delivers.pop(name, None)

    def close(self):
        pass


def test_a_held_answer_is_released_on_time_however_often_new_answers_come(request):
    holes = [blackhole() for _ in range(12)]  # connects that never complete
    request.addfinalizer(lambda: [s.close() for hole in holes for s in (hole[0], *hole[2])])
    inner = Answers()
    checks = HealthChecked(inner, lambda name: HealthCheckConfig(interval_ms=1000, timeout_ms=300))
    checks.start()
    request.addfinalizer(checks.close)
    delivered_at = []
    checks.watch("/svc/a", lambda addresses: delivered_at.append(time.monotonic()))
    started = time.monotonic()
    for i in range(len(holes)):  # every 100 ms an answer with one more endpoint nobody has checked yet
        inner.delivers["/svc/a"]([Address("127.0.0.1", port) for _, port, _ in holes[:i + 1]])
        time.sleep(0.1)  # the pace of the answers is the point of the test
    wait_for(lambda: delivered_at, timeout=5, message="a delivery")
    # The first hold ends 0.35 s after the first answer; held anew by each answer, it would end past 1.45 s.
    assert delivered_at[0] - started < 1.0


def test_checks_in_flight_are_capped_and_the_rest_wait_their_turn(request, monkeypatch):
    monkeypatch.setattr(health, "MAX_IN_FLIGHT", 3)
    holes = [blackhole() for _ in range(8)]
    request.addfinalizer(lambda: [s.close() for hole in holes for s in (hole[0], *hole[2])])
    inner = Answers()
    checks = HealthChecked(inner, lambda name: HealthCheckConfig(interval_ms=5000, timeout_ms=200))
    checks.start()
    request.addfinalizer(checks.close)
    delivered = Deliveries()
    checks.watch("/svc/a", delivered)
    inner.delivers["/svc/a"]([Address("127.0.0.1", port) for _, port, _ in holes])
    most = 0

    def all_unhealthy():
        nonlocal most
        most = max(most, checks._in_flight)
        last = delivered.updates[-1] if delivered.updates else None
        return last is not None and len(last) == 8 and all(len(a) == 4 and a[3] is False for a in last)

    wait_for(all_unhealthy, timeout=10, interval=0.01, message="every endpoint checked and found dead")
    assert 1 <= most <= 3
