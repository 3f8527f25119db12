"""Endpoints, their load, and the set a balancer picks from.

An endpoint counts its streams, its connects in flight, the bytes its
streams move and how long its connects take; what those numbers mean for a
pick is ``load``'s, and how a pick is made ``pick``'s.
"""

import socket

from ..lifecycle import Lifecycle, State
from .load import decayed_rate, peak_ewma, ramp
from .pick import PICKERS

__all__ = ["Endpoint", "EndpointSet", "AVAILABLE", "FAILED", "RETIRED", "ENDPOINT", "UNHEALTHY"]

RATE_INTERVAL = 0.1  # seconds: a throughput average is brought up to date at most this often


AVAILABLE = State("available")
FAILED = State("failed")  # sitting out a failFast penalty
RETIRED = State("retired")  # removed by discovery; kept while streams remain
# Not a state of the lifecycle but a verdict of active health checks, which come with
# discovery's answers: shown in place of available or failed, and kept out of picks.
UNHEALTHY = "unhealthy"

ENDPOINT = Lifecycle("Endpoint", {
    AVAILABLE: {"eject": FAILED, "retire": RETIRED},
    FAILED: {"revive": AVAILABLE, "retire": RETIRED},
    RETIRED: {"rediscover": AVAILABLE},
})


class Endpoint:
    """One concrete address of a destination: its state, its load and its record.

    Its counts move only through its own methods, in pairs:
    ``begin_connect``/``end_connect`` for connects in flight and
    ``acquire``/``release`` for established streams (``ending`` counts those
    of them that one side has finished).  ``moved`` is added to by the
    streams as bytes pass; ``rate_now`` and ``latency_now`` read the moving
    averages as of ``now``.
    """

    __slots__ = ("ip", "port", "family", "sockaddr", "weight", "effective", "since", "healthy", "state", "active",
                 "pending", "ending", "failures", "connects", "connect_failures", "moved", "rate", "rate_at",
                 "rate_moved", "latency", "latency_at")

    def __init__(self, ip, port, weight=1.0):
        self.ip = ip
        self.port = port
        self.family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sockaddr = (ip, port)
        self.weight = weight  # as discovery says
        self.effective = weight  # as picks use it: less during a slow start
        self.since = None  # when its slow start began, while it lasts
        self.healthy = True  # what active health checks last said (always, without them)
        self.state = AVAILABLE
        self.active = 0  # established streams
        self.pending = 0  # connects in flight
        self.ending = 0  # established streams one side of which has finished
        self.failures = 0  # consecutive connect failures
        self.connects = 0
        self.connect_failures = 0
        self.moved = 0  # bytes its streams have read, both ways, once open a second (duplex.LONG_LIVED)
        self.rate = 0.0  # moving average of bytes per second, as of rate_at
        self.rate_at = None
        self.rate_moved = 0  # ``moved`` at rate_at
        self.latency = 0.0  # peak-sensitive moving average of connect seconds, as of latency_at
        self.latency_at = 0.0

    @property
    def shown_state(self):
        """The state reports show: unhealthy in place of available or failed."""
        return UNHEALTHY if not self.healthy and self.state is not RETIRED else self.state.name

    def move(self, event):
        self.state = self.state.moves[event]

    def begin_connect(self):
        self.pending += 1

    def end_connect(self):
        if self.pending <= 0:
            raise RuntimeError(f"{self!r}: a connect ended that never began")
        self.pending -= 1

    def acquire(self):
        """A stream is established on this endpoint."""
        self.active += 1

    def release(self, ending=False):
        """A stream on this endpoint has ended (``ending``: it had been counted as ending)."""
        if self.active <= 0 or (ending and self.ending <= 0):
            raise RuntimeError(f"{self!r}: a stream released that was never acquired")
        self.active -= 1
        self.ending -= ending

    @property
    def in_use(self):
        """Streams and connects on it, ending or not: what ``maxConnectionsPerEndpoint`` limits."""
        return self.active + self.pending

    @property
    def load(self):
        """What picks compare: streams in flight, less those ending (``load`` docstring)."""
        return self.active - self.ending + self.pending

    def connected(self, seconds, now, decay):
        """A connect took ``seconds``: fold it into the latency average."""
        self.latency = peak_ewma(self.latency, seconds, now - self.latency_at, decay)
        self.latency_at = now

    def latency_now(self, now, decay):
        return peak_ewma(self.latency, None, now - self.latency_at, decay) if self.latency else 0.0

    def rate_now(self, now, decay):
        """Bytes per second its streams move, averaged with time constant ``decay``."""
        if self.rate_at is None:
            self.rate_at, self.rate_moved = now, self.moved
        elif now - self.rate_at >= RATE_INTERVAL:
            self.rate = decayed_rate(self.rate, self.moved - self.rate_moved, now - self.rate_at, decay)
            self.rate_at, self.rate_moved = now, self.moved
        return self.rate

    @property
    def address(self):
        return f"[{self.ip}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.ip}:{self.port}"

    def __repr__(self):
        return (f"<Endpoint {self.address} w={self.weight:g} {self.state.name} "
                f"active={self.active} pending={self.pending} failures={self.failures}>")


