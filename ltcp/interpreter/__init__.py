"""Interpreters turn a destination name into a stream of weighted address sets.

Every interpreter offers the same four calls, and a ``stats`` object
(``DiscoveryStats``) counting its lookups:

* ``start()`` begins any control-plane work (threads, connections);
* ``watch(name, deliver)`` follows ``name``: ``deliver(addresses)`` is called
  from a control-plane thread (or at once) with a list of ``config.Address``
  each time the set changes, or with ``None`` when the name resolves to nothing;
* ``unwatch(name)`` stops following a name (the route cache evicted it);
* ``close()`` stops every watch and joins the threads.

``deliver`` only queues the update for the reactor (``call_soon_threadsafe``);
an interpreter never touches data-plane state itself.
"""

import importlib
from typing import Callable, List, Optional, Protocol

from ..config import Address
from .stats import DiscoveryStats

__all__ = ["Interpreter", "MODULES", "build", "kinds"]


class Interpreter(Protocol):
    """What the binder needs of a discovery kind (see the module docstring)."""

    KIND: str  # the interpreter section's ``kind``; its ``CONFIG`` class in ltcp.config parses the rest
    stats: DiscoveryStats

    def start(self) -> None: ...

    def watch(self, name: str, deliver: Callable[[Optional[List[Address]]], None]) -> None: ...

    def unwatch(self, name: str) -> None: ...

    def close(self) -> None: ...


# Every kind, by name: the module and class that implement it.  A new kind is an
# interpreter class with KIND, CONFIG and from_config(), a line here, its config
# dataclass in ltcp.config and a line in ltcp.config.INTERPRETERS (config stays
# below the interpreters in the layering; tests/test_interpreters.py checks that
# the tables agree).  Imported on first use, so that a worker, which runs no
# discovery, never loads urllib3.
MODULES = {
    "io.l5d.static": ("static", "StaticInterpreter"),
    "io.l5d.fs": ("fs", "FsInterpreter"),
    "io.l5d.namerd.http": ("namerd", "NamerdInterpreter"),
    "io.l5d.dns": ("dnslookup", "DnsInterpreter"),
}


def kinds():
    """Every interpreter class, by kind."""
    return {kind: getattr(importlib.import_module(f".{module}", __name__), name)
            for kind, (module, name) in MODULES.items()}


def build(interpreter_config):
    """The interpreter object for one router's ``interpreter`` section."""
    module, name = MODULES[interpreter_config.kind]
    return getattr(importlib.import_module(f".{module}", __name__), name).from_config(interpreter_config)
