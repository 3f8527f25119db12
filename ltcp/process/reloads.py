"""Reload: re-read and check the configuration off the main thread, start a generation, drain the old one.

``Reloads`` is a part of the ``Supervisor`` (main thread only, but for
``reload``, which admin threads call); it uses the supervisor's generations,
sockets, events and counters.
"""

import concurrent.futures
import logging
import signal
import threading
import time

from ..config import ConfigError
from ..config.plan import listeners, plan
from ..names import display_address
from . import notify
from .prepare import prepare

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0  # seconds a reload waits for its configuration and TLS files to be read (a hung mount)
DRAIN_CONFIRM_TIMEOUT = 2.0  # seconds a reload waits for the old workers to confirm they stopped accepting


class ConfigRead:
    """A reload's reading and checking of its files, on a thread of its own, so that a file system that hangs
    (a FIFO was refused already; an NFS or FUSE mount may still) cannot stop the supervisor's main thread."""

    def __init__(self, path, waiting, done):
        self.path = path
        self.waiting = waiting  # Futures of the callers this reload answers
        self.deadline = time.monotonic() + READ_TIMEOUT
        self.result = None  # Prepared, or the exception prepare raised
        self.thread = threading.Thread(target=self._read, args=(done,), name="config-read", daemon=True)
        self.thread.start()

    def _read(self, done):
        try:
            self.result = prepare(self.path)
        except Exception as exc:  # (ConfigError, or a bug: the reload fails, the supervisor does not)
            self.result = exc
        done(self)


