"""The admin HTTP server: metrics, live state, shutdown.

    GET  /metrics        Prometheus text exposition
    GET  /routers.json   routers, servers, destinations and endpoints, live
    POST /shutdown       graceful drain (answers at once)
    POST /abort          exit 1 immediately

It runs on control-plane threads and reaches data-plane state only through a
reactor round trip (``metrics.on_reactor``).
"""

import concurrent.futures
import http.server
import json
import logging
import os
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from .metrics import LtcpCollector, on_reactor, routers_json, snapshot

__all__ = ["AdminServer"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT = 10  # seconds a client may take to send its request


class AdminServer:
    def __init__(self, app, config):
        self.app = app
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LtcpCollector(app))
        self.registry.register(ProcessCollector(namespace="ltcp", registry=None))
        owner = self

        class Handler(_Handler):
            admin = owner

        try:
            self._server = http.server.ThreadingHTTPServer((config.ip, config.port), Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {config.ip}:{config.port} for admin: {exc.strerror}") from None
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="ltcp-admin",
                                        daemon=True)
        self._thread.start()
        log.info("admin server on http://%s:%d/", *self.address)

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class _Handler(http.server.BaseHTTPRequestHandler):
    admin = None
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "ltcp-admin"
    routes = {"/metrics": "GET", "/routers.json": "GET", "/shutdown": "POST", "/abort": "POST"}

    def log_message(self, format, *args):
        log.debug("admin %s %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method):
        path = self.path.split("?", 1)[0]
        allowed = self.routes.get(path)
        if allowed is None:
            self._reply(404, b"not found\n")
            return
        if method != allowed:
            self._reply(405, b"method not allowed\n", {"Allow": allowed})
            return
        if not self._read_body():
            return
        try:
            getattr(self, "_" + path.strip("/").replace(".", "_"))()
        except concurrent.futures.TimeoutError:
            self._reply(503, b"the data plane did not answer in time\n")

    def _read_body(self):
        """Read and discard the body, refusing anything large or chunked."""
        if self.headers.get("Transfer-Encoding"):
            self._reply(411, b"send a Content-Length\n")
            return False
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._reply(413, b"request body too large\n")
            return False
        if length:
            self.rfile.read(length)
        return True

    def _reply(self, status, body, headers=None, content_type="text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _metrics(self):
        self._reply(200, generate_latest(self.admin.registry), content_type=CONTENT_TYPE_LATEST)

    def _routers_json(self):
        app = self.admin.app
        data = routers_json(on_reactor(app.reactor, lambda: snapshot(app)))
        self._reply(200, json.dumps(data, indent=2).encode() + b"\n", content_type="application/json")

    def _shutdown(self):
        log.info("shutdown requested through the admin server")
        self.admin.app.request_drain()
        self._reply(200, b"draining\n")

    def _abort(self):
        log.warning("abort requested through the admin server: exiting now")
        self._reply(200, b"aborting\n")
        self.wfile.flush()
        logging.shutdown()
        os._exit(1)
