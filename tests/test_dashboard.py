"""The dashboard at GET / on the admin port, rendered by a real browser (headless Chromium)."""

import json
import os
import signal
import time
import urllib.request

import pytest
from browser import Browser, chromium
from netutil import LtcpProcess, echo, named, recv_exactly, refused_port, wait_for
from test_workers import Load, document, reload_via_sighup, rewrite

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(chromium() is None,
                                 reason="chromium is not installed (apt-get install chromium; .ci/run does)")]

HOSTILE = "/svc/<img src=x onerror=document.title='owned'>"

# What the page shows, read back from its DOM: routers, destinations, and each endpoint's state.
READ_PAGE = """(() => !document.getElementById("instance") ? {updates: 0} : ({
  updates: Number(document.body.dataset.updates || 0),
  title: document.title,
  images: document.querySelectorAll("img").length,
  routers: [...document.querySelectorAll("section.router")].map((r) => r.dataset.label),
  servers: [...document.querySelectorAll("section.router > table td:first-child")].map((td) => td.textContent),
  badges: [...document.querySelectorAll("section.router > table .badge")].map((badge) => badge.textContent),
  destinations: Object.fromEntries([...document.querySelectorAll("section.destination")].map((d) => [
    d.querySelector("h3").textContent,
    Object.fromEntries([...d.querySelectorAll("table tr")].filter((tr) => tr.cells[0].tagName === "TD").map((tr) =>
      [tr.cells[0].textContent, tr.cells[2].textContent]))])),
  instance: document.getElementById("instance").textContent,
}))()"""


@pytest.fixture
def browser():
    started = Browser()
    yield started
    started.close()


def page(browser, condition, message):
    """What the page shows, once ``condition(shown)`` holds."""
    shown = {}

    def check():
        shown.update(browser.evaluate(READ_PAGE) or {})
        return shown.get("updates") and condition(shown)

    wait_for(check, timeout=30, interval=0.2, message=message)
    return shown


def test_the_dashboard_shows_the_routers_state_and_follows_discovery(browser, backends, tmp_path):
    live, later = backends(named("live")), backends(named("later"))
    holder, dead_port = refused_port()
    disco = tmp_path / "disco"
    disco.mkdir()
    # (the dead endpoint is drawn first but once in a million, so the first stream ejects it)
    (disco / "a").write_text(f"127.0.0.1 {live.port}\n127.0.0.1 {dead_port} 1000000\n")
    ltcp = LtcpProcess({
        "workers": 2,
        "admin": {"port": 0},
        "routers": [
            {"label": "files", "interpreter": {"kind": "io.l5d.fs", "rootDir": str(disco), "periodSecs": 0.1},
             "client": {"failFast": {"maxConsecutiveFailures": 1}},
             "servers": [{"port": 0, "dstName": "/svc/a"}]},
            {"label": "odd", "interpreter": {"kind": "io.l5d.static", "names": {HOSTILE: [live.addr]}},
             "servers": [{"port": 0, "dstName": HOSTILE}]},
        ]})
    try:
        for index in (0, 0, 0, 0, 1):  # the dead endpoint fails once (and is ejected); every stream still ends well
            with ltcp.connect(index) as conn:
                assert recv_exactly(conn, 5) == b"live\n"
        browser.open(ltcp.admin + "/")
        shown = page(browser, lambda s: s["destinations"].get("/svc/a", {}).get(f"127.0.0.1:{dead_port}") == "failed",
                     "the failed endpoint shown as failed")
        assert shown["routers"] == ["files", "odd"]
        assert [f"127.0.0.1:{port}" for port in ltcp.ports] == shown["servers"]
        assert shown["destinations"]["/svc/a"][live.addr] == "available"
        assert "serving: 2" in shown["instance"]
        # A name a client could have chosen is text, never markup.
        assert shown["destinations"][HOSTILE] == {live.addr: "available"}
        assert shown["images"] == 0 and shown["title"] == "ltcp"

        (disco / "a.new").write_text(f"127.0.0.1 {live.port}\n127.0.0.1 {dead_port} 1000000\n127.0.0.1 {later.port}\n")
        os.rename(disco / "a.new", disco / "a")
        before = shown["updates"]
        shown = page(browser, lambda s: later.addr in s["destinations"].get("/svc/a", {}),
                     "the new endpoint appears without reloading the page")
        assert shown["updates"] > before and shown["destinations"]["/svc/a"][later.addr] == "available"
        if os.environ.get("LTCP_DASHBOARD_SCREENSHOT"):  # (how the README's picture is made)
            browser.screenshot(os.environ["LTCP_DASHBOARD_SCREENSHOT"])
    finally:
        ltcp.stop()
        holder.close()


