"""What a reload keeps, opens and closes: a pure comparison of two configurations.

Listening sockets are identified by ``listener_key``: a reload keeps the
socket of every key still configured, so connections waiting in its backlog
are served by the new workers, never reset.  A router keeps its discovery
(its interpreter and every watch it holds) when its label, interpreter
section and health checks are unchanged, so a reload that only edits servers or clients does
not make namerd answer every name again.
"""

from typing import FrozenSet, NamedTuple

__all__ = ["Plan", "listener_key", "listeners", "plan"]


def listener_key(label, index, server):
    """A listening socket's identity: its address, or its place (router label, index) if the port is 0.

    A port the system chose is kept by place, so a reload does not move it.
    """
    return (server.ip, server.port) if server.port else (label, index, server.ip)


def listeners(config):
    """Every server of ``config`` by ``listener_key``."""
    return {listener_key(router.label, i, server): server
            for router in config.routers for i, server in enumerate(router.servers)}


class Plan(NamedTuple):
    keep: FrozenSet  # listener keys whose sockets the new workers inherit as they are
    open: FrozenSet  # listener keys to open before the new workers start
    close: FrozenSet  # listener keys to close once the old workers are gone
    discovery: FrozenSet  # router labels whose interpreter (and its watches) carries over


def plan(old, new):
    """How to go from configuration ``old`` to ``new`` (either may be None: nothing)."""
    before = set(listeners(old)) if old else set()
    after = set(listeners(new)) if new else set()
    discovery = {router.label: _discovery(router) for router in old.routers} if old else {}
    carried = frozenset(router.label for router in (new.routers if new else ())
                        if discovery.get(router.label) == _discovery(router))
    return Plan(frozenset(before & after), frozenset(after - before), frozenset(before - after), carried)


def _discovery(router):
    """What a router's discovery depends on: its interpreter, and the health checks that filter it."""
    return router.interpreter, router.client.health_checks
