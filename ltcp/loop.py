"""The data-plane reactor: one thread, one epoll, one timer wheel.

Everything the data plane owns (sockets, balancers, counters) is touched only
from the thread running ``Reactor.run``.  Other threads hand work over with
``call_soon_threadsafe``, the single thread-safe method: it queues the call and
writes one byte to a wakeup pipe, and concurrent calls share one byte until
the reactor has read it.

It drives ``select.epoll`` itself rather than through ``selectors``: the
dispatch loop is the hottest code in ltcp, and a dict lookup per ready
descriptor is all it needs.
"""

import collections
import logging
import os
import select
import time

from .wheel import NS_PER_SEC, TimerWheel

__all__ = ["Reactor", "Registration", "READ", "WRITE", "HANGUP", "ERRORS"]

log = logging.getLogger(__name__)

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
HANGUP = select.EPOLLRDHUP  # the peer shut down its side (or reset): asked alone, data does not wake it
ERRORS = select.EPOLLHUP  # interest in nothing but a reset or full hang-up (reported whatever is asked)
_TROUBLE = select.EPOLLERR | select.EPOLLHUP  # reported whatever was asked: wake every interest
MAX_EVENTS = 1024


class Registration:
    """Watching one descriptor: ``want(events)`` says what its owner waits for now.

    A base class for every object that watches a descriptor (a leg, a connect,
    an intake, a dial, a pooled connection), so the register / modify /
    unregister bookkeeping lives in one place.  Subclasses have ``reactor``,
    ``fd`` and ``events`` (0: not registered) attributes and an
    ``on_event(mask)`` method.
    """

    __slots__ = ()

    def want(self, events):
        """Wait for ``events`` from now on (0: nothing, unregistered)."""
        if events != self.events:
            if not events:
                self.reactor.unregister(self.fd)
            elif not self.events:
                self.reactor.register(self.fd, events, self.on_event)
            else:
                self.reactor.modify(self.fd, events, self.on_event)
            self.events = events

    def adopt(self, registered, events):
        """Take over a descriptor another owner left registered for ``registered``, and want ``events``.

        The callback changes hands even when the events stay the same.
        """
        if registered and events:
            self.reactor.modify(self.fd, events, self.on_event)
        elif registered:
            self.reactor.unregister(self.fd)
        elif events:
            self.reactor.register(self.fd, events, self.on_event)
        self.events = events


