"""The route cache: one balancer per destination name, created on first use."""

import functools

from .balancer import Balancer

__all__ = ["Binder"]


class Binder:
    def __init__(self, reactor, interpreter, client_config):
        self.reactor = reactor
        self.interpreter = interpreter
        self.client_config = client_config
        self.balancers = {}
        self.hits = 0
        self.creations = 0

    def bind(self, name):
        """The balancer for ``name``; a miss creates it and starts watching the name."""
        balancer = self.balancers.get(name)
        if balancer is not None:
            self.hits += 1
            return balancer
        self.creations += 1
        balancer = self.balancers[name] = Balancer(self.reactor, name, self.client_config.settings_for(name))
        self.interpreter.watch(name, functools.partial(self.reactor.call_soon_threadsafe, balancer.update))
        return balancer

    def close(self):
        for balancer in self.balancers.values():
            balancer.close()
