"""Upgrade: re-execute the supervisor with the ltcp now installed, carrying its sockets and workers over.

What is carried is a versioned record of named fields in a memfd
(``carry``, ``read_upgrade_state``): new code reads what old code wrote, and
skips what a later release added.  ``Upgrades`` is a part of the
``Supervisor`` (main thread only).
"""

import concurrent.futures
import dataclasses
import functools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

from ..admin.server import AdminServer
from ..admin.snapshot import finished
from ..config import ConfigError, load
from ..config.plan import listeners
from . import launch
from .channels import Link
from .fleet import Generation, WorkerProcess, channel_fd, wait_for_child

log = logging.getLogger(__name__)

HAND_OVER_TIMEOUT = 2.0  # seconds an upgrade waits for the workers to pause their channels
UPGRADE_ENV = "LTCP_UPGRADE"  # the descriptor of what an upgraded supervisor inherits (listeners, old workers)
UPGRADE_STATE_VERSION = 2  # named fields (``read_upgrade_state``); 1 gave workers as tuples


class Upgrades:
    """The upgrade part of the ``Supervisor``."""

    # -- upgrade ----------------------------------------------------------

    def upgrade(self):
        """Re-execute the supervisor with the ltcp now installed, keeping sockets and workers."""
        refused = self._not_now("upgrade")
        if refused:
            return refused
        check = subprocess.run(launch.python_module("ltcp", "--check", self.path), capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL)
        if check.returncode != 0:
            lines = (check.stderr or check.stdout).strip().splitlines() or [f"exit status {check.returncode}"]
            return self._reload_failed([f"upgrade refused: the installed ltcp says: {line}" for line in lines[-5:]])
        try:  # open new addresses now, while a failure still leaves everything as it is
            config = load(self.path)
            # A server may take the admin server's port: it is free once the admin server closes, below.
            admin_port = self.admin.address[1]
            self._open_listeners(config, leave={key for key in listeners(config) if key[1:] == (admin_port,)})
        except ConfigError:
            pass  # written for the new code: it opens what it needs
        except OSError as exc:
            return self._reload_failed([f"upgrade refused: {exc.strerror}"])
        try:
            self.snapshot()  # (every worker's latest counts, for those the new code cannot read)
        except concurrent.futures.TimeoutError:
            pass
        # Reloads asked for meanwhile: the new code serves the file as it is now, which is what they asked for.
        self._answer(self.reload_waiting, (False, "an upgrade is under way: it serves the file as it is now"))
        self.reload_waiting, self.reload_again = [], False
        self.admin.close()  # (no scrape may wait on a channel being handed over)
        if self.template is not None:
            self.template.close()  # (the new code forks from a template of its own)
        workers = [w for w in self._live_workers() if w.exit_code is None]
        # Each channel stops at a frame boundary, so the new code reads on where this one stopped
        # (the workers hold their access log lines meanwhile); asked of all at once, one deadline.
        token = next(self.tokens)
        for worker in workers:
            if worker.link is not None:
                worker.link.request_pause(token)
        deadline = time.monotonic() + HAND_OVER_TIMEOUT
        paused = {w: w.link is not None and w.link.paused_by(deadline) for w in workers}
        # What the new code counts without reading it (a worker it reads counts itself, once).
        carried = [s for s in (self.departed, *(w.final for w in workers)) if s is not None]
        carried += [w.last for w in workers if not paused[w] and w.final is None and w.last is not None]
        state = {"version": UPGRADE_STATE_VERSION,
                 "listeners": {key: sock.fileno() for key, sock in self.sockets.items()},
                 "workers": [{"pid": w.pid, "channel": channel_fd(w), "generation": w.generation,
                              "paused": paused[w], "state": w.state} for w in workers],
                 "reloads": self.reloads, "restarts": self.restarts, "admin_port": self.admin.address[1],
                 "departed": finished(carried) if carried else None, "config": self.current.config}
        handed = [*state["listeners"].values(), *(entry["channel"] for entry in state["workers"]
                                                  if entry["channel"] >= 0)]
        carrier = carry(state)  # a memfd: no size limit, unlike the environment
        for fd in handed:
            os.set_inheritable(fd, True)
        argv = launch.python_module("ltcp", *sys.argv[1:])
        log.info("upgrade: executing %s with %d listening sockets and %d workers", " ".join(argv),
                 len(self.sockets), len(workers))
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Signals arriving now stay pending (every thread blocks them) and survive the exec;
        # those already taken and queued are raised again, for the new code.
        kept = self._pass_on_queued_events()
        self.admin_port = self.admin.address[1]
        if self.access_log is not None:  # what the workers sent so far is written; the new code opens its own
            self.access_log.close()
            self.access_log = None
        try:
            os.execve(sys.executable, argv, {**os.environ, UPGRADE_ENV: str(carrier)})
        except OSError as exc:
            for event in kept:
                self.events.put(event)
            os.close(carrier)
            for fd in handed:
                os.set_inheritable(fd, False)
            for worker in workers:
                if worker.link is not None:
                    worker.link.resume()
            self.admin = AdminServer(self, self._admin_config(self.current.config))
            self.admin.start()
            try:
                self._configure_access_log(self.current.config)
            except OSError as log_error:
                log.error("access log: cannot reopen it: %s", log_error.strerror)
            return self._reload_failed([f"upgrade failed: cannot execute {sys.executable}: {exc.strerror}"])

    def _pass_on_queued_events(self):
        """Before the exec: queued signals and shutdowns become pending signals for the new code.

        The rest (workers that exited, which the new code finds reaped) is
        returned, to be queued again if the exec fails.
        """
        kept = []
        for event in self.events.take_all():
            kind, *args = event
            if kind in ("signal", "drain"):
                os.kill(os.getpid(), args[0] if kind == "signal" else signal.SIGTERM)
            elif kind == "reload":
                args[0].set_result((False, "an upgrade is under way: ask again in a moment"))
            else:
                kept.append(event)
        return kept

    def _admin_config(self, config):
        """The admin section, with the port the supervisor before an upgrade had when it was chosen by the system."""
        if config.admin.port == 0 and self.admin_port:
            return dataclasses.replace(config.admin, port=self.admin_port)
        return config.admin

    def _inherit(self, state):
        """Take over what the supervisor before an upgrade left open; its workers, as a generation."""
        for key, fd in state["listeners"].items():
            self.sockets[key] = socket.socket(fileno=fd)
        self.reloads = dict(state["reloads"])
        self.restarts = state["restarts"]
        self.admin_port = state["admin_port"]
        self.departed = state["departed"]
        previous = Generation(max((entry["generation"] for entry in state["workers"]), default=0),
                              state["config"], {})
        previous.restartable = False
        for slot, entry in enumerate(state["workers"]):
            pid, fd, paused = entry["pid"], entry["channel"], entry["paused"]
            worker = WorkerProcess(slot, entry["generation"], pid)
            worker.state = entry["state"]
            previous.workers[slot] = worker
            wait = functools.partial(wait_for_child, pid)
            if paused and fd >= 0:  # its channel stopped at a frame boundary: read on, once the log is open
                worker.link = Link(socket.socket(fileno=fd), f"worker-{pid}",
                                   functools.partial(self._received, previous, worker),
                                   functools.partial(self._closed, previous, worker, wait))
            else:  # (it did not answer in time: closing the channel is all that can be done with it)
                worker.channel = fd
                threading.Thread(target=self._closed, args=(previous, worker, wait),
                                 name=f"worker-{pid}-wait", daemon=True).start()
        with self.lock:
            self.generations.append(previous)
        return previous

    @staticmethod
    def _read_inherited(previous):
        """Read on the channels of the workers an upgrade handed over (each once)."""
        for worker in (previous.workers.values() if previous else ()):
            if worker.link is not None and not worker.link.reading:
                worker.link.resume()

    def _hand_over(self, previous, config):
        """The new workers serve: the previous ones drain (their channel closes), and old sockets go."""
        for worker in list(previous.workers.values()):
            self._drain(worker)
        with self.lock:
            older = [g for g in self.generations if g is not previous and g is not self.current]
        self._retarget_draining(older)
        self._close_sockets(keep=listeners(config))
        self.reloads["success"] += 1
        self.last_reload_success = time.time()
        log.info("upgrade: generation %d serving; %d workers of the previous ltcp draining",
                 self.current.number, len(previous.workers))


