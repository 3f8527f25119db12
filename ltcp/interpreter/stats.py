"""What every interpreter counts: lookups by outcome and how long they took.

Discovery threads update it; the admin server reads a copy.  The lock is
held for a few instructions at a time, never on the data plane.
"""

import threading

from ..histogram import LATENCY_BUCKETS, Histogram

__all__ = ["DiscoveryStats"]


class DiscoveryStats:
    def __init__(self):
        self._lock = threading.Lock()
        self._requests = {}  # outcome -> count
        self._latency = Histogram(LATENCY_BUCKETS)

    def request(self, outcome):
        """Count one lookup (a namerd request, an fs file read) by how it ended."""
        with self._lock:
            self._requests[outcome] = self._requests.get(outcome, 0) + 1

    def observe(self, seconds):
        """How long a lookup took to answer."""
        with self._lock:
            self._latency.observe(seconds)

    def snapshot(self):
        with self._lock:
            return {"requests": dict(self._requests), "latency": self._latency.copy()}
