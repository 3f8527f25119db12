"""``io.l5d.dns`` against a real DNS server (dnsmasq), and its pure parts property-tested.

Backends listen on several loopback addresses (127.0.0.2, 127.0.0.3, ::1) so
that A and AAAA records can tell them apart; each test binds its own ports.
"""

import json
import logging
import shutil
import socket
import time
import urllib.request

import dns.rcode
import dns.rdatatype
import hypothesis.strategies as st
import pytest
from dnsmasq import Dnsmasq, FailingServer
from hypothesis import given
from netutil import first_line, Backend, Deliveries, LtcpProcess, client_hello, closed_without_data, named, recv_exactly, wait_for

from ltcp.interpreter.dnslookup import (DnsInterpreter, Failure, Query, lookup_outcome, merge_families, parse_name, refresh_delay, srv_addresses)

pytestmark = pytest.mark.timeout(60)


# -- pure parts -------------------------------------------------------------------------

@pytest.mark.parametrize("name, query", [
    ("/inet/web.test/80", Query("inet", "web.test", 80)),
    ("/inet/Web.Test./8080", Query("inet", "web.test", 8080)),
    ("/inet/127.0.0.9/5", Query("ip", "127.0.0.9", 5)),
    ("/inet/::1/5", Query("ip", "::1", 5)),
    ("/srv/_http._tcp.web.test", Query("srv", "_http._tcp.web.test")),
])
def test_names_parse(name, query):
    assert parse_name(name) == query


@pytest.mark.parametrize("name", ["/inet/web.test", "/inet/web.test/0", "/inet/web.test/http", "/inet/a..b/80",
                                  "/inet/a b/80", "/srv", "/srv/a/b", "/svc/web", "inet/web.test/80",
                                  "/inet/" + "a" * 64 + ".test/80", "/inet/ünï.test/80"])
def test_names_that_are_not_lookups_are_refused(name):
    with pytest.raises(ValueError):
        parse_name(name)


def test_domains_restrict_what_can_be_looked_up():
    assert parse_name("/inet/api.svc.test/80", ("svc.test",)).host == "api.svc.test"
    assert parse_name("/inet/svc.test/80", ("svc.test",)).host == "svc.test"
    for outside in ("/inet/evilsvc.test/80", "/inet/svc.test.evil/80", "/srv/_x._tcp.other"):
        with pytest.raises(ValueError, match="outside the allowed domains"):
            parse_name(outside, ("svc.test",))


_records = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 65535), st.integers(0, 65535),
                              st.sampled_from(["a.test", "b.test", "c.test", "gone.test"])), max_size=12)
_ADDRESSES = {"a.test": ["127.0.0.2"], "b.test": ["127.0.0.3", "::1"], "c.test": ["127.0.0.4"], "gone.test": []}


@given(_records)
def test_srv_takes_the_lowest_priority_with_addresses_and_keeps_each_records_share(records):
    addresses = srv_addresses(records, _ADDRESSES.get)
    usable = [r for r in records if _ADDRESSES[r[3]] and r[2]]
    if not usable:
        assert addresses == []
        return
    priority = min(r[0] for r in usable)
    group = [r for r in usable if r[0] == priority]
    expected = {(ip, r[2]) for r in group for ip in _ADDRESSES[r[3]]}
    assert sorted((a.ip, a.port) for a in addresses) == sorted(expected)  # each once: records naming it add up
    assert all(a.weight > 0 for a in addresses)
    if all(r[1] for r in group):  # each record's weight is shared among its target's addresses
        assert sum(a.weight for a in addresses) == pytest.approx(sum(r[1] for r in group))


def test_srv_weight_zero_is_rare_beside_positive_weights_and_equal_among_zeros():
    mixed = srv_addresses([(0, 0, 1, "a.test"), (0, 100, 2, "c.test")], _ADDRESSES.get)
    assert [a.weight for a in mixed] == [1.0, 100.0]
    zeros = srv_addresses([(0, 0, 1, "a.test"), (0, 0, 2, "c.test")], _ADDRESSES.get)
    assert [a.weight for a in zeros] == [1.0, 1.0]


