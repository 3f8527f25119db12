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

from typing import Callable, List, Optional, Protocol

from ..config import Address
from .fs import FsInterpreter
from .namerd import NamerdInterpreter
from .static import StaticInterpreter
from .stats import DiscoveryStats

__all__ = ["Interpreter", "KINDS", "build"]


class Interpreter(Protocol):
    """What the binder needs of a discovery kind (see the module docstring)."""

    KIND: str  # the interpreter section's ``kind``; its ``CONFIG`` class in ltcp.config parses the rest
    stats: DiscoveryStats

    def start(self) -> None: ...

    def watch(self, name: str, deliver: Callable[[Optional[List[Address]]], None]) -> None: ...

    def unwatch(self, name: str) -> None: ...

    def close(self) -> None: ...


# Every kind, by name. A new kind is an interpreter class with KIND, CONFIG and
# from_config(), a line here, its config dataclass in ltcp.config and a line in
# ltcp.config.INTERPRETERS (config stays below the interpreters in the layering;
# tests/test_interpreters.py checks that the two tables name the same kinds).
KINDS = {cls.KIND: cls for cls in (StaticInterpreter, FsInterpreter, NamerdInterpreter)}


def build(interpreter_config):
    """The interpreter object for one router's ``interpreter`` section."""
    return KINDS[interpreter_config.kind].from_config(interpreter_config)
