"""The admin server: metrics, live state, shutdown.

    GET  /               the dashboard: a page that polls /api/v1/state
    GET  /api/v1/state   /routers.json's content plus the instance (workers, uptime, reloads, memory)
    GET  /metrics        Prometheus text exposition
    GET  /routers.json   routers, servers, destinations and endpoints, live
    POST /reload         re-read the configuration file (as SIGHUP does)
    POST /shutdown       graceful drain (answers at once)
    POST /abort          exit 1 immediately

HEAD is served wherever GET is (the same answer without its body).

It runs on control-plane threads (``httpd``) and reaches data-plane state only
through its ``view``: the supervisor's (which asks every worker for a
snapshot over its control channel and merges them) or ``ReactorView``'s (a
reactor round trip in this process).  A page is rendered at
most once per ``CACHE_SECS``, however many clients ask, so scrapes and open
dashboards cost the data plane a few snapshots a second at most; and while
its last rendering is fresh, the server's own thread answers at once
(``answer_at_once``), without a handler thread's turn: a third less of the
supervisor's CPU per scrape.

Browsers are the threat: any web page can make one send a simple POST to
127.0.0.1, and a DNS-rebinding page can read answers too.  So every request
must name this server in ``Host`` (its address, any loopback name, or any IP
literal when it listens on all addresses), and a POST is refused if it
comes from another origin (``Origin``, ``Sec-Fetch-Site``).  Tools such as
curl send neither header and are served.
"""

import concurrent.futures
import importlib.resources
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.parse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .httpd import HttpServer, Response, plain
from ..names import display_address
from .. import __version__
from .metrics import LtcpCollector, ProcessCollector, on_reactor, resident_bytes
from .rates import Rates, annotate, counters
from .snapshot import MAX_LISTED_ENDPOINTS, routers_json, snapshot

__all__ = ["AdminServer", "ReactorView", "exposure_warning", "refusal"]

log = logging.getLogger(__name__)

CACHE_SECS = 1.0
DASHBOARD_ENDPOINTS = 20  # endpoints the dashboard's state lists per destination (all are counted)


def _host_part(authority):
    """The host of ``host[:port]`` or ``[v6][:port]``, lowercased; None if it cannot be one."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        host, sep, _ = authority[1:].partition("]")
        return host if sep else None
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _names_this_server(host, admin_ip):
    """Whether a Host header's host can only mean this admin server (no DNS rebinding)."""
    if host is None:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name: an attacker's name may point here
    listening = ipaddress.ip_address(admin_ip)
    return address.is_loopback or address == listening or listening.is_unspecified


def _authority(origin):
    """The ``host[:port]`` of an Origin header, lowercased; None for "null" or anything unparsable."""
    try:
        return urllib.parse.urlsplit(origin).netloc.lower() or None
    except ValueError:
        return None


def refusal(method, headers, admin_ip):
    """Why a request must be refused with 403, or None; ``headers`` has a case-insensitive ``get``."""
    host = headers.get("Host")
    if host is not None and not _names_this_server(_host_part(host), admin_ip):
        return f"Host {host!r} is not this admin server"
    if method not in ("GET", "HEAD"):  # (only reads)
        origin = headers.get("Origin")
        if origin is not None and (host is None or _authority(origin) != host.strip().lower()):
            return f"a {method} from another origin ({origin})"
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            return f"a {method} from a {site} page"
    return None


def exposure_warning(admin_ip):
    """What an admin address exposes beyond this host, or None for loopback."""
    if ipaddress.ip_address(admin_ip).is_loopback:
        return None
    return ("is reachable from other hosts: anyone who can connect reads every metric and destination "
            "name and can stop ltcp (POST /shutdown, /abort); keep it on loopback or a management network")


class _Cached:
    """The last rendering of a page, reused for ``CACHE_SECS``; concurrent requests share one rendering."""

    def __init__(self, render, content_type, headers=()):
        self._render = render
        self._content_type = content_type
        self._headers = headers
        self._lock = threading.Lock()
        self._last = None  # (monotonic time, body): one attribute, read without the lock

    def response(self):
        """The page, rendered now unless the last rendering is fresh (waiting for a rendering under way)."""
        with self._lock:
            last = self._last
            if not _fresh(last):
                last = self._last = (time.monotonic(), self._render())
        return self._page(last[1])

    def fresh_response(self):
        """The page if its last rendering is fresh, else None: never renders, never waits."""
        last = self._last
        return self._page(last[1]) if _fresh(last) else None

    def _page(self, body):
        return Response(200, body, content_type=self._content_type, headers=self._headers)


def _fresh(last):
    """Whether a (monotonic time, body) rendering is recent enough to serve again."""
    return last is not None and time.monotonic() - last[0] < CACHE_SECS


