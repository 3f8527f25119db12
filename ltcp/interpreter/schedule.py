"""A shared schedule of names to look up, taken by a few threads: which name is due next.

Both polling interpreters use it (namerd without watch, and DNS): however
many names there are, a fixed set of threads serves them, and a name that
hangs delays only the thread holding it.  Entries need a ``stopped``
``threading.Event``, set once their name is unwatched.
"""

import heapq
import itertools
import random
import threading
import time

__all__ = ["FIRST_HEAD_START", "PollSchedule", "backoff"]

FIRST_HEAD_START = 1.0  # seconds a first resolution goes ahead of overdue polls


class PollSchedule:
    """Which polled name is due next, for several poll threads.

    Ordered by due time.  A name's first resolution (clients are waiting for
    it) is due ``FIRST_HEAD_START`` seconds in the past, so it goes ahead of
    the rotation without starving it: a poll overdue by more than that still
    comes first.  Unwatched names are forgotten: dropped when they come up,
    and all at once when they are half the schedule.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._heap = []  # (due, seq, entry)
        self._seq = itertools.count()
        self._stale = 0  # stopped entries still in the heap
        self._ready = threading.Condition()
        self._closed = False

    def __len__(self):
        with self._ready:
            return len(self._heap) - self._stale

    def add(self, entry, delay=0.0):
        with self._ready:
            heapq.heappush(self._heap, (self._clock() + delay, next(self._seq), entry))
            self._ready.notify()

    def add_first(self, entry):
        self.add(entry, -FIRST_HEAD_START)

    def forget(self, entry):
        """``entry`` was stopped; compact the heap once stopped entries are half of it."""
        with self._ready:
            self._stale += 1
            if self._stale * 2 > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].stopped.is_set()]
                heapq.heapify(self._heap)
                self._stale = 0

    def take(self):
        """The next due name, waiting until one is; None once closed."""
        with self._ready:
            while not self._closed:
                if not self._heap:
                    self._ready.wait()
                    continue
                due, _, entry = self._heap[0]
                if entry.stopped.is_set():
                    heapq.heappop(self._heap)
                    self._stale = max(0, self._stale - 1)
                    continue
                wait = due - self._clock()
                if wait > 0:
                    self._ready.wait(wait)
                    continue
                heapq.heappop(self._heap)
                return entry
            return None

    def close(self):
        with self._ready:
            self._closed = True
            self._heap.clear()
            self._ready.notify_all()


def backoff(failures, first, cap):
    """Seconds to wait after ``failures`` in a row: doubling from ``first``, capped, with jitter (half to all)."""
    ceiling = min(cap, first * 2 ** min(max(0, failures - 1), 30))
    return ceiling / 2 + random.random() * ceiling / 2
