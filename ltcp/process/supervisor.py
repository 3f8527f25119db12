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

import collections
import concurrent.futures
import dataclasses
import errno
import functools
import itertools
import pickle
import logging
import os
import queue
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from ..admin.server import AdminServer, exit_now
from ..dataplane.accesslog import FileWriter
from ..dataplane.app import raise_descriptor_limit
from ..config import ConfigError, load
from ..control import Framer, encode, update_frame
from ..interpreter.fanout import Hub
from ..balancer.health import checked
from ..interpreter import build
from .. import __version__
from ..admin.metrics import resident_bytes, supervisor_families
from . import launch, notify
from .lifeline import adopt_orphans
from ..names import display_address
from .prepare import prepare
from ..config.plan import listener_key, listeners, plan
from ..dataplane.server import listen
from ..admin.snapshot import destination_names, empty_snapshot, finished, merge, only_destinations
from .template import Template, TemplateError

__all__ = ["Supervisor", "serve"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds for a new generation's workers to be serving
SNAPSHOT_WAIT = 0.5  # seconds a scrape waits for a worker's answer; a later one is served its last snapshot
STABLE_SECS = 10.0  # a worker that ran this long had no start-up trouble: its next restart is immediate
MAX_RESTART_DELAY = 30.0
RESTART_SPACING = 0.1  # seconds between two starts in one slot, however its workers end: a kill loop cannot spin
READ_TIMEOUT = 10.0  # seconds a reload waits for its configuration and TLS files to be read (a hung mount)
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})
HAND_OVER_TIMEOUT = 2.0  # seconds an upgrade waits for the workers to pause their channels
DRAIN_CONFIRM_TIMEOUT = 2.0  # seconds a reload waits for the old workers to confirm they stopped accepting
KILL_MARGIN = 5.0  # seconds past graceSecs before a draining worker that has not exited is killed
UPGRADE_ENV = "LTCP_UPGRADE"  # the descriptor of what an upgraded supervisor inherits (listeners, old workers)
UPGRADE_STATE_VERSION = 2  # named fields (``read_upgrade_state``); 1 gave workers as tuples
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def crashed_on_its_own(code):
    """Whether a worker's exit ``code`` (negative: the signal) is its own failure, rather than a kill from outside
    (an operator, the OOM killer) or a clean exit: only those back off."""
    return code > 0 or -code in CRASH_SIGNALS


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


def restart_delay(crashes):
    """Seconds before restarting a worker that died ``crashes`` times in a row, each soon after starting."""
    return 0.0 if crashes <= 1 else min(MAX_RESTART_DELAY, 0.5 * 2 ** (crashes - 2))


class Events:
    """The main thread's work queue, which signals wake too.

    Every thread of the supervisor blocks the signals it handles, except the
    main thread while it waits here: so a signal is taken exactly there (never
    by a thread that would leave its handler pending), stays pending while the
    main thread is busy, and survives an upgrade's exec.  ``select`` also
    watches a pipe that ``signal.set_wakeup_fd`` writes to.
    """

    def __init__(self, signals=()):
        self._signals = signals
        self._items = collections.deque()
        self._read, self.wakeup_fd = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self.wakeup_fd, False)

    def put(self, item):
        self._items.append(item)
        try:
            os.write(self.wakeup_fd, b"\0")
        except BlockingIOError:
            pass  # full of wakeups already

    def get(self, timeout):
        """The next item, waiting up to ``timeout`` seconds (None: for ever); None if there is none."""
        if not self._items:
            blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
            try:
                select.select([self._read], [], [], timeout)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # (handlers of signals taken run here)
        try:
            os.read(self._read, 4096)
        except BlockingIOError:
            pass
        return self._items.popleft() if self._items else None

    def take(self, wanted):
        """The queued items ``wanted(item)`` picks, removed; the others stay, in order (main thread)."""
        kept, taken = [], []
        while self._items:
            item = self._items.popleft()
            (taken if wanted(item) else kept).append(item)
        self._items.extendleft(reversed(kept))  # (before anything put meanwhile)
        return taken

    def take_all(self):
        """Every item queued, without waiting (nor taking signals)."""
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items


