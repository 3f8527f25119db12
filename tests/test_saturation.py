"""A listener held back by a limit says so: a log line per episode, a counter, /routers.json.

Issue 23, item 6: 778 of 1,000 clients once sat in the backlog of a listener
at its limit while the log said nothing and no metric moved.
"""

import logging
import re

import pytest
import urllib3

from ltcp.dataplane import holdback
from ltcp.admin.snapshot import snapshot
from netutil import LtcpProcess, echo, recv_exactly, wait_for

http = urllib3.PoolManager(retries=False, timeout=10)


def served(c, message=b"ping"):
    c.sendall(message)
    return recv_exactly(c, len(message)) == message


def routers_json(ltcp):
    response = http.request("GET", ltcp.admin + "/routers.json")
    assert response.status == 200
    return response.json()


def paused_seconds(ltcp, reason):
    """The listener's ltcp_listener_paused_seconds_total for ``reason`` (0 while absent)."""
    text = http.request("GET", ltcp.admin + "/metrics").data.decode()
    found = re.search(r'^ltcp_listener_paused_seconds_total\{[^}]*reason="%s"[^}]*\} (\S+)$' % reason, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_max_concurrency_is_logged_once_counted_shown_and_its_end_logged(backends):
    backend = backends(echo)
    ltcp = LtcpProcess({"admin": {"port": 0}, "routers": [{
        "label": "sat", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a", "maxConcurrency": 3}]}]})
    clients = []
    try:
        clients = [ltcp.connect() for _ in range(3)]
        assert all(served(c) for c in clients)
        waiting = [ltcp.connect() for _ in range(9)]
        clients += waiting
        for c in waiting:
            c.sendall(b"ping")
        wait_for(lambda: "stopped accepting" in ltcp.log, message="the listener to say it stopped")
        assert re.search(r"router sat on 127\.0\.0\.1:\d+ stopped accepting: maxConcurrency 3 reached$", ltcp.log,
                         re.M), ltcp.log
        (shown,) = routers_json(ltcp)["routers"][0]["servers"]
        assert shown["listening"] is False and shown["paused"] == "max_concurrency"
        first = wait_for(lambda: paused_seconds(ltcp, "max_concurrency"), message="the counter to appear")
        wait_for(lambda: paused_seconds(ltcp, "max_concurrency") > first, message="the counter to grow")
        # As each stream ends the listener takes one more client and is held back again: one episode.
        in_service = clients[:3]
        for start in range(0, len(waiting), 3):
            for c in in_service:
                c.close()
            in_service = waiting[start:start + 3]
            assert all(recv_exactly(c, 4) == b"ping" for c in in_service)
        for c in in_service:
            c.close()
        resumed = wait_for(lambda: re.search(r"router sat on \S+ accepting again after ([\d.]+)s \(maxConcurrency 3 "
                                             r"reached; held back (\d+) more times, not logged\)", ltcp.log),
                           timeout=20, message="the listener to say it accepts again")
        assert float(resumed.group(1)) > 0 and int(resumed.group(2)) >= 2
        assert ltcp.log.count("stopped accepting") == 1
        (shown,) = routers_json(ltcp)["routers"][0]["servers"]
        assert shown["listening"] is True and shown["paused"] is None
        assert shown["paused_seconds"]["max_concurrency"] >= first
    finally:
        for c in clients:
            c.close()
        assert ltcp.stop() == 0


@pytest.fixture
def calm_soon(monkeypatch):
    monkeypatch.setattr(holdback, "CALM", 0.2)


def test_the_stream_budget_holds_back_each_listener_that_meets_it(proxies, backends, caplog, calm_soon):
    caplog.set_level(logging.INFO, logger="ltcp")
    backend = backends(echo)
    proxy = proxies({"routers": [{
        "label": "budget", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a"}, {"port": 0, "dstName": "/svc/a"}]}]})
    proxy.call(lambda: setattr(proxy.app.budget, "capacity", 2))
    held = [proxy.connect(0), proxy.connect(0)]
    assert all(served(c) for c in held)
    waiting = [proxy.connect(0), proxy.connect(1)]
    for c in waiting:
        c.sendall(b"ping")

    def paused():
        return [s["paused"] for s in proxy.call(snapshot, proxy.app)["routers"][0]["servers"]]

    wait_for(lambda: paused() == ["stream_budget", "stream_budget"], message="both listeners held back")
    stopped = [r.getMessage() for r in caplog.records if "stopped accepting" in r.getMessage()]
    assert len(stopped) == 2 and all("descriptor budget of 2 streams is in use" in m for m in stopped), stopped
    for c in held:
        c.close()
    assert all(recv_exactly(c, 4) == b"ping" for c in waiting)
    for c in waiting:
        c.close()
    wait_for(lambda: sum("accepting again" in r.getMessage() for r in caplog.records) == 2,
             message="both listeners to say they accept again")
    assert paused() == [None, None]
    seconds = [s["paused_seconds"] for s in proxy.call(snapshot, proxy.app)["routers"][0]["servers"]]
    assert all(s["stream_budget"] > 0 for s in seconds), seconds
