"""Running a configuration: routers on one reactor, signals, shutdown."""

import logging
import resource
import signal

from .loop import Reactor
from .router import Router
from .server import StreamBudget

__all__ = ["App", "serve"]

log = logging.getLogger(__name__)

RESERVED_DESCRIPTORS = 32  # stdio, selector, wakeup pipe, listeners, discovery, admin


def stream_capacity(config):
    """How many streams fit in the descriptor limit (raised to the hard limit first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    listeners = sum(len(r.servers) for r in config.routers)
    pooled = sum(r.client.min_connections for r in config.routers)
    capacity = max(1, (soft - RESERVED_DESCRIPTORS - listeners - pooled) // 2)
    log.info("descriptor limit %d: at most %d concurrent streams in all", soft, capacity)
    return capacity


class App:
    """Every router of a configuration on one reactor.

    ``start()`` binds the listeners (so ports chosen by the system are known
    before ``run()``), ``run()`` blocks on the reactor, and ``stop()`` may be
    called from any thread.
    """

    def __init__(self, config):
        self.config = config
        self.reactor = Reactor()
        self.buffer = bytearray(config.buffer_size_bytes)
        self.closed = False
        self.budget = StreamBudget(stream_capacity(config))
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
        self.reactor.call_soon_threadsafe(self._stop)

    def _stop(self):
        self.reactor.stop()

    def close(self):
        if not self.closed:
            self.closed = True
            for router in self.routers:
                router.close()
            self.reactor.close()


def serve(config):
    """Serve until SIGTERM or SIGINT; the process exit status."""
    try:
        app = App(config)
        app.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: app.stop())
    app.run()
    log.info("stopped")
    return 0
