"""Running a configuration: routers on one reactor, signals, shutdown."""

import gc
import logging
import os
import resource
import signal

from . import httpd
from .admin import AdminServer
from .config import NamerdConfig
from .interpreter.namerd import MAX_STREAMS, POLL_WORKERS
from .loop import Reactor
from .router import Router
from .server import StreamBudget
from .tls import TlsMaterialError

__all__ = ["App", "serve"]

log = logging.getLogger(__name__)

RESERVED_DESCRIPTORS = 32  # stdio, epoll, wakeup pipe, logs, a margin
ADMIN_DESCRIPTORS = httpd.MAX_CONNECTIONS + httpd.MAX_QUEUED + httpd.HANDLER_THREADS
NAMERD_THREADS = MAX_STREAMS + POLL_WORKERS  # a connection each at most


def reserved_descriptors(config):
    """Descriptors left to everything but streams: listeners, the admin server's clients, discovery's requests."""
    discovery = sum(NAMERD_THREADS if isinstance(r.interpreter, NamerdConfig) else 1
                    for r in config.routers)
    listeners = sum(len(r.servers) for r in config.routers)
    return RESERVED_DESCRIPTORS + ADMIN_DESCRIPTORS + discovery + listeners


def stream_budget(config):
    """How many streams, and pooled connections, fit in the descriptor limit (raised to the hard limit first).

    When any client keeps pre-established connections, a quarter of the
    descriptors is set aside for them (every destination's pool together);
    the rest holds streams, two descriptors each.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    available = soft - reserved_descriptors(config)
    pooling = any(r.client.min_connections or any(c.overrides.get("min_connections") for c in r.client.configs)
                  for r in config.routers)
    pool = max(0, available // 4) if pooling else 0
    streams = max(1, (available - pool) // 2)
    log.info("descriptor limit %d: at most %d concurrent streams in all%s", soft, streams,
             f" and {pool} pre-established connections" if pool else "")
    return StreamBudget(streams, pool)


class App:
    """Every router of a configuration on one reactor.

    ``start()`` binds the listeners (so ports chosen by the system are known
    before ``run()``), ``run()`` blocks on the reactor until a drain finishes
    or ``stop()``; ``request_drain()`` and ``stop()`` may be called from any thread.
    """

    def __init__(self, config):
        self.config = config
        self.reactor = Reactor()
        self.buffer = bytearray(config.buffer_size_bytes)
        self.closed = False
        self.draining = False
        self.grace_timer = None
        self.budget = stream_budget(config)
        self.routers = [Router(self.reactor, router, self.buffer, self.budget) for router in config.routers]

    @property
    def listeners(self):
        return [listener for router in self.routers for listener in router.listeners]

    def start(self):
        try:
            for router in self.routers:
                router.start()
        except BaseException:
            self.close()
            raise

    def run(self):
        try:
            self.reactor.run()
        finally:
            self.close()

    def stop(self):
        """End at once: open streams are cut."""
        self.reactor.call_soon_threadsafe(self.reactor.stop)

    def request_drain(self):
        self.reactor.call_soon_threadsafe(self.drain)

    def drain(self):
        """Stop accepting, let open streams finish for graceSecs, then stop."""
        if self.draining:
            return
        for router in self.routers:
            router.stop_accepting()
        self.draining = True  # once nothing accepts, for whoever watches from another thread
        grace = self.config.admin.grace_secs
        log.info("drain started: %d streams open, up to %gs to finish", self.budget.used, grace)
        if not self.budget.used:
            self._drained()
            return
        self.budget.on_empty = self._drained
        self.grace_timer = self.reactor.call_later(grace, self._grace_over)

    def _grace_over(self):
        self.grace_timer = None
        log.info("grace period over: closing %d streams", self.budget.used)
        for router in self.routers:
            router.close_streams()  # the last release calls _drained

    def _drained(self):
        self.budget.on_empty = None
        if self.grace_timer is not None:
            self.grace_timer.cancel()
            self.grace_timer = None
        log.info("drain finished")
        self.reactor.stop()

    def close(self):
        if not self.closed:
            self.closed = True
            for router in self.routers:
                router.close()
            self.reactor.close()


# Signals an operator or a service manager may send that ltcp gives no meaning
# yet: without a handler each would end the process at once, cutting every stream.
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def _install_signal_handlers(app):
    """SIGTERM and SIGINT drain (a second SIGINT exits at once); the rest are logged and ignored.

    Handlers run on the main thread between two bytecodes of the reactor, so
    they only queue work for it; the reactor does the logging.
    """
    interrupted = []

    def drain(signum, frame):
        if signum == signal.SIGINT and interrupted:
            os._exit(130)  # a second Ctrl-C: stop waiting for streams
        interrupted.append(signum)
        app.request_drain()

    def ignore(signum, frame):
        app.reactor.call_soon_threadsafe(
            log.warning, "received %s: it has no meaning for ltcp yet; ignored", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, ignore)


# Streams are freed by reference counting and make no cyclic garbage, so young
# collections can be rare; a burst of allocations (a discovery answer with
# tens of thousands of endpoints) then causes no full collection at all.
GC_THRESHOLDS = (10_000, 10, 10)


def _tune_garbage_collection():
    """Rarer young collections, and the startup heap (modules, configuration) never scanned again."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def serve(config):
    """Serve until drained (SIGTERM, SIGINT, /shutdown); the process exit status."""
    try:
        app = App(config)
    except TlsMaterialError as exc:  # a file changed since it was checked
        log.error("cannot start: %s", exc)
        return 2
    try:
        app.start()
        admin = AdminServer(app, config.admin)
    except OSError as exc:
        app.close()
        log.error("cannot start: %s", exc.strerror or exc)
        return 2
    _install_signal_handlers(app)
    _tune_garbage_collection()
    admin.start()
    try:
        app.run()
    finally:
        admin.close()
    log.info("stopped")
    return 0