class Link:
    """The supervisor's end of one worker's control channel.

    A reader thread hands each message to ``on_message`` and, at the end,
    calls ``on_closed``; a writer thread sends what ``send`` queued, so a
    worker slow to read holds up nobody else.
    """

    def __init__(self, sock, name, on_message, on_closed):
        self.sock = sock
        self.name = name
        self.on_message = on_message
        self.on_closed = on_closed
        self._queue = queue.SimpleQueue()
        self._paused = threading.Event()  # the worker said ("paused", token): the reader stopped at that frame
        self._pausing = None  # the token of the pause asked for, if one is
        self._threads = ()

    def start(self):
        self._paused.clear()
        self._threads = (threading.Thread(target=self._read, name=f"{self.name}-read", daemon=True),
                         threading.Thread(target=self._write, name=f"{self.name}-write", daemon=True))
        for thread in self._threads:
            thread.start()

    def request_pause(self, token):
        """Begin handing the channel over (an upgrade's new code will take it): ask the worker to pause.

        The worker answers ("paused", token) and then holds what it would send;
        our writer stops after the request, our reader after that answer (an
        answer to an earlier request, come too late, is ignored).
        """
        self._pausing = token
        self._queue.put(encode(("pause", token)))
        self._queue.put(None)

    def paused_by(self, deadline):
        """Whether the channel stopped at a frame boundary both ways by ``deadline`` (monotonic)."""
        reader, writer = self._threads
        writer.join(max(0.0, deadline - time.monotonic()))
        if not self._paused.wait(max(0.0, deadline - time.monotonic())):
            return False
        reader.join(max(0.0, deadline - time.monotonic()))
        return not reader.is_alive() and not writer.is_alive()

    @property
    def reading(self):
        return bool(self._threads) and self._threads[0].is_alive()

    def resume(self):
        """Use the channel again (after a pause, in this process or the next): the worker may send."""
        self._pausing = None
        self._paused.clear()
        reader, writer = self._threads or (None, None)
        if reader is None or not reader.is_alive():  # (one that did not stop keeps reading)
            reader = threading.Thread(target=self._read, name=f"{self.name}-read", daemon=True)
            reader.start()
        if writer is not None:
            writer.join(2)  # (one stuck in a write finishes it first: frames never interleave)
        writer = threading.Thread(target=self._write, name=f"{self.name}-write", daemon=True)
        writer.start()
        self._threads = (reader, writer)
        self.send(("resume",))

    def send(self, message):
        """Queue a message, or a frame already encoded (``bytes``)."""
        self._queue.put(message if isinstance(message, bytes) else encode(message))

    def close(self):
        """Close the channel: the worker reads EOF, and drains."""
        self._queue.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self):
        while (frame := self._queue.get()) is not None:
            try:
                self.sock.sendall(frame)
            except OSError:
                return

    def _read(self):
        framer = Framer()
        try:
            while data := self.sock.recv(1 << 20):
                for message in framer.feed(data):
                    if message[0] == "paused":
                        if self._pausing is not None and message[1] == self._pausing:
                            self._paused.set()  # (the worker sends nothing after it)
                            return  # the channel stays open, for whoever takes it over
                        continue  # a late answer to a pause given up on
                    self.on_message(message)
        except ConnectionResetError:
            pass  # the worker was killed, or closed its end with our messages unread
        except (OSError, ValueError) as exc:
            log.warning("%s: control channel failed: %s", self.name, exc)
        except Exception:
            log.exception("%s: control message failed", self.name)
        self._queue.put(None)
        self.sock.close()  # first: a finished worker waits for it before exiting
        self.on_closed()


class Question:
    """A snapshot asked of a worker: ``future`` has the answer, once it comes."""

    __slots__ = ("token", "listed", "future", "asked")

    def __init__(self, token, listed):
        self.token = token
        self.listed = listed  # endpoints listed per destination
        self.future = concurrent.futures.Future()
        self.asked = time.monotonic()


