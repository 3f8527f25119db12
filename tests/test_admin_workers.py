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

from netutil import echo, wait_for
from test_workers import document, http, metrics, ping, routers

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