@given(st.floats(0, 1e6), st.floats(1, 1e5))
def test_refresh_follows_the_ttl_within_one_second_and_the_period(ttl, period):
    delay = refresh_delay(ttl, period)
    assert 1 <= delay <= period or delay == period
    if 1 <= ttl <= period:
        assert delay == ttl


_REFUSED = Failure("AAAA web.test", "refused", "REFUSED")
_TIMEOUT = Failure("A web.test", "timeout", "no answer in 1.0s")


@pytest.mark.parametrize("outcomes, kept, ips, keep", [
    ({"A": ["127.0.0.2"], "AAAA": ["::1"]}, {}, ["127.0.0.2", "::1"], {"A": ("127.0.0.2",), "AAAA": ("::1",)}),
    # issue 24: a refused AAAA query never discards the A answer
    ({"A": ["127.0.0.2"], "AAAA": _REFUSED}, {}, ["127.0.0.2"], {"A": ("127.0.0.2",)}),
    ({"A": _TIMEOUT, "AAAA": ["::1"]}, {}, ["::1"], {"AAAA": ("::1",)}),
    # a family that answered once and fails now counts with its last answer; the other's new one replaces its old
    ({"A": ["127.0.0.3"], "AAAA": _REFUSED}, {"A": ("127.0.0.2",), "AAAA": ("::1",)}, ["127.0.0.3", "::1"],
     {"A": ("127.0.0.3",), "AAAA": ("::1",)}),
    # "no such record" is an answer: it replaces what was kept
    ({"A": [], "AAAA": _REFUSED}, {"A": ("127.0.0.2",)}, [], {"A": ()}),
    ({"A": _TIMEOUT, "AAAA": _REFUSED}, {"A": ("127.0.0.2",)}, ["127.0.0.2"], {"A": ("127.0.0.2",)}),
    ({"A": _TIMEOUT, "AAAA": _REFUSED}, {}, [], {}),
])
def test_families_combine_so_that_a_failure_discards_no_answer(outcomes, kept, ips, keep):
    assert merge_families(outcomes, kept) == (ips, keep)


_family = st.one_of(st.lists(st.sampled_from(["127.0.0.2", "127.0.0.3", "::1", "::2"]), max_size=3),
                    st.just(_REFUSED))


@given(st.fixed_dictionaries({"A": _family, "AAAA": _family}),
       st.dictionaries(st.sampled_from(["A", "AAAA"]), st.tuples(st.sampled_from(["10.0.0.1", "::9"]))))
def test_every_answer_serves_and_a_failed_family_serves_only_its_last_answer(outcomes, kept):
    ips, keep = merge_families(outcomes, kept)
    expected = set()
    for family, outcome in outcomes.items():
        expected |= set(kept.get(family, ())) if isinstance(outcome, Failure) else set(outcome)
    assert ips == sorted(expected)
    answered = {family for family, outcome in outcomes.items() if not isinstance(outcome, Failure)}
    assert set(keep) == answered | set(kept)  # what answered now, and what failed but answered before


_SOME = ["an address"]


@pytest.mark.parametrize("answered, failures, addresses, outcome", [
    (True, [], _SOME, "ok"),
    (True, [], [], "neg"),  # NXDOMAIN or NODATA for every query
    (True, [_REFUSED], _SOME, "partial"),
    (True, [_REFUSED], [], "partial"),  # A said "no records", AAAA was refused
    (False, [_TIMEOUT, _REFUSED], [], "timeout"),  # nothing answered: counted as the first failure
])
def test_a_lookup_is_counted_by_whether_its_queries_answered(answered, failures, addresses, outcome):
    assert lookup_outcome(answered, failures, addresses) == outcome