class WorkerProcess:
    """One worker as the supervisor sees it."""

    def __init__(self, slot, generation, pid):
        self.slot = slot
        self.generation = generation
        self.pid = pid
        self.started = time.monotonic()
        self.state = "starting"  # -> serving -> draining; "exited" once reaped
        self.ready = threading.Event()
        self.stopped_accepting = threading.Event()  # set when it confirms a drain order
        self.link = None  # None for a worker inherited through an upgrade: it is only waited for
        self.channel = None  # such a worker's channel descriptor, held open until it must drain
        self.final = None  # its last snapshot, sent when it finished draining
        self.last = None  # the latest snapshot it answered (stands in if it fails to answer, or is killed)
        self.answered_at = None  # when ``last`` came (monotonic)
        self.exit_code = None  # once reaped: as subprocess gives it (negative: killed by that signal)
        self._question = None  # the snapshot asked and not answered yet: one at a time
        self._hung_up = False
        self._asking = threading.Lock()

    def describe(self):
        return {"pid": self.pid, "generation": self.generation, "state": self.state}

    def ask(self, listed, tokens):
        """The snapshot question this worker is answering: the one outstanding, else a new one.

        A worker is never asked again before it answers, so one that is stopped
        or stuck is not sent a question per scrape (to answer all at once when it
        wakes).  None once its channel has closed.
        """
        with self._asking:
            if self._question is not None or self._hung_up:
                return self._question
            question = self._question = Question(next(tokens), listed)
        self.link.send(("snapshot", question.token, listed))
        return question

    def answered(self, token, data):
        """Its answer: kept as ``last`` whenever it comes, so a late one is shown at the next scrape."""
        with self._asking:
            question = self._question
            if question is None or question.token != token:
                return  # (asked by the supervisor before an upgrade)
            self._question = None
            self.last, self.answered_at = data, time.monotonic()
        late = self.answered_at - question.asked
        if late > SNAPSHOT_WAIT:
            log.info("worker %d answered a snapshot %.1fs after it was asked", self.pid, late)
        question.future.set_result(data)

    def hung_up(self):
        """Its channel closed: no answer will come."""
        with self._asking:
            question, self._question, self._hung_up = self._question, None, True
        if question is not None:
            question.future.cancel()

    @property
    def late(self):
        """Whether it has left a snapshot question unanswered for longer than a scrape waits."""
        question = self._question
        return question is not None and time.monotonic() - question.asked >= SNAPSHOT_WAIT


def _discovery(router):
    """One router's interpreter, with the health checks its client settings ask for."""
    return checked(build(router.interpreter), router.client)


class Generation:
    """The workers serving one configuration, and the discovery they subscribe to.

    ``material`` holds the TLS files' bytes as they were checked: each of its
    workers, a replacement for one that died too, builds its contexts from
    them, whatever the disk holds by then (None for workers an upgrade
    inherited, which are never restarted).
    """

    def __init__(self, number, config, hubs, material=None):
        self.number = number
        self.config = config
        self.material = material  # tls.TlsMaterial
        self.hubs = hubs  # router label -> Hub
        self.workers = {}  # slot -> WorkerProcess, while it runs
        self.restartable = True  # False for workers inherited through an upgrade, and failed starts


