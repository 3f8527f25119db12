"""``io.l5d.static``: the addresses are written in the configuration."""

from ..config import StaticConfig
from .stats import DiscoveryStats

__all__ = ["StaticInterpreter"]


class StaticInterpreter:
    KIND = "io.l5d.static"
    CONFIG = StaticConfig

    def __init__(self, names):
        self.names = dict(names)
        self.stats = DiscoveryStats()

    @classmethod
    def from_config(cls, config):
        return cls(config.names)

    def start(self):
        pass

    def watch(self, name, deliver):
        addresses = self.names.get(name)
        self.stats.request("ok" if addresses else "neg")
        deliver(list(addresses) if addresses else None)

    def unwatch(self, name):
        pass

    def close(self):
        pass