class EndpointSet:
    """The endpoints of one destination, and the picker over those a stream may use.

    Pure: no sockets, no reactor, no clock (the time comes in as ``now``).
    It knows what discovery said (``endpoints``), which of those sit out a
    penalty (``ejected``), which were removed while streams still ran on them
    (``retired``, until their last stream ends), and which are in a slow
    start (``ramping``).  The picker offers the available endpoints, or all
    of them when every one has failed: better to try them anyway than to
    refuse.
    """

    __slots__ = ("endpoints", "retired", "ejected", "unhealthy", "ramping", "picker", "max_failures", "kind",
                 "limit", "decay", "slow_start")

    def __init__(self, max_failures, kind="p2c", limit=0, decay=10.0, slow_start=0.0):
        self.endpoints = {}  # sockaddr -> Endpoint, as discovery last said
        self.retired = {}  # sockaddr -> Endpoint removed by discovery, streams still open
        self.ejected = set()  # endpoints of ``endpoints`` in state FAILED
        self.unhealthy = set()  # endpoints of ``endpoints`` whose health checks fail
        self.ramping = set()  # endpoints in a slow start
        self.max_failures = max_failures
        self.kind = kind  # loadBalancer.kind
        self.limit = limit  # maxConnectionsPerEndpoint (0: none)
        self.decay = decay  # seconds: the time constant of the ewma averages
        self.slow_start = slow_start  # seconds (0: none)
        self.picker = PICKERS[kind]((), limit, decay)

    def collect(self, addresses, fresh, now=0.0):
        """Add ``addresses`` to a set being built, reusing the endpoints already known."""
        endpoints, retired = self.endpoints, self.retired
        for address in addresses:  # config.Address, or plain tuples from the supervisor
            ip, port, weight = address[:3]
            key = (ip, port)
            endpoint = endpoints.get(key) or retired.get(key) or Endpoint(ip, port)
            healthy = len(address) < 4 or address[3]  # (ip, port, weight, False): failing checks
            if healthy and not endpoint.healthy and key in endpoints:
                self._start_ramp(endpoint, now)
            endpoint.weight = weight
            endpoint.healthy = healthy
            if endpoint.since is None:  # (the usual case, on the path of every address of every answer)
                endpoint.effective = weight
            else:
                self._ramp(endpoint, now)
            fresh[key] = endpoint

    def replace(self, fresh, now=0.0):
        """Make ``fresh`` (built by ``collect``) what discovery says; returns (added, removed)."""
        current = self.endpoints
        serving = any(e.state is AVAILABLE and e.healthy for e in current.values())
        added = 0
        for key, endpoint in fresh.items():
            if endpoint.state is RETIRED:
                self.retired.pop(key, None)  # (its last stream may have ended while the set was built)
                endpoint.move("rediscover")
            elif key in current:
                continue
            added += 1
            if serving:
                self._start_ramp(endpoint, now)
        removed = [endpoint for key, endpoint in current.items() if key not in fresh]
        for endpoint in removed:
            endpoint.move("retire")
            self.ejected.discard(endpoint)
            self.ramping.discard(endpoint)
            endpoint.since, endpoint.effective = None, endpoint.weight
            if endpoint.in_use:
                self.retired[endpoint.sockaddr] = endpoint
        self.endpoints = fresh
        self._rebuild()
        return added, removed

    def connect_succeeded(self, endpoint):
        endpoint.failures = 0
        endpoint.connects += 1

    def connect_failed(self, endpoint):
        """Count a failed connect; True when it ejects the endpoint (the caller times the penalty)."""
        endpoint.connect_failures += 1
        endpoint.failures += 1
        if endpoint.state is AVAILABLE and endpoint.failures >= self.max_failures:
            endpoint.move("eject")
            self.ejected.add(endpoint)
            self._rebuild()
            return True
        return False

    def revive(self, endpoint, now=0.0):
        """The penalty is over; one more failure sends it straight back out."""
        if endpoint.state is FAILED:
            endpoint.move("revive")
            self.ejected.discard(endpoint)
            endpoint.failures = self.max_failures - 1
            self._start_ramp(endpoint, now)
            self._rebuild()

    def adopt(self, ip, port):
        """The endpoint at (ip, port) for a stream that already runs on it: known, or kept as retired."""
        key = (ip, port)
        endpoint = self.endpoints.get(key) or self.retired.get(key)
        if endpoint is None:
            endpoint = self.retired[key] = Endpoint(ip, port)
            endpoint.move("retire")
        return endpoint

    def settle(self, endpoint):
        """Forget a retired endpoint once nothing runs on it any more."""
        if endpoint.state is RETIRED and not endpoint.in_use:
            self.retired.pop(endpoint.sockaddr, None)

    def ramp_step(self, now):
        """Bring every slow start up to ``now``; whether any goes on."""
        for endpoint in list(self.ramping):
            self._ramp(endpoint, now)
        self._rebuild()
        return bool(self.ramping)

    def _start_ramp(self, endpoint, now):
        if self.slow_start > 0:
            endpoint.since = now
            self.ramping.add(endpoint)
            self._ramp(endpoint, now)

    def _ramp(self, endpoint, now):
        share = 1.0 if endpoint.since is None else ramp(now - endpoint.since, self.slow_start)
        endpoint.effective = endpoint.weight * share
        if share >= 1.0 and endpoint.since is not None:
            endpoint.since = None
            self.ramping.discard(endpoint)

    def counts(self):
        """Endpoints by state, without walking them."""
        failed = len(self.ejected - self.unhealthy) if self.unhealthy else len(self.ejected)
        return {AVAILABLE.name: len(self.endpoints) - failed - len(self.unhealthy), FAILED.name: failed,
                UNHEALTHY: len(self.unhealthy), RETIRED.name: len(self.retired)}

    @property
    def busy(self):
        """Something runs on one of these endpoints."""
        return bool(self.retired) or any(e.in_use for e in self.endpoints.values())

    def _rebuild(self):
        """Pick among the available healthy endpoints; failing that the healthy ones; failing that all."""
        endpoints = self.endpoints.values()
        self.unhealthy = {e for e in endpoints if not e.healthy}
        candidates = endpoints
        if self.ejected or self.unhealthy:
            usable = [e for e in endpoints if e.state is AVAILABLE and e.healthy]
            candidates = usable or [e for e in endpoints if e.healthy] or endpoints
        self.picker = PICKERS[self.kind](candidates, self.limit, self.decay)
