"""Endpoints and the power-of-two-choices pick among them.

Load score
----------
An endpoint's score is ``load / weight``, where ``load`` is its open streams
plus its connects in flight and ``weight`` (> 0) comes from discovery.  A pick
draws two distinct endpoints, each with probability proportional to its
weight, and takes the one with the lower score (the first drawn on a tie).

The score is monotone in both inputs: for ``w > 0``, ``d(l/w)/dl = 1/w > 0``,
so more load never makes an endpoint more attractive, and
``d(l/w)/dw = -l/w**2 <= 0``, so more weight never makes it less attractive.
When every endpoint is idle the scores tie and the weighted draw alone decides,
so short connections are still spread in proportion to weight.
"""

import bisect
import socket

from ..lifecycle import Lifecycle, State

__all__ = ["Endpoint", "EndpointSet", "Picker", "AVAILABLE", "FAILED", "RETIRED", "ENDPOINT", "UNHEALTHY"]


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
    """One concrete address of a destination: its state, its load and its failure record.

    Its two counts move only through its own methods, in pairs:
    ``begin_connect``/``end_connect`` for connects in flight and
    ``acquire``/``release`` for established streams.
    """

    __slots__ = ("ip", "port", "family", "sockaddr", "weight", "healthy", "state", "active", "pending",
                 "failures", "connects", "connect_failures")

    def __init__(self, ip, port, weight=1.0):
        self.ip = ip
        self.port = port
        self.family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sockaddr = (ip, port)
        self.weight = weight
        self.healthy = True  # what active health checks last said (always, without them)
        self.state = AVAILABLE
        self.active = 0  # established streams
        self.pending = 0  # connects in flight
        self.failures = 0  # consecutive connect failures
        self.connects = 0
        self.connect_failures = 0

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

    def release(self):
        """A stream on this endpoint has ended."""
        if self.active <= 0:
            raise RuntimeError(f"{self!r}: a stream released that was never acquired")
        self.active -= 1

    @property
    def load(self):
        return self.active + self.pending

    @property
    def address(self):
        return f"[{self.ip}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.ip}:{self.port}"

    def __repr__(self):
        return (f"<Endpoint {self.address} w={self.weight:g} {self.state.name} "
                f"active={self.active} pending={self.pending} failures={self.failures}>")


class EndpointSet:
    """The endpoints of one destination, and the picker over those a stream may use.

    Pure: no sockets, no reactor, no clock.  It knows what discovery said
    (``endpoints``), which of those sit out a penalty (``ejected``), and which
    were removed while streams still ran on them (``retired``, until their
    last stream ends).  The picker offers the available endpoints, or all of
    them when every one has failed: better to try them anyway than to refuse.
    """

    __slots__ = ("endpoints", "retired", "ejected", "unhealthy", "picker", "max_failures")

    def __init__(self, max_failures):
        self.endpoints = {}  # sockaddr -> Endpoint, as discovery last said
        self.retired = {}  # sockaddr -> Endpoint removed by discovery, streams still open
        self.ejected = set()  # endpoints of ``endpoints`` in state FAILED
        self.unhealthy = set()  # endpoints of ``endpoints`` whose health checks fail
        self.picker = Picker(())
        self.max_failures = max_failures

    def collect(self, addresses, fresh):
        """Add ``addresses`` to a set being built, reusing the endpoints already known."""
        endpoints, retired = self.endpoints, self.retired
        for address in addresses:  # config.Address, or plain tuples from the supervisor
            ip, port, weight = address[:3]
            key = (ip, port)
            endpoint = endpoints.get(key) or retired.get(key) or Endpoint(ip, port)
            endpoint.weight = weight
            endpoint.healthy = len(address) < 4 or address[3]  # (ip, port, weight, False): failing checks
            fresh[key] = endpoint

    def replace(self, fresh):
        """Make ``fresh`` (built by ``collect``) what discovery says; returns (added, removed)."""
        current = self.endpoints
        added = 0
        for key, endpoint in fresh.items():
            if endpoint.state is RETIRED:
                self.retired.pop(key, None)  # (its last stream may have ended while the set was built)
                endpoint.move("rediscover")
                added += 1
            elif key not in current:
                added += 1
        removed = [endpoint for key, endpoint in current.items() if key not in fresh]
        for endpoint in removed:
            endpoint.move("retire")
            self.ejected.discard(endpoint)
            if endpoint.load:
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

    def revive(self, endpoint):
        """The penalty is over; one more failure sends it straight back out."""
        if endpoint.state is FAILED:
            endpoint.move("revive")
            self.ejected.discard(endpoint)
            endpoint.failures = self.max_failures - 1
            self._rebuild()

    def settle(self, endpoint):
        """Forget a retired endpoint once nothing runs on it any more."""
        if endpoint.state is RETIRED and not endpoint.load:
            self.retired.pop(endpoint.sockaddr, None)

    def counts(self):
        """Endpoints by state, without walking them."""
        failed = len(self.ejected - self.unhealthy) if self.unhealthy else len(self.ejected)
        return {AVAILABLE.name: len(self.endpoints) - failed - len(self.unhealthy), FAILED.name: failed,
                UNHEALTHY: len(self.unhealthy), RETIRED.name: len(self.retired)}

    @property
    def busy(self):
        """Something runs on one of these endpoints."""
        return bool(self.retired) or any(e.load for e in self.endpoints.values())

    def _rebuild(self):
        """Pick among the available healthy endpoints; failing that the healthy ones; failing that all."""
        endpoints = self.endpoints.values()
        self.unhealthy = {e for e in endpoints if not e.healthy}
        if self.ejected or self.unhealthy:
            usable = [e for e in endpoints if e.state is AVAILABLE and e.healthy]
            self.picker = Picker(usable or [e for e in endpoints if e.healthy] or endpoints)
        else:
            self.picker = Picker(endpoints)


def score(load, weight):
    """The quantity a pick minimises (see the module docstring)."""
    return load / weight


class Picker:
    """Weighted power-of-two-choices over a fixed list of candidates.

    Built once per change of the candidate set, so a pick costs two random
    numbers and two bisections.
    """

    __slots__ = ("candidates", "cumulative", "total")

    def __init__(self, candidates):
        self.candidates = list(candidates)
        self.cumulative = []
        total = 0.0
        for endpoint in self.candidates:
            total += endpoint.weight
            self.cumulative.append(total)
        self.total = total

    def _draw(self, random):
        index = bisect.bisect_right(self.cumulative, random() * self.total)
        return min(index, len(self.candidates) - 1)

    def pick(self, random, avoid=None):
        """The less loaded of two weighted draws; ``avoid`` loses whenever there is another."""
        candidates = self.candidates
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            return candidates[0]
        i = self._draw(random)
        j = self._draw(random)
        if j == i:
            j = self._draw(random)
            if j == i:  # one weight dominates: fall back to a uniform second choice
                j = (i + 1 + int(random() * (n - 1))) % n
        a, b = candidates[i], candidates[j]
        if a is avoid:
            return b
        if b is avoid:
            return a
        # a.load / a.weight <= b.load / b.weight, without dividing
        return a if a.load * b.weight <= b.load * a.weight else b