def carry(state):
    """The upgrade state in an anonymous file the new code inherits; its descriptor."""
    fd = os.memfd_create("ltcp-upgrade", 0)
    os.write(fd, pickle.dumps(state))
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    return fd


def inherited_state():
    """What the supervisor before an upgrade carried over, or None for a plain start."""
    carrier = os.environ.pop(UPGRADE_ENV, None)
    if carrier is None:
        return None
    with os.fdopen(int(carrier), "rb") as f:
        return read_upgrade_state(pickle.load(f))


def read_upgrade_state(state):
    """The upgrade state of any earlier release, in this release's terms.

    Fields are read by name and unknown ones are ignored, as HAProxy's master
    reads the process list its predecessor left: so a release may add fields
    that older code skips.  Version 1 (unnumbered) gave each worker as a tuple
    (pid, channel, generation[, paused[, state]]).
    """
    workers = []
    for entry in state["workers"]:
        if not isinstance(entry, dict):  # version 1
            entry = dict(zip(("pid", "channel", "generation", "paused", "state"), entry))
        workers.append({"paused": False, "state": "serving", **entry})
    defaults = {"reloads": {"success": 0, "failure": 0}, "restarts": 0, "admin_port": 0, "departed": None}
    return {**defaults, **state, "workers": workers}
