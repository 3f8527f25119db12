"""One balancer per destination name: its endpoints, waiters, pool and dials.

Discovery updates arrive as events (``update``) on the reactor thread; the
endpoints themselves, their states and the picker live in a pure
``EndpointSet``, rebuilt only when the set of usable endpoints changes, so
the per-connection path never recomputes balancer state.  What needs the
reactor stays here: penalty timers, waiters, the pool, merging big updates
a slice per turn.
"""

import collections
import functools
import logging
import random
import socket
import time
from typing import Protocol

from ..protocol import proxyproto
from .connector import Connect
from .endpoint import RETIRED, EndpointSet
from ..lifecycle import Lifecycle, State
from ..loop import ERRORS, HANGUP, READ, WRITE, Registration

__all__ = ["Balancer", "Dial", "DialOwner", "DIAL"]

log = logging.getLogger(__name__)

RETRY_BACKOFF = 0.025  # first pause once the quick attempts have failed; doubles up to 1 s
QUICK_ATTEMPTS = 3  # attempts a stream makes without a pause (each to another endpoint)
MAX_ATTEMPTS = 10  # attempts a stream makes in all before it gives up (cause "unreachable")
POOL_RETRY = 1.0  # pause before refilling the pool after a failure
UPDATE_SLICE = 2000  # addresses merged per reactor turn, so a huge answer never stalls the loop
LOCAL_CAUSES = ("resources", "bug")  # connect failures that say nothing about the endpoint
CANCELLED = "cancelled"  # an attempt its stream abandoned: no failure at all