class Supervisor:
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
        notify.ready(self._status())

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

    def _start_workers(self, generation):
        """Start every worker of ``generation`` and wait until all serve; a problem, or None."""
        try:
            for slot in range(generation.config.workers):
                self._spawn(generation, slot)
        except OSError as exc:  # out of processes or descriptors
            return f"cannot start a worker: {exc.strerror or exc}"
        deadline = time.monotonic() + READY_TIMEOUT
        for worker in list(generation.workers.values()):
            while not worker.ready.wait(0.05):
                if worker.exit_code is not None:
                    return f"worker {worker.pid} {_status(worker.exit_code)} while starting"
                if time.monotonic() > deadline:
                    return f"worker {worker.pid} was not ready within {READY_TIMEOUT:g}s"
        return None

    def _spawn(self, generation, slot):
        parent, child = socket.socketpair()
        sockets = {key: self.sockets[key] for key in listeners(generation.config)}
        try:
            pid, wait = self._start_process(child, sockets, generation)
        finally:
            child.close()
        worker = WorkerProcess(slot, generation.number, pid)
        worker.link = Link(parent, f"worker-{pid}", lambda message: self._received(generation, worker, message),
                           lambda: self._closed(generation, worker, wait))
        with self.lock:
            generation.workers[slot] = worker
        fds = {key: sock.fileno() for key, sock in sockets.items()}  # (a fresh interpreter has them by number)
        worker.link.send(("start", generation.config, generation.material, fds, generation.number))
        worker.link.start()
        log.info("worker %d started (generation %d, slot %d)", pid, generation.number, slot)
        return worker

    def _start_process(self, channel, sockets, generation):
        """A worker process of ``generation`` on ``channel``: forked by the template, else a fresh interpreter;
        (pid, wait)."""
        if self.template is not None:
            try:
                pid = self.template.spawn(channel, sockets, generation)
                return pid, functools.partial(_wait_for_child, pid)
            except TemplateError as exc:
                log.warning("%s; starting the worker as a new interpreter", exc)
        fds = [sock.fileno() for sock in sockets.values()]
        proc = subprocess.Popen(launch.python_module("ltcp.worker", str(channel.fileno()), *self.logging_args,
                                                     str(os.getpid())),
                                pass_fds=[channel.fileno(), *fds], stdin=subprocess.DEVNULL)
        return proc.pid, proc.wait

    # -- messages from workers (on their link's reader thread) ----------

    def _received(self, generation, worker, message):
        kind = message[0]
        if kind == "ready":
            worker.state = "serving" if worker.state == "starting" else worker.state
            worker.ready.set()
        elif kind in ("subscribe", "unsubscribe"):
            hub = generation.hubs.get(message[1])
            if hub is None:  # a worker of the code before an upgrade: it gets no discovery any more
                return
            (hub.subscribe if kind == "subscribe" else hub.unsubscribe)(worker.link, message[2])
        elif kind == "snapshot":
            worker.answered(message[1], message[2])
        elif kind == "draining":
            worker.stopped_accepting.set()
        elif kind == "log":
            writer = self.access_log
            if writer is not None:
                writer.submit(message[1], message[2])
        elif kind == "final":
            worker.final = finished([message[1]])  # once, here: scrapes merge it until the worker is reaped
        else:
            log.warning("worker %d: unknown message %r ignored", worker.pid, kind)

    def _closed(self, generation, worker, wait):
        """The worker's channel closed: end its subscriptions, reap it, tell the main thread."""
        for hub in generation.hubs.values():
            hub.drop(worker.link)
        worker.hung_up()
        worker.stopped_accepting.set()
        worker.exit_code = wait()
        self.events.put(("exited", generation, worker))

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

    def _exited(self, generation, worker):
        status = worker.exit_code
        with self.lock:
            if generation.workers.get(worker.slot) is worker:
                del generation.workers[worker.slot]
            counted = worker.final or worker.last  # killed: what it had counted at the last scrape
            if counted is not None:
                self.departed = self._departed_with(counted)
        expected = worker.state == "draining" or self.stopping
        worker.state = "exited"
        self.kill_at.pop(worker, None)
        if expected:
            log.info("worker %d finished (%s)", worker.pid, _status(status))
        elif generation is self.current and generation.restartable:
            delay = 0.0
            if crashed_on_its_own(status):  # (a kill from outside says nothing of the next start: at once)
                lived = time.monotonic() - worker.started
                crashes = self.crashes.get(worker.slot, 0) + 1 if lived < STABLE_SECS else 1
                self.crashes[worker.slot] = crashes
                delay = restart_delay(crashes)
            log.error("worker %d exited unexpectedly (%s); restarting it%s", worker.pid, _status(status),
                      f" in {delay:g}s" if delay else "")
            self.restart_at[worker.slot] = max(time.monotonic() + delay, worker.started + RESTART_SPACING)
        self._retire_finished()

    def _restart_due(self):
        now = time.monotonic()
        for slot, due in list(self.restart_at.items()):
            if due <= now:
                del self.restart_at[slot]
                if not self.stopping and slot not in self.current.workers and slot < self.current.config.workers:
                    try:
                        self._spawn(self.current, slot)
                    except OSError as exc:  # out of processes or descriptors: try again shortly
                        log.error("cannot start a worker: %s; trying again in %gs", exc, MAX_RESTART_DELAY / 30)
                        self.restart_at[slot] = now + MAX_RESTART_DELAY / 30
                    else:
                        self.restarts += 1

    def _kill_overdue(self):
        now = time.monotonic()
        for worker, due in list(self.kill_at.items()):
            if worker.exit_code is not None:
                del self.kill_at[worker]
            elif due <= now:
                del self.kill_at[worker]
                log.warning("worker %d still running %gs after its grace period: killing it", worker.pid, KILL_MARGIN)
                _kill(worker.pid, signal.SIGKILL)

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
        worker.state = "draining"
        self.kill_at[worker] = time.monotonic() + self.current.config.admin.grace_secs + KILL_MARGIN
        if worker.link is not None:
            worker.link.send(("drain",))
        elif worker.channel is not None:  # inherited through an upgrade: closing its channel drains it
            if worker.channel >= 0:
                os.close(worker.channel)
            worker.channel = None

    def abort(self, status=1):
        """End at once: every worker killed."""
        for worker in self._live_workers():
            _kill(worker.pid, signal.SIGKILL)
        exit_now(status)

    def _stop_everything(self):
        if self.admin is not None:
            self.admin.close()
        if self.template is not None:
            self.template.close()
        for worker in self._live_workers():
            _kill(worker.pid, signal.SIGKILL)
        with self.lock:
            hubs = {id(hub): hub for g in self.generations for hub in g.hubs.values()}
            self.generations = []
        for hub in hubs.values():
            hub.close()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

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
            notify.ready(self._status())
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

    def _status(self):
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
                 "workers": [{"pid": w.pid, "channel": _channel_fd(w), "generation": w.generation,
                              "paused": paused[w], "state": w.state} for w in workers],
                 "reloads": self.reloads, "restarts": self.restarts, "admin_port": self.admin.address[1],
                 "departed": finished(carried) if carried else None, "config": self.current.config}
        handed = [*state["listeners"].values(), *(entry["channel"] for entry in state["workers"]
                                                  if entry["channel"] >= 0)]
        carrier = _carry(state)  # a memfd: no size limit, unlike the environment
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
            wait = functools.partial(_wait_for_child, pid)
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
        self._close_sockets(keep=listeners(config))
        self.reloads["success"] += 1
        self.last_reload_success = time.time()
        log.info("upgrade: generation %d serving; %d workers of the previous ltcp draining",
                 self.current.number, len(previous.workers))

    # -- what the admin server shows (on its threads) ---------------------

    def snapshot(self, listed=0):
        """Every serving worker's snapshot merged, plus what finished workers counted; and by generation.

        Workers that do not answer within ``SNAPSHOT_WAIT`` (stopped, stuck) are
        shown by their last snapshot, marked stale with its age: a scrape never
        waits longer than that, and not at all for a worker already late.  With
        no worker serving (all starting, or crashed), it is what finished workers
        counted, or nothing: the admin server still answers, and says so.
        """
        with self.lock:
            live = [w for w in self._all_workers_locked() if w.exit_code is None]
            running = [w for w in live if w.link is not None]
            workers = [w for w in running if w.state != "starting" and w.final is None]
            # Finished but not yet reaped: counted from their final snapshot, never twice, never not at all.
            finished_counts = [w.final for w in running if w.final is not None]
            if self.departed is not None:
                finished_counts.append(self.departed)
            hubs = dict(self.current.hubs)
            current = self.current.number
        self._ask(workers, listed)
        answered = [w for w in workers if w.last is not None]  # a stuck worker's counts are stale, not gone
        answers = [w.last for w in answered]
        # Finished workers' destinations count while a live worker routes to them (no series for ever).
        names = destination_names(answers)
        merged = merge(answers + [only_destinations(c, names) for c in finished_counts] or [empty_snapshot()])
        # New dicts, not edits: a merge of one snapshot is that snapshot, kept as a worker's last or final.
        routers = [{**router, "discovery": hubs[router["label"]].interpreter.stats.snapshot()}
                   if router["label"] in hubs else router for router in merged["routers"]]
        now = time.monotonic()
        data = {**merged, "routers": routers, "draining": self.stopping, "generation": current,
                "generations": _by_generation(answered), "workers": [_worker_entry(w, now) for w in live]}
        writer = self.access_log
        if writer is not None:
            written, dropped = writer.counts()
            data["access_log"] = {"written": written, "dropped": dropped + merged.get("access_log_dropped", 0)}
        return data

    def _ask(self, workers, listed):
        """Ask each worker for a snapshot listing ``listed`` endpoints; wait up to ``SNAPSHOT_WAIT`` in all."""
        deadline = time.monotonic() + SNAPSHOT_WAIT
        questions = [(worker, worker.ask(listed, self.tokens)) for worker in workers]
        # An answer to a question that listed fewer endpoints (a scrape's) came first: ask again.
        again = [worker for worker, question in questions if _answered(question, deadline, worker.pid)
                 and question.listed < listed]
        for worker in again:
            _answered(worker.ask(listed, self.tokens), deadline, worker.pid)

    def _departed_with(self, counted):
        """What finished workers counted, ``counted`` added (under the lock); destinations only while a
        live worker, or the one just finished, has them, so names routed to once are not kept for ever."""
        live = [w.last for w in self._all_workers_locked() if w.exit_code is None and w.last is not None]
        total = finished([self.departed, counted] if self.departed else [counted])
        return only_destinations(total, destination_names([counted, *live]))

    def families(self, data):
        """The process model's families; ``data``: the snapshot being rendered (with its workers' ages)."""
        with self.lock:
            states = [w.state for w in self._all_workers_locked()]
        ages = {w["pid"]: w["snapshot_age_secs"] for w in data["workers"] if w["snapshot_age_secs"] is not None}
        return supervisor_families({"workers": states, "restarts": self.restarts, "reloads": dict(self.reloads),
                                    "last_reload_success": self.last_reload_success, "snapshot_ages": ages})

    def instance(self):
        """What the dashboard shows of the instance itself."""
        with self.lock:
            workers = [w.describe() for w in self._all_workers_locked() if w.exit_code is None]
        return {"version": __version__, "pid": os.getpid(), "started": self.started_at,
                "uptime_secs": time.time() - self.started_at, "workers": workers, "reloads": dict(self.reloads),
                "restarts": self.restarts, "draining": self.stopping,
                "rss_bytes": resident_bytes(os.getpid()) + sum(resident_bytes(w["pid"]) for w in workers)}

    def _all_workers_locked(self):
        return [w for g in self.generations for w in g.workers.values()]

    def drain(self):
        self.events.put(("drain",))

    def __repr__(self):
        return f"<Supervisor generation={self.current.number} workers={len(self._live_workers())}>"


