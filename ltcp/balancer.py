"""One balancer per destination name: its endpoints, waiters, pool and dials.

Discovery updates arrive as events (``update``) on the reactor thread; picks
use a ``Picker`` rebuilt only when the set of usable endpoints changes, so the
per-connection path never recomputes balancer state.
"""

import collections
import functools
import logging
import random
import socket
import time

from . import proxyproto
from .connector import Connect
from .endpoint import Endpoint, Picker
from .loop import ERRORS, HANGUP, READ, WRITE
from .tls import client_context

__all__ = ["Balancer", "Dial"]

log = logging.getLogger(__name__)

RETRY_BACKOFF = 0.025  # first pause once the quick attempts have failed; doubles up to 1 s
QUICK_ATTEMPTS = 3  # attempts a stream makes without a pause (each to another endpoint)
MAX_ATTEMPTS = 10  # attempts a stream makes in all before it gives up (cause "unreachable")
POOL_RETRY = 1.0  # pause before refilling the pool after a failure
UPDATE_SLICE = 2000  # addresses merged per reactor turn, so a huge answer never stalls the loop
LOCAL_CAUSES = ("resources", "bug")  # connect failures that say nothing about the endpoint


class Balancer:
    """Endpoints of one destination name and how connections are spread over them."""

    def __init__(self, reactor, name, settings, budget, rng=None):
        self.reactor = reactor
        self.name = name
        self.settings = settings
        self.budget = budget  # the process's stream budget; pooled connections draw on it too
        self.random = (rng or random.Random()).random
        self.endpoints = {}  # sockaddr -> Endpoint, as discovery last said
        self.retired = {}  # sockaddr -> Endpoint removed by discovery, streams still open
        self.resolved = False  # has discovery answered at all?
        self.last_update = None  # wall-clock time of the last discovery answer
        self.waiters = {}  # Dial -> None, oldest first
        self.picker = Picker(())
        self.pool = collections.deque()  # PooledConnection, ready to hand out
        self.pool_connecting = 0
        self.pool_timer = None
        self.closed = False
        self.merging = None  # an update being merged a slice per turn: (addresses, position, endpoints)
        self.queued = None  # the newest update that arrived during a merge
        self.dials = 0  # streams between accept and established that use this balancer
        self.connect_failures = collections.Counter()  # cause -> count
        self.tls = (client_context(settings.tls), settings.tls.dns_name) if settings.tls else None
        self.proxy_header = {"v1": proxyproto.build_v1, "v2": proxyproto.build_v2}.get(settings.proxy_protocol)

    # -- discovery ------------------------------------------------------------

    def update(self, addresses):
        """Replace the endpoint set; None or empty means the name resolves to nothing.

        A large set is merged ``UPDATE_SLICE`` addresses per reactor turn and
        takes effect at once when complete; updates arriving meanwhile wait,
        and only the newest of them is merged next, so a stream of updates
        still takes effect one complete set after another.
        """
        if self.closed:
            return
        if self.merging is not None:  # the newest update waits for the merge under way, then goes next
            self.queued = addresses or ()
            return
        self.merging = (addresses or (), 0, {})
        self._merge()

    def _merge(self):
        if self.merging is None or self.closed:
            return
        addresses, position, fresh = self.merging
        current, retired = self.endpoints, self.retired
        end = min(position + UPDATE_SLICE, len(addresses))
        for address in addresses[position:end]:
            key = (address.ip, address.port)
            endpoint = current.get(key) or retired.get(key) or Endpoint(address.ip, address.port, balancer=self)
            endpoint.weight = address.weight
            fresh[key] = endpoint
        if end < len(addresses):
            self.merging = (addresses, end, fresh)
            self.reactor.call_soon(self._merge)
            return
        self.merging = None
        self._replace(fresh)
        if self.queued is not None:
            queued, self.queued = self.queued, None
            self.update(queued)

    def _replace(self, fresh):
        current = self.endpoints
        for key, endpoint in fresh.items():
            if endpoint.retired:
                self.retired.pop(key, None)
                endpoint.retired = False
        removed = [e for key, e in current.items() if key not in fresh]
        for endpoint in removed:
            self._retire(endpoint)
        added = len(fresh) - (len(current) - len(removed))
        self.endpoints = fresh
        self.resolved = True
        self.last_update = time.time()
        if added or removed or not fresh:
            log.info("%s: %d endpoints (%d added, %d removed)", self.name, len(fresh), added, len(removed))
        self._rebuild()
        self._drop_pooled(lambda pooled: pooled.endpoint.retired)
        waiters, self.waiters = self.waiters, {}
        for dial in waiters:
            if fresh:
                dial.next_attempt()
            else:
                dial.fail("no_endpoints")
        self._fill_pool()

    def _retire(self, endpoint):
        endpoint.retired = True
        endpoint.failed = False
        if endpoint.revive_timer is not None:
            endpoint.revive_timer.cancel()
            endpoint.revive_timer = None
        if endpoint.load:
            self.retired[endpoint.sockaddr] = endpoint

    def drop_if_unused(self, endpoint):
        if endpoint.retired and not endpoint.load:
            self.retired.pop(endpoint.sockaddr, None)

    def _rebuild(self):
        usable = [e for e in self.endpoints.values() if not e.failed]
        # Every endpoint failed: better to try them anyway than to refuse everyone.
        self.picker = Picker(usable or self.endpoints.values())

    @property
    def idle(self):
        """Nothing depends on this balancer: it may be evicted from the route cache."""
        return (not self.dials and not self.waiters and not self.retired
                and not any(e.load for e in self.endpoints.values()))

    def pick(self, avoid=None):
        return self.picker.pick(self.random, avoid)

    # -- connect outcomes -----------------------------------------------------

    def connect_succeeded(self, endpoint):
        endpoint.failures = 0
        endpoint.connects += 1

    def connect_failed(self, endpoint, cause):
        self.connect_failures[cause] += 1
        if cause in LOCAL_CAUSES:  # our shortage or our bug, not the endpoint's fault
            self.drop_if_unused(endpoint)
            return
        endpoint.connect_failures += 1
        endpoint.failures += 1
        fail_fast = self.settings.fail_fast
        if not endpoint.failed and not endpoint.retired and endpoint.failures >= fail_fast.max_consecutive_failures:
            endpoint.failed = True
            endpoint.revive_timer = self.reactor.call_later(fail_fast.failure_penalty_secs, self._revive, endpoint)
            log.warning("%s: endpoint %s ejected for %gs after %d failed connects (%s)", self.name,
                        endpoint.address, fail_fast.failure_penalty_secs, endpoint.failures, cause)
            self._rebuild()
        self.drop_if_unused(endpoint)

    def _revive(self, endpoint):
        endpoint.revive_timer = None
        endpoint.failed = False
        # One more failure sends it straight back out.
        endpoint.failures = self.settings.fail_fast.max_consecutive_failures - 1
        log.info("%s: endpoint %s back after its penalty", self.name, endpoint.address)
        self._rebuild()

    def stream_closed(self, endpoint):
        endpoint.active -= 1
        self.drop_if_unused(endpoint)

    # -- dials ------------------------------------------------------------------

    def dial(self, dial):
        """Start ``dial`` now, or queue it until discovery first answers."""
        if self.endpoints:
            dial.next_attempt()
        elif self.resolved:
            dial.fail("no_endpoints")
        elif len(self.waiters) >= self.settings.max_waiters:
            dial.fail("no_endpoints")
        else:
            self.waiters[dial] = None

    def forget(self, dial):
        self.waiters.pop(dial, None)

    # -- pre-established connections (minConnections) ---------------------------

    def take_pooled(self):
        """A pooled (endpoint, socket, registered events: none) ready for a stream, or None.

        The stream's own budget covers the socket from now on.
        """
        if not self.pool:
            return None
        pooled = self.pool.popleft()
        pooled.unwatch()  # its callback must not outlive it: the stream registers its own
        self.budget.pooled -= 1
        self.reactor.call_soon(self._fill_pool)
        return pooled.endpoint, pooled.sock, 0

    def _fill_pool(self):
        # A PROXY header names the client, so a connection made before it arrives cannot carry one.
        if self.closed or self.pool_timer is not None or self.proxy_header is not None:
            return
        settings, budget = self.settings, self.budget
        for _ in range(settings.min_connections - len(self.pool) - self.pool_connecting):
            endpoint = self.pick()
            if endpoint is None or budget.pooled >= budget.pool_capacity:
                return
            budget.pooled += 1
            endpoint.pending += 1
            self.pool_connecting += 1
            Connect(self.reactor, endpoint.family, endpoint.sockaddr, settings.connect_timeout_ms / 1000,
                    functools.partial(self._pool_connected, endpoint), tls=self.tls)

    def _pool_connected(self, endpoint, sock, cause):
        endpoint.pending -= 1
        self.pool_connecting -= 1
        if sock is None:
            self.budget.pooled -= 1
            self.connect_failed(endpoint, cause)
            self._refill_later()
            return
        self.connect_succeeded(endpoint)
        if self.closed or endpoint.retired:
            self.budget.pooled -= 1
            sock.close()
            return
        self.pool.append(PooledConnection(self, endpoint, sock))  # takes over the WRITE registration

    def _refill_later(self):
        if self.pool_timer is None and not self.closed:
            self.pool_timer = self.reactor.call_later(POOL_RETRY, self._refill_now)

    def _refill_now(self):
        self.pool_timer = None
        self._fill_pool()

    def _drop_pooled(self, condition):
        keep = collections.deque()
        for pooled in self.pool:
            if condition(pooled):
                pooled.unwatch()
                pooled.sock.close()
                self.budget.pooled -= 1
            else:
                keep.append(pooled)
        self.pool = keep

    def pooled_closed(self, pooled):
        """A pooled connection was closed by its endpoint before use."""
        self._drop_pooled(lambda p: p is pooled)
        self._refill_later()

    def close(self):
        """Stop for good: fail waiters, close pooled connections."""
        self.closed = True
        self.merging = self.queued = None
        for dial in list(self.waiters):
            dial.fail("no_endpoints")
        self.waiters.clear()
        self._drop_pooled(lambda pooled: True)
        for endpoint in self.endpoints.values():
            if endpoint.revive_timer is not None:
                endpoint.revive_timer.cancel()
        if self.pool_timer is not None:
            self.pool_timer.cancel()


