"""Workers as the supervisor sees them: each process, its generation, and when a dead one comes back.

A worker killed from outside (an operator, the OOM killer) says nothing
about the next start and is restarted at once; one that fails on its own
backs off, per slot (``crashed_on_its_own``, ``restart_delay``).
"""

import concurrent.futures
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

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