class Balancer:
    """Endpoints of one destination name and how connections are spread over them."""

    def __init__(self, reactor, name, settings, budget, router="", rng=None, tls=None):
        self.reactor = reactor
        self.name = name
        self.prefix = f"{router} {name}".strip()  # how log lines name this destination
        self.settings = settings
        self.budget = budget  # the process's stream budget; pooled connections draw on it too
        self.random = (rng or random.Random()).random
        self.set = EndpointSet(settings.fail_fast.max_consecutive_failures)
        self.resolved = False  # has discovery answered at all?
        self.last_update = None  # wall-clock time of the last discovery answer
        self.waiters = {}  # Dial -> None, oldest first
        self.penalties = {}  # ejected Endpoint -> its revive timer
        self.pool = collections.deque()  # PooledConnection, ready to hand out
        self.pool_connecting = 0
        self.pool_timer = None
        self.closed = False
        self.merging = None  # an update being merged a slice per turn: (addresses, position, endpoints)
        self.queued = None  # the newest update that arrived during a merge
        self.dials = 0  # streams between accept and established that use this balancer
        self.streams = 0  # streams established to its endpoints, ever
        self.active = 0  # of those, the ones open now
        self.connect_failures = collections.Counter()  # cause -> count
        self.tls = tls  # (client context, server name) when the endpoints speak TLS
        self.proxy_header = {"v1": proxyproto.build_v1, "v2": proxyproto.build_v2}.get(settings.proxy_protocol)

    def __repr__(self):
        counts = self.set.counts()
        return (f"<Balancer {self.prefix} endpoints={counts} dials={self.dials} waiters={len(self.waiters)} "
                f"pool={len(self.pool)}{' closed' if self.closed else ''}>")

    @property
    def endpoints(self):
        return self.set.endpoints

    @property
    def retired(self):
        return self.set.retired

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
        if self.merging is not None:
            self.queued = addresses or ()
            return
        self.merging = (addresses or (), 0, {})
        self._merge()

    def _merge(self):
        if self.merging is None or self.closed:
            return
        addresses, position, fresh = self.merging
        end = min(position + UPDATE_SLICE, len(addresses))
        self.set.collect(addresses[position:end], fresh)
        if end < len(addresses):
            self.merging = (addresses, end, fresh)
            self.reactor.call_soon(self._merge)
            return
        self.merging = None
        self._apply(fresh)
        if self.queued is not None:
            queued, self.queued = self.queued, None
            self.update(queued)

    def _apply(self, fresh):
        added, removed = self.set.replace(fresh)
        for endpoint in removed:
            self._cancel_penalty(endpoint)
        self.resolved = True
        self.last_update = time.time()
        if added or removed or not fresh:
            log.info("%s: %d endpoints (%d added, %d removed)", self.prefix, len(fresh), added, len(removed))
        # (and those to endpoints failing health checks, unless the picker must use them anyway)
        usable = set(self.set.picker.candidates) if self.set.unhealthy else ()
        self._drop_pooled(lambda pooled: pooled.endpoint.sockaddr not in fresh
                          or (not pooled.endpoint.healthy and pooled.endpoint not in usable))
        waiters, self.waiters = self.waiters, {}
        call_now = self.reactor.call_now  # (a bug in one waiter's step ends that stream, not the others)
        for dial in waiters:
            if fresh:
                call_now(dial.next_attempt)
            else:
                call_now(dial.fail, "no_endpoints")
        self._fill_pool()

    def _cancel_penalty(self, endpoint):
        timer = self.penalties.pop(endpoint, None)
        if timer is not None:
            timer.cancel()

    @property
    def idle(self):
        """Nothing depends on this balancer: it may be evicted from the route cache."""
        return not self.dials and not self.waiters and not self.set.busy

    def pick(self, avoid=None):
        return self.set.picker.pick(self.random, avoid)

    # -- connect outcomes and streams -----------------------------------------------

    def attempt_ended(self, endpoint, cause=None, detail=""):
        """A connect to ``endpoint`` ended: in success (``cause`` None), failure, or ``CANCELLED`` by its stream."""
        endpoint.end_connect()
        if cause is None:  # (no settling: the stream about to run on it is not counted yet)
            self.set.connect_succeeded(endpoint)
            return
        if cause is not CANCELLED:
            self.connect_failures[cause] += 1
            if cause not in LOCAL_CAUSES and self.set.connect_failed(endpoint):  # ours say nothing of it
                penalty = self.settings.fail_fast.failure_penalty_secs
                self.penalties[endpoint] = self.reactor.call_later(penalty, self._revive, endpoint)
                log.warning("%s: endpoint %s ejected for %gs after %d failed connects (%s%s)", self.prefix,
                            endpoint.address, penalty, endpoint.failures, cause, f": {detail}" if detail else "")
        if endpoint.state is RETIRED:
            self.set.settle(endpoint)

    def _revive(self, endpoint):
        del self.penalties[endpoint]
        self.set.revive(endpoint)
        log.info("%s: endpoint %s back after its penalty", self.prefix, endpoint.address)

    def stream_opened(self, endpoint):
        endpoint.acquire()
        self.streams += 1
        self.active += 1

    def stream_closed(self, endpoint):
        endpoint.release()
        self.active -= 1
        if endpoint.state is RETIRED:
            self.set.settle(endpoint)

    # -- dials ------------------------------------------------------------------

    def dial(self, dial):
        """Start ``dial`` now, or queue it until discovery first answers."""
        if self.set.endpoints:
            dial.next_attempt()
        elif self.resolved or len(self.waiters) >= self.settings.max_waiters:
            dial.fail("no_endpoints")
        else:
            dial.wait()
            self.waiters[dial] = None

    def forget(self, dial):
        self.waiters.pop(dial, None)

    # -- pre-established connections (minConnections) ---------------------------

    def take_pooled(self):
        """A pooled (endpoint, socket) ready for a stream (not registered), or None.

        The stream's own budget covers the socket from now on.
        """
        if not self.pool:
            return None
        pooled = self.pool.popleft()
        pooled.want(0)  # its callback must not outlive it: the stream registers its own
        self.budget.pool.give_back()
        self.reactor.call_soon(self._fill_pool)
        return pooled.endpoint, pooled.sock

    def _fill_pool(self):
        # A PROXY header names the client, so a connection made before it arrives cannot carry one.
        if self.closed or self.pool_timer is not None or self.proxy_header is not None:
            return
        settings = self.settings
        for _ in range(settings.min_connections - len(self.pool) - self.pool_connecting):
            endpoint = self.pick()
            if endpoint is None or not self.budget.pool.take():
                return
            endpoint.begin_connect()
            self.pool_connecting += 1
            Connect(self.reactor, endpoint.family, endpoint.sockaddr, settings.connect_timeout_ms / 1000,
                    functools.partial(self._pool_connected, endpoint), tls=self.tls)

    def _pool_connected(self, endpoint, sock, cause, detail=""):
        self.pool_connecting -= 1
        self.attempt_ended(endpoint, cause, detail)
        if sock is None:
            self.budget.pool.give_back()
            self._refill_later()
            return
        if self.closed or endpoint.sockaddr not in self.endpoints:
            self.budget.pool.give_back()
            self.reactor.unregister(sock)
            sock.close()
            if endpoint.state is RETIRED:
                self.set.settle(endpoint)
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
                pooled.want(0)
                pooled.sock.close()
                self.budget.pool.give_back()
            else:
                keep.append(pooled)
        self.pool = keep

    def pooled_closed(self, pooled):
        """A pooled connection was closed by its endpoint before use."""
        self._drop_pooled(lambda p: p is pooled)
        self._refill_later()

    def close(self):
        """Stop for good: fail waiters, close pooled connections, cancel penalties."""
        self.closed = True
        self.merging = self.queued = None
        for dial in list(self.waiters):
            dial.fail("no_endpoints")
        self.waiters.clear()
        self._drop_pooled(lambda pooled: True)
        for timer in self.penalties.values():
            timer.cancel()
        self.penalties.clear()
        if self.pool_timer is not None:
            self.pool_timer.cancel()