# -- against dnsmasq --------------------------------------------------------------------

@pytest.fixture
def dnsmasq(tmp_path):
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (apt-get install dnsmasq-base; .ci/run does)")
    servers = []

    def start(hosts="", records=(), local=True):
        server = Dnsmasq(str(tmp_path), hosts, records, local)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def on_loopback():
    """Backends on given loopback addresses at one shared port, closed afterwards."""
    started = []

    def start(ips, port=0, handler=None):
        for _ in range(20):
            first = Backend(handler or named(ips[0]), port, ips[0])
            rest = []
            try:
                for ip in ips[1:]:
                    rest.append(Backend(handler or named(ip), first.port, ip))
            except OSError:  # that port is taken on another address: try another
                for backend in [first, *rest]:
                    backend.close()
                continue
            started.extend([first, *rest])
            return [first, *rest]
        raise RuntimeError("no port free on every address")

    yield start
    for backend in started:
        backend.close()


@pytest.fixture
def failing():
    """DNS servers that fail queries (``failing(rcodes)``, see ``FailingServer``), stopped afterwards."""
    servers = []

    def start(rcodes):
        server = FailingServer(rcodes)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")


def dns_config(server, dst_name, period=30, connect_timeout_ms=3000, **interpreter):
    return {
        "admin": {"port": 0},
        "routers": [{
            "label": "dns",
            "interpreter": {"kind": "io.l5d.dns", "nameservers": [server.nameserver], "periodSecs": period,
                            **interpreter},
            "servers": [{"port": 0, "dstName": dst_name, "connectTimeoutMs": connect_timeout_ms}],
        }],
    }


def dns_log(caplog, name, level=logging.WARNING):
    """What the DNS interpreter logged of ``name`` at ``level``."""
    return [r.getMessage() for r in caplog.records
            if r.name == "ltcp.interpreter.dnslookup" and r.levelno == level and f" {name}: " in r.getMessage()]


def seconds_to_close(proxy):
    """How long ltcp takes to close a new client without sending it anything."""
    started = time.monotonic()
    with proxy.connect() as conn:
        assert closed_without_data(conn)
    return time.monotonic() - started


def connect_failures(proxy, name):
    return proxy.call(lambda: dict(proxy.app.routers[0].binder.balancers[name].connect_failures))


def endpoint_count(proxy, name):
    return proxy.call(lambda: len(proxy.app.routers[0].binder.balancers[name].endpoints))


def lookups(proxy):
    return sum(proxy.app.routers[0].interpreter.stats.snapshot()["requests"].values())


def name_state(proxy, name):
    return proxy.app.routers[0].interpreter.stats.snapshot()["names"][name]


def tally(proxy, count):
    """Who answered ``count`` connections made one after another (each ended before the next)."""
    seen = {}
    for _ in range(count):
        name = first_line(proxy)
        seen[name] = seen.get(name, 0) + 1
        wait_for(lambda: proxy.call(lambda: proxy.listener.active) == 0, message="the stream ended")
    return seen


def test_a_records_spread_streams_over_every_address(dnsmasq, on_loopback, proxies):
    backends = on_loopback(["127.0.0.2", "127.0.0.3"])
    server = dnsmasq("127.0.0.2 web.test\n127.0.0.3 web.test\n")
    proxy = proxies(dns_config(server, f"/inet/web.test/{backends[0].port}"))
    seen = tally(proxy, 40)
    assert set(seen) == {"127.0.0.2", "127.0.0.3"} and min(seen.values()) >= 8, seen


