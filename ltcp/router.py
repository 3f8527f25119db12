"""A router: its interpreter, its route cache and its listeners."""

from . import interpreter as interpreters
from .binder import Binder
from .server import Listener

__all__ = ["Router"]


class Router:
    def __init__(self, reactor, config, buffer, budget):
        self.label = config.label
        self.interpreter_kind = config.interpreter.kind
        self.interpreter = interpreters.build(config.interpreter)
        self.binder = Binder(reactor, self.interpreter, config.client, budget, self.label)
        self.listeners = [Listener(reactor, server, self.binder, buffer, config.label, budget)
                          for server in config.servers]

    def start(self):
        """Bind every listener (OSError if one cannot), then start discovery."""
        for listener in self.listeners:
            listener.start()
        self.interpreter.start()

    def stop_accepting(self):
        for listener in self.listeners:
            listener.close()

    def close_streams(self):
        for listener in self.listeners:
            listener.close_streams()

    def close(self):
        """Close listeners, streams and balancers; stop discovery."""
        self.stop_accepting()
        self.close_streams()
        self.binder.close()
        self.interpreter.close()
