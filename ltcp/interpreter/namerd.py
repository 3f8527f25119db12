"""``io.l5d.namerd.http``: follow names through namerd's HTTP API.

``GET {baseUrl}/api/1/resolve/{namespace}?path={name}`` answers one JSON
object; with ``&watch=true`` the answer is a chunked stream of such objects,
one per state change, each ending in a newline.

Threads are bounded, however many names SNI routing brings:

* up to ``MAX_STREAMS`` names at a time are followed by a streaming watch,
  one thread each, on a connection of its own; unwatching a name cuts that
  connection at once, so its thread is free for the next name;
* every further name (every name, with ``watch: false``) is polled by
  ``POLL_WORKERS`` threads sharing one schedule: a new name is resolved at
  once, ahead of the rotation, then polled every ``periodSecs``; each request
  has its own deadline, so a name namerd never answers delays only itself.

Every request has a connection of its own, so unwatching a name (or closing)
cuts its request at once, whatever it is waiting for.

Failures (an HTTP error, a ``failed`` answer, malformed JSON, a dropped
stream, namerd down) keep the last good address set, are counted, and are
retried with exponential backoff and jitter capped at ``periodSecs``.
"""

import http.client
import json
import logging
import queue
import socket
import threading
import time
import urllib.parse
import weakref

import urllib3

from ..config import MAX_WEIGHT, Address, NamerdConfig
from ..names import canonical_ip
from .schedule import PollSchedule, backoff
from .stats import DiscoveryStats

__all__ = ["NamerdInterpreter", "NamerdError", "ObjectStream", "parse_answer"]

log = logging.getLogger(__name__)

MAX_STREAMS = 16
POLL_WORKERS = 8
MAX_OBJECT_BYTES = 4 << 20  # the default of maxAnswerBytes
CONNECT_TIMEOUT = 5.0
POLL_TIMEOUT = 5.0  # a whole poll request, connect to last byte
FIRST_BACKOFF = 0.1

BOUND, NEG, PENDING = "bound", "neg", "pending"


class NamerdError(ValueError):
    """An answer namerd should not have given (or a ``failed`` one).

    ``outcome`` is the label it is counted under.
    """

    def __init__(self, message, outcome="malformed"):
        super().__init__(message)
        self.outcome = outcome


def parse_answer(answer):
    """One decoded JSON answer -> (state, addresses, problems).

    ``addresses`` is a list for ``bound`` and None otherwise; ``problems``
    lists the addresses that were skipped and why.  Raises NamerdError for
    ``failed`` and for anything that is not a namerd answer at all.
    """
    if not isinstance(answer, dict):
        raise NamerdError(f"expected a JSON object, got {type(answer).__name__}")
    state = answer.get("type")
    if state == "failed":
        raise NamerdError(f"namerd says the name failed: {answer.get('reason', 'no reason given')}", "failed")
    if state in (NEG, PENDING):
        return state, None, []
    if state != BOUND:
        raise NamerdError(f"unknown answer type {state!r}")
    addrs = answer.get("addrs")
    if not isinstance(addrs, list):
        raise NamerdError("a bound answer needs a list 'addrs'")
    addresses, problems, seen = [], [], set()
    for index, entry in enumerate(addrs):
        try:
            address = _address(entry)
        except NamerdError as exc:
            problems.append(f"addrs[{index}]: {exc}")
            continue
        if (address.ip, address.port) not in seen:
            seen.add((address.ip, address.port))
            addresses.append(address)
    return BOUND, addresses, problems


def _address(entry):
    if not isinstance(entry, dict):
        raise NamerdError("not an object")
    try:
        ip = canonical_ip(entry.get("ip"))
    except ValueError as exc:
        raise NamerdError(str(exc)) from None
    port = entry.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
        raise NamerdError(f"port must be an integer 1..65535, not {port!r}")
    meta = entry.get("meta") or {}
    weight = meta.get("endpoint_addr_weight", 1.0) if isinstance(meta, dict) else 1.0
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight <= MAX_WEIGHT:
        raise NamerdError(f"endpoint_addr_weight must be a number > 0 and <= {MAX_WEIGHT:g}, not {weight!r}")
    return Address(ip, port, float(weight))


