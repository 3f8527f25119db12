"""The route cache: one balancer per destination name, created on first use.

SNI routing lets clients choose destination names, so the cache is bounded:
when it is full, balancers nobody is using (no streams, no waiters) are
evicted, oldest first, a tenth of the cache at a time; if none can go, the
new name is refused.
"""

import functools
import logging

from ..balancer import Balancer

__all__ = ["Binder", "MAX_DESTINATIONS"]

log = logging.getLogger(__name__)

MAX_DESTINATIONS = 1000


class Binder:
    def __init__(self, reactor, interpreter, client_config, budget, tls_contexts, label="", capacity=MAX_DESTINATIONS):
        self.reactor = reactor
        self.label = label
        self.interpreter = interpreter
        self.client_config = client_config
        self.tls_contexts = tls_contexts  # client TLS setting -> its context (tls.client_contexts)
        self.budget = budget
        self.capacity = capacity
        self.balancers = {}
        self.hits = 0
        self.creations = 0
        self.evictions = 0

    def bind(self, name):
        """The balancer for ``name``, or None when the cache is full of balancers in use."""
        balancer = self.balancers.get(name)
        if balancer is not None:
            self.hits += 1
            return balancer
        if len(self.balancers) >= self.capacity and not self._evict():
            return None
        self.creations += 1
        settings = self.client_config.settings_for(name)
        tls = (self.tls_contexts[settings.tls], settings.tls.dns_name) if settings.tls else None
        balancer = self.balancers[name] = Balancer(self.reactor, name, settings, self.budget, self.label, tls=tls)
        self.interpreter.watch(name, functools.partial(self.reactor.call_soon_threadsafe, balancer.update))
        return balancer

    def _evict(self):
        idle = [name for name, balancer in self.balancers.items() if balancer.idle]
        for name in idle[:max(1, self.capacity // 10)]:
            self.balancers.pop(name).close()
            self.interpreter.unwatch(name)
            self.evictions += 1
        if not idle:
            log.warning("route cache full: %d destinations all in use", len(self.balancers))
        return bool(idle)

    def close(self):
        for balancer in self.balancers.values():
            balancer.close()
