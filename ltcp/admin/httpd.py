"""A small HTTP/1.1 server for the admin port that slow or hostile clients cannot exhaust.

One thread does all the socket work with a selector: it accepts, reads
requests, and writes responses, never blocking on a client.  So a client that
drips bytes, or never reads its answer, costs a socket, never a thread.  A
request must arrive whole, headers and body, within ``DEADLINE`` of the
connection opening (or of the previous response being written), and a
response must be taken within ``DEADLINE`` too; when ``MAX_CONNECTIONS`` are
open, the one that has waited longest is closed to make room.  Only complete
requests reach ``handle``, on one of a few handler threads that only compute
responses (an answer that waits on other work, a reload say, is a Future of
its Response: the handler thread goes on to the next request meanwhile),
unless ``at_once`` has an answer ready without computing (a cached page),
which the selector thread writes itself;
while they are all busy and ``MAX_QUEUED`` requests wait, further ones are
answered 503 at once.  A connection that closes before its request
is complete is never acted on.

``parse_request`` (and ``parse_head``) are pure functions over the bytes
received so far.  Lines may end in CRLF or, as RFC 9112 section 2.2 allows a
recipient to accept, a bare LF; a bare CR anywhere in the head is refused.
A HEAD request is answered as its GET would be, without the body.
"""

import collections
import concurrent.futures
import email.parser
import errno
import functools
import http.client
import logging
import queue
import re
import selectors
import socket
import threading
import time

from ..mailbox import Mailbox

