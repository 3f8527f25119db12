"""Interpreters turn a destination name into a stream of weighted address sets.

Every interpreter offers the same four calls:

* ``start()`` begins any control-plane work (threads, connections);
* ``watch(name, deliver)`` follows ``name``: ``deliver(addresses)`` is called
  from a control-plane thread (or at once) with a list of ``config.Address``
  each time the set changes, or with ``None`` when the name resolves to nothing;
* ``unwatch(name)`` stops following a name (the route cache evicted it);
* ``close()`` stops every watch and joins the threads.

``deliver`` only queues the update for the reactor (``call_soon_threadsafe``);
an interpreter never touches data-plane state itself.
"""

from .. import config as _config
from .fs import FsInterpreter
from .namerd import NamerdInterpreter
from .static import StaticInterpreter

__all__ = ["build"]


def build(interpreter_config):
    """The interpreter object for one router's ``interpreter`` section."""
    if isinstance(interpreter_config, _config.StaticInterpreter):
        return StaticInterpreter(interpreter_config.names)
    if isinstance(interpreter_config, _config.FsInterpreter):
        return FsInterpreter(interpreter_config.root_dir, interpreter_config.period_secs)
    if isinstance(interpreter_config, _config.NamerdInterpreter):
        return NamerdInterpreter(interpreter_config.base_url, interpreter_config.namespace,
                                 interpreter_config.period_secs, interpreter_config.watch,
                                 max_answer_bytes=interpreter_config.max_answer_bytes)
    raise ValueError(f"unknown interpreter {interpreter_config.kind}")