def _channel_fd(worker):
    """The supervisor's end of a worker's channel (-1 once closed), to carry across an upgrade."""
    if worker.link is not None:
        return worker.link.sock.fileno()
    return worker.channel if worker.channel is not None else -1


def _answered(question, deadline, pid):
    """Whether ``question`` is answered by ``deadline``, or by ``SNAPSHOT_WAIT`` after it was asked if sooner."""
    if question is None:
        return False
    wait = min(deadline, question.asked + SNAPSHOT_WAIT) - time.monotonic()
    try:
        question.future.result(max(0.0, wait))
        return True
    except concurrent.futures.TimeoutError:
        if wait > 0:  # (once: a worker already late is not waited for again)
            log.warning("worker %d did not answer a snapshot within %gs: showing its last one, as stale",
                        pid, SNAPSHOT_WAIT)
        return False
    except concurrent.futures.CancelledError:
        return False


def _worker_entry(worker, now):
    """A worker as /routers.json lists it: its streams, and how old the snapshot they come from is (None: none)."""
    counted = worker.final or worker.last
    servers = [server for router in counted["routers"] for server in router["servers"]] if counted else []
    return {**worker.describe(), "streams": sum(s["active"] for s in servers),
            "accepted": sum(s["accepted"] for s in servers),
            "snapshot_age_secs": None if worker.answered_at is None else round(now - worker.answered_at, 3),
            "stale": worker.late}


