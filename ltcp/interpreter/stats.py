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
        self._names = {}  # name -> what an interpreter tells of it (DNS: last outcome, TTL, update time)

    def request(self, outcome):
        """Count one lookup (a namerd request, an fs file read) by how it ended."""
        with self._lock:
            self._requests[outcome] = self._requests.get(outcome, 0) + 1

    def observe(self, seconds):
        """How long a lookup took to answer."""
        with self._lock:
            self._latency.observe(seconds)

    def track(self, name):
        """Keep what will be known of ``name`` (until ``forget``)."""
        with self._lock:
            self._names[name] = {}

    def name_state(self, name, **state):
        """Record what is known of a tracked name (a name forgotten meanwhile stays forgotten)."""
        with self._lock:
            known = self._names.get(name)
            if known is not None:
                known.update(state)

    def forget(self, name):
        with self._lock:
            self._names.pop(name, None)

    def snapshot(self):
        with self._lock:
            snapshot = {"requests": dict(self._requests), "latency": self._latency.copy()}
            if self._names:
                snapshot["names"] = {name: dict(state) for name, state in self._names.items() if state}
            return snapshot