class ObjectStream:
    """Reassembles newline-delimited JSON objects from arbitrary byte chunks."""

    def __init__(self, limit=MAX_OBJECT_BYTES):
        self.limit = limit
        self._partial = bytearray()
        self._scanned = 0  # bytes of _partial known to hold no newline

    def feed(self, chunk):
        """Every complete object the chunk finishes, decoded; NamerdError on garbage.

        Only new bytes are searched for the newline, so a large answer
        arriving in many chunks costs linear time, not quadratic.
        """
        self._partial += chunk
        objects = []
        while True:
            end = self._partial.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._partial)
                break
            line = bytes(self._partial[:end]).strip()
            del self._partial[:end + 1]
            self._scanned = 0
            if line:
                objects.append(_decode(line))
        if len(self._partial) > self.limit:
            raise NamerdError(f"an answer longer than {self.limit} bytes (maxAnswerBytes)")
        return objects

    def finish(self):
        """The last object, if the stream ended without its newline."""
        line = bytes(self._partial).strip()
        self._partial.clear()
        self._scanned = 0
        return [_decode(line)] if line else []


def _decode(line):
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise NamerdError(f"malformed JSON: {exc}") from None


class _Name:
    """One watched name and what was last delivered for it."""

    __slots__ = ("name", "deliver", "last", "failures", "streamed", "stopped", "sock")

    def __init__(self, name, deliver, streamed):
        self.name = name
        self.deliver = deliver
        self.last = ()  # nothing delivered yet
        self.failures = 0
        self.streamed = streamed
        self.stopped = threading.Event()  # unwatched or closing: drop it, wake its backoff
        self.sock = None  # the socket of its request in flight, if any

    def stop(self):
        """Stop following this name now, cutting its request in flight; forget whom to tell."""
        self.stopped.set()
        self.deliver = _nobody
        _cut(self.sock)


def _nobody(addresses):
    pass


def _cut(sock):
    """Wake whatever thread is blocked on ``sock`` (its owner closes it).

    The plain socket's shutdown, even under TLS: ``SSLSocket.shutdown`` would
    tear down the TLS object under the thread reading it.
    """
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


