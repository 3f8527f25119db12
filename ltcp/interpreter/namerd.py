"""``io.l5d.namerd.http``: follow names through namerd's HTTP API.

``GET {baseUrl}/api/1/resolve/{namespace}?path={name}`` answers one JSON
object; with ``&watch=true`` the answer is a chunked stream of such objects,
one per state change, each ending in a newline.

Threads are bounded: the first ``MAX_STREAMS`` names each get a streaming
watcher (one pool thread apiece); every further name is polled by one more
pool thread, round-robin, every ``periodSecs``.  With ``watch: false`` every
name is polled that way.  So a router never runs more than
``MAX_STREAMS + 1`` namerd threads, however many names SNI routing brings.

Failures (an HTTP error, a ``failed`` answer, malformed JSON, a dropped
stream, namerd down) keep the last good address set, are counted, and are
retried with exponential backoff and jitter capped at ``periodSecs``.
"""

import concurrent.futures
import ipaddress
import json
import logging
import queue
import random
import socket
import threading
import time
import urllib.parse
import weakref

import urllib3

from ..config import MAX_WEIGHT, Address
from ..histogram import LATENCY_BUCKETS, Histogram

__all__ = ["NamerdInterpreter", "NamerdError", "ObjectStream", "parse_answer"]

log = logging.getLogger(__name__)

MAX_STREAMS = 16
MAX_OBJECT_BYTES = 4 << 20
CONNECT_TIMEOUT = 5.0
POLL_READ_TIMEOUT = 10.0
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
    ip, port = entry.get("ip"), entry.get("port")
    try:
        ip = str(ipaddress.ip_address(ip))
    except ValueError:
        raise NamerdError(f"{ip!r} is not an IP address literal") from None
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

    def feed(self, chunk):
        """Every complete object the chunk finishes, decoded; NamerdError on garbage."""
        self._partial += chunk
        objects = []
        while True:
            end = self._partial.find(b"\n")
            if end < 0:
                break
            line = bytes(self._partial[:end]).strip()
            del self._partial[:end + 1]
            if line:
                objects.append(_decode(line))
        if len(self._partial) > self.limit:
            raise NamerdError(f"an answer longer than {self.limit} bytes")
        return objects

    def finish(self):
        """The last object, if the stream ended without its newline."""
        line = bytes(self._partial).strip()
        self._partial.clear()
        return [_decode(line)] if line else []


def _decode(line):
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise NamerdError(f"malformed JSON: {exc}") from None


class Stats:
    """Counters the control plane updates and the admin server reads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # outcome -> count
        self.latency = Histogram(LATENCY_BUCKETS)
        self.endpoints = {}  # name -> endpoints in the last good set
        self.last_update = {}  # name -> wall-clock time of the last good answer

    def request(self, outcome):
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe(self, seconds):
        """Time from sending a request to namerd's response headers."""
        with self.lock:
            self.latency.observe(seconds)

    def snapshot(self):
        with self.lock:
            return {"requests": dict(self.requests), "latency": self.latency.copy(),
                    "endpoints": dict(self.endpoints), "last_update": dict(self.last_update)}

    def updated(self, name, addresses):
        with self.lock:
            self.endpoints[name] = len(addresses or ())
            self.last_update[name] = time.time()


class _Name:
    """One watched name and what was last delivered for it."""

    __slots__ = ("name", "deliver", "last", "failures", "streamed", "cancelled")

    def __init__(self, name, deliver):
        self.name = name
        self.deliver = deliver
        self.last = ()  # nothing delivered yet
        self.failures = 0
        self.streamed = False
        self.cancelled = False  # unwatched: workers drop it at their next look