def _by_generation(workers):
    """Each generation's answering workers' snapshots, merged: {number: snapshot}."""
    lasts = collections.defaultdict(list)
    for worker in workers:
        lasts[worker.generation].append(worker.last)
    return {number: merge(snapshots) for number, snapshots in lasts.items()}


def _status(code):
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _wait_for_child(pid):
    """Wait for a worker started before an upgrade (no Popen object knows it); its exit code."""
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:  # reaped already (it ended while the upgrade began)
        return 0


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def serve(config, material, path, logging_args):
    """Run the supervisor until it has drained, serving ``config`` with ``material`` (see ``prepare``); the exit
    status."""
    # Blocked before any thread starts, so every thread inherits the mask (see Events).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    supervisor = Supervisor(config, material, path, logging_args)
    signal.set_wakeup_fd(supervisor.events.wakeup_fd, warn_on_full_buffer=False)
    supervisor.install_signal_handlers()
    try:
        supervisor.start(_inherited_state())
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", getattr(exc, "strerror", None) or exc)
        return 2
    return supervisor.run()


def _carry(state):
    """The upgrade state in an anonymous file the new code inherits; its descriptor."""
    fd = os.memfd_create("ltcp-upgrade", 0)
    os.write(fd, pickle.dumps(state))
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    return fd


def _inherited_state():
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