__all__ = ["HttpError", "HttpServer", "Request", "Response", "parse_head", "parse_request", "plain"]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_HEADERS = 100  # header lines
MAX_STRAY_LINE_ENDS = 8  # empty lines tolerated before a request line (RFC 9112 allows some)
DEADLINE = 10.0  # seconds for a whole request to arrive, and for a response to be taken
MAX_CONNECTIONS = 128
HANDLER_THREADS = 4
MAX_QUEUED = 32
BACKLOG = 128
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1  # seconds without accepting after running out of descriptors
CLOSING_WRITE_TIMEOUT = 1.0  # seconds, all together, to write the answers ready when the server closes
_HEADER_PARSER = email.parser.Parser(_class=http.client.HTTPMessage)  # (what http.client.parse_headers uses)
HEAD_END = re.compile(rb"\n\r?\n")  # an empty line: the end of a request's head (CRLF or bare LF line ends)

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

    def __init__(self, method, target, version, headers, body=b""):
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
    __slots__ = ("status", "body", "content_type", "headers", "after", "length")

    def __init__(self, status, body, content_type="text/plain; charset=utf-8", headers=(), after=None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = tuple(headers)
        self.after = after  # called once the response has been written (or could not be)
        self.length = len(body)  # Content-Length: the body's, or the GET body's for a HEAD

    def without_body(self):
        """The answer to a HEAD: the same status and headers, the GET's Content-Length, no body."""
        head = Response(self.status, b"", self.content_type, self.headers, self.after)
        head.length = self.length
        return head

    def encode(self, keep_alive):
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
                 f"Content-Type: {self.content_type}", f"Content-Length: {self.length}",
                 "Connection: " + ("keep-alive" if keep_alive else "close"),
                 *(f"{name}: {value}" for name, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def plain(status, text):
    return Response(status, (text + "\n").encode())


def parse_head(data):
    """The first request's head in ``data``: ``(request without body, body offset, body length)``.

    None while the head is incomplete; HttpError for anything that can never
    become a request we serve: a malformed request line or header, a bare CR,
    no Host or two (RFC 9112 section 3.2), a chunked body, a body or header
    block over its limit, a flood of empty lines.
    """
    start = _skip_empty_lines(data)
    found = HEAD_END.search(data, start)
    if found is None:
        if len(data) - start > MAX_HEADER_BYTES:
            raise HttpError(431, "request headers too large")
        return None
    end = found.end()
    if end - start > MAX_HEADER_BYTES:
        raise HttpError(431, "request headers too large")
    head = bytes(data[start:end])
    if b"\r" in head.replace(b"\r\n", b""):
        raise HttpError(400, "a bare CR in the request head")
    line, _, header_block = head.partition(b"\n")
    method, target, version = _request_line(line.rstrip(b"\r").decode("latin-1"))
    headers = _headers(header_block)
    hosts = len(headers.get_all("Host") or ())
    if hosts > 1 or (hosts == 0 and version == "HTTP/1.1"):
        raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header" if hosts == 0 else
                        "more than one Host header")
    if headers.get("Transfer-Encoding") is not None:
        raise HttpError(411, "send a Content-Length")
    return Request(method, target, version, headers), end, _content_length(headers)


def _skip_empty_lines(data):
    """Where the request begins after the empty lines RFC 9112 lets a client send first (a few)."""
    start = 0
    for _ in range(MAX_STRAY_LINE_ENDS + 1):
        if data.startswith(b"\r\n", start):
            start += 2
        elif data.startswith(b"\n", start):
            start += 1
        else:
            return start
    raise HttpError(400, "empty lines instead of a request")


def _request_line(line):
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    if parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    return parts


def _headers(block):
    """The header fields of a head (``block``: its lines after the request line, up to the empty one)."""
    if block.count(b"\n") - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    if block.startswith((b" ", b"\t")) or b"\n " in block or b"\n\t" in block:
        raise HttpError(400, "obsolete line folding")  # RFC 9112 section 5.2: refuse it, or unfold it
    headers = _HEADER_PARSER.parsestr(block.decode("latin-1"), headersonly=True)
    if headers.defects:
        raise HttpError(400, "malformed request headers")
    return headers


def parse_request(data):
    """The first complete request in ``data`` and the bytes it took, or ``(None, 0)`` while incomplete."""
    head = parse_head(data)
    if head is None:
        return None, 0
    request, body_start, length = head
    if len(data) < body_start + length:
        return None, 0
    request.body = bytes(data[body_start:body_start + length])
    return request, body_start + length


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
    """One client connection, as the selector thread sees it."""

    __slots__ = ("sock", "buffer", "head", "deadline", "out", "keep_alive", "after", "closed")

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.head = None  # (request, body offset, body length) once the head has arrived
        self.deadline = 0.0
        self.out = None  # memoryview of response bytes still to write
        self.keep_alive = False
        self.after = None
        self.closed = False


def _as_sent(request, response):
    """(the response as ``request`` gets it, whether the connection stays open after it)."""
    if request.method == "HEAD":
        response = response.without_body()
    return response, request.keep_alive and response.status < 400


class HttpServer:
    """Serves ``handle(request) -> Response`` on ``address``; see the module docstring."""

    def __init__(self, address, handle, name="http", handlers=HANDLER_THREADS, at_once=None):
        self.handle = handle
        self.at_once = at_once  # request -> a Response ready now, or None (on the selector thread: never waits)
        self.name = name
        ip, port = address
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        try:
            # On "::" it takes IPv4 too, as ltcp's own listeners do (and as the configuration check assumes).
            self.sock = socket.create_server((ip, port), family=family, backlog=BACKLOG,
                                             dualstack_ipv6=family == socket.AF_INET6 and ip == "::")
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {ip}:{port} for {name}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._timed = collections.OrderedDict()  # _Connection -> None, reading or writing, by deadline
        self._requests = queue.Queue(MAX_QUEUED)  # complete requests for the handler threads
        self._answers = Mailbox()  # (connection, response, keep alive?) from the handler threads
        self._accepting_again = None  # monotonic time to resume accepting after EMFILE
        self._closing = False
        self._threads = [threading.Thread(target=self._serve, name=f"ltcp-{name}", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"ltcp-{name}-handler", daemon=True)
                          for _ in range(handlers)]

    def start(self):
        self._selector.register(self.sock, selectors.EVENT_READ, self._accept)
        self._selector.register(self._answers, selectors.EVENT_READ, self._take_answers)
        for thread in self._threads:
            thread.start()

    def close(self):
        self._closing = True
        self._answers.wake()
        for _ in self._threads[1:]:
            try:
                self._requests.put_nowait(None)
            except queue.Full:
                break  # handlers see the closing flag after their current request
        for thread in self._threads:
            thread.join(2)
        self._selector.close()
        answers = self._answers.take()
        self._write_last([(c, c.out) for c in self._timed if c.out is not None] +
                         [(c, memoryview(response.encode(False))) for c, response, _ in answers])
        leftovers = list(self._timed) + [answer[0] for answer in answers]
        while not self._requests.empty():
            item = self._requests.get()
            if item is not None:
                leftovers.append(item[0])
        for connection in leftovers:
            connection.sock.close()
        self._timed.clear()
        self.sock.close()
        self._answers.close()

    @staticmethod
    def _write_last(writes):
        """Write answers already made (a shutdown's "draining", say), within one short deadline for all."""
        deadline = time.monotonic() + CLOSING_WRITE_TIMEOUT
        for connection, data in writes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                connection.sock.settimeout(left)
                connection.sock.sendall(data)
            except OSError:
                pass  # that client is gone or too slow: it gets no answer

    # -- the socket thread -------------------------------------------------------------

    def _serve(self):
        while not self._closing:
            for key, mask in self._selector.select(self._timeout()):
                connection = key.data
                if not isinstance(connection, _Connection):
                    connection()  # accept, or answers to write
                elif not connection.closed:  # it may have been dropped earlier in this batch
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._writable(connection)
                        else:
                            self._readable(connection)
                    except Exception:
                        log.exception("%s: serving a connection failed; closing it", self.name)
                        self._drop(connection)
            self._expire()

    def _timeout(self):
        times = []
        if self._timed:
            times.append(next(iter(self._timed)).deadline)
        if self._accepting_again is not None:
            times.append(self._accepting_again)
        return max(0.0, min(times) - time.monotonic()) if times else None

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: out of descriptors; not accepting for %gs", self.name, ACCEPT_PAUSE)
                    self._selector.unregister(self.sock)
                    self._accepting_again = time.monotonic() + ACCEPT_PAUSE
                return  # anything else: that client is gone already
            if len(self._timed) >= MAX_CONNECTIONS:
                log.debug("%s: %d connections open; closing the longest waiting", self.name, MAX_CONNECTIONS)
                self._drop(next(iter(self._timed)))
            client.setblocking(False)
            connection = _Connection(client)
            self._selector.register(client, selectors.EVENT_READ, connection)
            self._time(connection)

    def _time(self, connection):
        """(Re)start the connection's deadline; every deadline is DEADLINE long, so the dict stays in order."""
        self._timed.pop(connection, None)
        connection.deadline = time.monotonic() + DEADLINE
        self._timed[connection] = None

    def _drop(self, connection):
        if connection.closed:
            return
        connection.closed = True
        self._timed.pop(connection, None)
        try:
            self._selector.unregister(connection.sock)
        except (KeyError, ValueError):
            pass  # not registered: it was being handled
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
        buffer = connection.buffer
        searched = max(0, len(buffer) - 2)  # (an empty line may have begun in the bytes already here)
        buffer += data
        if connection.head is None and HEAD_END.search(buffer, searched) is None:
            if len(buffer) > MAX_HEADER_BYTES + 2 * MAX_STRAY_LINE_ENDS:
                self._refuse(connection, plain(431, "request headers too large"))
            return  # only a new blank line can complete the head: no need to parse again
        self._parse(connection)

    def _parse(self, connection):
        """Hand a complete request to the handlers, or refuse one that can never be served."""
        try:
            if connection.head is None:
                connection.head = parse_head(connection.buffer)
        except HttpError as exc:
            self._refuse(connection, plain(exc.status, str(exc)))
            return
        if connection.head is None:
            return
        request, body_start, length = connection.head
        end = body_start + length
        if len(connection.buffer) < end:
            return
        request.body = bytes(connection.buffer[body_start:end])
        del connection.buffer[:end]
        connection.head = None
        self._timed.pop(connection, None)
        self._selector.unregister(connection.sock)
        # (Not with more pipelined behind it: writing it would parse the next at once, and so on, recursively.)
        ready = self.at_once(request) if self.at_once is not None and not connection.buffer else None
        if ready is not None:
            self._respond(connection, *_as_sent(request, ready))
            return
        try:
            self._requests.put_nowait((connection, request))
        except queue.Full:
            self._respond(connection, plain(503, "the admin server is busy; try again"), keep_alive=False)

    def _refuse(self, connection, response):
        self._timed.pop(connection, None)
        self._selector.unregister(connection.sock)
        self._respond(connection, response, keep_alive=False)

    def _respond(self, connection, response, keep_alive):
        """Start writing a response (the connection is not registered at this point)."""
        connection.out = memoryview(response.encode(keep_alive))
        connection.keep_alive = keep_alive
        connection.after = response.after
        self._selector.register(connection.sock, selectors.EVENT_WRITE, connection)
        self._time(connection)
        self._writable(connection)

    def _writable(self, connection):
        try:
            sent = connection.sock.send(connection.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = -1
        if 0 <= sent < len(connection.out):
            connection.out = connection.out[sent:]
            return
        after, connection.after, connection.out = connection.after, None, None
        if sent >= 0 and connection.keep_alive and not self._closing:
            self._selector.modify(connection.sock, selectors.EVENT_READ, connection)
            self._time(connection)
            if connection.buffer:  # a pipelined request may be complete already
                self._parse(connection)
        else:
            self._drop(connection)
        if after is not None:
            after()

    def _take_answers(self):
        for connection, response, keep_alive in self._answers.take():
            self._respond(connection, response, keep_alive)

    def _resume_accepting(self):
        self._accepting_again = None
        self._selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def _expire(self):
        now = time.monotonic()
        if self._accepting_again is not None and now >= self._accepting_again:
            self._resume_accepting()
        while self._timed:
            connection = next(iter(self._timed))
            if connection.deadline > now:
                return
            log.debug("%s: a client took longer than %gs to send a request or take a response; closed",
                      self.name, DEADLINE)
            self._drop(connection)

    # -- handler threads: compute responses, never touch sockets ---------------------------

    def _work(self):
        while True:
            item = self._requests.get()
            if item is None or self._closing:
                if item is not None:
                    self._answers.put((item[0], plain(503, "shutting down"), False))
                return
            connection, request = item
            try:
                response = self.handle(request)
            except Exception:
                log.exception("%s: handling %r failed", self.name, request)
                response = plain(500, "internal error")
            if isinstance(response, concurrent.futures.Future):
                response.add_done_callback(functools.partial(self._answer_later, connection, request))
            else:
                self._answer(connection, request, response)

    def _answer(self, connection, request, response):
        self._answers.put((connection, *_as_sent(request, response)))

    def _answer_later(self, connection, request, future):
        """A deferred answer is ready (on whichever thread made it)."""
        try:
            response = future.result()
        except Exception:
            log.exception("%s: handling %r failed", self.name, request)
            response = plain(500, "internal error")
        if not self._closing:
            self._answer(connection, request, response)