class ReactorView:
    """What the admin server shows of one App running in this process (tests, embedding)."""

    def __init__(self, app):
        self.app = app
        self.started_at = time.time()

    def snapshot(self, listed=0):
        return on_reactor(self.app.reactor, lambda: snapshot(self.app, listed))

    def families(self, data):
        return []

    def instance(self):
        return {"version": __version__, "pid": os.getpid(), "started": self.started_at,
                "uptime_secs": time.time() - self.started_at, "workers": [], "reloads": {}, "restarts": 0,
                "draining": self.app.draining, "rss_bytes": resident_bytes(os.getpid())}

    def drain(self):
        self.app.request_drain()

    def abort(self):
        exit_now()

    def reload(self):
        """Only a supervisor can reload: a Future of the reason it cannot, for the client."""
        outcome = concurrent.futures.Future()
        outcome.set_result((False, "this process has no supervisor to reload it"))
        return outcome


class AdminServer:
    def __init__(self, view, config):
        self.view = view
        self.ip = config.ip
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LtcpCollector(view))
        self.registry.register(ProcessCollector())  # process_*: the names dashboards expect
        self._pages = {
            "/metrics": _Cached(lambda: generate_latest(self.registry), CONTENT_TYPE_LATEST),
            "/routers.json": _Cached(lambda: json.dumps(routers_json(view.snapshot(MAX_LISTED_ENDPOINTS)),
                                                        indent=2).encode() + b"\n", "application/json"),
            "/api/v1/state": _Cached(self._render_state, "application/json", [("Cache-Control", "no-store")]),
        }
        self._rates = Rates()  # (used by _render_state alone, under its cache's lock)
        self._routes = {"/": ("GET", _asset("index.html", "text/html; charset=utf-8")),
                        "/dashboard.js": ("GET", _asset("dashboard.js", "text/javascript; charset=utf-8")),
                        "/dashboard.css": ("GET", _asset("dashboard.css", "text/css; charset=utf-8")),
                        **{path: ("GET", page.response) for path, page in self._pages.items()},
                        "/reload": ("POST", self._reload), "/shutdown": ("POST", self._shutdown),
                        "/abort": ("POST", self._abort)}
        self._http = HttpServer((config.ip, config.port), self.handle, name="admin", at_once=self.answer_at_once)
        self.address = self._http.address
        warning = exposure_warning(config.ip)
        if warning:
            log.warning("the admin server on %s %s", self.display_address, warning)

    @property
    def display_address(self):
        return display_address(self.address)

    def start(self):
        self._http.start()
        log.info("admin server on http://%s/", self.display_address)

    def close(self):
        self._http.close()

    def answer_at_once(self, request):
        """The answer to ``request`` if it is a page rendered a moment ago (served on the server's own thread,
        so it must never wait), else None: the request goes to a handler thread."""
        page = self._pages.get(request.path)
        if page is None or request.method not in ("GET", "HEAD"):
            return None
        if refusal(request.method, request.headers, self.ip) is not None:
            return None  # (a handler thread refuses it, and logs why)
        return page.fresh_response()

    def handle(self, request):
        """One complete request -> Response (on an httpd handler thread)."""
        refused = refusal(request.method, request.headers, self.ip)
        if refused is not None:
            log.debug("admin: refused %s %s: %s", request.method, request.path, refused)
            return plain(403, f"refused: {refused}")
        route = self._routes.get(request.path)
        if route is None:
            return plain(404, "not found")
        method, action = route
        allowed = ("GET", "HEAD") if method == "GET" else (method,)  # (httpd drops a HEAD's body)
        if request.method not in allowed:
            return Response(405, b"method not allowed\n", headers=[("Allow", ", ".join(allowed))])
        try:
            return action()
        except concurrent.futures.TimeoutError:
            return plain(503, "the data plane did not answer in time")

    def _render_state(self):
        """/routers.json's content, with rates from this server's own samples of the counts, and the instance."""
        data = self.view.snapshot(DASHBOARD_ENDPOINTS)
        self._rates.observe(time.monotonic(), counters(data))
        instance = self.view.instance()
        if "workers" in data:  # (a supervisor's: each worker with its streams)
            instance["workers"] = data["workers"]
        return json.dumps({"time": time.time(), "instance": instance, "rates_window_secs": self._rates.window,
                           "history_secs": self._rates.span, **annotate(routers_json(data), self._rates)}).encode()

    def _reload(self):
        """Answered when the reload is over, without holding a handler thread meanwhile."""
        log.info("reload requested through the admin server")
        answer = concurrent.futures.Future()

        def done(outcome):
            ok, message = outcome.result()
            answer.set_result(plain(200 if ok else 409, message))

        self.view.reload().add_done_callback(done)
        return answer

    def _shutdown(self):
        log.info("shutdown requested through the admin server")
        self.view.drain()
        return plain(200, "draining")

    def _abort(self):
        log.warning("abort requested through the admin server: exiting now")
        return Response(200, b"aborting\n", after=self.view.abort)


# The page and its assets only read; whatever they display arrives as JSON and is set as text.
_PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


def _asset(name, content_type):
    """A handler serving one file of the dashboard (package data, read once)."""
    body = importlib.resources.files(__package__).joinpath("dashboard", name).read_bytes()
    response = Response(200, body, content_type=content_type, headers=_PAGE_HEADERS)
    return lambda: response


def exit_now(status=1):
    """End this process at once (after the answer has gone out)."""
    logging.shutdown()
    os._exit(status)
