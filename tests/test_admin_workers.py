"""The admin server of a supervisor and its workers: stuck workers, no worker serving, generations.

Each test runs ``python -m ltcp FILE`` with workers and reads its admin pages as
a scraper or a dashboard would.
"""

import os
import signal
import time

import pytest

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
