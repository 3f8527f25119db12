"""The worker template: an interpreter with the data plane imported, which forks workers from itself.

A fresh ``python -m ltcp.worker`` spends about 120 ms of CPU importing ltcp
and the standard library before it serves, and keeps its own copy of every
module.  So the supervisor starts this process once: it holds what a worker
needs imported, with that heap frozen (no collection writes to those pages
again), and waits.  Each worker is a fork of it: serving within
milliseconds, and sharing those pages with its siblings.

The supervisor forks the template from itself before it starts its first
thread, having imported the data plane too (it checks configurations with
it), so the supervisor, the template and every worker share one copy of the
interpreter and the modules, where an ``exec`` would load a second (5 MB of
the summed PSS of an instance with two workers).  Should that template die
later, its replacement is a new interpreter (``python -m
ltcp.process.template FD LEVEL FORMAT SUPERVISOR``): the supervisor runs
threads by then (discovery, admin, a reader and a writer per worker), and a
fork copies whatever lock one of them held at that instant.  The template
never starts a thread, and holds no listening socket: each request brings
the worker's descriptors, which go to the worker and are closed here.

Workers remain the supervisor's children.  The template forks twice and the
middle process exits at once, so the worker is re-parented to the
supervisor, a child subreaper (``lifeline.adopt_orphans``): the supervisor
reaps, signals and carries workers across an upgrade as it always did, and a
worker, once its parent is the supervisor, ties its life to it.

It also builds each generation's TLS server contexts before forking its
workers, so that they all inherit one set of session ticket keys and a
client resumes its session on any worker (``tls.keep_server_contexts``).

One request at a time, on a SOCK_SEQPACKET socket pair (a message and its
descriptors travel together)::

    ("prepare", generation) + [a memfd holding the pickled (config, material)]
        -> ("prepared", contexts built) | ("failed", why)
    ("spawn", keys) + [channel, listening sockets in the order of keys]
        -> ("spawned", pid) | ("failed", why)

The supervisor's side is ``Template``; a supervisor that cannot use one (it
failed to start) starts fresh interpreters instead.
"""

import gc
import logging
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import threading
import time

from . import launch
from .. import logs, worker
from ..protocol import tls
from ..dataplane.server import terminating_servers
from .lifeline import die_with

__all__ = ["Template", "TemplateError", "main"]

log = logging.getLogger("ltcp.process.template")  # (not __name__: run as a script, that is __main__)

MAX_MESSAGE = 64 * 1024
MAX_DESCRIPTORS = 1024  # a channel and the listening sockets of one configuration
ANSWER_TIMEOUT = 2.0  # seconds for the template to answer a request (a fork takes milliseconds)
PREPARE_TIMEOUT = 10.0  # seconds to build a generation's TLS contexts (a few ms each, and most are kept)
ADOPTION_TIMEOUT = 2.0  # seconds for a new worker to become the supervisor's child


class TemplateError(Exception):
    """The template could not be started, or did not answer."""


