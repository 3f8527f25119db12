"""Running a configuration's routers on one reactor, and draining them.

A worker process runs one App, its discovery answered by the supervisor; the
tests run one in-process, with discovery on threads of their own.
"""

import gc
import logging

from .accesslog import FileWriter, StreamLog
from .handover import Mover, Receiver
from ..loop import Reactor
from .router import Router
from .budget import stream_budget
from ..protocol.tls import read_material

__all__ = ["App", "tune_garbage_collection"]

log = logging.getLogger(__name__)

class App:
    """Every router of a configuration on one reactor.

    ``start()`` binds the listeners (so ports chosen by the system are known
    before ``run()``), ``run()`` blocks on the reactor until a drain finishes
    or ``stop()``; ``request_drain()`` and ``stop()`` may be called from any thread.

    ``interpreters`` (by router label) answer discovery; without them each
    router runs its own in this process.  ``sockets`` are listening sockets
    already open, by ``router.listener_key``.  ``log_sink(data, lines)``
    takes the access log's chunks (a worker's control channel); without one,
    an app with an access log writes the file itself.  ``material`` holds
    the TLS files' bytes (``tls.TlsMaterial``, as the supervisor checked
    them); without it they are read now.
    """

    def __init__(self, config, interpreters=None, sockets=None, log_sink=None, material=None):
        self.config = config
        self.reactor = Reactor()
        self.log_writer = None  # the access log's file, when this process writes it
        self.access_log = None
        if config.access_log is not None:
            if log_sink is None:  # (in-process: the control plane is here, and so is the file)
                self.log_writer = FileWriter(config.access_log.path)
                log_sink = self.log_writer.submit
            self.access_log = StreamLog(self.reactor, config.access_log.format, log_sink)
        self.buffer = bytearray(config.buffer_size_bytes)
        self.closed = False
        self.draining = False
        self.grace_timer = None
        self.receiver = None  # handover.Receiver: streams old workers hand to this one
        self.movers = []  # handover.Mover: this one's streams, handed to the next generation (each drain order)
        self.budget = stream_budget(config, control_plane=interpreters is None)
        if interpreters is None:
            from ..balancer.health import checked
            from ..interpreter import build
            interpreters = {router.label: checked(build(router.interpreter), router.client)
                            for router in config.routers}
        material = read_material(config) if material is None else material
        self.routers = [Router(self.reactor, router, self.buffer, self.budget, interpreters[router.label], material,
                               sockets, self.access_log) for router in config.routers]

    @property
    def listeners(self):
        return [listener for router in self.routers for listener in router.listeners]

    def start(self):
        try:
            for router in self.routers:
                router.start()
        except BaseException:
            self.close()
            raise

    def run(self):
        try:
            self.reactor.run()
        finally:
            self.close()

    def stop(self):
        """End at once: open streams are cut."""
        self.reactor.call_soon_threadsafe(self.reactor.stop)

    def request_drain(self):
        self.reactor.call_soon_threadsafe(self.drain)

    def receive_streams(self, secret):
        """Take the streams draining workers hand over (``handOver``), from those that know ``secret``."""
        if self.config.hand_over and secret:
            try:
                self.receiver = Receiver(self.reactor, secret, self._adopt, lambda duplex: duplex.owner.let_go(duplex))
            except OSError as exc:
                log.error("hand-over: cannot open this worker's socket (%s): it takes no streams from others",
                          exc.strerror)

    def _adopt(self, record, client, upstream):
        for listener in self.listeners:
            if listener.label == record.router and listener.address == record.listener:
                return listener.adopt(record, client, upstream)
        return None  # the new configuration does not serve it: it stays where it is, and drains

    def drain(self, targets=()):
        """Stop accepting, hand open streams to the new workers ``targets`` [(pid, secret)] if there are any
        (``handOver``), let the others finish for graceSecs, then stop.  Draining already, hand what is left
        to ``targets`` (newer workers than the last ones named)."""
        if self.draining:
            self._hand_over(targets)
            return
        for router in self.routers:
            router.stop_accepting()
        self.draining = True  # once nothing accepts, for whoever watches from another thread
        grace = self.config.admin.grace_secs
        log.info("drain started: %d streams open, up to %gs to finish", self.budget.used, grace)
        if not self.budget.used:
            self._drained()
            return
        self.budget.on_empty = self._drained
        self.grace_timer = self.reactor.call_later(grace, self._grace_over)
        self._hand_over(targets)

    def _hand_over(self, targets):
        if targets and self.config.hand_over and self.budget.used:
            mover = Mover(self.reactor, self.listeners, targets, lambda listener, duplex: listener.let_go(duplex),
                          lambda listener, outcome: listener.handed_over.update((outcome,)), self._given_back,
                          count_unmovable=not self.movers)
            self.movers.append(mover)
            mover.start()

    def _given_back(self, mover, listener, duplex):
        """A stream ``mover``'s targets refused or failed: the newest workers named since may take it."""
        newest = self.movers[-1]
        if newest is not mover:
            newest.offer(listener, duplex)

    def _grace_over(self):
        self.grace_timer = None
        for mover in self.movers:
            mover.close()
        log.info("grace period over: closing %d streams", self.budget.used)
        for router in self.routers:
            router.close_streams()  # the last release calls _drained

    def _drained(self):
        self.budget.on_empty = None
        if self.grace_timer is not None:
            self.grace_timer.cancel()
            self.grace_timer = None
        log.info("drain finished")
        self.reactor.stop()

    def close(self):
        if not self.closed:
            self.closed = True
            for part in (self.receiver, *self.movers):
                if part is not None:
                    part.close()
            for router in self.routers:
                router.close()
            if self.access_log is not None:
                self.access_log.close()
                if self.log_writer is not None:  # (a worker hands its last lines on itself)
                    self.access_log.flush()
                    self.log_writer.close()
            self.reactor.close()


# Streams are freed by reference counting and make no cyclic garbage, so young
# collections can be rare; a burst of allocations (a discovery answer with
# tens of thousands of endpoints) then causes no full collection at all.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_garbage_collection():
    """Rarer young collections, and the startup heap (modules, configuration) never scanned again."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
