"""The process model, end to end: a supervisor, N workers, reloads, upgrades and faults.

Each test runs ``python -m ltcp FILE`` as an operator would and drives it with
real clients, signals and admin requests.
"""

import json
import os
import re
import resource
import signal
import socket
import ssl
import threading
import time

import pytest
import urllib3
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ltcp.testing.namerd import NamerdServer
from netutil import echo, recv_all, recv_exactly, wait_for

pytestmark = pytest.mark.timeout(120)

http = urllib3.PoolManager(retries=False, timeout=10)


def metrics(ltcp):
    response = http.request("GET", ltcp.admin + "/metrics")
    assert response.status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.data.decode()) for s in family.samples}


def routers(ltcp):
    response = http.request("GET", ltcp.admin + "/routers.json")
    assert response.status == 200, response.data
    return json.loads(response.data)


def serving(ltcp):
    """Pids of the workers serving the newest generation."""
    state = routers(ltcp)
    return sorted(w["pid"] for w in state["workers"]
                  if w["generation"] == state["generation"] and w["state"] == "serving")


def alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:  # (it may be reaped between the two)
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def document(backend, workers=2, servers=None, **top):
    return {"workers": workers, "admin": {"port": 0, "graceSecs": 10}, **top, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": servers or [{"port": 0, "dstName": "/svc/a"}]}]}


def rewrite(ltcp, config):
    with open(ltcp.path, "w") as f:
        yaml.safe_dump(config, f)


def reload_via_sighup(ltcp, expect):
    def outcomes():
        return ltcp.log.count("reload: generation"), ltcp.log.count("reload failed")

    succeeded, failed = outcomes()
    ltcp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: outcomes() != (succeeded, failed), timeout=40, message="the reload to finish")
    assert outcomes() == ((succeeded + 1, failed) if expect else (succeeded, failed + 1)), ltcp.log[-3000:]


def ping(port, payload=b"ping", context=None, server_name=None):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) if context else raw as sock:
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
            return True


class Load:
    """Short connections, one after another on a few threads, each checked; every failure kept."""

    def __init__(self, port, threads=4, **connect):
        self.port, self.connect = port, connect
        self.done, self.errors = 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index):
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                ping(self.port, f"{index}:{n}".encode(), **self.connect)
                self.done += 1
            except (OSError, AssertionError) as exc:
                self.errors.append(repr(exc))

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(15)
        return self.done, self.errors


