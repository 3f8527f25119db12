"""Handing the C heap back after a burst of streams.

glibc keeps the memory ``free`` returns for later ``malloc`` calls unless told
otherwise, and TLS handshakes allocate and free several kilobytes each inside
OpenSSL: after a burst of them a worker held 3 MB more heap than before it,
idle.  ``malloc_trim`` gives such free pages back to the system; it takes
about 0.4 ms for a worker's heap, so it runs at most once a period, and only
when streams ended since the last time (a worker whose streams stay open
freed nothing).  On a C library without it (musl), nothing runs.
"""

import ctypes

__all__ = ["HeapTrim", "TRIM_PERIOD", "malloc_trim"]

TRIM_PERIOD = 10.0  # seconds between looks


def malloc_trim():
    """glibc's ``malloc_trim(0)`` as a function of no arguments, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


class HeapTrim:
    """Every ``period`` seconds on ``reactor``, trim the heap with ``trim()`` if ``ended()`` (a count of the
    streams that ended, ever) changed since the last look."""

    __slots__ = ("reactor", "ended", "trim", "period", "seen")

    def __init__(self, reactor, ended, trim, period=TRIM_PERIOD):
        self.reactor = reactor
        self.ended = ended
        self.trim = trim
        self.period = period
        self.seen = ended()
        reactor.call_later(period, self._look)

    def _look(self):
        self.reactor.call_later(self.period, self._look)  # (first: a failure below ends no look after)
        ended = self.ended()
        if ended != self.seen:
            self.seen = ended
            self.trim()
