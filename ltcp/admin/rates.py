"""Per-second rates of the instance's counters, from the admin server's own samples of them.

The dashboard once computed rates in the page, from the difference between
two answers; an answer served from the admin server's cache carries the same
counts and time as the one before, so a page polling faster than the cache
showed no rate at all.  Here the admin server samples the counts each time it
renders the state (at most once a second), on its own clock, and the page
only displays what it computed: a rate over the last ``WINDOW`` seconds, and
a history of rates over ``SPAN`` seconds, one point per ``STEP``.

Counts are the whole instance's, every generation's workers and the finished
ones' included, so a reload does not reset them; a count that falls anyway
(a killed worker takes what it counted since the last scrape) counts as no
increase.  Pure: no clock, no sockets.
"""

import collections

__all__ = ["Rates", "counters", "annotate"]

WINDOW = 10.0  # seconds a rate is averaged over (at least one sample apart)
STEP = 5.0  # seconds between the samples kept for a history
SPAN = 300.0  # seconds of history


class Rates:
    def __init__(self, window=WINDOW, step=STEP, span=SPAN):
        self.window, self.step, self.span = window, step, span
        self._kept = collections.deque()  # (time, counts), at least ``step`` apart, oldest first
        self._latest = None  # the newest (time, counts), kept or not

    def observe(self, now, counts):
        """Counts (key -> number) at monotonic time ``now``."""
        self._latest = (now, counts)
        if not self._kept or now - self._kept[-1][0] >= self.step:
            self._kept.append(self._latest)
        while now - self._kept[0][0] > self.span + self.step:
            self._kept.popleft()

    def rate(self, key):
        """Per second over the last ``window`` seconds (or since the last sample before it); None if unknown."""
        if self._latest is None:
            return None
        now = self._latest[0]
        earlier = [sample for sample in self._kept if sample[0] < now]
        recent = [sample for sample in earlier if sample[0] >= now - self.window]
        base = recent[0] if recent else earlier[-1] if earlier else None
        return None if base is None else _per_second(base, self._latest, key)

    def history(self, key):
        """[[seconds before the latest sample, rate], ...], oldest first: one point per kept sample."""
        if self._latest is None:
            return []
        now = self._latest[0]
        samples = list(self._kept) + ([self._latest] if self._latest is not self._kept[-1] else [])
        points = []
        for before, after in zip(samples, samples[1:]):
            value = _per_second(before, after, key)
            if value is not None:
                points.append([round(now - after[0], 1), value])
        return points


def _per_second(before, after, key):
    if key not in before[1] or key not in after[1]:
        return None
    return max(0.0, after[1][key] - before[1][key]) / (after[0] - before[0])


def counters(data):
    """The counts rates are kept for, from a (merged) snapshot: servers' accepts and bytes, destinations' streams."""
    counts = {}
    for router in data["routers"]:
        label = router["label"]
        for server in router["servers"]:
            for field in ("accepted", "received_bytes", "sent_bytes"):
                counts[(field, label, server["address"])] = server[field]
        for destination in router["destinations"]:
            counts[("streams", label, destination["name"])] = destination["streams"]
    return counts


def annotate(shown, rates):
    """``shown`` (/routers.json's content) with each current server's and destination's rates: new dicts."""
    return {**shown, "routers": [{
        **router,
        "servers": [{**server, "rates": {field: rates.rate((field, router["label"], server["address"]))
                                         for field in ("accepted", "received_bytes", "sent_bytes")},
                     "history": {"accepted": rates.history(("accepted", router["label"], server["address"]))}}
                    for server in router["servers"]],
        "destinations": [{**destination, "rates": {"streams": rates.rate(("streams", router["label"],
                                                                          destination["name"]))}}
                         for destination in router["destinations"]],
    } for router in shown["routers"]]}