class Reactor:
    """Readiness dispatch, deferred calls and timers on one thread.

    A file is registered once with ``register(fileobj, events, callback)``;
    the callback receives the ready mask: the events it asked for that
    happened (``READ``, ``WRITE``, ``HANGUP``), or all it asked for when the
    socket is in error or hung up.  Interest changes go through ``modify`` (one
    ``epoll_ctl``), never unregister/register churn.

    A callback that raises is a bug, and must not take the process or its
    other streams with it, nor fire again on every turn: the reactor logs it
    once, then, if the callback is a method of an object with a
    ``crashed(exc)`` method (every per-stream object has one), calls that so
    the object releases what it holds; and an I/O callback still registered
    afterwards is unregistered.
    """

    def __init__(self, poller=None, clock=time.monotonic_ns, tick=0.01, slots=4096):
        self._poller = poller if poller is not None else select.epoll()
        self._handlers = {}  # fd -> (callback, events)
        self._clock = clock
        self.wheel = TimerWheel(clock, tick, slots, on_error=lambda timer, exc: self.callback_failed(timer.fn, exc))
        self.now = self.time()  # refreshed once per loop turn; cheap stamps for the hot path
        self._ready = collections.deque()
        self._running = False
        self._stop_early = False  # stop() came while not running: the next run() returns at once
        self._wakeup_sent = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.register(self._wake_r, READ, self._drain_wakeup)

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

    def call_now(self, fn, *args):
        """Run ``fn(*args)`` at once, under the loop's rule for bugs (see the class docstring).

        For a step one object takes on another's behalf (a listener starting a
        stream, a balancer resuming its waiters): a bug in it ends what ``fn``
        belongs to, never the caller nor the others it serves.
        """
        try:
            fn(*args)
        except Exception as exc:
            self.callback_failed(fn, exc)

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
        fd = fileobj if fileobj.__class__ is int else fileobj.fileno()  # (no call for a plain fd)
        self._poller.register(fd, events)
        self._handlers[fd] = (callback, events)

    def modify(self, fileobj, events, callback):
        fd = fileobj if fileobj.__class__ is int else fileobj.fileno()
        self._poller.modify(fd, events)
        self._handlers[fd] = (callback, events)

    def unregister(self, fileobj):
        fd = fileobj if fileobj.__class__ is int else fileobj.fileno()
        del self._handlers[fd]
        self._poller.unregister(fd)

    def forget(self, fd):
        """Stop dispatching ``fd``, whose socket the caller closes next: closing a socket's last descriptor takes
        it out of the epoll set, a syscall fewer than ``unregister``.  Never for a socket that another process,
        or another descriptor of this one, holds too: it would stay in the set."""
        del self._handlers[fd]

    def discard(self, fileobj):
        """Unregister ``fileobj`` if it is registered (cleaning up after a bug, when nobody knows)."""
        fd = fileobj if fileobj.__class__ is int else fileobj.fileno()
        if self._handlers.pop(fd, None) is not None:
            try:
                self._poller.unregister(fd)
            except (OSError, ValueError):
                pass

    # -- running ----------------------------------------------------------

    def run(self):
        """Dispatch until ``stop()``; sleeps in ``select`` when there is nothing to do."""
        if self._stop_early:  # (a worker whose supervisor vanished while it started drained before running)
            self._stop_early = False
            return
        self._running = True
        poll = self._poller.poll
        handlers = self._handlers
        ready = self._ready
        wheel = self.wheel
        clock = self._clock
        while self._running:
            timeout = 0 if ready else wheel.timeout()
            try:
                events = poll(-1 if timeout is None else timeout, MAX_EVENTS)
            except InterruptedError:
                events = ()
            now = clock()
            self.now = now / NS_PER_SEC
            for fd, happened in events:
                handler = handlers.get(fd)
                if handler is None:  # unregistered by an earlier callback of this batch
                    continue
                callback, wanted = handler
                try:
                    callback(wanted if happened & _TROUBLE else happened & wanted)
                except Exception as exc:
                    self.callback_failed(callback, exc)
                    if handlers.get(fd, (None,))[0] is callback:  # never again, whatever its state
                        self.discard(fd)
            if now >= wheel.horizon:  # a tick has passed (the time the events were taken: one clock read)
                wheel.advance(now)
            # Only what is queued now: callbacks that queue more wait a turn,
            # so a self-requeueing callback cannot starve I/O.
            if ready:
                for _ in range(len(ready)):
                    fn, args = ready.popleft()
                    try:
                        fn(*args)
                    except Exception as exc:
                        self.callback_failed(fn, exc)

    def stop(self):
        """End ``run()`` after the current iteration, or the next ``run()`` at once (reactor thread, or via
        call_soon_threadsafe)."""
        if self._running:
            self._running = False
        else:
            self._stop_early = True

    def close(self):
        self._poller.close()
        self._handlers.clear()
        # A control-plane thread may still call call_soon_threadsafe: make its
        # write fail (EBADF) rather than land in whatever reuses the number.
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        self._wakeup_sent = True
        for fd in (wake_r, wake_w):
            os.close(fd)

    def callback_failed(self, fn, exc):
        """``fn`` raised: log it once, and let its object release what it holds."""
        owner = getattr(fn, "__self__", None)
        crashed = getattr(owner, "crashed", None)
        log.error("callback %r failed%s", fn, "; closing what it belongs to" if crashed else "", exc_info=exc)
        if crashed is not None:
            try:
                crashed(exc)
            except Exception:
                log.exception("closing %r after a failed callback failed too", owner)
