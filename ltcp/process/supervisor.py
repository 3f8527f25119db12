"""The supervisor: configuration, listening sockets, discovery, admin and signals; workers do the rest.

``python -m ltcp cfg.yaml`` runs this process, the one a service manager
sees.  It opens every listening socket, runs one discovery watch per name
for all workers (``fanout.Hub``), serves the admin port, and starts,
watches, restarts and drains workers.  It never touches a proxied byte.

Workers are forked from a template process that has imported the data plane
and runs no thread (``template``), so a new worker serves within
milliseconds and shares the template's pages; the supervisor itself never
forks without exec, since a lock one of its threads held would be copied.
Where the template cannot be used, a worker is a fresh interpreter
(``python -m ltcp.worker``).  Workers are the supervisor's children either
way.  They share the listening sockets; the kernel wakes one waiting worker
per connection (``EPOLLEXCLUSIVE``).

Generations: each configuration the supervisor serves is a generation of
workers.  A reload starts the next generation on the same sockets and,
once every new worker is ready, tells the old ones to drain; an upgrade
re-executes the supervisor with its sockets and its workers' channels kept
open, and the new code does the same.  Nothing that reached a listening
socket is reset by either.
"""

import errno
import itertools
import logging
import os
import resource
import signal
import threading
import time

from ..admin.server import AdminServer, exit_now
from ..dataplane.accesslog import FileWriter
from ..dataplane.budget import raise_descriptor_limit
from ..control import update_frame
from ..interpreter.fanout import Hub
from ..balancer.health import checked
from ..interpreter import build
from . import notify
from .lifeline import adopt_orphans
from ..names import display_address
from ..config.plan import listener_key
from ..dataplane.server import listen
from .channels import Events
from .fleet import KILL_MARGIN, Fleet, Generation, kill
from .reloads import Reloads
from .template import Template
from .upgrade import Upgrades, inherited_state
from .view import AdminView

__all__ = ["Supervisor", "serve"]

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def _discovery(router):
    """One router's interpreter, with the health checks its client settings ask for."""
    return checked(build(router.interpreter), router.client)


