"""Active health checks: a connect (and optionally a request) to every endpoint, on a timer.

``HealthChecked`` stands between an interpreter and whoever watches names
through it (the supervisor's fan-out, or an in-process app), so checks run
once per instance, on the control plane, whatever the number of workers.
For a name whose client settings have ``healthCheck``, each discovery answer
is held back until every new endpoint has been checked once (at most
``timeoutMs``), and delivered with unhealthy endpoints marked: an address
becomes ``(ip, port, weight, False)``.  The balancer keeps such an endpoint,
with its counters, but sends it no stream unless every endpoint is
unhealthy.  Each change of health is delivered again the same way.

An endpoint's first check decides its state; after that it takes
``unhealthyThreshold`` failures in a row to mark it unhealthy and
``healthyThreshold`` successes to bring it back.  An endpoint listed under
several names with the same settings is checked once for all of them.

One thread runs every check of one router with a selector: nonblocking
connects, each with its deadline, the next one due after ``intervalMs`` give
or take a tenth (so checks started together spread out).
"""

import collections
import errno
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time

from ..mailbox import Mailbox

__all__ = ["HealthChecked", "Target", "checked"]

log = logging.getLogger(__name__)

JITTER = 0.1  # each interval is drawn from +- this fraction
MAX_IN_FLIGHT = 256  # checks open at once; due ones beyond wait their turn (descriptors are shared)
HOLD_MARGIN = 0.05  # seconds past timeoutMs a held answer waits for its first checks


def checked(interpreter, client_config):
    """``interpreter`` with health checks for the names whose settings ask for them (unchanged if none can)."""
    everywhere, by_prefix = client_config.health_checks
    if not everywhere and not by_prefix:
        return interpreter
    return HealthChecked(interpreter, lambda name: client_config.settings_for(name).health_check)


class Target:
    """One endpoint checked under one set of settings, and what its checks said."""

    __slots__ = ("ip", "port", "settings", "healthy", "successes", "failures", "names", "due", "sock", "deadline",
                 "received", "sent", "last_error")

    def __init__(self, ip, port, settings):
        self.ip = ip
        self.port = port
        self.settings = settings
        self.healthy = None  # not checked yet
        self.successes = self.failures = 0  # in a row
        self.names = set()
        self.due = 0.0
        self.sock = None  # the check in flight
        self.deadline = 0.0
        self.received = b""
        self.sent = False
        self.last_error = ""

    def record(self, ok):
        """Count one check; True if it changed the endpoint's health (or was its first)."""
        settings = self.settings
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            change = self.healthy is None or (not self.healthy and self.successes >= settings.healthy_threshold)
        else:
            self.successes, self.failures = 0, self.failures + 1
            change = self.healthy is None or (self.healthy and self.failures >= settings.unhealthy_threshold)
        if change:
            self.healthy = ok
        return change


class _Name:
    __slots__ = ("name", "deliver", "settings", "addresses", "targets", "hold_until")

    def __init__(self, name, deliver, settings):
        self.name = name
        self.deliver = deliver
        self.settings = settings
        self.addresses = None  # discovery's last answer, not delivered yet while held
        self.targets = []
        self.hold_until = None  # held for first checks until then; None: delivered


