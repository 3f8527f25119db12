"""A small server that speaks namerd's HTTP resolve API, driven by its caller.

It answers ``GET /api/1/resolve/{namespace}?path={name}`` with the name's
current state, and with ``&watch=true`` holds a chunked stream open and sends
one JSON object plus a newline for every change.  Tests (and demos) set the
states, and can make it misbehave the ways a real namerd or the network can:
HTTP errors, garbage, a stall, a stream dropped in the middle of an object,
an object split across chunks.

    python -m ltcp.testing.namerd --port 4180 /svc/default=127.0.0.1:8080,127.0.0.1:8081
"""

import argparse
import http.server
import json
import select
import socket
import sys
import threading
import urllib.parse

__all__ = ["NamerdServer"]

CLIENT_CHECK = 0.05  # how often a waiting watch looks whether its client has gone


def bound(addresses):
    """A ``bound`` answer from ``"ip:port"`` strings or ``(ip, port[, weight])`` tuples."""
    addrs = []
    for address in addresses:
        if isinstance(address, str):
            ip, _, port = address.rpartition(":")
            address = (ip.strip("[]"), int(port))
        ip, port, *weight = address
        meta = {"endpoint_addr_weight": weight[0]} if weight else {}
        addrs.append({"ip": ip, "port": port, "meta": meta})
    return {"type": "bound", "addrs": addrs, "meta": {}}


class _Name:
    """One name's history of events; watchers read it from where they joined."""

    def __init__(self):
        self.events = [("state", {"type": "neg", "meta": {}})]
        self.trouble = None  # None, ("http", status) or ("stall",)
        self.requests = 0
        self.watchers = 0

    def current(self):
        for kind, payload in reversed(self.events):
            if kind in ("state", "split", "garbage"):
                return kind, payload
        raise AssertionError("a name always has a state")


class NamerdServer:
    def __init__(self, port=0):
        self._names = {}
        self._changed = threading.Condition()
        self._closing = False
        self._connections = set()
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = _Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, name="namerd-server", daemon=True)
        self._thread.start()
        return self

    def close(self):
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(5)

    # -- what the caller drives ---------------------------------------------------

    def _entry(self, name, namespace):
        return self._names.setdefault((namespace, name), _Name())

    def _push(self, name, namespace, kind, payload=None, clear_trouble=True):
        with self._changed:
            entry = self._entry(name, namespace)
            entry.events.append((kind, payload))
            if clear_trouble:
                entry.trouble = None
            self._changed.notify_all()

    def set(self, name, addresses, namespace="default"):
        self._push(name, namespace, "state", bound(addresses))

    def neg(self, name, namespace="default"):
        self._push(name, namespace, "state", {"type": "neg", "meta": {}})

    def pending(self, name, namespace="default"):
        self._push(name, namespace, "state", {"type": "pending", "meta": {}})

    def failed(self, name, reason="boom", namespace="default"):
        self._push(name, namespace, "state", {"type": "failed", "reason": reason, "meta": {}})

    def split(self, name, addresses, namespace="default"):
        """Like ``set``, but watchers get the object in two chunks."""
        self._push(name, namespace, "split", bound(addresses))

    def garbage(self, name, data=b'{"type": "bound", "addrs": [tru', namespace="default"):
        self._push(name, namespace, "garbage", data)

    def drop(self, name, namespace="default"):
        """Watchers get half an object, then the connection closes."""
        self._push(name, namespace, "drop", None, clear_trouble=False)

    def http_error(self, name, status=500, namespace="default"):
        with self._changed:
            self._entry(name, namespace).trouble = ("http", status)

    def stall(self, name, namespace="default"):
        """New requests for the name get no answer until the next state is set."""
        with self._changed:
            self._entry(name, namespace).trouble = ("stall",)

    def requests(self, name, namespace="default"):
        with self._changed:
            return self._entry(name, namespace).requests

    def watchers(self, name, namespace="default"):
        with self._changed:
            return self._entry(name, namespace).watchers


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client that went away is no news
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server_owner = None

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        owner = self.server_owner
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")
        query = urllib.parse.parse_qs(url.query)
        if len(parts) != 5 or parts[1:4] != ["api", "1", "resolve"] or "path" not in query:
            self._reply(404, b"not found\n")
            return
        namespace, name = urllib.parse.unquote(parts[4]), query["path"][0]
        watch = query.get("watch", ["false"])[0] == "true"
        with owner._changed:
            owner._connections.add(self.connection)
            entry = owner._entry(name, namespace)
            entry.requests += 1
            owner._changed.wait_for(lambda: owner._closing or entry.trouble != ("stall",))
            trouble = entry.trouble
            kind, payload = entry.current()
            joined = len(entry.events)
        try:
            if owner._closing:
                return
            if trouble is not None:
                self._reply(trouble[1], b"trouble\n")
            elif watch:
                self._watch(owner, entry, kind, payload, joined)
            elif kind == "garbage":
                self._reply(200, payload)
            else:
                self._reply(200, json.dumps(payload).encode())
        finally:
            with owner._changed:
                owner._connections.discard(self.connection)

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send(self, kind, payload):
        """Write one event; False if the stream must end here."""
        if kind == "garbage":
            self._chunk(payload + b"\n")
        elif kind == "drop":
            self._chunk(b'{"type": "bound", "ad')
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return False
        else:
            line = json.dumps(payload).encode() + b"\n"
            if kind == "split":
                self._chunk(line[:len(line) // 2])
                self._chunk(line[len(line) // 2:])
            else:
                self._chunk(line)
        return True

    def _client_gone(self):
        """Whether the watching client has closed its end (so ``watchers`` stays true)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _watch(self, owner, entry, kind, payload, seen):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with owner._changed:
            entry.watchers += 1
        try:
            if not self._send(kind, payload):
                return
            while True:
                with owner._changed:
                    while not (owner._closing or len(entry.events) > seen):
                        owner._changed.wait(CLIENT_CHECK)
                        if self._client_gone():
                            return
                    if owner._closing:
                        return
                    new, seen = entry.events[seen:], len(entry.events)
                for event in new:
                    if not self._send(*event):
                        return
        except OSError:
            self.close_connection = True
        finally:
            with owner._changed:
                entry.watchers -= 1


def main():
    parser = argparse.ArgumentParser(description="Serve namerd's HTTP resolve API for fixed names.")
    parser.add_argument("--port", type=int, default=4180)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("names", nargs="+", metavar="NAME=IP:PORT[,IP:PORT...]")
    args = parser.parse_args()
    server = NamerdServer(args.port)
    for spec in args.names:
        name, _, addresses = spec.partition("=")
        server.set(name, [a for a in addresses.split(",") if a], args.namespace)
    print(f"namerd API on {server.url} (namespace {args.namespace}); Ctrl-C stops", flush=True)
    server.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
