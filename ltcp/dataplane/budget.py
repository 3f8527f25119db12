"""The descriptor budget: how many streams, pooled connections and splice pipes one process may hold.

Every stream holds two descriptors (client and upstream), so a process that
accepted clients until its limit would have none left to connect them.  The
budget is sized from the descriptor limit once, at start: listeners stop
accepting while it is in use, and what else a stream may open (a splice
pipe, a pre-established connection) has a share of its own.
"""

import logging
import resource

__all__ = ["Share", "StreamBudget", "raise_descriptor_limit", "stream_budget"]

log = logging.getLogger(__name__)

class Share:
    """A part of the descriptor budget set aside for one use, counted in units.

    When it is used up, ``take`` says so and the caller does without (no pooled
    connection, no splice pipe), rather than run the process out of descriptors.
    """

    __slots__ = ("capacity", "used")

    def __init__(self, capacity):
        self.capacity = capacity
        self.used = 0

    def take(self):
        """Count one more unit, if the share has room; whether it had."""
        if self.used >= self.capacity:
            return False
        self.used += 1
        return True

    def give_back(self):
        if self.used <= 0:
            raise RuntimeError("a unit given back that was never taken")
        self.used -= 1


class StreamBudget:
    """How many streams the whole process may hold, shared by every listener.

    Sized from the descriptor limit so that a stream, once accepted, can
    always open its upstream socket: accepting every client first and then
    finding no descriptor left for any upstream would stall them all.
    What else a stream may open has a share of its own, so that it cannot
    eat the streams' descriptors: pre-established connections
    (``minConnections``, which SNI names can multiply) and the pipes a duplex
    splices bulk data through.
    """

    def __init__(self, capacity, pool_capacity=0, pipe_capacity=0):
        self.capacity = capacity
        self.used = 0
        self.pool = Share(pool_capacity)  # idle pre-established connections, every balancer together
        self.pipes = Share(pipe_capacity)  # splice pipes (two descriptors each), every stream together
        self.waiting = set()  # listeners paused until a stream ends
        self.on_empty = None  # called when the last stream ends (graceful drain)

    def has_room(self):
        return self.used < self.capacity

    def acquire(self):
        """Count one more stream (the caller has checked ``has_room``)."""
        self.used += 1

    def release(self):
        """A stream has ended: listeners that waited for room may accept again."""
        if self.used <= 0:
            raise RuntimeError("a stream released that was never acquired")
        self.used -= 1
        if self.waiting:
            waiting, self.waiting = self.waiting, set()
            for listener in waiting:
                listener.resume()
        if not self.used and self.on_empty is not None:
            self.on_empty()


RESERVED_DESCRIPTORS = 32  # stdio, epoll, wakeup pipe, the control channel, logs, a margin


def reserved_descriptors(config, control_plane):
    """Descriptors left to everything but streams: listeners, and the control plane's when it shares the process."""
    listeners = sum(len(r.servers) for r in config.routers)
    return RESERVED_DESCRIPTORS + listeners + (control_plane_descriptors(config) if control_plane else 0)


def control_plane_descriptors(config):
    """The admin server's clients and discovery's requests, at most."""
    from ..admin import httpd
    from ..config import NamerdConfig
    from ..interpreter.namerd import MAX_STREAMS, POLL_WORKERS
    admin = httpd.MAX_CONNECTIONS + httpd.MAX_QUEUED + httpd.HANDLER_THREADS
    discovery = sum(MAX_STREAMS + POLL_WORKERS if isinstance(r.interpreter, NamerdConfig) else 1
                    for r in config.routers)
    return admin + discovery


def raise_descriptor_limit():
    """Raise the soft descriptor limit to the hard one (when allowed); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def stream_budget(config, control_plane=True):
    """How many streams, pooled connections and splice pipes fit in the descriptor limit (raised first).

    A quarter of the descriptors is set aside for the pipes duplexes splice
    bulk data through (two descriptors each, one pipe per direction), and,
    when any client keeps pre-established connections, another quarter for
    them (every destination's pool together); the rest holds streams, two
    descriptors each.  A stream that finds no pipe left copies instead.
    """
    soft = raise_descriptor_limit()
    available = soft - reserved_descriptors(config, control_plane)
    pooling = any(r.client.min_connections or any(c.overrides.get("min_connections") for c in r.client.configs)
                  for r in config.routers)
    share = max(0, available // 4)
    pool = share if pooling else 0
    pipes = share // 2
    streams = max(1, (available - pool - 2 * pipes) // 2)
    log.info("descriptor limit %d: at most %d concurrent streams in this process (%d splice pipes%s)", soft, streams,
             pipes, f", {pool} pre-established connections" if pool else "")
    return StreamBudget(streams, pool, pipes)
