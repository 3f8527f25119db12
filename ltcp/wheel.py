"""A hashed timing wheel: O(1) schedule and cancel for the reactor's timeouts.

Time is kept in integer nanoseconds so that "due" is exact arithmetic, never a
float comparison.  A timer due at ``when`` belongs to tick ``ceil(when / tick)``
and fires on the first ``advance`` whose clock has reached that tick, so it
never fires early and at most one tick late.  Timers further away than one
revolution share a slot with nearer ones and simply stay put until their own
tick comes round.

Which slots hold timers is mirrored in an integer bitmap, so finding the next
occupied slot (the reactor's sleep time) is a couple of big-int operations
rather than a scan.
"""

import logging
import time

from .histogram import Histogram

__all__ = ["Timer", "TimerWheel"]

log = logging.getLogger(__name__)

NS_PER_SEC = 1_000_000_000
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Timer:
    """A scheduled call; ``cancel()`` is safe at any time, any number of times."""

    __slots__ = ("when", "tick", "fn", "args", "active", "_wheel")

    def __init__(self, wheel, when, tick, fn, args):
        self.when = when
        self.tick = tick
        self.fn = fn
        self.args = args
        self.active = True
        self._wheel = wheel

    def cancel(self):
        if self.active:
            self.active = False
            self._wheel._discard(self)

    def __repr__(self):
        state = "pending" if self.active else "done"
        return f"<Timer {self.fn!r} at {self.when}ns {state}>"


class TimerWheel:
    """Timers bucketed by tick into ``slots`` slots (a power of two).

    ``clock`` returns integer nanoseconds (``time.monotonic_ns`` by default);
    tests inject their own.  ``on_error(timer, exc)`` is called when a callback
    raises; the remaining due timers still fire.
    """

    def __init__(self, clock=time.monotonic_ns, tick=0.01, slots=4096, on_error=None):
        if slots <= 0 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self.clock = clock
        self.tick_ns = max(1, round(tick * NS_PER_SEC))
        self._mask = slots - 1
        # A slot is a dict of its timers while it holds any, else None: 4,096 empty dicts would be 0.3 MB
        # in every worker, most of them empty at any time.
        self._slots = [None] * slots
        self._occupied = 0  # bit i set <=> self._slots[i] holds timers
        self._count = 0
        self._current = clock() // self.tick_ns  # last tick fully processed
        # advance() has nothing to do before the clock reads this: a caller on a hot
        # loop may compare against it rather than call.
        self.horizon = (self._current + 1) * self.tick_ns
        self._next_look = None  # next_tick(), remembered until advance moves on; None: not known
        self._on_error = on_error or _log_error
        self.lag = Histogram(LAG_BUCKETS)  # seconds each timer fired after its deadline

    def __len__(self):
        return self._count

    def call_later(self, delay, fn, *args):
        """Call ``fn(*args)`` once ``delay`` seconds have passed."""
        return self.call_at(self.clock() + int(delay * NS_PER_SEC), fn, *args)

    def call_at(self, when, fn, *args):
        """Call ``fn(*args)`` once the clock reads ``when`` nanoseconds or later."""
        tick = -(-when // self.tick_ns)
        if tick <= self._current:
            tick = self._current + 1  # already due: the next advance runs it
        timer = Timer(self, when, tick, fn, args)
        index = tick & self._mask
        slot = self._slots[index]
        if slot is None:
            slot = self._slots[index] = {}
            self._occupied |= 1 << index
        slot[timer] = None
        self._count += 1
        if self._next_look is not None and tick < self._next_look:
            self._next_look = tick  # (cancelling only makes the next look early, never late)
        return timer

    def _discard(self, timer):
        index = timer.tick & self._mask
        slot = self._slots[index]
        if slot is not None and slot.pop(timer, False) is None:  # (a due timer has left its slot already)
            self._count -= 1
            if not slot:
                self._slots[index] = None
                self._occupied &= ~(1 << index)

    def next_tick(self):
        """The earliest tick at which some slot needs a look, or None if empty.

        It can be earlier than any real deadline (the slot may only hold timers
        for a later revolution); it is never later.
        """
        if not self._occupied:
            return None
        start = (self._current + 1) & self._mask
        ahead = self._occupied >> start
        if ahead:
            distance = (ahead & -ahead).bit_length() - 1
        else:
            wrapped = self._occupied
            distance = (wrapped & -wrapped).bit_length() - 1 + (self._mask + 1 - start)
        return self._current + 1 + distance

    def timeout(self, now=None):
        """Seconds until the next tick that needs a look; None when there are no timers."""
        if not self._occupied:
            return None
        tick = self._next_look
        if tick is None:  # (the reactor asks every turn: worked out once per tick)
            tick = self._next_look = self.next_tick()
        if now is None:
            now = self.clock()
        wait = tick * self.tick_ns - now
        return wait / NS_PER_SEC if wait > 0 else 0.0

    def advance(self, now=None):
        """Fire every timer due by ``now``; return how many fired."""
        if now is None:
            now = self.clock()
        if now < self.horizon:
            return 0
        try:
            return self._advance(now // self.tick_ns, now)
        finally:
            self.horizon = (self._current + 1) * self.tick_ns
            self._next_look = None

    def _advance(self, target, now):
        if not self._occupied:
            self._current = target
            return 0
        fired = 0
        first = self._current + 1
        if target - first > self._mask:
            # The clock jumped a whole revolution: visit every slot once, oldest first.
            due = []
            for index in range(self._mask + 1):
                due.extend(self._take_due(index, target))
            due.sort(key=_timer_order)
            self._current = target
            return self._fire(due, now)
        for tick in range(first, target + 1):
            self._current = tick
            if self._occupied >> (tick & self._mask) & 1:
                fired += self._fire(self._take_due(tick & self._mask, tick), now)
            if not self._occupied:
                self._current = target
                break
        return fired

    def _take_due(self, index, tick):
        slot = self._slots[index]
        if not slot:
            return ()
        due = [timer for timer in slot if timer.tick <= tick]
        for timer in due:
            del slot[timer]
        self._count -= len(due)
        if not slot:
            self._slots[index] = None
            self._occupied &= ~(1 << index)
        return due

    def _fire(self, due, now):
        fired = 0
        observe = self.lag.observe
        for timer in due:
            if not timer.active:  # cancelled by an earlier callback of this batch
                continue
            timer.active = False
            fired += 1
            observe((now - timer.when) / NS_PER_SEC)
            try:
                timer.fn(*timer.args)
            except Exception as exc:
                self._on_error(timer, exc)
        return fired


def _timer_order(timer):
    return timer.tick


def _log_error(timer, exc):
    log.error("timer callback %r failed", timer.fn, exc_info=exc)
