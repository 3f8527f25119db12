"""The admin server of a supervisor and its workers: stuck workers, no worker serving, generations.

Each test runs ``python -m ltcp FILE`` with workers and reads its admin pages as
a scraper or a dashboard would.
"""

import collections
import json
import os
import re
import signal
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netutil import echo, recv_all, recv_exactly, refused_port, wait_for
from test_workers import document, http, metrics, ping, reload_via_sighup, rewrite, routers

pytestmark = pytest.mark.timeout(120)


def timed_get(ltcp, path):
    """(status, seconds) of one GET."""
    started = time.monotonic()
    response = http.request("GET", ltcp.admin + path)
    return response.status, time.monotonic() - started


def worker_entry(ltcp, pid):
    return next(w for w in routers(ltcp)["workers"] if w["pid"] == pid)


def test_a_stopped_worker_is_served_stale_at_once_and_fresh_again_once_it_answers(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    for _ in range(10):
        assert ping(ltcp.port)
    assert all(not w["stale"] for w in routers(ltcp)["workers"])  # both answered once: each has counts
    stopped, running = ltcp.workers
    os.kill(stopped, signal.SIGSTOP)
    try:
        # Each once took 5 s (the snapshot timeout), every time: a scrape that waits on two is lost.
        answers = [timed_get(ltcp, path) for path in ("/metrics", "/routers.json", "/api/v1/state", "/metrics")]
        assert all(status == 200 and seconds < 1.0 for status, seconds in answers), answers
        wait_for(lambda: worker_entry(ltcp, stopped)["snapshot_age_secs"] > 1.0, timeout=10,
                 message="the stopped worker's snapshot to age")
        shown = worker_entry(ltcp, stopped)
        assert shown["stale"] and shown["state"] == "serving"
        assert not worker_entry(ltcp, running)["stale"]
        age = metrics(ltcp)[("ltcp_worker_snapshot_age_seconds", (("pid", str(stopped)),))]
        assert age > 1.0
        assert metrics(ltcp)[("ltcp_worker_snapshot_age_seconds", (("pid", str(running)),))] < 1.0
    finally:
        os.kill(stopped, signal.SIGCONT)
    wait_for(lambda: not worker_entry(ltcp, stopped)["stale"], timeout=10, message="the worker to answer again")
    assert worker_entry(ltcp, stopped)["snapshot_age_secs"] < 1.0
    assert "did not answer a snapshot within 0.5s: showing its last one, as stale" in ltcp.log


class Killer:
    """Kills the newest worker every ``period`` seconds, as a crash loop would, until stopped."""

    def __init__(self, ltcp, period=0.3):
        self.ltcp, self.period, self.kills = ltcp, period, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.period):  # (the rhythm of the faults, not a wait for a condition)
            pid = int(re.findall(r"worker (\d+) started", self.ltcp.log)[-1])
            try:
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass  # dead already, and its replacement not started yet

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def test_with_no_worker_serving_every_page_answers_and_says_so(instances, backends):
    ltcp = instances(document(backends(echo), workers=1))
    killer = Killer(ltcp)
    statuses, seen = collections.Counter(), collections.Counter()

    def outage_seen():
        for path in ("/metrics", "/routers.json", "/api/v1/state"):
            response = http.request("GET", ltcp.admin + path)
            statuses[response.status] += 1
            if response.status != 200:
                continue
            if path == "/metrics":
                samples = {(s.name, tuple(s.labels.items())): s.value
                           for family in text_string_to_metric_families(response.data.decode()) for s in family.samples}
                assert ("ltcp_worker_restarts_total", ()) in samples and ("process_open_fds", ()) in samples
                seen["metrics"] += samples[("ltcp_workers", (("state", "serving"),))] == 0
            else:
                state = json.loads(response.data)
                workers = state["workers"] if path == "/routers.json" else state["instance"]["workers"]
                seen[path] += not any(w["state"] == "serving" for w in workers)
        return len(seen) == 3 and killer.kills >= 3

    try:
        # Once 503 "the data plane did not answer in time" exactly then: 18% of scrapes, all with one worker.
        wait_for(outage_seen, timeout=60, interval=0.05, message="every page seen with no worker serving")
    finally:
        killer.stop()
    assert set(statuses) == {200}, statuses


def two_servers(interpreter):
    # (streams stay with their generation here, which is what these tests look at: no hand-over)
    return {"workers": 2, "handOver": False, "admin": {"port": 0, "graceSecs": 30}, "routers": [{
        "label": "r", "interpreter": interpreter,
        "servers": [{"port": 0, "dstName": "/svc/a"}, {"port": 0, "dstName": "/svc/dead", "connectTimeoutMs": 2000}]}]}


def fails(ltcp):
    """A stream to /svc/dead, whose only endpoint refuses: it is closed, having counted connect failures."""
    with ltcp.connect(1) as conn:
        return recv_all(conn) == b""


def test_routers_json_shows_the_current_generation_and_the_draining_one_apart(instances, backends, tmp_path):
    old, new = backends(echo), backends(echo)
    holder, dead_port = refused_port()
    ltcp = instances(two_servers({"kind": "io.l5d.static", "names": {
        "/svc/a": [old.addr], "/svc/dead": [f"127.0.0.1:{dead_port}"]}}))
    held = ltcp.connect(0)  # a stream of generation 1, open through the reload
    held.sendall(b"held")
    assert recv_exactly(held, 4) == b"held"
    assert fails(ltcp)
    accepted = ("ltcp_accepted_total", (("router", "r"), ("server", f"127.0.0.1:{ltcp.port}")))
    refused = ("ltcp_connect_failures_total", (("cause", "refused"), ("dst", "/svc/dead"), ("router", "r")))
    before = metrics(ltcp)
    disco = tmp_path / "disco"
    disco.mkdir()
    (disco / "a").write_text(f"127.0.0.1 {new.port}\n")
    (disco / "dead").write_text(f"127.0.0.1 {dead_port}\n")
    rewrite(ltcp, two_servers({"kind": "io.l5d.fs", "rootDir": str(disco)}))
    reload_via_sighup(ltcp, expect=True)
    assert ping(ltcp.port) and fails(ltcp)

    state = routers(ltcp)
    (router,) = state["routers"]
    # Once: io.l5d.static, and /svc/a with both generations' endpoints, for the whole grace period.
    assert router["interpreter"] == "io.l5d.fs"
    endpoints = {d["name"]: [e["address"] for e in d["endpoints"]] for d in router["destinations"]}
    assert endpoints["/svc/a"] == [new.addr]
    (draining,) = state["draining_generations"]
    (old_router,) = draining["routers"]
    assert (draining["generation"], old_router["interpreter"], old_router["streams"]) == (1, "io.l5d.static", 1)
    open_streams = {d["name"]: {e["address"]: e["open"] for e in d["endpoints"]} for d in old_router["destinations"]}
    assert open_streams["/svc/a"] == {old.addr: 1}
    assert {d["name"]: d["active"] for d in old_router["destinations"]}["/svc/a"] == 1
    # Counters add up over every worker of every generation ...
    during = metrics(ltcp)
    assert during[accepted] == before[accepted] + 1 and during[refused] > before[refused]
    # ... and stay when the old generation's workers have finished.
    held.close()
    wait_for(lambda: routers(ltcp)["draining_generations"] == [], timeout=20, message="generation 1 to finish")
    after = metrics(ltcp)
    assert (after[accepted], after[refused]) == (during[accepted], during[refused])
    holder.close()