def _pool_manager(sockets, max_streams):
    """A PoolManager whose connections record their sockets, so close() can cut them."""

    def tracked(connection_class):
        class Tracked(connection_class):
            def connect(self):
                super().connect()
                sockets.add(self.sock)
        return Tracked

    options = urllib3.connection.HTTPConnection.default_socket_options + [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    if hasattr(socket, "TCP_KEEPIDLE"):  # notice a vanished namerd on a silent watch
        options += [(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
                    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)]
    manager = urllib3.PoolManager(num_pools=4, maxsize=max_streams + 1, retries=False, socket_options=options)
    manager.pool_classes_by_scheme = {
        "http": type("TrackedPool", (urllib3.HTTPConnectionPool,),
                     {"ConnectionCls": tracked(urllib3.connection.HTTPConnection)}),
        "https": type("TrackedTLSPool", (urllib3.HTTPSConnectionPool,),
                      {"ConnectionCls": tracked(urllib3.connection.HTTPSConnection)}),
    }
    return manager


class NamerdInterpreter:
    """Watches names on namerd from ``max_streams + 1`` pool threads, started up front.

    ``watch()`` runs on the reactor thread, so it only puts the name on a
    queue: the first ``max_streams`` names go to the streaming workers, the
    rest to the poller.
    """

    def __init__(self, base_url, namespace, period_secs, watch=True, max_streams=MAX_STREAMS):
        self.base_url = base_url
        self.namespace = namespace
        self.period = period_secs
        self.max_streams = max_streams if watch else 0
        self.stats = Stats()
        self._closing = threading.Event()
        self._to_stream = queue.SimpleQueue()
        self._to_poll = queue.SimpleQueue()
        self._assigned = 0  # names given to streaming workers (reactor thread only)
        self._entries = {}  # name -> _Name (reactor thread only)
        self._sockets = weakref.WeakSet()
        self._http = _pool_manager(self._sockets, max(1, self.max_streams))
        self._executor = None
        self._running = 0
        self._finished = threading.Condition()

    def start(self):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_streams + 1, thread_name_prefix="ltcp-namerd")
        for _ in range(self.max_streams):
            self._submit(self._streamer)
        self._submit(self._poller)

    def _submit(self, worker):
        with self._finished:
            self._running += 1
        self._executor.submit(self._run, worker)

    def _run(self, worker):
        try:
            worker()
        except Exception:
            log.exception("namerd worker failed")
        finally:
            with self._finished:
                self._running -= 1
                self._finished.notify_all()

    def watch(self, name, deliver):
        entry = self._entries[name] = _Name(name, deliver)
        if self._assigned < self.max_streams:
            self._assigned += 1
            entry.streamed = True
            self._to_stream.put(entry)
        else:
            self._to_poll.put(entry)

    def unwatch(self, name):
        """Stop following ``name``; a streaming slot is freed once its worker notices."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            entry.cancelled = True
            if entry.streamed:
                self._assigned -= 1

    def close(self, timeout=1.0):
        """Stop every worker: cut their connections and wait up to ``timeout``."""
        self._closing.set()
        for _ in range(self.max_streams):
            self._to_stream.put(None)
        self._to_poll.put(None)
        for sock in list(self._sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._finished:
            stopped = self._finished.wait_for(lambda: self._running == 0, timeout)
        if self._executor is not None:
            if not stopped:
                log.warning("namerd: %d workers still stopping", self._running)
            self._executor.shutdown(wait=stopped)
        self._http.clear()

    # -- answers ----------------------------------------------------------------

    def _url(self, name, watch):
        query = urllib.parse.urlencode({"path": name, **({"watch": "true"} if watch else {})})
        namespace = urllib.parse.quote(self.namespace, safe="")
        return f"{self.base_url}/api/1/resolve/{namespace}?{query}"

    def _apply(self, entry, answer):
        """Deliver a decoded answer if it changes what the balancer has."""
        state, addresses, problems = parse_answer(answer)
        for problem in problems:
            log.warning("namerd: %s: %s (address skipped)", entry.name, problem)
        if state == PENDING:
            return
        entry.failures = 0
        self.stats.updated(entry.name, addresses)
        update = addresses or None
        if update != entry.last:
            entry.last = update
            entry.deliver(update)

    def _failed(self, entry, outcome, reason):
        """Count a failure; logged at WARNING the first time in a row, then at DEBUG."""
        self.stats.request(outcome)
        entry.failures += 1
        level = logging.WARNING if entry.failures == 1 else logging.DEBUG
        log.log(level, "namerd: %s: %s; keeping the last answer, retrying with backoff up to %gs (failure %d)",
                entry.name, reason, self.period, entry.failures)

    def _backoff(self, entry):
        """Sleep before retrying; False once closing.  Exponential, jittered, capped at periodSecs."""
        ceiling = min(self.period, FIRST_BACKOFF * 2 ** max(0, entry.failures - 1))
        return not self._closing.wait(ceiling / 2 + random.random() * ceiling / 2)

    # -- streaming watch ------------------------------------------------------------

    def _streamer(self):
        """Follow one name at a time, for as long as it is watched."""
        while not self._closing.is_set():
            entry = self._to_stream.get()
            if entry is None:
                return
            self._follow_until_cancelled(entry)

    def _follow_until_cancelled(self, entry):
        while not self._closing.is_set() and not entry.cancelled:
            try:
                self._follow(entry)
                outcome, reason = "dropped", "the watch stream ended"
            except NamerdError as exc:
                outcome, reason = exc.outcome, str(exc)
            except urllib3.exceptions.ProtocolError as exc:
                outcome, reason = "dropped", f"the watch stream broke: {exc}"
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                outcome, reason = "unreachable", f"cannot reach namerd: {exc}"
            if self._closing.is_set() or entry.cancelled:
                return  # our own close() cut the stream, or nobody wants the name any more
            self._failed(entry, outcome, reason)
            if not self._backoff(entry):
                return

    def _follow(self, entry):
        started = time.monotonic()
        response = self._http.request(
            "GET", self._url(entry.name, watch=True), preload_content=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=None))
        try:
            self.stats.observe(time.monotonic() - started)
            if response.status != 200:
                raise NamerdError(f"HTTP {response.status}", f"http_{response.status}")
            self.stats.request("ok")
            objects = ObjectStream()
            for chunk in response.stream(1 << 16):
                if self._closing.is_set() or entry.cancelled:
                    return
                for answer in objects.feed(chunk):
                    self._apply(entry, answer)
            for answer in objects.finish():
                self._apply(entry, answer)
        finally:
            response.release_conn()

    # -- polling -------------------------------------------------------------------

    def _poller(self):
        """Poll every name without a stream, one after another, every periodSecs."""
        polled = []
        next_round = time.monotonic() + self.period
        while not self._closing.is_set():
            try:
                entry = self._to_poll.get(timeout=max(0.0, next_round - time.monotonic()))
            except queue.Empty:
                polled = [entry for entry in polled if not entry.cancelled]
                for entry in polled:
                    if self._closing.is_set():
                        return
                    self._poll(entry)
                next_round = time.monotonic() + self.period
                continue
            if entry is None:
                return
            polled.append(entry)
            self._poll(entry)  # a new name is answered at once, not a period later

    def _poll(self, entry):
        started = time.monotonic()
        try:
            response = self._http.request(
                "GET", self._url(entry.name, watch=False),
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=POLL_READ_TIMEOUT))
        except urllib3.exceptions.HTTPError as exc:
            self._failed(entry, "unreachable", f"cannot reach namerd: {exc}")
            return
        self.stats.observe(time.monotonic() - started)
        try:
            if response.status != 200:
                raise NamerdError(f"HTTP {response.status}", f"http_{response.status}")
            self._apply(entry, _decode(response.data))
        except NamerdError as exc:
            self._failed(entry, exc.outcome, str(exc))
            return
        self.stats.request("ok")