class Template:
    """The supervisor's end: starts the template process, and asks it for workers (main thread only)."""

    def __init__(self, logging_args):
        self.logging_args = logging_args
        self.sock = None
        self.proc = None
        self.prepared = None  # the generation whose TLS contexts the template holds

    def spawn(self, channel, sockets, generation):
        """Fork a worker of ``generation`` for ``channel`` and ``sockets`` (key -> socket); its pid.

        Raises TemplateError (the template is then restarted at the next call).
        """
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        if self.prepared != generation.number and generation.material is not None:
            self._prepare(generation)
            if self.sock is None:  # it failed, and was stopped: the next request starts another
                raise TemplateError("the worker template stopped answering")
        keys = list(sockets)
        return self._ask(("spawn", keys), [channel.fileno(), *(sockets[key].fileno() for key in keys)], "spawned")

    def _prepare(self, generation):
        """Have the template build ``generation``'s server contexts, for its workers to share; if it cannot, each
        worker builds its own (and sessions resume only on the worker that began them)."""
        state = os.memfd_create("ltcp-generation", os.MFD_CLOEXEC)
        try:
            with open(state, "wb", closefd=False) as f:
                pickle.dump((generation.config, generation.material), f)
            self.sock.settimeout(PREPARE_TIMEOUT)
            built = self._ask(("prepare", generation.number), [state], "prepared")
            self.prepared = generation.number
            log.debug("worker template: generation %d's TLS contexts ready, %d built anew", generation.number, built)
        except TemplateError as exc:
            log.warning("%s; each worker of generation %d builds its own TLS contexts", exc, generation.number)
        finally:
            os.close(state)
            if self.sock is not None:
                self.sock.settimeout(ANSWER_TIMEOUT)

    def _ask(self, request, fds, expected):
        """Send ``request`` with ``fds``; the detail of an ``expected`` answer, else TemplateError."""
        try:
            socket.send_fds(self.sock, [pickle.dumps(request)], fds)
            answer = self.sock.recv(MAX_MESSAGE)
        except OSError as exc:  # (a timeout included: a template that hangs is replaced)
            self.close(kill=True)
            raise TemplateError(f"the worker template failed: {exc.strerror or exc}") from None
        if not answer:
            self.close(kill=True)
            raise TemplateError("the worker template exited")
        kind, detail = pickle.loads(answer)
        if kind != expected:
            raise TemplateError(detail)
        return detail

    def start(self):
        """Start the template now, if it is not running: called before the supervisor starts a thread, it is a
        fork of the supervisor, sharing every page both have imported rather than importing it all again."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()

    def _start(self):
        self.close(kill=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = (str(theirs.fileno()), *self.logging_args, str(os.getpid()))
        try:
            if threading.active_count() == 1:  # (forking a process with threads copies the locks they hold)
                self.proc = Forked(main, args)
            else:
                command = launch.python_module("ltcp.process.template", *args)
                self.proc = subprocess.Popen(command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise TemplateError(f"cannot start the worker template: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        ours.settimeout(ANSWER_TIMEOUT)
        self.sock = ours
        self.prepared = None
        log.info("worker template %d started", self.proc.pid)

    def close(self, kill=False):
        """Stop the template: it exits when its channel closes (``kill``: now); its workers are not its to stop."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            if kill:
                self.proc.kill()
            try:
                self.proc.wait(ANSWER_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class Forked:
    """A child process running ``entry(args)`` in a fork of this one, with the few methods of ``Popen`` that
    ``Template`` uses.  The child starts as a new program would: only stdio and the descriptor its first
    argument names open, and no Python signal handler."""

    def __init__(self, entry, args):
        gc.freeze()  # (in both: neither process's collections write to the pages they share)
        self.returncode = None
        self.pid = os.fork()
        if self.pid == 0:
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                for signum in signal.valid_signals():
                    if callable(signal.getsignal(signum)):
                        signal.signal(signum, signal.SIG_DFL)
                keep = int(args[0])
                os.closerange(3, keep)
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                status = entry(args)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(status)

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone all the same
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"template {self.pid}", timeout)
            time.sleep(0.001)
        return self.returncode


# -- the template process --------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fd, level, log_format, supervisor = int(argv[0]), argv[1], argv[2], int(argv[3])
    logs.configure(level, log_format)
    die_with(supervisor)
    for signum in worker.SUPERVISOR_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    sock = socket.socket(fileno=fd)
    gc.freeze()  # what is imported by now is shared with every worker: never scanned, never written
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_DESCRIPTORS)
        except OSError:
            data, fds = b"", []
        if not data:
            return 0  # the supervisor closed its end: an upgrade, a shutdown, or it is gone
        try:
            kind, detail = pickle.loads(data)
            if kind == "prepare":
                answer = "prepared", _prepare(fds[0])
            elif kind == "spawn":
                answer = _fork_worker(sock, fds, detail, supervisor)
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as exc:  # a request this template cannot serve: the supervisor falls back
            log.exception("worker template: request failed")
            answer = ("failed", f"the worker template failed: {exc}")
        finally:
            for number in fds:
                os.close(number)
        sock.send(pickle.dumps(answer))


def _prepare(state):
    """Build the TLS server contexts of the configuration pickled in the memfd ``state``; the number built."""
    with open(state, "rb", closefd=False) as f:
        f.seek(0)
        config, material = pickle.load(f)
    return tls.keep_server_contexts(terminating_servers(config), material)


def _fork_worker(template_sock, fds, keys, supervisor):
    """Fork twice; the grandchild becomes a worker, the supervisor's child; ("spawned", pid)."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            pid = os.fork()
            if pid == 0:
                os.close(write_end)
                template_sock.close()
                _be_worker(fds, keys, supervisor)  # (never returns)
            os.write(write_end, str(pid).encode())
        finally:
            os._exit(0)  # (a failed fork too: the template answers "failed")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        pid = pipe.read()
    os.waitpid(middle, 0)
    if not pid:
        return "failed", "the worker template could not fork"
    return "spawned", int(pid)


def _be_worker(fds, keys, supervisor):
    """Serve as a worker, once adopted by the supervisor; exit with its status, never return."""
    status = 1
    try:
        deadline = time.monotonic() + ADOPTION_TIMEOUT
        while os.getppid() != supervisor:  # the middle process is exiting: the supervisor adopts us
            if time.monotonic() > deadline:
                raise SystemExit("ltcp worker: the supervisor is gone")
            time.sleep(0.0005)
        die_with(supervisor)
        random.seed()  # (a copy of the template's state otherwise: every worker would draw alike)
        channel = socket.socket(fileno=fds[0])
        sockets = {key: socket.socket(fileno=number) for key, number in zip(keys, fds[1:])}
        status = worker.serve(channel, sockets)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            log.error("%s", exc.code)
    except BaseException:
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
