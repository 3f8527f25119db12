"""A small HTTP/1.1 server for the admin port that slow or hostile clients cannot exhaust.

One thread reads every connection with a selector, so a client dripping bytes
costs a socket, never a thread.  A request must arrive whole, headers and
body, within ``REQUEST_DEADLINE`` of its first byte (or of the previous
response on a kept-alive connection), however it is split into reads; when
``MAX_CONNECTIONS`` are open, the one that has been waiting longest is closed
to make room.  Only complete requests reach the handler, on one of a fixed
number of threads; while they are all busy and ``MAX_QUEUED`` requests wait,
further requests are answered 503 at once.  A connection that closes before
its request is complete is never acted on.

``parse_request`` is a pure function over the bytes received so far.
"""

import collections
import http.client
import io
import logging
import queue
import selectors
import socket
import threading
import time

__all__ = ["HttpError", "HttpServer", "Request", "Response", "parse_request"]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024
REQUEST_DEADLINE = 10.0  # seconds for a whole request to arrive
WRITE_TIMEOUT = 10.0  # seconds for a response to be taken
MAX_CONNECTIONS = 512
HANDLER_THREADS = 4
MAX_QUEUED = 64
BACKLOG = 128
ACCEPT_BATCH = 64

REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class HttpError(Exception):
    """A request that can never be served; answered with ``status`` and the connection closed."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Request:
    __slots__ = ("method", "target", "version", "headers", "body")

    def __init__(self, method, target, version, headers, body):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # http.client.HTTPMessage: case-insensitive get()
        self.body = body

    @property
    def path(self):
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self):
        tokens = (self.headers.get("Connection") or "").lower()
        return self.version == "HTTP/1.1" and "close" not in tokens

    def __repr__(self):
        return f"<Request {self.method} {self.target}>"


class Response:
    __slots__ = ("status", "body", "content_type", "headers", "after")

    def __init__(self, status, body, content_type="text/plain; charset=utf-8", headers=(), after=None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = tuple(headers)
        self.after = after  # called once the response has been sent (or could not be)

    def encode(self, keep_alive):
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}",
                 "Connection: " + ("keep-alive" if keep_alive else "close"),
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def plain(status, text):
    return Response(status, (text + "\n").encode())


def parse_request(data):
    """The first request in ``data``: ``(request, bytes it took)``, or ``(None, 0)`` while incomplete.

    Raises HttpError for anything that can never become a request we serve:
    a malformed request line or header, a chunked body, a body or header
    block over its limit.
    """
    start = 0
    while data.startswith(b"\r\n", start):  # stray line ends between kept-alive requests
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        if len(data) - start > MAX_HEADER_BYTES:
            raise HttpError(431, "request headers too large")
        return None, 0
    if end - start > MAX_HEADER_BYTES:
        raise HttpError(431, "request headers too large")
    line, _, header_block = bytes(data[start:end + 4]).partition(b"\r\n")
    parts = line.decode("latin-1").split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    try:
        headers = http.client.parse_headers(io.BytesIO(header_block))
    except http.client.HTTPException as exc:
        raise HttpError(431 if isinstance(exc, http.client.LineTooLong) else 400,
                        "malformed request headers") from None
    if headers.defects:
        raise HttpError(400, "malformed request headers")
    if headers.get("Transfer-Encoding") is not None:
        raise HttpError(411, "send a Content-Length")
    length = _content_length(headers)
    body_start = end + 4
    if len(data) < body_start + length:
        return None, 0
    return Request(method, target, version, headers, bytes(data[body_start:body_start + length])), body_start + length


def _content_length(headers):
    values = set(headers.get_all("Content-Length") or ["0"])
    if len(values) != 1:
        raise HttpError(400, "conflicting Content-Length headers")
    value = values.pop().strip()
    if not (value.isascii() and value.isdigit()):
        raise HttpError(400, "malformed Content-Length")
    if len(value) > 9 or int(value) > MAX_BODY_BYTES:
        raise HttpError(413, "request body too large")
    return int(value)


class _Connection:
    __slots__ = ("sock", "buffer", "deadline")

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.deadline = time.monotonic() + REQUEST_DEADLINE


class HttpServer:
    """Serves ``handle(request) -> Response`` on ``address``; see the module docstring."""

    def __init__(self, address, handle, name="http", handlers=HANDLER_THREADS):
        self.handle = handle
        self.name = name
        ip, port = address
        try:
            self.sock = socket.create_server((ip, port), family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                                             backlog=BACKLOG)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {ip}:{port} for {name}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._waiting = collections.OrderedDict()  # _Connection -> None, by deadline (all equal spans)
        self._requests = queue.Queue(MAX_QUEUED)
        self._returned = queue.SimpleQueue()  # kept-alive connections back from handler threads
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._closing = False
        self._threads = [threading.Thread(target=self._serve, name=f"ltcp-{name}", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"ltcp-{name}-handler", daemon=True)
                          for _ in range(handlers)]

    def start(self):
        self._selector.register(self.sock, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._take_back)
        for thread in self._threads:
            thread.start()

    def close(self):
        self._closing = True
        self._wake()
        for _ in self._threads[1:]:
            try:
                self._requests.put_nowait(None)
            except queue.Full:
                break  # handlers find the closing flag after their current request
        for thread in self._threads:
            if thread.is_alive():
                thread.join(5)
        for connection in list(self._waiting):
            connection.sock.close()
        self._waiting.clear()
        self._selector.close()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    def _wake(self):
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: the loop is awake anyway

    # -- the reading thread ---------------------------------------------------------

    def _serve(self):
        while not self._closing:
            timeout = None
            if self._waiting:
                timeout = max(0.0, next(iter(self._waiting)).deadline - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if isinstance(key.data, _Connection):
                    self._readable(key.data)
                else:
                    key.data()
            self._expire()

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, or a client gone already
                log.debug("%s: accept failed: %s", self.name, exc)
                return
            if len(self._waiting) >= MAX_CONNECTIONS:
                oldest = next(iter(self._waiting))
                log.debug("%s: %d connections open; closing the longest waiting", self.name, MAX_CONNECTIONS)
                self._drop(oldest)
            client.setblocking(False)
            self._watch(_Connection(client))

    def _watch(self, connection):
        self._waiting[connection] = None
        self._selector.register(connection.sock, selectors.EVENT_READ, connection)

    def _drop(self, connection):
        self._waiting.pop(connection, None)
        self._selector.unregister(connection.sock)
        connection.sock.close()

    def _readable(self, connection):
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(connection)  # whatever it sent is never acted on
            return
        connection.buffer += data
        self._parse(connection)

    def _parse(self, connection):
        try:
            request, used = parse_request(connection.buffer)
        except HttpError as exc:
            self._waiting.pop(connection, None)
            self._selector.unregister(connection.sock)
            self._refuse(connection, plain(exc.status, str(exc)))
            return
        if request is None:
            return
        del connection.buffer[:used]
        self._waiting.pop(connection, None)
        self._selector.unregister(connection.sock)
        try:
            self._requests.put_nowait((connection, request))
        except queue.Full:
            self._refuse(connection, plain(503, "the admin server is busy; try again"))

    def _refuse(self, connection, response):
        """Answer without a handler thread (best effort: one nonblocking send), then close."""
        try:
            connection.sock.send(response.encode(keep_alive=False))
        except OSError:
            pass
        connection.sock.close()

    def _take_back(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                connection = self._returned.get_nowait()
            except queue.Empty:
                return
            if self._closing:
                connection.sock.close()
                continue
            connection.deadline = time.monotonic() + REQUEST_DEADLINE
            self._watch(connection)
            if connection.buffer:  # a pipelined request may already be complete
                self._parse(connection)

    def _expire(self):
        now = time.monotonic()
        while self._waiting:
            connection = next(iter(self._waiting))
            if connection.deadline > now:
                return
            log.debug("%s: a request took longer than %gs to arrive; closed", self.name, REQUEST_DEADLINE)
            self._drop(connection)

    # -- handler threads --------------------------------------------------------------

    def _work(self):
        while True:
            item = self._requests.get()
            if item is None or self._closing:
                if item is not None:
                    item[0].sock.close()
                return
            connection, request = item
            self._respond(connection, request)

    def _respond(self, connection, request):
        try:
            response = self.handle(request)
        except Exception:
            log.exception("%s: handling %r failed", self.name, request)
            response = plain(500, "internal error")
        keep_alive = request.keep_alive and response.status < 400
        try:
            connection.sock.settimeout(WRITE_TIMEOUT)
            connection.sock.sendall(response.encode(keep_alive))
            connection.sock.setblocking(False)
        except OSError:
            keep_alive = False
        if keep_alive and not self._closing:
            self._returned.put(connection)
            self._wake()
        else:
            connection.sock.close()
        if response.after is not None:
            response.after()
