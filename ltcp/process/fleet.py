"""Workers as the supervisor sees them: each process, its generation, and when a dead one comes back.

A worker killed from outside (an operator, the OOM killer) says nothing
about the next start and is restarted at once; one that fails on its own
backs off, per slot (``crashed_on_its_own``, ``restart_delay``).
"""

import concurrent.futures
import functools
import logging
import os
import secrets
import signal
import socket
import subprocess
import threading
import time

from ..admin.snapshot import finished
from ..config.plan import listeners
from . import launch
from .channels import Link
from .template import TemplateError

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds for a new generation's workers to be serving
KILL_MARGIN = 5.0  # seconds past graceSecs before a draining worker that has not exited is killed
SNAPSHOT_WAIT = 0.5  # seconds a scrape waits for a worker's answer; a later one is served its last snapshot
STABLE_SECS = 10.0  # a worker that ran this long had no start-up trouble: its next restart is immediate
MAX_RESTART_DELAY = 30.0
RESTART_SPACING = 0.1  # seconds between two starts in one slot, however its workers end: a kill loop cannot spin
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE})


def crashed_on_its_own(code):
    """Whether a worker's exit ``code`` (negative: the signal) is its own failure, rather than a kill from outside
    (an operator, the OOM killer) or a clean exit: only those back off."""
    return code > 0 or -code in CRASH_SIGNALS


def restart_delay(crashes):
    """Seconds before restarting a worker that died ``crashes`` times in a row, each soon after starting."""
    return 0.0 if crashes <= 1 else min(MAX_RESTART_DELAY, 0.5 * 2 ** (crashes - 2))


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
        self.secret = None  # what a worker handing it streams must show (hex); known for those this code started
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


def channel_fd(worker):
    """The supervisor's end of a worker's channel (-1 once closed), to carry across an upgrade."""
    if worker.link is not None:
        return worker.link.sock.fileno()
    return worker.channel if worker.channel is not None else -1


def describe_exit(code):
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def wait_for_child(pid):
    """Wait for a worker started before an upgrade (no Popen object knows it); its exit code."""
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:  # reaped already (it ended while the upgrade began)
        return 0


def kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


class Fleet:
    """The supervisor's part that starts workers, reads their messages, reaps them and restarts the ones that
    died: a mixin of ``Supervisor``, whose state (``generations``, ``restart_at``, ``kill_at``) it shares."""

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
                    return f"worker {worker.pid} {describe_exit(worker.exit_code)} while starting"
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
        worker.secret = secrets.token_hex(16)
        worker.link = Link(parent, f"worker-{pid}", lambda message: self._received(generation, worker, message),
                           lambda: self._closed(generation, worker, wait))
        with self.lock:
            generation.workers[slot] = worker
        fds = {key: sock.fileno() for key, sock in sockets.items()}  # (a fresh interpreter has them by number)
        worker.link.send(("start", generation.config, generation.material, fds, generation.number, worker.secret))
        worker.link.start()
        log.info("worker %d started (generation %d, slot %d)", pid, generation.number, slot)
        return worker

    def _start_process(self, channel, sockets, generation):
        """A worker process of ``generation`` on ``channel``: forked by the template, else a fresh interpreter;
        (pid, wait)."""
        if self.template is not None:
            try:
                pid = self.template.spawn(channel, sockets, generation)
                return pid, functools.partial(wait_for_child, pid)
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

    # -- ends ------------------------------------------------------------

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
            log.info("worker %d finished (%s)", worker.pid, describe_exit(status))
        elif generation is self.current and generation.restartable:
            delay = 0.0
            if crashed_on_its_own(status):  # (a kill from outside says nothing of the next start: at once)
                lived = time.monotonic() - worker.started
                crashes = self.crashes.get(worker.slot, 0) + 1 if lived < STABLE_SECS else 1
                self.crashes[worker.slot] = crashes
                delay = restart_delay(crashes)
            log.error("worker %d exited unexpectedly (%s); restarting it%s", worker.pid, describe_exit(status),
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
                kill(worker.pid, signal.SIGKILL)