def test_a_changed_record_is_followed_within_its_ttl_not_the_period(dnsmasq, on_loopback, proxies):
    backends = on_loopback(["127.0.0.2", "127.0.0.3"])
    server = dnsmasq("127.0.0.2 web.test\n")
    proxy = proxies(dns_config(server, f"/inet/web.test/{backends[0].port}", period=60))
    assert first_line(proxy) == "127.0.0.2"
    server.set_hosts("127.0.0.3 web.test\n")
    # The TTL is 1 s, the period 60 s: only the TTL can explain a change within 10 s.
    wait_for(lambda: first_line(proxy) == "127.0.0.3", timeout=10, interval=0.2, message="the new record in use")
    assert tally(proxy, 5) == {"127.0.0.3": 5}


def test_srv_weights_and_ports_decide_the_share(dnsmasq, backends, proxies):
    light, heavy = backends(named("light")), backends(named("heavy"))
    server = dnsmasq(records=[
        "--host-record=light.test,127.0.0.1", "--host-record=heavy.test,127.0.0.1",
        f"--srv-host=_web._tcp.test,light.test,{light.port},0,1",
        f"--srv-host=_web._tcp.test,heavy.test,{heavy.port},0,3"])
    proxy = proxies(dns_config(server, "/srv/_web._tcp.test"))
    seen = tally(proxy, 200)
    assert 0.65 <= seen.get("heavy", 0) / 200 <= 0.85, seen  # 3:1 (binomial: 0.75 +- 0.1 is 3.3 sigma)


def test_srv_serves_the_lowest_priority_and_falls_back_when_it_has_no_address(dnsmasq, backends, proxies):
    first, backup = backends(named("first")), backends(named("backup"))
    server = dnsmasq(records=[
        "--host-record=first.test,127.0.0.1", "--host-record=backup.test,127.0.0.1",
        f"--srv-host=_main._tcp.test,first.test,{first.port},0,1",
        f"--srv-host=_main._tcp.test,backup.test,{backup.port},1,1",
        f"--srv-host=_lost._tcp.test,gone.test,{first.port},0,1",
        f"--srv-host=_lost._tcp.test,backup.test,{backup.port},1,1"])
    main = proxies(dns_config(server, "/srv/_main._tcp.test"))
    assert tally(main, 10) == {"first": 10}
    lost = proxies(dns_config(server, "/srv/_lost._tcp.test"))
    assert tally(lost, 10) == {"backup": 10}


def test_nxdomain_fails_fast(dnsmasq, proxies):
    server = dnsmasq("127.0.0.2 web.test\n")
    proxy = proxies(dns_config(server, "/inet/nothing-here.test/80"))
    started = time.monotonic()
    with proxy.connect() as conn:
        assert closed_without_data(conn)
    assert time.monotonic() - started < 2  # the connect timeout is 3 s: nobody waited for it
    failures = proxy.call(lambda: dict(proxy.app.routers[0].binder.balancers["/inet/nothing-here.test/80"]
                                       .connect_failures))
    assert failures == {"no_endpoints": 1}


def test_a_dead_dns_server_keeps_the_last_answer_and_is_counted(dnsmasq, on_loopback, proxies, caplog):
    backends = on_loopback(["127.0.0.2"])
    server = dnsmasq("127.0.0.2 web.test\n")
    proxy = proxies(dns_config(server, f"/inet/web.test/{backends[0].port}", period=2))
    assert first_line(proxy) == "127.0.0.2"
    server.stop()
    stats = proxy.app.routers[0].interpreter.stats
    wait_for(lambda: set(stats.snapshot()["requests"]) - {"ok"}, timeout=15, interval=0.1,
             message="a failed lookup counted")
    assert set(stats.snapshot()["requests"]) - {"ok"} <= {"timeout", "servfail", "unreachable", "error"}
    assert tally(proxy, 3) == {"127.0.0.2": 3}  # the last good set still serves
    [warning] = dns_log(caplog, f"/inet/web.test/{backends[0].port}")
    assert "keeping the last answer (1 address)" in warning


