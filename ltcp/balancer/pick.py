"""The three ways a balancer picks an endpoint (``client.loadBalancer.kind``); the arithmetic is ``load``'s.

A picker is built over a fixed list of candidates each time that list
changes, so a pick costs two random numbers, two bisections and one
comparison (p2c, ewma), or one pass over the candidates (roundRobin).  It
never returns an endpoint holding ``limit`` streams or more
(``maxConnectionsPerEndpoint``); None means there is none to give.
"""

import bisect

from .load import ewma_score

__all__ = ["PICKERS", "EwmaPicker", "P2cPicker", "RoundRobinPicker"]


class _Candidates:
    """Candidates, their limit, and what is shared by every kind."""

    __slots__ = ("candidates", "limit")

    def __init__(self, candidates, limit=0):
        self.candidates = list(candidates)
        self.limit = limit

    def has_room(self, endpoint):
        return not self.limit or endpoint.in_use < self.limit

    def least_loaded_with_room(self, avoid):
        """The endpoint with the lowest ``load / weight`` that has room (``avoid`` only if alone); or None."""
        open_ = [e for e in self.candidates if self.has_room(e)]
        others = [e for e in open_ if e is not avoid] or open_
        return min(others, key=lambda e: e.load / e.effective, default=None)


class P2cPicker(_Candidates):
    """Power of two choices over weighted draws: the lower ``load / weight`` of two (``load`` docstring)."""

    __slots__ = ("cumulative", "total")

    def __init__(self, candidates, limit=0, decay=None):
        super().__init__(candidates, limit)
        self.cumulative = []
        total = 0.0
        for endpoint in self.candidates:
            total += endpoint.effective
            self.cumulative.append(total)
        self.total = total

    def _draw(self, random):
        index = bisect.bisect_right(self.cumulative, random() * self.total)
        return min(index, len(self.candidates) - 1)

    def pick(self, random, avoid=None, now=0.0):
        """The better of two weighted draws; ``avoid`` loses whenever there is another."""
        candidates = self.candidates
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            only = candidates[0]
            return only if not self.limit or self.has_room(only) else None
        i = self._draw(random)
        j = self._draw(random)
        if j == i:
            j = self._draw(random)
            if j == i:  # one weight dominates: fall back to a uniform second choice
                j = (i + 1 + int(random() * (n - 1))) % n
        a, b = candidates[i], candidates[j]
        if self.limit:
            a_room, b_room = self.has_room(a), self.has_room(b)
            if not (a_room and b_room):
                return a if a_room else b if b_room else self.least_loaded_with_room(avoid)
        if a is avoid:
            return b
        if b is avoid:
            return a
        return a if self.prefers(a, b, now) else b

    def prefers(self, a, b, now):
        """Whether ``a`` (drawn first) beats ``b``: ``a.load / a.weight <= b.load / b.weight``, without dividing."""
        return a.load * b.effective <= b.load * a.effective


class EwmaPicker(P2cPicker):
    """Power of two choices on a score that counts throughput and connect latency too (``load`` docstring)."""

    __slots__ = ("decay",)

    def __init__(self, candidates, limit=0, decay=10.0):
        super().__init__(candidates, limit)
        self.decay = decay

    def prefers(self, a, b, now):
        decay = self.decay
        a_rate, b_rate = a.rate_now(now, decay), b.rate_now(now, decay)
        if not (a_rate or b_rate or a.latency or b.latency):  # nothing measured yet: p2c's comparison
            return P2cPicker.prefers(self, a, b, now)
        a_latency, b_latency = a.latency_now(now, decay), b.latency_now(now, decay)
        per_weight = (a_rate + b_rate) / (a.effective + b.effective)
        fastest = min(a_latency, b_latency)
        return (ewma_score(a.load, a.effective, a_rate, a_latency, per_weight, fastest)
                <= ewma_score(b.load, b.effective, b_rate, b_latency, per_weight, fastest))


class RoundRobinPicker(_Candidates):
    """Smooth weighted round robin: an exact, interleaved split by weight, whatever the load."""

    __slots__ = ("credit",)

    def __init__(self, candidates, limit=0, decay=None):
        super().__init__(candidates, limit)
        self.credit = [0.0] * len(self.candidates)

    def pick(self, random, avoid=None, now=0.0):
        candidates, credit = self.candidates, self.credit
        best = None
        total = 0.0
        for index, endpoint in enumerate(candidates):
            if endpoint is avoid or not self.has_room(endpoint):
                continue
            credit[index] += endpoint.effective
            total += endpoint.effective
            if best is None or credit[index] > credit[best]:
                best = index
        if best is None:  # nothing but ``avoid`` has room, or nothing at all
            return avoid if avoid in candidates and self.has_room(avoid) else None
        credit[best] -= total
        return candidates[best]


PICKERS = {"p2c": P2cPicker, "ewma": EwmaPicker, "roundRobin": RoundRobinPicker}  # by loadBalancer.kind