class PooledConnection:
    """An idle upstream connection waiting to be handed to a stream.

    While idle it is watched for readability: EOF means the endpoint closed it
    (drop and replace); data means the server speaks first, so the bytes are
    left in the kernel for the stream and the watch ends.
    """

    __slots__ = ("balancer", "endpoint", "sock", "watched")

    def __init__(self, balancer, endpoint, sock):
        self.balancer = balancer
        self.endpoint = endpoint
        self.sock = sock
        self.watched = True
        balancer.reactor.modify(sock, READ, self._readable)

    def _readable(self, mask):
        try:
            # Peek below TLS too: only "closed or not" matters here.
            data = socket.socket.recv(self.sock, 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.unwatch()
        else:
            self.balancer.pooled_closed(self)

    def unwatch(self):
        if self.watched:
            self.balancer.reactor.unregister(self.sock)
            self.watched = False

    def crashed(self, exc):
        self.balancer.pooled_closed(self)


class Dial:
    """The connect phase of one accepted stream.

    Picks an endpoint, connects within the client's per-attempt timeout, and on
    failure tries another while the server's connect deadline allows: up to
    ``QUICK_ATTEMPTS`` straight away, then with a doubling pause, and at most
    ``MAX_ATTEMPTS`` in all, so a destination whose endpoints all refuse can
    never spin the loop.  Meanwhile the client is watched: one that resets
    ends the dial at once.  Ends in exactly one of
    ``owner.established(dial, endpoint, sock, events)`` or
    ``owner.dial_failed(dial, cause)``; ``client_events`` says how the client
    socket is registered when it is handed over.
    """

    __slots__ = ("balancer", "client", "envelope", "owner", "endpoint", "attempt",
                 "deadline_timer", "retry_timer", "tries", "client_events")

    def __init__(self, balancer, client, envelope, owner):
        self.balancer = balancer
        self.client = client
        self.envelope = envelope
        self.owner = owner
        self.endpoint = None
        self.attempt = None
        self.retry_timer = None
        self.tries = 0
        self.deadline_timer = None
        self.client_events = 0

    def start(self):
        self.balancer.dials += 1
        reactor = self.balancer.reactor
        self.deadline_timer = reactor.call_at(self.envelope.connect_deadline, self._expired)
        reactor.register(self.client, HANGUP, self._client_hung_up)
        self.client_events = HANGUP
        self.balancer.dial(self)

    def _client_hung_up(self, mask):
        """The client reset, or shut down its side; after a reset nobody is left to serve.

        A shutdown alone may be a half-close by a client that has said all it
        will and waits for the answer, so the dial goes on, watching only for
        a reset from then on.
        """
        if mask & HANGUP:
            try:
                socket.socket.recv(self.client, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.fail("closed")
                return
            self.balancer.reactor.modify(self.client, ERRORS, self._client_hung_up)
            self.client_events = ERRORS
            return
        self.fail("closed")  # a reset, or a full hang-up, after a half-close

    def _unwatch_client(self):
        if self.client_events:
            self.balancer.reactor.unregister(self.client)
            self.client_events = 0

    def next_attempt(self):
        self.retry_timer = None
        balancer = self.balancer
        pooled = balancer.take_pooled()
        if pooled is not None:
            endpoint, sock, events = pooled
            self.endpoint = endpoint
            self._finish(endpoint, sock, events)
            return
        endpoint = balancer.pick(avoid=self.endpoint)
        if endpoint is None:
            self.fail("no_endpoints")
            return
        self.endpoint = endpoint
        self.tries += 1
        endpoint.pending += 1
        reactor = balancer.reactor
        remaining = self.envelope.connect_deadline - reactor.now
        timeout = min(balancer.settings.connect_timeout_ms / 1000, max(remaining, 0.001))
        preface = None
        if balancer.proxy_header is not None:
            envelope = self.envelope
            preface = balancer.proxy_header(envelope.source, envelope.destination or self.client.getsockname()[:2])
        self.attempt = Connect(reactor, endpoint.family, endpoint.sockaddr, timeout, self._connected,
                               preface, balancer.tls)

    def _connected(self, sock, cause):
        self.attempt = None
        endpoint = self.endpoint
        endpoint.pending -= 1
        balancer = self.balancer
        if sock is not None:
            balancer.connect_succeeded(endpoint)
            self._finish(endpoint, sock, WRITE)
            return
        balancer.connect_failed(endpoint, cause)
        if cause in LOCAL_CAUSES:
            self.fail(cause)
        elif self.tries >= MAX_ATTEMPTS:
            self.fail("unreachable")
        elif self.tries < min(QUICK_ATTEMPTS, len(balancer.endpoints)):
            self.next_attempt()
        else:
            pause = min(1.0, RETRY_BACKOFF * 2 ** max(0, self.tries - QUICK_ATTEMPTS))
            self.retry_timer = balancer.reactor.call_later(pause, self.next_attempt)

    def _finish(self, endpoint, sock, events):
        """Hand the connected socket (registered for ``events``, or not at all) to the owner.

        A bug in the owner while it takes the stream over ends the stream here,
        since no callback of ours is left to be told.
        """
        self.deadline_timer.cancel()
        self.deadline_timer = None
        self.balancer.dials -= 1
        try:
            self.owner.established(self, endpoint, sock, events)
        except Exception:
            log.exception("handing over the stream from %s to %s failed", self.envelope.source, endpoint.address)
            reactor = self.balancer.reactor
            reactor.discard(sock)
            sock.close()
            reactor.discard(self.client)  # whoever had registered it last
            self.client_events = 0
            self.balancer.dials += 1  # undone once more by _stop
            self.fail("bug")

    def _expired(self):
        self.deadline_timer = None
        self._stop()
        self.owner.dial_failed(self, "timeout")

    def fail(self, cause):
        if cause == "no_endpoints":
            self.balancer.connect_failures[cause] += 1
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        self._stop()
        self.owner.dial_failed(self, cause)

    def crashed(self, exc):
        """A bug in one of our callbacks: end the stream if it is still ours."""
        if self.deadline_timer is not None:
            self.fail("bug")

    def _stop(self):
        self.balancer.dials -= 1
        self.balancer.forget(self)
        self._unwatch_client()
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
            self.endpoint.pending -= 1
            self.balancer.drop_if_unused(self.endpoint)
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