class HealthChecked:
    """An interpreter whose answers carry the health of their endpoints (see the module docstring)."""

    def __init__(self, interpreter, settings_for):
        self.interpreter = interpreter
        self.settings_for = settings_for
        self.stats = interpreter.stats
        self.KIND = interpreter.KIND
        self._commands = Mailbox()  # (what, *arguments) for the checker thread
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._commands, selectors.EVENT_READ)
        self._names = {}  # name -> _Name (checker thread only)
        self._targets = {}  # (ip, port, settings) -> Target (checker thread only)
        self._due = []  # (when, seq, target): a check to start or a deadline to enforce; stale ones skipped
        self._held = set()  # _Name entries whose answer waits for first checks
        self._in_flight = 0
        self._waiting = collections.deque()  # targets due while MAX_IN_FLIGHT checks were open
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="ltcp-health", daemon=True)
        self._closed = False
        self.checks = 0  # checks finished, for the curious (tests, benchmarks)

    def start(self):
        self._thread.start()
        self.interpreter.start()

    def watch(self, name, deliver):
        settings = self.settings_for(name)
        if settings is None:
            self.interpreter.watch(name, deliver)
            return
        self._command("watch", name, deliver, settings)
        self.interpreter.watch(name, lambda addresses: self._command("answer", name, addresses))

    def unwatch(self, name):
        self.interpreter.unwatch(name)
        self._command("unwatch", name)

    def close(self):
        self.interpreter.close()
        self._command("close")
        if self._thread.is_alive():
            self._thread.join(2)
        self._selector.close()
        self._commands.close()

    def _command(self, *command):
        self._commands.put(command)

    # -- the checker thread ------------------------------------------------------------

    def _run(self):
        while not self._closed:
            try:
                self._turn()
            except Exception:
                log.exception("health checks: a bug; carrying on")
        for target in self._targets.values():
            self._end_check(target)

    def _turn(self):
        now = time.monotonic()
        events = self._selector.select(self._sleep(now))
        for key, mask in events:
            if key.fileobj is self._commands:
                for command in self._commands.take():
                    getattr(self, "_on_" + command[0])(*command[1:])
            elif key.data.sock is key.fileobj:  # (a command of this batch may have ended that check)
                self._progress(key.data, mask)
        now = time.monotonic()
        while self._due and self._due[0][0] <= now:
            when, _, target = heapq.heappop(self._due)
            if self._targets.get(self._key(target)) is not target:
                continue  # no name lists it any more
            if target.sock is not None and when == target.deadline:
                self._finish(target, False, "no answer in time")
            elif target.sock is None and when == target.due:
                self._waiting.append(target)
        while self._waiting and self._in_flight < MAX_IN_FLIGHT:
            target = self._waiting.popleft()
            if target.sock is None and self._targets.get(self._key(target)) is target:
                self._start_check(target)
        for entry in [e for e in self._held if now >= e.hold_until]:
            self._deliver(entry)

    def _sleep(self, now):
        wakes = [self._due[0][0]] if self._due else []
        wakes += [entry.hold_until for entry in self._held]
        return max(0.0, min(wakes) - now) if wakes else None

    def _on_watch(self, name, deliver, settings):
        self._names[name] = _Name(name, deliver, settings)

    def _on_answer(self, name, addresses):
        entry = self._names.get(name)
        if entry is None:
            return  # unwatched meanwhile
        targets = []
        for address in addresses or ():
            ip, port = address[0], address[1]
            key = (ip, port, entry.settings)
            target = self._targets.get(key)
            if target is None:
                target = self._targets[key] = Target(ip, port, entry.settings)
                self._schedule(target, 0.0)
            target.names.add(name)
            targets.append(target)
        self._release(entry, targets)
        entry.addresses = addresses
        entry.targets = targets
        if any(t.healthy is None for t in targets):
            if entry.hold_until is None:  # (a newer answer never extends a hold: it would starve the name)
                entry.hold_until = time.monotonic() + entry.settings.timeout_ms / 1000 + HOLD_MARGIN
                self._held.add(entry)
        else:
            self._deliver(entry)

    def _on_unwatch(self, name):
        entry = self._names.pop(name, None)
        if entry is not None:
            self._held.discard(entry)
            self._release(entry, [])

    def _on_close(self):
        self._closed = True

    def _release(self, entry, keeping):
        """Drop ``entry`` from the targets it no longer lists; a target nobody lists is checked no more."""
        kept = set(map(id, keeping))
        for target in entry.targets:
            if id(target) not in kept:
                target.names.discard(entry.name)
                if not target.names:
                    self._end_check(target)
                    del self._targets[self._key(target)]

    @staticmethod
    def _key(target):
        return (target.ip, target.port, target.settings)

    def _schedule(self, target, delay):
        target.due = time.monotonic() + delay
        heapq.heappush(self._due, (target.due, next(self._seq), target))

    def _start_check(self, target):
        family = socket.AF_INET6 if ":" in target.ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # out of descriptors: that says nothing of the endpoint; try later
            log.warning("health checks: cannot open a socket (%s)", exc.strerror)
            self._schedule(target, target.settings.interval_ms / 1000)
            return
        target.sock = sock
        self._in_flight += 1
        target.deadline = time.monotonic() + target.settings.timeout_ms / 1000
        heapq.heappush(self._due, (target.deadline, next(self._seq), target))
        target.received = b""
        target.sent = False
        err = sock.connect_ex((target.ip, target.port))
        if err not in (0, errno.EINPROGRESS):
            self._finish(target, False, errno.errorcode.get(err, str(err)))
            return
        self._selector.register(sock, selectors.EVENT_WRITE, target)

    def _progress(self, target, mask):
        """The check's socket is ready: connected, sent, or has (part of) the answer."""
        settings = target.settings
        sock = target.sock
        if not target.sent:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._finish(target, False, errno.errorcode.get(err, str(err)))
                return
            target.sent = True
            if settings.send:
                try:
                    sock.send(settings.send)  # a fresh socket's buffer takes it whole
                except OSError as exc:
                    self._finish(target, False, exc.strerror or str(exc))
                    return
            if not settings.expect:
                self._finish(target, True)
                return
            self._selector.modify(sock, selectors.EVENT_READ, target)
            return
        try:
            data = sock.recv(len(settings.expect) - len(target.received))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(target, False, exc.strerror or str(exc))
            return
        target.received += data
        if not settings.expect.startswith(target.received):
            self._finish(target, False, f"answered {target.received[:40]!r}")
        elif len(target.received) == len(settings.expect):
            self._finish(target, True)
        elif not data:
            self._finish(target, False, "closed before answering")

    def _end_check(self, target):
        if target.sock is not None:
            try:
                self._selector.unregister(target.sock)
            except (KeyError, ValueError):
                pass
            target.sock.close()
            target.sock = None
            self._in_flight -= 1

    def _finish(self, target, ok, error=""):
        self._end_check(target)
        self.checks += 1
        target.last_error = error
        interval = target.settings.interval_ms / 1000
        self._schedule(target, interval * random.uniform(1 - JITTER, 1 + JITTER))
        first = target.healthy is None
        if not target.record(ok):
            return
        if not first or not ok:
            log.log(logging.INFO if ok else logging.WARNING, "health checks: %s:%s is %s%s", target.ip, target.port,
                    "healthy again" if ok else "unhealthy", f" ({error})" if error else "")
        for name in target.names:
            entry = self._names.get(name)
            if entry is None:
                continue
            if entry.hold_until is None:
                self._deliver(entry)  # a change to pass on
            elif all(t.healthy is not None for t in entry.targets):
                self._deliver(entry)  # the last first check of a held answer

    def _deliver(self, entry):
        entry.hold_until = None
        self._held.discard(entry)
        addresses = entry.addresses
        if addresses:
            health = {(t.ip, t.port): t.healthy for t in entry.targets}
            addresses = [(a[0], a[1], a[2], False) if health.get((a[0], a[1])) is False else a for a in addresses]
        entry.deliver(addresses)
