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

__all__ = ["Endpoint", "Picker", "AVAILABLE", "FAILED", "RETIRED"]

AVAILABLE, FAILED, RETIRED = "available", "failed", "retired"


class Endpoint:
    """One concrete address of a destination, with its load and failure record."""

    __slots__ = ("ip", "port", "family", "sockaddr", "weight", "balancer", "active", "pending",
                 "failures", "failed", "retired", "revive_timer", "connects", "connect_failures")

    def __init__(self, ip, port, weight=1.0, balancer=None):
        self.ip = ip
        self.port = port
        self.family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sockaddr = (ip, port)
        self.weight = weight
        self.balancer = balancer
        self.active = 0  # established streams
        self.pending = 0  # connects in flight
        self.failures = 0  # consecutive connect failures
        self.failed = False  # sitting out a failFast penalty
        self.retired = False  # removed by discovery; kept while streams remain
        self.revive_timer = None
        self.connects = 0
        self.connect_failures = 0

    @property
    def load(self):
        return self.active + self.pending

    @property
    def state(self):
        return RETIRED if self.retired else FAILED if self.failed else AVAILABLE

    @property
    def address(self):
        return f"[{self.ip}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.ip}:{self.port}"

    def __repr__(self):
        return f"<Endpoint {self.address} w={self.weight} load={self.load} {self.state}>"


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
