"""A router: its discovery, its route cache and its listeners."""

from ..protocol import tls
from .binder import Binder
from ..config.plan import listener_key
from .server import Listener

__all__ = ["Router"]


class Router:
    def __init__(self, reactor, config, buffer, budget, interpreter, material, sockets=None, access_log=None):
        """``material``: the TLS files' bytes (``tls.TlsMaterial``) every context is built from.

        ``sockets``: listening sockets already open, by ``reload.listener_key``; the rest are opened at start.
        ``access_log``: the app's ``accesslog.StreamLog``, if it keeps one.

        Client contexts are built here, once: if they cannot be, none of this
        router's servers is served by this process (every other router is).
        """
        sockets = sockets or {}
        self.label = config.label
        self.interpreter_kind = config.interpreter.kind
        self.interpreter = interpreter
        contexts, problem = tls.attempt(tls.client_contexts, config.client, material)
        self.binder = Binder(reactor, interpreter, config.client, budget, contexts or {}, self.label)
        unusable = problem and f"client.tls: {problem}"
        self.listeners = [Listener(reactor, server, self.binder, buffer, config.label, budget, material,
                                   sockets.get(listener_key(config.label, i, server)), access_log, unusable)
                          for i, server in enumerate(config.servers)]

    def start(self):
        """Listen on every server (OSError if one cannot), then start discovery."""
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