class LongStream:
    """One connection carrying numbered chunks both ways for as long as the test runs; checked byte for byte."""

    CHUNK = 4096

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sent = 0
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                chunk = (b"%08d" % self.sent) * (self.CHUNK // 8)
                self.sock.sendall(chunk)
                assert recv_exactly(self.sock, len(chunk)) == chunk
                self.sent += 1
                time.sleep(0.005)  # a slow, steady stream
        except (OSError, AssertionError) as exc:
            self.error = repr(exc)

    def finish(self):
        self._stop.set()
        self._thread.join(15)
        self.sock.shutdown(socket.SHUT_WR)
        rest = recv_all(self.sock)
        self.sock.close()
        return self.error, self.sent, rest


def test_two_workers_serve_one_instance_and_admin_counts_every_connection(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    assert len(ltcp.workers) == 2
    connections = 300
    clients = [socket.create_connection(("127.0.0.1", ltcp.port), timeout=10) for _ in range(connections)]
    for i, c in enumerate(clients):  # all open at once, so the kernel must hand them to both workers
        c.sendall(b"%d" % i)
    for i, c in enumerate(clients):
        assert recv_exactly(c, len(b"%d" % i)) == b"%d" % i
        c.close()
    samples = metrics(ltcp)
    assert samples[("ltcp_accepted_total", (("router", "r"), ("server", f"127.0.0.1:{ltcp.port}")))] == connections
    assert samples[("ltcp_workers", (("state", "serving"),))] == 2
    assert samples[("ltcp_worker_restarts_total", ())] == 0
    state = routers(ltcp)
    assert state["generation"] == 1
    assert sorted(w["pid"] for w in state["workers"]) == sorted(ltcp.workers)
    accepted = [w["accepted"] for w in state["workers"]]
    assert sum(accepted) == connections
    # A worker sees at most the other's share of a burst plus its own: both take part.
    assert min(accepted) > 0, accepted


def test_one_discovery_watch_per_name_whatever_the_number_of_workers(instances, backends):
    backend = backends(echo)
    namerd = NamerdServer().start()
    try:
        namerd.set("/svc/a", [backend.addr])
        config = {"workers": 2, "admin": {"port": 0}, "routers": [{
            "label": "n", "interpreter": {"kind": "io.l5d.namerd.http", "baseUrl": namerd.url, "periodSecs": 1},
            "servers": [{"port": 0, "dstName": "/svc/a"}]}]}
        ltcp = instances(config)
        # An idle worker first in the kernel's line takes every connection (EPOLLEXCLUSIVE): keep it
        # busy with clients in parallel until the other has taken some too, so both route to /svc/a.
        def round_trips(stop):
            while not stop.is_set():
                with socket.create_connection(("127.0.0.1", ltcp.port), timeout=10) as c:
                    c.sendall(b"hi")
                    assert recv_exactly(c, 2) == b"hi"

        stop = threading.Event()
        clients = [threading.Thread(target=round_trips, args=(stop,)) for _ in range(16)]
        for thread in clients:
            thread.start()
        try:
            wait_for(lambda: all(w["accepted"] > 0 for w in routers(ltcp)["workers"]), interval=0.1,
                     message="both workers to take a connection")
        finally:
            stop.set()
            for thread in clients:
                thread.join(10)
        assert namerd.requests("/svc/a") == 1 and namerd.watchers("/svc/a") == 1
    finally:
        namerd.close()


def test_a_bad_configuration_is_refused_line_by_line_and_the_old_one_keeps_serving(instances, backends):
    backend = backends(echo)
    ltcp = instances(document(backend, workers=1))
    held = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    held.sendall(b"a")
    assert recv_exactly(held, 1) == b"a"
    with open(ltcp.path, "w") as f:
        f.write("workers: 0\nrouters:\n- label: r\n  interpreter: {kind: io.l5d.static, names: {}}\n"
                "  servers: [{port: 99999, dstName: /svc/a}]\n")
    reload_via_sighup(ltcp, expect=False)
    assert "reload refused: " in ltcp.log and "workers: must be an integer 1..1024 or auto" in ltcp.log
    assert "servers[0].port: must be an integer 0..65535" in ltcp.log
    samples = metrics(ltcp)
    assert samples[("ltcp_config_reloads_total", (("outcome", "failure"),))] == 1
    assert samples[("ltcp_config_reloads_total", (("outcome", "success"),))] == 0
    assert serving(ltcp) == sorted(ltcp.workers)  # nothing restarted
    held.sendall(b"b")
    assert recv_exactly(held, 1) == b"b"
    assert ping(ltcp.port)
    held.close()


def test_post_reload_applies_a_new_endpoint_list_and_refuses_cross_site_requests(instances, backends):
    first, second = backends(echo), backends(echo)
    ltcp = instances(document(first, workers=2))
    assert ping(ltcp.port) and first.accepted == 1
    refused = http.request("POST", ltcp.admin + "/reload", headers={
        "Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert refused.status == 403
    rewrite(ltcp, document(second, workers=2))
    answer = http.request("POST", ltcp.admin + "/reload")
    assert answer.status == 200, answer.data
    assert b"generation 2 serving with 2 workers" in answer.data
    for _ in range(10):
        assert ping(ltcp.port)
    assert first.accepted == 1 and second.accepted == 10
    samples = metrics(ltcp)
    assert samples[("ltcp_config_reloads_total", (("outcome", "success"),))] == 1
    assert time.time() - samples[("ltcp_config_last_reload_success_timestamp_seconds", ())] < 30
    wait_for(lambda: not any(alive(pid) for pid in ltcp.workers), timeout=20, message="old workers to exit")
    # Counters survive the workers that counted them.
    assert metrics(ltcp)[("ltcp_accepted_total", (("router", "r"), ("server", f"127.0.0.1:{ltcp.port}")))] == 11


@pytest.mark.timeout(240)
def test_reloads_under_load_drop_nothing(instances, backends, certificates, tmp_path):
    """Endpoint lists, a new listener, a removed one and a new certificate, each under load: nothing lost."""
    identity, install_certificate, tls_client, cas = certificates
    one, two = backends(echo), backends(echo)
    extra = socket.socket()  # a port for the listener added and removed, reserved until then
    extra.bind(("127.0.0.1", 0))
    extra_port = extra.getsockname()[1]
    extra.close()

    def config(backend, with_extra):
        servers = [{"port": 0, "dstName": "/svc/a"},
                   {"port": 0, "dstName": "/svc/a", "tls": {"defaultIdentity": identity}}]
        if with_extra:
            servers.append({"port": extra_port, "dstName": "/svc/a"})
        return document(backend, workers=2, servers=servers)

    ltcp = instances(config(one, False))
    plain_port, tls_port = ltcp.ports
    loads = [Load(plain_port, threads=3),
             Load(tls_port, threads=1, context=tls_client, server_name="web.example.com")]
    streams = [LongStream(plain_port) for _ in range(6)]
    wait_for(lambda: all(load.done > 20 for load in loads), timeout=20, message="load to run")
    steps = [
        (config(two, False), None),  # a new endpoint list
        (config(two, True), None),  # a new listener
        (config(one, True), None),
        (config(one, False), None),  # that listener removed
        (config(two, False), 1),  # a new certificate on disk
    ]
    extra_load = None
    for generation, (new_config, certificate) in enumerate(steps, start=2):
        if certificate is not None:
            install_certificate(certificate)
        rewrite(ltcp, new_config)
        if extra_load is not None and generation == 5:
            done, errors = extra_load.stop()  # stopped before its listener goes
            assert errors == [] and done > 0
        reload_via_sighup(ltcp, expect=True)
        if generation == 3:
            extra_load = Load(extra_port, threads=1)
        counts = [load.done for load in loads]
        wait_for(lambda counts=counts: all(load.done > count + 20 for load, count in zip(loads, counts)), timeout=20,
                 message=f"load to go on after reload {generation - 1}")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", extra_port), timeout=5)
    for load in loads:
        done, errors = load.stop()
        assert errors == [], errors[:5]
        assert done > 100
    for stream in streams:
        error, sent, rest = stream.finish()
        assert error is None and rest == b"" and sent > 50
    second_ca = ssl.create_default_context(cadata=cas[1].cert_pem.bytes().decode())
    assert ping(tls_port, context=second_ca, server_name="web.example.com")  # the new certificate serves
    samples = metrics(ltcp)
    assert samples[("ltcp_config_reloads_total", (("outcome", "success"),))] == len(steps)
    assert routers(ltcp)["generation"] == len(steps) + 1
    failures = [k for k, v in samples.items() if k[0] == "ltcp_stream_failures_total" and v]
    assert failures == [], failures


def test_a_killed_worker_is_replaced_at_once_and_the_others_streams_are_untouched(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    clients = [socket.create_connection(("127.0.0.1", ltcp.port), timeout=10) for _ in range(40)]
    for c in clients:
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
    before = {w["pid"]: w["streams"] for w in routers(ltcp)["workers"]}
    victim, survivor = sorted(before, key=before.get)  # kill the one with fewer streams, keep the other's
    assert before[survivor] > 0
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: len(serving(ltcp)) == 2 and victim not in serving(ltcp), timeout=5,
             message="a replacement worker")
    assert time.monotonic() - killed_at < 1.5
    assert metrics(ltcp)[("ltcp_worker_restarts_total", ())] == 1
    working = 0
    for c in clients:
        try:
            c.sendall(b"y")
            working += recv_exactly(c, 1) == b"y"
        except (OSError, AssertionError):
            pass
        c.close()
    assert working == before[survivor]
    assert "worker %d exited unexpectedly (killed by SIGKILL); restarting it" % victim in ltcp.log
    assert ping(ltcp.port)


def test_restarts_back_off_when_a_worker_keeps_dying():
    from ltcp.process.fleet import MAX_RESTART_DELAY, restart_delay
    delays = [restart_delay(n) for n in range(1, 12)]
    assert delays[0] == 0  # the first death: replaced at once
    assert all(a < b for a, b in zip(delays[1:], delays[2:]) if b < MAX_RESTART_DELAY)
    assert delays[-1] == MAX_RESTART_DELAY


def test_when_the_supervisor_dies_its_workers_drain_and_exit(instances, backends):
    ltcp = instances(document(backends(echo), workers=2, admin={"port": 0, "graceSecs": 2}))
    held = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    held.sendall(b"a")
    assert recv_exactly(held, 1) == b"a"
    ltcp.proc.kill()
    ltcp.proc.wait(10)
    # Each notices by its parent-death signal or its channel's end, whichever comes first.
    wait_for(lambda: ltcp.log.count("drain started") == 2, message="workers to notice")
    held.sendall(b"b")  # the stream carries on while it drains
    assert recv_exactly(held, 1) == b"b"
    with pytest.raises(OSError):
        ping(ltcp.port)  # nobody accepts any more
    wait_for(lambda: not any(alive(pid) for pid in ltcp.workers), timeout=10, message="workers to exit")
    held.close()


@pytest.mark.timeout(180)
def test_an_upgrade_re_executes_the_supervisor_without_dropping_a_connection(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    load = Load(ltcp.port, threads=3)
    streams = [LongStream(ltcp.port) for _ in range(4)]
    wait_for(lambda: load.done > 20, message="load to run")
    supervisor = ltcp.proc.pid
    accepted = ("ltcp_accepted_total", (("router", "r"), ("server", f"127.0.0.1:{ltcp.port}")))
    before = metrics(ltcp)[accepted]
    ltcp.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: "received SIGUSR2" in ltcp.log, message="the upgrade to begin")
    ltcp.proc.send_signal(signal.SIGHUP)  # during the check or the exec: kept for the new code
    wait_for(lambda: "upgrade: generation 2 serving; 2 workers of the previous ltcp draining" in ltcp.log, timeout=60,
             message="the new supervisor to serve")
    wait_for(lambda: "reload: generation 3 serving" in ltcp.log, timeout=60, message="the SIGHUP, then")
    assert "upgrade: executing" in ltcp.log
    count = load.done
    wait_for(lambda: load.done > count + 50, timeout=20, message="load to go on")
    done, errors = load.stop()
    assert errors == [], errors[:5]
    for stream in streams:
        error, sent, rest = stream.finish()
        assert error is None and rest == b"" and sent > 10
    wait_for(lambda: not any(alive(pid) for pid in ltcp.workers), timeout=20, message="old workers to exit")
    assert ltcp.proc.pid == supervisor and ltcp.proc.poll() is None
    new_workers = serving(ltcp)
    assert len(new_workers) == 2 and not set(new_workers) & set(ltcp.workers)
    # Counts carried over, once each: every connection made, no more (the old workers' counted by them).
    wait_for(lambda: metrics(ltcp)[accepted] == done + len(streams), timeout=10,
             message=f"{done + len(streams)} connections counted")
    assert metrics(ltcp)[accepted] >= before
    assert metrics(ltcp)[("ltcp_config_reloads_total", (("outcome", "success"),))] == 2


def test_an_upgrade_that_cannot_listen_is_refused_before_anything_changes(instances, backends):
    backend = backends(echo)
    ltcp = instances(document(backend, workers=2))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        rewrite(ltcp, document(backend, workers=2, servers=[
            {"port": 0, "dstName": "/svc/a"}, {"port": taken.getsockname()[1], "dstName": "/svc/a"}]))
        ltcp.proc.send_signal(signal.SIGUSR2)
        ltcp.proc.send_signal(signal.SIGHUP)  # at once: a reload, refused for the same reason
        wait_for(lambda: ltcp.log.count("reload failed") == 2, timeout=60, message="both refusals")
    finally:
        taken.close()
    assert re.search(r"upgrade refused: cannot listen on 127\.0\.0\.1:\d+: Address already in use", ltcp.log)
    assert "upgrade: executing" not in ltcp.log
    assert serving(ltcp) == sorted(ltcp.workers) and ping(ltcp.port)
    assert metrics(ltcp)[("ltcp_config_reloads_total", (("outcome", "failure"),))] == 2
    reload_via_sighup(ltcp, expect=True)  # the address is free now
    assert ping(ltcp.port) and ping(ltcp.ports[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_every_worker(instances, backends, workers):
    ltcp = instances(document(backends(echo), workers=workers, admin={"port": 0, "graceSecs": 5}))
    held = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    held.sendall(b"a")
    assert recv_exactly(held, 1) == b"a"
    ltcp.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: ltcp.log.count("drain started") == workers, message="every worker to drain")
    held.sendall(b"b")
    assert recv_exactly(held, 1) == b"b"
    held.close()
    assert ltcp.proc.wait(10) == 0
    assert not any(alive(pid) for pid in ltcp.workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_every_discovery_kind_and_intake_feature_works_through_workers(instances, backends, certificates,
                                                                      tmp_path, workers):
    """fs, namerd, SNI routing over terminated TLS, and PROXY headers, each through the supervisor's workers."""
    identity, _, tls_client, _ = certificates
    backend = backends(echo)
    (tmp_path / "disco").mkdir()
    (tmp_path / "disco" / "a").write_text(f"127.0.0.1 {backend.port}\n")
    namerd = NamerdServer().start()
    namerd.set("/svc/a", [backend.addr])
    static = {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr], "/svc/web.example.com": [backend.addr]}}
    config = {"workers": workers, "admin": {"port": 0}, "routers": [
        {"label": "fs", "interpreter": {"kind": "io.l5d.fs", "rootDir": str(tmp_path / "disco")},
         "servers": [{"port": 0, "dstName": "/svc/a"}]},
        {"label": "namerd", "interpreter": {"kind": "io.l5d.namerd.http", "baseUrl": namerd.url},
         "servers": [{"port": 0, "dstName": "/svc/a"}]},
        {"label": "sni", "interpreter": static,
         "servers": [{"port": 0, "dstName": "/svc/{sni}", "tls": {"defaultIdentity": identity}}]},
        {"label": "proxy", "interpreter": static,
         "servers": [{"port": 0, "dstName": "/svc/a", "proxyProtocol": "accept"}]},
    ]}
    try:
        ltcp = instances(config)
        fs_port, namerd_port, sni_port, proxy_port = ltcp.ports
        for _ in range(4):
            assert ping(fs_port) and ping(namerd_port)
            assert ping(sni_port, context=tls_client, server_name="web.example.com")
            with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as c:
                c.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 1111 2222\r\nhello")
                assert recv_exactly(c, 5) == b"hello"
        samples = metrics(ltcp)
        for label, port in (("fs", fs_port), ("namerd", namerd_port), ("sni", sni_port), ("proxy", proxy_port)):
            assert samples[("ltcp_accepted_total", (("router", label), ("server", f"127.0.0.1:{port}")))] == 4
        assert namerd.requests("/svc/a") == 1
        assert len(routers(ltcp)["workers"]) == workers
    finally:
        namerd.close()


def test_a_second_upgrade_while_the_first_ones_workers_drain(instances, backends):
    ltcp = instances(document(backends(echo), workers=1, admin={"port": 0, "graceSecs": 30}))
    held = socket.create_connection(("127.0.0.1", ltcp.port), timeout=10)
    held.sendall(b"a")
    assert recv_exactly(held, 1) == b"a"  # keeps the first worker draining through both upgrades
    for generation in (2, 3):
        ltcp.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda generation=generation: f"upgrade: generation {generation} serving" in ltcp.log,
                 timeout=60, message=f"upgrade to generation {generation}")
        assert ping(ltcp.port)
    held.sendall(b"b")
    assert recv_exactly(held, 1) == b"b"
    held.close()
    wait_for(lambda: not any(alive(pid) for pid in ltcp.workers), timeout=20, message="the first worker to exit")
    assert ltcp.proc.poll() is None and len(serving(ltcp)) == 1


def test_a_reload_that_cannot_start_its_workers_leaves_none_behind(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    soft, hard = resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{ltcp.proc.pid}/fd"))
    resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE, (in_use + 2, hard))  # room for one worker's channel
    try:
        reload_via_sighup(ltcp, expect=False)
    finally:
        resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert "cannot start a worker" in ltcp.log
    wait_for(lambda: len(routers(ltcp)["workers"]) == 2, timeout=20, message="the half-started generation to go")
    assert serving(ltcp) == sorted(ltcp.workers) and ping(ltcp.port)
    assert metrics(ltcp)[("ltcp_config_reloads_total", (("outcome", "failure"),))] == 1