class Supervisor(Fleet, Reloads, Upgrades, AdminView):
    """Generations of workers on the listening sockets, discovery, admin and signals.

    Its parts: ``Fleet`` (starting, reaping and restarting workers),
    ``Reloads`` (reload), ``Upgrades`` (upgrade across exec) and ``AdminView``
    (what the admin server shows), each in a module of its own; its channels
    are ``channels``'.
    """

    def __init__(self, config, material, path, logging_args):
        self.path = path  # re-read on reload; "-" (standard input) cannot be
        self.logging_args = logging_args  # (level, format), for the workers
        self.events = Events(HANDLED_SIGNALS)  # work for the main thread, from signals, links and admin
        # Generations, workers and totals, shared with the admin threads; reentrant, since a
        # second Ctrl-C's handler (abort) may run while the main thread holds it.
        self.lock = threading.RLock()
        self.sockets = {}  # listener key -> listening socket
        self.generations = []  # live ones, oldest first
        self.current = Generation(0, config, {}, material)
        self.stopping = False
        self.restarts = 0
        self.crashes = {}  # slot -> deaths in a row, each soon after a start
        self.reading = None  # the ConfigRead of the reload under way
        self.stuck_read = None  # a ConfigRead given up on, still not returned: no other read begins meanwhile
        self.reload_waiting = []  # Futures of reloads asked for while one was under way
        self.reload_again = False  # a reload was asked for while one was under way
        self.upgrade_after_reload = False  # SIGUSR2 came while a reload was under way
        self.restart_at = {}  # slot -> monotonic time its replacement is due
        self.kill_at = {}  # draining WorkerProcess -> monotonic time it must have exited by
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_success = time.time()
        self.departed = None  # the final snapshots of finished workers, merged: their counts stay counted
        self.tokens = itertools.count()
        self.admin = None
        self.admin_port = 0  # the admin port before an upgrade
        # Workers forked from a template, when this process can adopt them (Linux); else fresh interpreters.
        self.template = Template(logging_args) if adopt_orphans() else None
        self.access_log = None  # accesslog.FileWriter: every worker's lines go through it
        self.started_at = time.time()

    # -- starting ----------------------------------------------------------

    def start(self, inherited=None):
        """Open (or inherit) the sockets, start discovery and the first workers, then the admin server.

        Raises OSError or RuntimeError when it cannot; nothing is left running then.  After an
        upgrade (``inherited``), new code that cannot serve leaves the previous workers serving.
        """
        config, material = self.current.config, self.current.material
        if self.template is not None:
            self.template.start()  # (first: no thread runs yet)
        raise_descriptor_limit()  # discovery, health checks and admin clients share it
        previous = self._inherit(inherited) if inherited else None
        try:
            self._configure_access_log(config)
            self._read_inherited(previous)  # (after the log is open: their held lines go to it)
            self._open_listeners(config, self._announce)
            generation = self._generation(config, material, hubs={}, number=self._next_number())
            problem = self._start_workers(generation)
            if problem:
                self._abandon(generation)
                raise RuntimeError(problem)
            self.current = generation
            self.admin = AdminServer(self, self._admin_config(config))
        except (OSError, RuntimeError) as exc:
            if previous is None:
                self._stop_everything()
                raise
            self.current = previous
            self._read_inherited(previous)
            self._reload_failed([f"upgrade failed: {getattr(exc, 'strerror', None) or exc}; the previous "
                                 "workers keep serving (fix the problem, then send SIGHUP or SIGUSR2)"])
            self.admin = AdminServer(self, self._admin_config(config))
        self.admin.start()
        if previous is not None and self.current is not previous:
            self._hand_over(previous, config)
        notify.ready(self.describe_exit())

    def _open_access_log(self, config):
        """(changed, writer): a writer for ``config``'s access log when it is not the one in use (OSError if
        it cannot be opened); ``_use_access_log`` puts it in place."""
        wanted = config.access_log.path if config.access_log else None
        if wanted == (self.access_log.path if self.access_log else None):
            return False, None
        return True, FileWriter(wanted) if wanted else None

    def _use_access_log(self, writer):
        old, self.access_log = self.access_log, writer
        if old is not None:
            old.close()
        if writer is not None:
            log.info("access log: %s", "standard error" if writer.path == "-" else writer.path)

    def _configure_access_log(self, config):
        changed, writer = self._open_access_log(config)
        if changed:
            self._use_access_log(writer)

    def _next_number(self):
        with self.lock:
            return max(g.number for g in [self.current, *self.generations]) + 1

    def _announce(self, router, server, sock):
        address = display_address(sock.getsockname())
        log.info("router %s listening on %s for %s", router.label, address, server.dst_name)

    def _open_listeners(self, config, announce=None, leave=()):
        """Open the sockets ``config`` needs that are not open yet, but those in ``leave``; the keys opened (all or
        none).

        Out of descriptors, the error says how many the configuration needs
        and how many the limit leaves free, not just "Too many open files".
        """
        servers = [(router, server, listener_key(router.label, index, server))
                   for router in config.routers for index, server in enumerate(router.servers)]
        opened = []
        try:
            for router, server, key in servers:
                if key not in self.sockets and key not in leave:
                    self.sockets[key] = listen(server)
                    opened.append(key)
                if announce:
                    announce(router, server, self.sockets[key])
        except OSError as exc:
            for key in opened:
                self.sockets.pop(key).close()
            if exc.errno != errno.EMFILE:
                raise
            needed = sum(key not in self.sockets for _, _, key in servers)
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            free = limit - len(os.listdir("/proc/self/fd")) + 1  # (listdir's own descriptor is free again)
            raise OSError(exc.errno, f"{exc.strerror}: {needed} new listening sockets are needed and {free} of "
                                     f"the {limit} descriptors this process may open are free") from None
        return opened

    def _generation(self, config, material, hubs, number):
        """A generation for ``config``, reusing ``hubs`` by label and starting discovery for the rest."""
        hubs = {router.label: hubs.get(router.label) or Hub(router.label, _discovery(router), update_frame)
                for router in config.routers}
        for hub in hubs.values():
            if not hub.started:
                hub.start()
        generation = Generation(number, config, hubs, material)
        with self.lock:
            self.generations.append(generation)
        return generation

    # -- the main thread --------------------------------------------------

    def run(self):
        """Handle events until every worker has finished after a shutdown; the exit status."""
        handlers = {"exited": self._exited, "signal": self._signalled, "reload": self._reload_requested,
                    "read": self._read_done, "drain": lambda: self.shutdown("the admin server asked")}
        while not (self.stopping and not self._live_workers()):
            reading = [self.reading.deadline] if self.reading is not None else []
            due = min([*self.restart_at.values(), *self.kill_at.values(), *reading], default=None)
            timeout = None if due is None else max(0.0, due - time.monotonic())
            kind, *args = self.events.get(timeout) or (None,)
            try:
                if kind is not None:
                    handlers[kind](*args)
                self._restart_due()
                self._kill_overdue()
                self._read_overdue()
            except Exception:  # (a worker that cannot be started, say: the supervisor carries on)
                log.exception("supervisor: handling %s failed", kind or "timers")
        self._stop_everything()
        self._answer([*self.reload_waiting, *(self.reading.waiting if self.reading else ())], (False, "shut down"))
        if self.access_log is not None:
            self.access_log.close()  # (the last workers' lines came before their final snapshots)
        log.info("stopped")
        return 0

    def _live_workers(self):
        with self.lock:
            return [w for g in self.generations for w in g.workers.values()]

    def _retire_finished(self):
        """Generations other than the current one whose workers are all gone: stop their discovery."""
        with self.lock:
            finished = [g for g in self.generations if g is not self.current and not g.workers]
            self.generations = [g for g in self.generations if g not in finished]
            in_use = {id(hub) for g in self.generations for hub in g.hubs.values()}
        for generation in finished:
            for hub in generation.hubs.values():
                if id(hub) not in in_use:
                    hub.close()

    # -- signals ----------------------------------------------------------

    def install_signal_handlers(self):
        """Handlers only queue the signal: the main thread acts on it between two events."""
        interrupted = []

        def handle(signum, frame):
            if signum == signal.SIGINT and interrupted:
                self.abort(130)  # a second Ctrl-C: stop waiting for streams
            if signum == signal.SIGINT:
                interrupted.append(signum)
            self.events.put(("signal", signum))

        for signum in HANDLED_SIGNALS:
            signal.signal(signum, handle)

    def _signalled(self, signum):
        name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.shutdown(f"received {name}")
        elif signum == signal.SIGHUP:
            log.info("received SIGHUP: reloading %s", self.path)
            self._reload_requested()
        elif signum == signal.SIGUSR2 and self.reading is not None:
            log.info("received SIGUSR2: upgrading once the reload under way is over")
            self.upgrade_after_reload = True
        elif signum == signal.SIGUSR2:
            log.info("received SIGUSR2: upgrading to the ltcp now installed")
            self.upgrade()
        elif signum == signal.SIGUSR1:
            if self.access_log is not None:
                log.info("received SIGUSR1: reopening the access log")
                self.access_log.reopen()
            else:
                log.info("received SIGUSR1: there is no access log to reopen")
        else:
            log.warning("received %s: it has no meaning for ltcp yet; ignored", name)

    # -- shutdown ---------------------------------------------------------

    def shutdown(self, why):
        """Every worker drains (graceSecs); the supervisor exits when the last one has."""
        if self.stopping:
            return
        self.stopping = True
        notify.stopping(why)
        self.restart_at.clear()
        workers = self._live_workers()
        log.info("%s: draining %d workers, up to %gs", why, len(workers), self.current.config.admin.grace_secs)
        for worker in workers:
            self._drain(worker)
        self._close_sockets(keep=())  # new clients are refused once the workers stop accepting

    def _drain(self, worker):
        """Tell ``worker`` to drain; on a reload or an upgrade, it hands its plain streams to the current
        generation's workers (``handOver``)."""
        worker.state = "draining"
        self.kill_at[worker] = time.monotonic() + self.current.config.admin.grace_secs + KILL_MARGIN
        if worker.link is not None:
            worker.link.send(("drain", self._hand_over_targets(worker)))
        elif worker.channel is not None:  # inherited through an upgrade: closing its channel drains it
            if worker.channel >= 0:
                os.close(worker.channel)
            worker.channel = None

    def _hand_over_targets(self, worker):
        """The workers ``worker`` hands its streams to as it drains: the current generation's, serving."""
        if not self.current.config.hand_over or self.stopping:
            return []
        return [(w.pid, w.secret) for w in self.current.workers.values()
                if w is not worker and w.secret and w.state == "serving"]

    def _retarget_draining(self, generations):
        """Workers of ``generations`` still draining hand what they hold to the current generation now: a
        reload right after another leaves nothing with workers that were new a moment ago."""
        for generation in generations:
            for worker in list(generation.workers.values()):
                if worker.state == "draining" and worker.link is not None:
                    worker.link.send(("drain", self._hand_over_targets(worker)))

    def abort(self, status=1):
        """End at once: every worker killed."""
        for worker in self._live_workers():
            kill(worker.pid, signal.SIGKILL)
        exit_now(status)

    def _stop_everything(self):
        if self.admin is not None:
            self.admin.close()
        if self.template is not None:
            self.template.close()
        for worker in self._live_workers():
            kill(worker.pid, signal.SIGKILL)
        with self.lock:
            hubs = {id(hub): hub for g in self.generations for hub in g.hubs.values()}
            self.generations = []
        for hub in hubs.values():
            hub.close()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    def __repr__(self):
        return f"<Supervisor generation={self.current.number} workers={len(self._live_workers())}>"


def serve(config, material, path, logging_args):
    """Run the supervisor until it has drained, serving ``config`` with ``material`` (see ``prepare``); the exit
    status."""
    # Blocked before any thread starts, so every thread inherits the mask (see Events).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    supervisor = Supervisor(config, material, path, logging_args)
    signal.set_wakeup_fd(supervisor.events.wakeup_fd, warn_on_full_buffer=False)
    supervisor.install_signal_handlers()
    try:
        supervisor.start(inherited_state())
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", getattr(exc, "strerror", None) or exc)
        return 2
    return supervisor.run()