class PooledConnection(Registration):
    """An idle upstream connection waiting to be handed to a stream.

    While idle it is watched for readability: EOF means the endpoint closed it
    (drop and replace); data means the server speaks first, so the bytes are
    left in the kernel for the stream and the watch ends.
    """

    __slots__ = ("balancer", "endpoint", "sock", "reactor", "fd", "events")

    def __init__(self, balancer, endpoint, sock):
        self.balancer = balancer
        self.endpoint = endpoint
        self.sock = sock
        self.reactor = balancer.reactor
        self.fd = sock.fileno()
        self.adopt(WRITE, READ)  # the connector left it registered for WRITE

    def on_event(self, mask):
        try:
            # Peek below TLS too: only "closed or not" matters here.
            data = socket.socket.recv(self.sock, 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.want(0)
        else:
            self.balancer.pooled_closed(self)

    def crashed(self, exc):
        self.balancer.pooled_closed(self)

    def __repr__(self):
        return f"<PooledConnection fd={self.fd} to {self.endpoint.address}{' watched' if self.events else ''}>"


class DialOwner(Protocol):
    """What a dial reports to (a listener)."""

    def established(self, dial: "Dial", endpoint, sock, events: int) -> None: ...

    def dial_failed(self, dial: "Dial", cause: str) -> None: ...


NEW = State("new")
WAITING = State("waiting")  # for discovery's first answer
CONNECTING = State("connecting")
PAUSED = State("paused")  # between attempts, once the quick ones have failed
ESTABLISHED = State("established")  # handed over to its owner
FAILED = State("failed")
_ENDINGS = {"establish": ESTABLISHED, "fail": FAILED}
DIAL = Lifecycle("Dial", {
    NEW: {"wait": WAITING, "connect": CONNECTING, **_ENDINGS},
    WAITING: {"connect": CONNECTING, **_ENDINGS},
    CONNECTING: {"connect": CONNECTING, "pause": PAUSED, **_ENDINGS},
    PAUSED: {"connect": CONNECTING, **_ENDINGS},
})


class Dial(Registration):
    """The connect phase of one accepted stream.

    Picks an endpoint, connects within the client's per-attempt timeout, and on
    failure tries another while the server's connect deadline allows: up to
    ``QUICK_ATTEMPTS`` straight away, then with a doubling pause, and at most
    ``MAX_ATTEMPTS`` in all, so a destination whose endpoints all refuse can
    never spin the loop.  One timer does for the stream's deadline, the
    attempt's timeout and the pause, whichever its state waits for first.
    Meanwhile the client is watched: one that resets ends the dial at once.
    Ends in exactly one of ``owner.established(dial, endpoint, sock, events)``
    or ``owner.dial_failed(dial, cause)``, the two moves out of its lifecycle
    (``DIAL``); the client socket is handed over registered for ``events``,
    and from then on the stream is the owner's, even should taking it over fail.
    """

    __slots__ = ("balancer", "client", "envelope", "owner", "endpoint", "attempt", "state", "timer", "expiring",
                 "tries", "failure", "reactor", "fd", "events")

    def __init__(self, balancer, client, envelope, owner: DialOwner):
        self.balancer = balancer
        self.client = client
        self.envelope = envelope
        self.owner = owner
        self.endpoint = None
        self.attempt = None
        self.state = NEW
        self.timer = None
        self.expiring = False  # the timer is for the stream's deadline (not an attempt's, not a pause's end)
        self.tries = 0
        self.failure = ""  # the last attempt's failure, for the log
        self.reactor = balancer.reactor
        self.fd = client.fileno()
        self.events = 0

    def __repr__(self):
        return (f"<Dial fd={self.fd} {self.balancer.prefix} {self.state.name} tries={self.tries}"
                f"{' to ' + self.endpoint.address if self.endpoint else ''}"
                f"{' last: ' + self.failure if self.failure else ''}>")

    def start(self):
        self.balancer.dials += 1  # undone by the move to established or failed, exactly once
        self.want(HANGUP)
        self.balancer.dial(self)

    def wait(self):
        self.state = self.state.moves["wait"]
        self._wake_at(self.envelope.connect_deadline)

    def _wake_at(self, when):
        """(Re)arm the one timer: at ``when``, or at the stream's deadline if that comes first."""
        if self.timer is not None:
            self.timer.cancel()
        deadline = self.envelope.connect_deadline
        self.expiring = when >= deadline  # decided now: when it fires, the loop's clock may lag behind
        self.timer = self.reactor.call_at(min(when, deadline), self._woken)

    def _woken(self):
        self.timer = None
        if self.expiring:
            self.fail("timeout")
        elif self.state is CONNECTING:  # the attempt took longer than the client's connectTimeoutMs
            self.attempt.cancel()
            self.attempt = None
            self._connected(None, "timeout", "no answer in time")
        else:  # a pause between attempts is over
            self.next_attempt()

    def on_event(self, mask):
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
            self.want(ERRORS)
            return
        self.fail("closed")  # a reset, or a full hang-up, after a half-close

    def next_attempt(self):
        balancer = self.balancer
        pooled = balancer.take_pooled() if balancer.pool else None
        if pooled is not None:
            endpoint, sock = pooled
            self.endpoint = endpoint
            self._finish(endpoint, sock, 0)
            return
        endpoint = balancer.pick(avoid=self.endpoint)
        if endpoint is None:
            self.fail("no_endpoints")
            return
        preface = None
        if balancer.proxy_header is not None:
            envelope = self.envelope
            tls = envelope.tls_version and (envelope.tls_version, envelope.client_certified, envelope.client_identity,
                                            envelope.server_name)
            destination = envelope.destination or self.client.getsockname()[:2]
            preface = balancer.proxy_header(envelope.source, destination, tls or None)
        self.state = self.state.moves["connect"]
        self.endpoint = endpoint
        self.tries += 1
        reactor = self.reactor
        self._wake_at(reactor.now + balancer.settings.connect_timeout_ms / 1000)
        self.attempt = Connect(reactor, endpoint.family, endpoint.sockaddr, None, self._connected, preface,
                               balancer.tls)
        endpoint.begin_connect()  # (once the attempt exists: fail() ends what began, and only that)

    def _connected(self, sock, cause, detail=""):
        self.attempt = None
        endpoint = self.endpoint
        balancer = self.balancer
        balancer.attempt_ended(endpoint, cause, detail)
        if sock is not None:
            self._finish(endpoint, sock, WRITE)
            return
        self.failure = f"{endpoint.address}: {cause}{f' ({detail})' if detail else ''}"
        if cause in LOCAL_CAUSES:
            self.fail(cause)
        elif self.tries >= MAX_ATTEMPTS:
            self.fail("unreachable")
        elif self.tries < min(QUICK_ATTEMPTS, len(balancer.set.endpoints)):
            self.next_attempt()
        else:
            self.state = self.state.moves["pause"]
            self._wake_at(self.reactor.now + min(1.0, RETRY_BACKOFF * 2 ** max(0, self.tries - QUICK_ATTEMPTS)))

    def _finish(self, endpoint, sock, events):
        """Hand the connected socket (registered for ``events``, or not at all) to the owner."""
        self.state = self.state.moves["establish"]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.balancer.dials -= 1
        self.owner.established(self, endpoint, sock, events)

    def fail(self, cause):
        self.state = self.state.moves["fail"]
        if cause == "no_endpoints":
            self.balancer.connect_failures[cause] += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.balancer.dials -= 1
        self.balancer.forget(self)
        self.want(0)
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
            self.balancer.attempt_ended(self.endpoint, CANCELLED)
            self.failure = f"{self.endpoint.address}: cut off"
        self.owner.dial_failed(self, cause)

    def crashed(self, exc):
        """A bug in one of our callbacks: end the stream if it is still ours."""
        if self.state is not ESTABLISHED and self.state is not FAILED:
            self.fail("bug")