def test_a_listener_held_back_wears_a_badge_while_it_is(browser, backends):
    live = backends(named("live"))
    ltcp = LtcpProcess({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [live.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a", "maxConcurrency": 1}]}]})
    held = ltcp.connect()
    waiting = None
    try:
        assert recv_exactly(held, 5) == b"live\n"
        waiting = ltcp.connect()
        browser.open(ltcp.admin + "/")
        page(browser, lambda s: s["badges"] == ["held back: maxConcurrency"], "the badge on the held-back server")
        held.close()
        assert recv_exactly(waiting, 5) == b"live\n"
        waiting.close()
        page(browser, lambda s: s["badges"] == [], "the badge gone once the listener accepts again")
    finally:
        held.close()
        if waiting is not None:
            waiting.close()
        ltcp.stop()


def test_the_page_only_reads_and_forbids_inline_script(tmp_path):
    ltcp = LtcpProcess({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]})
    try:
        with urllib.request.urlopen(ltcp.admin + "/", timeout=10) as response:
            policy = response.headers["Content-Security-Policy"]
            html = response.read().decode()
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "<script src=\"/dashboard.js\"" in html and "http" not in html.split("<body>")[0]  # no CDN
        started = time.time()
        with urllib.request.urlopen(ltcp.admin + "/api/v1/state", timeout=10) as response:
            state = json.load(response)
        assert state["routers"][0]["label"] == "r" and state["time"] >= started - 1
        assert state["instance"]["workers"][0]["state"] == "serving" and state["instance"]["rss_bytes"] > 0
        request = urllib.request.Request(ltcp.admin + "/", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        refused.value.close()  # (an HTTPError holds the answer's connection)
        assert refused.value.code == 405
    finally:
        ltcp.stop()


# Each destination the page shows (the current generation's, and those of generations still draining),
# with the rate it displays; and each server's accepts per second.
READ_RATES = """(() => ({
  updates: Number(document.body.dataset.updates || 0),
  destinations: [...document.querySelectorAll("[data-destination]")].map((d) => [
    d.dataset.destination, d.dataset.generation || "", (d.querySelector(".rate") || {}).textContent || ""]),
  accepts: [...document.querySelectorAll("section.router > table td.accepts")].map((td) => td.textContent),
  history: [...document.querySelectorAll("svg.history")].map((svg) => svg.dataset.points),
}))()"""


def rate(text):
    """The number in a rate as the page shows it ("12.5/s"), or 0 for "-"."""
    return float(text.split("/")[0]) if text and text[0].isdigit() else 0.0


def test_after_reloads_under_load_the_page_shows_the_destination_and_its_rate(browser, backends, instances):
    one, two = backends(echo), backends(echo)
    ltcp = instances(document(one, workers=2))
    load = Load(ltcp.port, threads=3)
    try:
        wait_for(lambda: load.done > 20, timeout=20, message="load to run")
        for n in range(3):
            rewrite(ltcp, document(two if n % 2 == 0 else one, workers=2))
            reload_via_sighup(ltcp, expect=True)
        browser.open(ltcp.admin + "/")
        shown = {}

        def rates_shown():
            # The page polls as fast as its fetches allow, far faster than the state's 1 s cache:
            # rates computed in the page from successive answers were never shown so.
            browser.fast_forward(20_000)
            shown.update(browser.evaluate(READ_RATES))
            current = [rate(text) for name, generation, text in shown["destinations"] if name == "/svc/a"
                       and not generation]
            return current and current[0] > 0 and all(rate(text) > 0 for text in shown["accepts"])

        wait_for(rates_shown, timeout=30, interval=0.2, message="a nonzero rate for /svc/a")
        assert shown["updates"] > 5 and shown["accepts"]
        assert max(int(points) for points in shown["history"]) >= 1
    finally:
        done, errors = load.stop()
    assert errors == [] and done > 0


def test_a_worker_that_stopped_answering_is_named_on_the_page(browser, backends, instances):
    ltcp = instances(document(backends(echo), workers=2))
    stopped = ltcp.workers[0]
    browser.open(ltcp.admin + "/")
    page(browser, lambda s: "serving: 2" in s["instance"], "the page to show both workers")
    os.kill(stopped, signal.SIGSTOP)
    try:
        shown = page(browser, lambda s: f"worker {stopped}: counts from" in s["instance"], "the stale worker named")
        assert "not answering" in shown["instance"]
    finally:
        os.kill(stopped, signal.SIGCONT)
    page(browser, lambda s: "not answering" not in s["instance"], "the worker answering again")
