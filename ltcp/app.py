"""Running a configuration: routers on one reactor, signals, shutdown."""

import logging
import signal

from .loop import Reactor
from .router import Router

__all__ = ["App", "serve"]

log = logging.getLogger(__name__)


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
        self.routers = [Router(self.reactor, router, self.buffer) for router in config.routers]

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
    except (OSError, NotImplementedError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: app.stop())
    app.run()
    log.info("stopped")
    return 0
