"""A plain histogram the data plane can update cheaply and the admin server can read."""

import bisect

__all__ = ["Histogram", "LATENCY_BUCKETS", "DURATION_BUCKETS"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)


class Histogram:
    """Counts per upper bound (the last slot is +Inf), a sum and a count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self):
        return sum(self.counts)

    def cumulative(self):
        """[(upper bound, observations <= bound)], ending with +Inf, as Prometheus wants."""
        total, result = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            result.append((bound, total))
        return result

    def merged(self, other):
        """A new histogram holding both this one's observations and ``other``'s (same bounds)."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different bounds cannot be merged")
        result = Histogram(self.bounds)
        result.counts = [a + b for a, b in zip(self.counts, other.counts)]
        result.sum = self.sum + other.sum
        return result

    def copy(self):
        other = Histogram(self.bounds)
        other.counts = list(self.counts)
        other.sum = self.sum
        return other