@needs_ipv6
def test_aaaa_records_reach_ipv6_endpoints(dnsmasq, on_loopback, proxies):
    backends = on_loopback(["::1"])
    server = dnsmasq(records=["--host-record=six.test,::1"])
    proxy = proxies(dns_config(server, f"/inet/six.test/{backends[0].port}"))
    assert first_line(proxy) == "::1"


def test_a_hostile_sni_name_is_not_looked_up_outside_the_allowed_domains(dnsmasq, on_loopback, proxies):
    backends = on_loopback(["127.0.0.2"], handler=named("inside"))
    server = dnsmasq("127.0.0.2 web.svc.test\n127.0.0.2 web.other.test\n")
    proxy = proxies(dns_config(server, f"/inet/{{sni}}/{backends[0].port}", domains=["svc.test"]))
    for name, answered in (("web.svc.test", True), ("web.other.test", False)):
        with proxy.connect() as conn:
            conn.sendall(client_hello(name))
            if answered:
                assert recv_exactly(conn, 7) == b"inside\n"
            else:
                assert closed_without_data(conn)
    assert proxy.app.routers[0].interpreter.stats.snapshot()["requests"].get("invalid") == 1


@pytest.mark.timeout(90)
def test_dns_names_show_in_routers_json_and_metrics_with_two_workers(dnsmasq, on_loopback, tmp_path):
    backends = on_loopback(["127.0.0.2"])
    server = dnsmasq("127.0.0.2 web.test\n")
    document = dns_config(server, f"/inet/web.test/{backends[0].port}")
    document["workers"] = 2
    ltcp = LtcpProcess(document)
    try:
        for _ in range(4):  # both workers (most likely) route to the name: still one watch
            with ltcp.connect() as conn:
                assert recv_exactly(conn, 10) == b"127.0.0.2\n"
        name = f"/inet/web.test/{backends[0].port}"

        def discovery():
            with urllib.request.urlopen(f"{ltcp.admin}/routers.json", timeout=10) as response:
                return json.load(response)["routers"][0]["discovery"]

        wait_for(lambda: name in discovery().get("names", {}), message="the name in /routers.json")
        state = discovery()["names"][name]
        assert state["outcome"] == "ok" and state["ttl"] == 1 and state["updated"] <= time.time()
        assert discovery()["requests"]["ok"] >= 1
        with urllib.request.urlopen(f"{ltcp.admin}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert f'ltcp_discovery_ttl_seconds{{dst="{name}",router="dns"}} 1.0' in metrics
        assert 'ltcp_discovery_requests_total{outcome="ok",router="dns"}' in metrics
    finally:
        ltcp.stop()


def test_a_name_server_that_is_not_an_address_is_a_clear_config_error():
    from ltcp.config import ConfigError, loads
    with pytest.raises(ConfigError, match=r"nameservers\[0\]: must be 'ip' or 'ip:port'"):
        loads("routers: [{label: a, interpreter: {kind: io.l5d.dns, nameservers: [dns.example]}, "
              "servers: [{port: 0, dstName: /inet/x/1}]}]")


def test_an_answer_too_big_for_udp_is_fetched_over_tcp_and_delivered_once(dnsmasq):
    ips = [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(300)]  # ~5 KB of A records: past any UDP limit
    server = dnsmasq("".join(f"{ip} big.test\n" for ip in ips))
    interpreter = DnsInterpreter([("127.0.0.1", server.port)], 30)
    interpreter.start()
    try:
        delivered = Deliveries()
        interpreter.watch("/inet/big.test/80", delivered)
        assert sorted(a.ip for a in delivered.wait(timeout=5)) == sorted(ips)
        # dnsmasq rotates the records of every answer: the same set in another order is no news
        wait_for(lambda: interpreter.stats.snapshot()["requests"]["ok"] >= 3, message="two more lookups")
        assert len(delivered.updates) == 1
    finally:
        interpreter.close()


def test_an_ip_literal_is_outside_every_domain():
    """With {sni} and domains, "169.254.169.254." must not reach the metadata service (nor any address)."""
    from ltcp.protocol.tls import routing_name
    assert routing_name("169.254.169.254.") == (None, "no_sni")
    with pytest.raises(ValueError, match="outside the allowed domains"):
        parse_name("/inet/169.254.169.254/443", ("svc.test",))
    assert parse_name("/inet/169.254.169.254/443") == Query("ip", "169.254.169.254", 443)  # no domains: as written



def test_srv_target_dot_means_not_offered_and_is_never_looked_up(dnsmasq):
    server = dnsmasq(records=["--srv-host=_none._tcp.test"])  # dnsmasq's way to say "not offered": target "."
    interpreter = DnsInterpreter([("127.0.0.1", server.port)], 30)
    interpreter.start()
    try:
        delivered = Deliveries()
        interpreter.watch("/srv/_none._tcp.test", delivered)
        assert delivered.wait(timeout=5) is None
        assert interpreter.stats.snapshot()["requests"] == {"neg": 1}  # not a lookup of the root, refused
    finally:
        interpreter.close()


# -- when some queries fail (issue 24) --------------------------------------------------

def test_a_name_with_only_a_records_serves_when_its_aaaa_query_is_refused(dnsmasq, on_loopback, proxies, caplog):
    """The report: dnsmasq with --no-resolv refuses the AAAA query of a name it knows only an A record for."""
    backends = on_loopback(["127.0.0.2"])
    server = dnsmasq("127.0.0.2 only4.test\n", local=False)
    name = f"/inet/only4.test/{backends[0].port}"
    proxy = proxies(dns_config(server, name))
    assert tally(proxy, 3) == {"127.0.0.2": 3}
    wait_for(lambda: lookups(proxy) >= 3, message="three lookups")
    assert proxy.app.routers[0].interpreter.stats.snapshot()["requests"].keys() == {"partial"}
    assert name_state(proxy, name)["outcome"] == "partial"
    assert name_state(proxy, name)["failed"] == ["AAAA only4.test refused"]
    [warning] = dns_log(caplog, name)  # once, not once per lookup
    assert "AAAA only4.test refused" in warning and "serving what answered (1 address)" in warning
    assert connect_failures(proxy, name) == {}


@needs_ipv6
def test_an_aaaa_only_name_serves_when_its_a_query_is_refused_and_merges_a_records_once_they_answer(
        dnsmasq, on_loopback, proxies, caplog):
    caplog.set_level(logging.INFO, logger="ltcp.interpreter.dnslookup")
    backends = on_loopback(["::1", "127.0.0.2"])
    server = dnsmasq("::1 only6.test\n", local=False)
    name = f"/inet/only6.test/{backends[0].port}"
    proxy = proxies(dns_config(server, name))
    assert tally(proxy, 3) == {"::1": 3}
    [warning] = dns_log(caplog, name)
    assert "A only6.test refused" in warning and "serving what answered (1 address)" in warning
    server.set_hosts("::1 only6.test\n127.0.0.2 only6.test\n")
    wait_for(lambda: endpoint_count(proxy, name) == 2, message="the A record merged in")
    assert set(tally(proxy, 20)) == {"::1", "127.0.0.2"}
    assert dns_log(caplog, name, logging.INFO) == [f"dns: {name}: every query answers again (2 addresses)"]
    assert name_state(proxy, name)["outcome"] == "ok" and name_state(proxy, name)["failed"] == []


@pytest.mark.parametrize("family, rcode, kind", [
    ("AAAA", dns.rcode.SERVFAIL, "servfail"),
    ("AAAA", None, "timeout"),
    pytest.param("A", None, "timeout", marks=needs_ipv6),  # asked first, it must leave the AAAA query time to answer
])
def test_a_query_failing_upstream_leaves_the_other_family_serving(family, rcode, kind, dnsmasq, failing, on_loopback,
                                                                  proxies, caplog):
    """dnsmasq knows one family of the name and forwards the other's query to a server that answers
    SERVFAIL, or never."""
    upstream = failing({} if rcode is None else {dns.rdatatype.from_text(family): rcode})
    ip = "::1" if family == "A" else "127.0.0.2"
    backends = on_loopback([ip])
    server = dnsmasq(f"{ip} web.test\n", records=[f"--server=127.0.0.1#{upstream.port}"], local=False)
    name = f"/inet/web.test/{backends[0].port}"
    proxy = proxies(dns_config(server, name, connect_timeout_ms=10000))
    assert tally(proxy, 3) == {ip: 3}
    assert dns.rdatatype.from_text(family) in upstream.asked
    assert name_state(proxy, name)["outcome"] == "partial"
    assert name_state(proxy, name)["failed"] == [f"{family} web.test {kind}"]
    [warning] = dns_log(caplog, name)
    assert f"{family} web.test {kind}" in warning and "serving what answered (1 address)" in warning


def test_a_name_no_query_answers_fails_its_clients_fast_and_serves_once_it_resolves(dnsmasq, on_loopback, proxies,
                                                                                     caplog):
    backends = on_loopback(["127.0.0.2"])
    server = dnsmasq("", local=False)  # knows no name: refuses every query
    name = f"/inet/later.test/{backends[0].port}"
    proxy = proxies(dns_config(server, name, period=2, connect_timeout_ms=10000))
    for _ in range(3):
        assert seconds_to_close(proxy) < 1  # not the 10 s connect timeout
    assert connect_failures(proxy, name) == {"no_endpoints": 3}  # as for a name that resolves to nothing
    wait_for(lambda: lookups(proxy) >= 3, message="retries")
    assert proxy.app.routers[0].interpreter.stats.snapshot()["requests"].keys() == {"refused"}
    assert name_state(proxy, name) == {"outcome": "refused", "failed": ["A later.test refused", "AAAA later.test refused"]}
    [warning] = dns_log(caplog, name)
    assert "A later.test refused" in warning and "AAAA later.test refused" in warning
    assert "no answer yet, none to keep: its clients fail at once" in warning and "last answer" not in warning
    server.set_hosts("127.0.0.2 later.test\n")
    wait_for(lambda: endpoint_count(proxy, name) == 1, timeout=10, message="the name resolved on a retry")
    assert tally(proxy, 3) == {"127.0.0.2": 3}


@pytest.mark.parametrize("name, rcode, failed, within", [
    ("/inet/web.test/80", dns.rcode.SERVFAIL, ["A web.test servfail", "AAAA web.test servfail"], 1),
    ("/srv/_web._tcp.test", dns.rcode.SERVFAIL, ["SRV _web._tcp.test servfail"], 1),
    ("/inet/web.test/80", None, ["A web.test timeout", "AAAA web.test timeout"], 4),  # one 2 s lookup first
])
def test_a_name_whose_server_fails_every_query_fails_its_clients_fast(name, rcode, failed, within, failing, proxies,
                                                                      caplog):
    server = failing({} if rcode is None else {t: rcode for t in (dns.rdatatype.A, dns.rdatatype.AAAA,
                                                                   dns.rdatatype.SRV)})
    proxy = proxies(dns_config(server, name, connect_timeout_ms=10000))
    assert seconds_to_close(proxy) < within  # the first client waits for the first lookup only
    assert seconds_to_close(proxy) < 0.5  # the next ones not at all
    assert connect_failures(proxy, name) == {"no_endpoints": 2}
    kind = failed[0].split()[-1]
    assert proxy.app.routers[0].interpreter.stats.snapshot()["requests"].keys() == {kind}
    assert name_state(proxy, name) == {"outcome": kind, "failed": failed}
    [warning] = dns_log(caplog, name)
    assert all(query in warning for query in failed) and "no answer yet, none to keep" in warning
