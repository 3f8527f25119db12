"""The data-plane reactor: one thread, one selector, one timer wheel.

Everything the data plane owns (sockets, balancers, counters) is touched only
from the thread running ``Reactor.run``.  Other threads hand work over with
``call_soon_threadsafe``, the single thread-safe method: it queues the call and
writes one byte to a wakeup pipe, and concurrent calls share one byte until
the reactor has read it.
"""

import collections
import logging
import os
import selectors
import time

from .wheel import NS_PER_SEC, TimerWheel

__all__ = ["Reactor", "READ", "WRITE"]

log = logging.getLogger(__name__)

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Reactor:
    """Readiness dispatch, deferred calls and timers on one thread.

    A file is registered once with ``register(fileobj, events, callback)``;
    the callback receives the ready mask.  Interest changes go through
    ``modify`` (one ``epoll_ctl``), never unregister/register churn.
    """

    def __init__(self, selector=None, clock=time.monotonic_ns, tick=0.01, slots=4096):
        self._selector = selector if selector is not None else selectors.DefaultSelector()
        self._clock = clock
        self.wheel = TimerWheel(clock, tick, slots, on_error=self._timer_failed)
        self.now = self.time()  # refreshed once per loop turn; cheap stamps for the hot path
        self._ready = collections.deque()
        self._running = False
        self._wakeup_sent = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, READ, self._drain_wakeup)

    # -- time -------------------------------------------------------------

    def time(self):
        """Monotonic seconds, the clock every deadline is measured on."""
        return self._clock() / NS_PER_SEC

    def call_later(self, delay, fn, *args):
        """Run ``fn(*args)`` after ``delay`` seconds (one tick of resolution)."""
        return self.wheel.call_later(delay, fn, *args)

    def call_at(self, when, fn, *args):
        """Run ``fn(*args)`` once ``time()`` reaches ``when``."""
        return self.wheel.call_at(int(when * NS_PER_SEC), fn, *args)

    # -- deferred calls ---------------------------------------------------

    def call_soon(self, fn, *args):
        """Run ``fn(*args)`` on the next loop iteration (reactor thread only)."""
        self._ready.append((fn, args))

    def call_soon_threadsafe(self, fn, *args):
        """Queue ``fn(*args)`` from any thread and wake the reactor."""
        self._ready.append((fn, args))
        if not self._wakeup_sent:
            self._wakeup_sent = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # a full or closed pipe already means "awake" or "gone"

    def _drain_wakeup(self, mask):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        # Cleared before the ready queue runs, so a later append writes again.
        self._wakeup_sent = False

    # -- readiness --------------------------------------------------------

    def register(self, fileobj, events, callback):
        self._selector.register(fileobj, events, callback)

    def modify(self, fileobj, events, callback):
        self._selector.modify(fileobj, events, callback)

    def unregister(self, fileobj):
        self._selector.unregister(fileobj)

    # -- running ----------------------------------------------------------

    def run(self):
        """Dispatch until ``stop()``; sleeps in ``select`` when there is nothing to do."""
        self._running = True
        select = self._selector.select
        ready = self._ready
        wheel = self.wheel
        clock = self._clock
        while self._running:
            timeout = 0 if ready else wheel.timeout()
            events = select(timeout)
            self.now = clock() / NS_PER_SEC
            for key, mask in events:
                try:
                    key.data(mask)
                except Exception:
                    log.exception("I/O callback %r failed", key.data)
            wheel.advance()
            # Only what is queued now: callbacks that queue more wait a turn,
            # so a self-requeueing callback cannot starve I/O.
            for _ in range(len(ready)):
                fn, args = ready.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception("callback %r failed", fn)

    def stop(self):
        """End ``run()`` after the current iteration (reactor thread, or via call_soon_threadsafe)."""
        self._running = False

    def close(self):
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _timer_failed(self, timer, exc):
        log.error("timer callback %r failed", timer.fn, exc_info=exc)