_SOCKET_OPTIONS = urllib3.connection.HTTPConnection.default_socket_options + [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
if hasattr(socket, "TCP_KEEPIDLE"):  # notice a vanished namerd on a silent watch
    _SOCKET_OPTIONS += [(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
                        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]

# What a request to namerd can fail with, and the outcome it is counted as.
_FAILURES = (
    (NamerdError, None),  # carries its own outcome
    (urllib3.exceptions.NewConnectionError, "unreachable"),  # (urllib3 makes it a kind of timeout)
    (urllib3.exceptions.TimeoutError, "timeout"),
    (TimeoutError, "timeout"),
    (urllib3.exceptions.ProtocolError, "dropped"),  # the connection broke mid-answer
    (http.client.HTTPException, "malformed"),  # not HTTP at all (a TLS port, an SSH port...)
    (urllib3.exceptions.HTTPError, "unreachable"),
    (OSError, "unreachable"),
)


def _outcome(exc):
    for kind, outcome in _FAILURES:
        if isinstance(exc, kind):
            return outcome or exc.outcome
    return None


def _left(deadline):
    """Seconds until ``deadline``, as a socket timeout; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("namerd did not answer in time")
    return left


class NamerdInterpreter:
    """Watches names on namerd from a fixed set of threads, started up front.

    ``watch()`` and ``unwatch()`` run on the reactor thread, so they only hand
    names over (a queue for the streaming threads, the poll schedule) and cut
    sockets; they never block or start a thread.
    """

    KIND = "io.l5d.namerd.http"
    CONFIG = NamerdConfig

    def __init__(self, base_url, namespace, period_secs, watch=True, max_streams=MAX_STREAMS,
                 max_answer_bytes=MAX_OBJECT_BYTES, poll_workers=POLL_WORKERS):
        self.base_url = base_url
        self.namespace = namespace
        self.period = period_secs
        self.max_streams = max_streams if watch else 0
        self.poll_workers = poll_workers
        self.max_answer_bytes = max_answer_bytes
        self.stats = DiscoveryStats()
        self._to_stream = queue.SimpleQueue()
        self._schedule = PollSchedule()
        self._streaming = 0  # names holding a streaming slot (reactor thread only)
        self._entries = {}  # name -> _Name (reactor thread only)
        self._sockets = weakref.WeakSet()  # every namerd socket, for close()
        self._threads = []
        url = urllib3.util.parse_url(base_url)
        self._connection_class = (urllib3.connection.HTTPSConnection if url.scheme == "https"
                                  else urllib3.connection.HTTPConnection)
        self._host, self._port = url.host, url.port
        self._prefix = (url.path or "").rstrip("/")

    @classmethod
    def from_config(cls, config):
        return cls(config.base_url, config.namespace, config.period_secs, config.watch,
                   max_answer_bytes=config.max_answer_bytes)

    def start(self):
        workers = [self._streamer] * self.max_streams + [self._poller] * self.poll_workers
        for worker in workers:
            thread = threading.Thread(target=self._run, args=(worker,), name="ltcp-namerd", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, worker):
        """Run a worker loop for good: a bug in it is logged, and the loop starts again."""
        while True:
            try:
                worker()
                return
            except Exception:
                log.exception("namerd worker failed; restarting it")

    def watch(self, name, deliver):
        streamed = self._streaming < self.max_streams
        entry = self._entries[name] = _Name(name, deliver, streamed)
        if streamed:
            self._streaming += 1
            self._to_stream.put(entry)
        else:
            self._schedule.add_first(entry)

    def unwatch(self, name):
        """Stop following ``name``; its streaming slot and connection are freed at once."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.stop()
            if entry.streamed:
                self._streaming -= 1
            else:
                self._schedule.forget(entry)

    @property
    def watched(self):
        """How many names are followed (reactor thread)."""
        return len(self._entries)

    def close(self, timeout=1.0):
        """Stop every worker: cut their connections and wait up to ``timeout``."""
        for entry in list(self._entries.values()):
            entry.stop()
        for _ in range(self.max_streams):
            self._to_stream.put(None)
        self._schedule.close()
        for sock in list(self._sockets):
            _cut(sock)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = sum(thread.is_alive() for thread in self._threads)
        if alive:
            log.warning("namerd: %d workers still stopping", alive)

    # -- answers ----------------------------------------------------------------

    def _path(self, name, watch):
        query = urllib.parse.urlencode({"path": name, **({"watch": "true"} if watch else {})})
        namespace = urllib.parse.quote(self.namespace, safe="")
        return f"{self._prefix}/api/1/resolve/{namespace}?{query}"

    def _apply(self, entry, answer):
        """Deliver a decoded answer if it changes what the balancer has."""
        state, addresses, problems = parse_answer(answer)
        for problem in problems:
            log.warning("namerd: %s: %s (address skipped)", entry.name, problem)
        if state == PENDING:
            return
        entry.failures = 0
        update = addresses or None
        if update != entry.last and not entry.stopped.is_set():
            entry.last = update
            entry.deliver(update)

    def _failed(self, entry, exc):
        """Count a failed request; logged at WARNING the first time in a row, then at DEBUG."""
        if entry.stopped.is_set():
            return  # unwatched or closing: the cut connection is ours
        outcome = _outcome(exc)
        if outcome is None:  # not a failure we know: a bug, which the worker's restart logs
            raise exc
        self.stats.request(outcome)
        entry.failures += 1
        level = logging.WARNING if entry.failures == 1 else logging.DEBUG
        log.log(level, "namerd: %s: %s (%s); keeping the last answer, retrying with backoff up to %gs "
                "(failure %d)", entry.name, exc, outcome, self.period, entry.failures)

    def _backoff_delay(self, entry):
        """Exponential, jittered, capped at periodSecs."""
        return backoff(entry.failures, FIRST_BACKOFF, self.period)

    def _request(self, entry, watch, deadline):
        """Send one request on a connection of its own, which ``entry.stop()`` can cut.

        Connecting and waiting for the response's headers end by ``deadline``.
        Returns ``(connection, response)``, or ``(None, None)`` if the name
        was unwatched meanwhile.  The caller closes the connection.
        """
        conn = self._connection_class(self._host, self._port, timeout=_left(deadline),
                                      socket_options=_SOCKET_OPTIONS)
        try:
            conn.connect()
            self._sockets.add(conn.sock)
            entry.sock = conn.sock
            if entry.stopped.is_set():  # unwatched while connecting: stop() saw no socket to cut
                conn.close()
                return None, None
            started = time.monotonic()
            conn.timeout = _left(deadline)  # request() and getresponse() apply it to the socket
            conn.request("GET", self._path(entry.name, watch), preload_content=False)
            response = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        self.stats.observe(time.monotonic() - started)
        if response.status != 200:
            conn.close()
            raise NamerdError(f"HTTP {response.status}", f"http_{response.status}")
        self.stats.request("ok")
        return conn, response

    # -- streaming watch ------------------------------------------------------------

    def _streamer(self):
        """Follow one name at a time, for as long as it is watched."""
        while True:
            entry = self._to_stream.get()
            if entry is None:
                return
            while not entry.stopped.is_set():
                try:
                    self._follow(entry)
                    self._failed(entry, NamerdError("the watch stream ended", "dropped"))
                except Exception as exc:
                    self._failed(entry, exc)
                if entry.stopped.wait(self._backoff_delay(entry)):
                    break

    def _follow(self, entry):
        conn, response = self._request(entry, watch=True, deadline=time.monotonic() + CONNECT_TIMEOUT)
        if conn is None:
            return
        try:
            conn.timeout = None  # a watch may stay silent for as long as nothing changes
            conn.sock.settimeout(None)
            objects = ObjectStream(self.max_answer_bytes)
            for chunk in response.stream(1 << 16):
                for answer in objects.feed(chunk):
                    self._apply(entry, answer)
            for answer in objects.finish():
                self._apply(entry, answer)
        finally:
            entry.sock = None
            conn.close()

    # -- polling -------------------------------------------------------------------

    def _poller(self):
        """Take due names off the shared schedule, poll each once, put it back in the rotation."""
        while True:
            entry = self._schedule.take()
            if entry is None:
                return
            try:
                self._poll(entry)
            except Exception as exc:
                self._failed(entry, exc)
            if not entry.stopped.is_set():
                self._schedule.add(entry, self._backoff_delay(entry) if entry.failures else self.period)

    def _poll(self, entry):
        """One request with a deadline for the whole of it, however namerd trickles its answer."""
        deadline = time.monotonic() + POLL_TIMEOUT
        conn, response = self._request(entry, watch=False, deadline=deadline)
        if conn is None:
            return
        try:
            body = bytearray()
            while len(body) <= self.max_answer_bytes:
                conn.sock.settimeout(_left(deadline))
                chunk = response.read1(1 << 16)  # what has arrived: the deadline is checked between reads
                if not chunk:
                    break
                body += chunk
            if len(body) > self.max_answer_bytes:
                raise NamerdError(f"an answer longer than {self.max_answer_bytes} bytes (maxAnswerBytes)")
            self._apply(entry, _decode(bytes(body)))
        finally:
            entry.sock = None
            conn.close()