class Reloads:
    """The reload part of the ``Supervisor``."""

    # -- reload -----------------------------------------------------------

    def reload(self):
        """From another thread (the admin server): a reload on the main thread; a Future of (ok, message)."""
        done = concurrent.futures.Future()
        self.events.put(("reload", done))
        return done

    def _reload_requested(self, done=None):
        """A reload for every request queued by now (asked over admin, or SIGHUP), answering each.

        Requests that come while one is under way wait for the next: so each
        caller gets the outcome of a reload that began after it asked (its
        change is seen), and a burst of requests costs two reloads, not one each.
        """
        queued = self.events.take(lambda item: item[0] == "reload" or item == ("signal", signal.SIGHUP))
        self.reload_waiting += [future for future in (done, *(item[1] for item in queued if item[0] == "reload"))
                                if future is not None]
        if queued:
            log.info("reload: %d requests at once, served by one reload", len(queued) + 1)
        if self.reading is not None:
            self.reload_again = True
        else:
            self._begin_reload()

    def _begin_reload(self):
        """Read and check the files on a thread; the reload goes on in ``_read_done`` (or fails when overdue)."""
        waiting, self.reload_waiting, self.reload_again = self.reload_waiting, [], False
        refused = self._not_now("reload")
        if refused is None and self.stuck_read is not None and self.stuck_read.thread.is_alive():
            refused = self._reload_failed([f"the last read of {self.path} has not returned (a hung file system?): "
                                           "no other read begins until it does"])
        if refused is not None:
            self._answer(waiting, refused)
            return
        self.stuck_read = None
        notify.reloading()
        self.reading = ConfigRead(self.path, waiting, lambda read: self.events.put(("read", read)))

    def _read_done(self, read):
        if read is not self.reading:  # given up on already: it only frees the next read
            return
        self.reading = None
        if isinstance(read.result, ConfigError):
            outcome = self._reload_failed(read.result.errors)
        elif isinstance(read.result, Exception):
            log.error("reload: reading %s failed", self.path, exc_info=read.result)
            outcome = self._reload_failed([f"reading {self.path} failed: {read.result}"])
        else:
            outcome = self._reload(*read.result)
        self._reload_over(read.waiting, outcome)

    def _read_overdue(self):
        read = self.reading
        if read is not None and time.monotonic() >= read.deadline:
            self.reading, self.stuck_read = None, read
            outcome = self._reload_failed([f"reading {self.path} took longer than {READ_TIMEOUT:g}s (a hung file "
                                           "system?)"])
            self._reload_over(read.waiting, outcome)

    def _reload_over(self, waiting, outcome):
        if not self.stopping:
            notify.ready(self.describe_exit())
        self._answer(waiting, outcome)
        if self.upgrade_after_reload:
            self.upgrade_after_reload = False
            self.upgrade()  # (if it cannot exec, reloads asked meanwhile go on below)
        if self.reload_again or self.reload_waiting:
            self._begin_reload()

    @staticmethod
    def _answer(waiting, outcome):
        for future in waiting:
            if not future.done():
                future.set_result(outcome)

    def describe_exit(self):
        """One line for a service manager: what is serving."""
        generation = self.current
        return f"generation {generation.number} serving with {len(generation.workers)} workers"

    def _not_now(self, action):
        """Why a reload or an upgrade cannot begin, as its outcome (ok, message); None when it can."""
        if self.stopping:
            log.warning("%s ignored: shutting down", action)
            return False, "shutting down"
        if self.path == "-":
            return self._reload_failed(["the configuration came from standard input: there is no file to re-read"])
        return None

    def _reload(self, config, material):
        """Serve ``config`` and ``material``, read and checked again as ``--check`` does, with new workers, and
        drain the old; (ok, message)."""
        refused = self._not_now("reload") or self._admin_move(config)
        if refused:
            return refused
        try:  # opened now, used once the reload has succeeded
            log_changed, log_writer = self._open_access_log(config)
        except OSError as exc:
            return self._reload_failed([f"accessLog: cannot open {config.access_log.path}: {exc.strerror}"])
        outcome = self._reload_with(config, material, log_changed, log_writer)
        if log_changed and log_writer is not None and self.access_log is not log_writer:
            log_writer.close()  # the reload was refused: the old log goes on
        return outcome

    def _reload_with(self, config, material, log_changed, log_writer):
        old = self.current
        steps = plan(old.config, config)
        try:
            opened = self._open_listeners(config)
        except OSError as exc:
            return self._reload_failed([str(exc.strerror or exc)])
        for key in opened:
            log.info("reload: listening on %s", display_address(self.sockets[key].getsockname()))
        kept = {label: hub for label, hub in old.hubs.items() if label in steps.discovery}
        generation = self._generation(config, material, kept, self._next_number())
        problem = self._start_workers(generation)
        if problem:
            self._abandon(generation)
            self._close_sockets(keep=listeners(old.config))
            return self._reload_failed([problem])
        with self.lock:
            self.current = generation
        if log_changed:
            self._use_access_log(log_writer)
        self.restart_at.clear()
        self.crashes.clear()
        draining = list(old.workers.values())
        for worker in draining:
            self._drain(worker)
        with self.lock:
            older = [g for g in self.generations if g is not old and g is not generation]
        self._retarget_draining(older)
        # Once the answer is out, every new connection gets the new configuration.
        deadline = time.monotonic() + DRAIN_CONFIRM_TIMEOUT
        for worker in draining:
            if worker.link is not None:
                worker.stopped_accepting.wait(max(0.0, deadline - time.monotonic()))
        for key in steps.close:
            log.info("reload: no longer listening on %s", display_address(self.sockets[key].getsockname()))
        self._close_sockets(keep=listeners(config))
        self._retire_finished()
        self.reloads["success"] += 1
        self.last_reload_success = time.time()
        message = (f"generation {generation.number} serving with {len(generation.workers)} workers; "
                   f"generation {old.number} draining")
        log.info("reload: %s", message)
        return True, message

    def _admin_move(self, config):
        """A reload keeps the admin server where it listens (its socket serves the very request that may have
        asked for the reload, and its old port could be wanted by a server of ``config``); a refusal that says
        what moves it, or None when ``config`` leaves it in place."""
        running, wanted = self._admin_config(self.current.config), self._admin_config(config)
        if (running.ip, running.port) == (wanted.ip, wanted.port):
            return None
        return self._reload_failed([
            f"admin: a reload cannot move the admin server from {display_address(self.admin.address)} to "
            f"{display_address((wanted.ip, wanted.port))}; an upgrade (SIGUSR2, which keeps every stream) or a "
            "restart moves it"])

    def _abandon(self, generation):
        """A generation that failed to start: whatever workers did start drain (they may hold streams)."""
        generation.restartable = False
        for worker in list(generation.workers.values()):
            self._drain(worker)

    def _reload_failed(self, problems):
        for problem in problems:
            log.error("reload refused: %s", problem)
        self.reloads["failure"] += 1
        log.error("reload failed: still serving generation %d", self.current.number)
        return False, "reload failed: " + "; ".join(problems)

    def _close_sockets(self, keep):
        """Close the supervisor's copy of every socket not in ``keep``; the last worker using one closes it."""
        for key in [key for key in self.sockets if key not in keep]:
            self.sockets.pop(key).close()
