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
dashboards cost the data plane a few snapshots a second at most.

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

    def __init__(self, render):
        self._render = render
        self._lock = threading.Lock()
        self._at = None
        self._body = None

    def get(self):
        with self._lock:
            now = time.monotonic()
            if self._at is None or now - self._at >= CACHE_SECS:
                self._body = self._render()
                self._at = now
            return self._body


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
        self._metrics = _Cached(lambda: generate_latest(self.registry))
        self._routers = _Cached(lambda: json.dumps(routers_json(view.snapshot(MAX_LISTED_ENDPOINTS)), indent=2).encode()
                                + b"\n")
        self._state = _Cached(self._render_state)
        self._rates = Rates()  # (used by _render_state alone, under its cache's lock)
        self._routes = {"/": ("GET", _asset("index.html", "text/html; charset=utf-8")),
                        "/dashboard.js": ("GET", _asset("dashboard.js", "text/javascript; charset=utf-8")),
                        "/dashboard.css": ("GET", _asset("dashboard.css", "text/css; charset=utf-8")),
                        "/api/v1/state": ("GET", self._get_state),
                        "/metrics": ("GET", self._get_metrics), "/routers.json": ("GET", self._get_routers),
                        "/reload": ("POST", self._reload), "/shutdown": ("POST", self._shutdown),
                        "/abort": ("POST", self._abort)}
        self._http = HttpServer((config.ip, config.port), self.handle, name="admin")
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

    def _get_metrics(self):
        return Response(200, self._metrics.get(), content_type=CONTENT_TYPE_LATEST)

    def _get_routers(self):
        return Response(200, self._routers.get(), content_type="application/json")

    def _render_state(self):
        """/routers.json's content, with rates from this server's own samples of the counts, and the instance."""
        data = self.view.snapshot(DASHBOARD_ENDPOINTS)
        self._rates.observe(time.monotonic(), counters(data))
        instance = self.view.instance()
        if "workers" in data:  # (a supervisor's: each worker with its streams)
            instance["workers"] = data["workers"]
        return json.dumps({"time": time.time(), "instance": instance, "rates_window_secs": self._rates.window,
                           "history_secs": self._rates.span, **annotate(routers_json(data), self._rates)}).encode()

    def _get_state(self):
        return Response(200, self._state.get(), content_type="application/json",
                        headers=[("Cache-Control", "no-store")])

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
