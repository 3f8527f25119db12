"""One balancer per destination name: its endpoints and waiters (its dials are ``dial``'s, its pool ``pool``'s).

Discovery updates arrive as events (``update``) on the reactor thread; the
endpoints themselves, their states and the picker live in a pure
``EndpointSet``, rebuilt only when the set of usable endpoints changes, so
the per-connection path never recomputes balancer state.  What needs the
reactor stays here: penalty timers, waiters, the pool, merging big updates
a slice per turn.
"""

import collections
import logging
import random
import time

from ..protocol import proxyproto
from .connector import CANCELLED, LOCAL_CAUSES
from .endpoint import RETIRED, EndpointSet
from .load import ewma_score
from .pool import Pool

__all__ = ["Balancer"]

log = logging.getLogger(__name__)

UPDATE_SLICE = 2000  # addresses merged per reactor turn, so a huge answer never stalls the loop


class Balancer:
    """Endpoints of one destination name and how connections are spread over them."""

    def __init__(self, reactor, name, settings, budget, router="", rng=None, tls=None):
        self.reactor = reactor
        self.name = name
        self.prefix = f"{router} {name}".strip()  # how log lines name this destination
        self.settings = settings
        self.budget = budget  # the process's stream budget; pooled connections draw on it too
        self.random = (rng or random.Random()).random
        balancing = settings.load_balancer
        self.decay = balancing.decay_time_ms / 1000  # seconds: the time constant of the load averages
        self.timed = balancing.kind == "ewma"  # connect times count in its picks: measure each attempt
        self.set = EndpointSet(settings.fail_fast.max_consecutive_failures, balancing.kind,
                               settings.max_connections_per_endpoint, self.decay, settings.slow_start_secs)
        self.ramp_timer = None  # while endpoints are in a slow start
        self.resolved = False  # has discovery answered at all?
        self.last_update = None  # wall-clock time of the last discovery answer
        self.waiters = {}  # Dial -> None, oldest first: waiting for discovery's first answer
        self.queue = {}  # Dial -> None, oldest first: waiting for an endpoint below its connection limit
        self.queued = 0  # streams that ever waited in ``queue``
        self.penalties = {}  # ejected Endpoint -> its revive timer
        self.closed = False
        self.merging = None  # an update being merged a slice per turn: (addresses, position, endpoints)
        self.next_update = None  # the newest update that arrived during a merge
        self.dials = 0  # streams between accept and established that use this balancer
        self.streams = 0  # streams established to its endpoints, ever
        self.active = 0  # of those, the ones open now
        self.connect_failures = collections.Counter()  # cause -> count
        self.tls = tls  # (client context, server name) when the endpoints speak TLS
        self.proxy_header = {"v1": proxyproto.build_v1, "v2": proxyproto.build_v2}.get(settings.proxy_protocol)
        self.pool = Pool(self)  # pre-established connections (minConnections)

    def __repr__(self):
        counts = self.set.counts()
        return (f"<Balancer {self.prefix} endpoints={counts} dials={self.dials} waiters={len(self.waiters)} "
                f"queue={len(self.queue)} "
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
            self.next_update = addresses or ()
            return
        self.merging = (addresses or (), 0, {})
        self._merge()

    def _merge(self):
        if self.merging is None or self.closed:
            return
        addresses, position, fresh = self.merging
        end = min(position + UPDATE_SLICE, len(addresses))
        self.set.collect(addresses[position:end], fresh, self.reactor.now)
        if end < len(addresses):
            self.merging = (addresses, end, fresh)
            self.reactor.call_soon(self._merge)
            return
        self.merging = None
        self._apply(fresh)
        if self.next_update is not None:
            addresses, self.next_update = self.next_update, None
            self.update(addresses)

    def _apply(self, fresh):
        added, removed = self.set.replace(fresh, self.reactor.now)
        for endpoint in removed:
            self._cancel_penalty(endpoint)
        self.resolved = True
        self.last_update = time.time()
        if added or removed or not fresh:
            log.info("%s: %d endpoints (%d added, %d removed)", self.prefix, len(fresh), added, len(removed))
        # (and those to endpoints failing health checks, unless the picker must use them anyway)
        usable = set(self.set.picker.candidates) if self.set.unhealthy else ()
        self.pool.drop(lambda pooled: pooled.endpoint.sockaddr not in fresh
                       or (not pooled.endpoint.healthy and pooled.endpoint not in usable))
        waiters, self.waiters = {**self.waiters, **self.queue}, {}
        self.queue = {}
        call_now = self.reactor.call_now  # (a bug in one waiter's step ends that stream, not the others)
        for dial in waiters:
            if fresh:
                call_now(dial.next_attempt)
            else:
                call_now(dial.fail, "no_endpoints")
        self._ramp_later()
        self.pool.fill()

    def _cancel_penalty(self, endpoint):
        timer = self.penalties.pop(endpoint, None)
        if timer is not None:
            timer.cancel()

    @property
    def idle(self):
        """Nothing depends on this balancer: it may be evicted from the route cache."""
        return not self.dials and not self.waiters and not self.set.busy

    def pick(self, avoid=None):
        return self.set.picker.pick(self.random, avoid, self.reactor.now)

    def scores(self, endpoints, now):
        """Each endpoint's score as its picks see it, for reports: ``load / weight`` (p2c, roundRobin), or the
        ewma score against the whole destination."""
        if self.settings.load_balancer.kind != "ewma":
            return [e.load / e.effective for e in endpoints]
        decay = self.decay
        measured = {e: (e.rate_now(now, decay), e.latency_now(now, decay))
                    for e in (*self.set.picker.candidates, *endpoints)}
        available = self.set.picker.candidates
        per_weight = sum(measured[e][0] for e in available) / (sum(e.effective for e in available) or 1.0)
        fastest = min((measured[e][1] for e in available), default=0.0)
        return [ewma_score(e.load, e.effective, *measured[e], per_weight, fastest) for e in endpoints]

    # -- slow start -------------------------------------------------------------

    def _ramp_later(self):
        """While endpoints are in a slow start, raise their weights in twenty steps."""
        if self.set.ramping and self.ramp_timer is None and not self.closed:
            step = min(1.0, max(0.05, self.settings.slow_start_secs / 20))
            self.ramp_timer = self.reactor.call_later(step, self._ramp_now)

    def _ramp_now(self):
        self.ramp_timer = None
        if self.set.ramp_step(self.reactor.now):
            self._ramp_later()

    # -- connect outcomes and streams -----------------------------------------------

    def attempt_ended(self, endpoint, cause=None, detail="", seconds=None):
        """A connect to ``endpoint`` ended: in success (``cause`` None), failure, or ``CANCELLED`` by its stream;
        ``seconds`` is how long it took, when that says something of the endpoint."""
        endpoint.end_connect()
        if seconds is not None and (cause is None or cause == "timeout"):
            endpoint.connected(seconds, self.reactor.now, self.decay)
        if cause is None:  # (no settling: the stream about to run on it is not counted yet)
            self.set.connect_succeeded(endpoint)
            return
        if self.queue:
            self._room_made()
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
        self.set.revive(endpoint, self.reactor.now)
        self._ramp_later()
        log.info("%s: endpoint %s back after its penalty", self.prefix, endpoint.address)

    def stream_opened(self, endpoint):
        endpoint.acquire()
        self.streams += 1
        self.active += 1

    def stream_adopted(self, sockaddr, ending):
        """A stream handed over from another worker runs on the endpoint at ``sockaddr`` (counted as established
        there, not again here): the one discovery gave, or one kept as retired until the stream ends (this
        worker may not know the name's endpoints yet, or no longer).  The endpoint."""
        endpoint = self.set.adopt(*sockaddr)
        endpoint.acquire()
        endpoint.ending += ending
        self.active += 1
        return endpoint

    def stream_closed(self, endpoint, ending=False):
        endpoint.release(ending)
        self.active -= 1
        if endpoint.state is RETIRED:
            self.set.settle(endpoint)
        if self.queue:
            self._room_made()

    def _room_made(self):
        """A stream or a connect ended: the oldest stream waiting for room may try again."""
        dial = next(iter(self.queue))
        del self.queue[dial]
        self.reactor.call_soon(dial.next_attempt)

    # -- dials ------------------------------------------------------------------

    def dial(self, dial):
        """Start ``dial`` now, or queue it until discovery first answers (or behind others waiting for room)."""
        if self.queue:
            self.wait_for_room(dial)
        elif self.set.endpoints:
            dial.next_attempt()
        elif self.resolved or len(self.waiters) >= self.settings.max_waiters:
            dial.fail("no_endpoints")
        else:
            dial.wait()
            self.waiters[dial] = None

    def wait_for_room(self, dial):
        """Every endpoint holds ``maxConnectionsPerEndpoint``: ``dial`` waits (within its deadline) for one
        to have room, or fails at once when ``maxWaiters`` streams already wait."""
        if len(self.queue) >= self.settings.max_waiters:
            dial.fail("full")
            return
        dial.wait()
        self.queue[dial] = None
        self.queued += 1

    def forget(self, dial):
        self.waiters.pop(dial, None)
        self.queue.pop(dial, None)

    def close(self):
        """Stop for good: fail waiters, close pooled connections, cancel penalties."""
        self.closed = True
        self.merging = self.next_update = None
        for dial in [*self.waiters, *self.queue]:
            dial.fail("no_endpoints")
        self.waiters.clear()
        self.queue.clear()
        if self.ramp_timer is not None:
            self.ramp_timer.cancel()
        self.pool.close()
        for timer in self.penalties.values():
            timer.cancel()
        self.penalties.clear()
