"""Listening sockets: accept, build the Envelope, hand the stream to its balancer.

A listener stops accepting (drops its registration) rather than accepting and
dropping: at ``maxConcurrency`` or the process's stream budget until a stream
ends, and for a short pause when the process runs out of file descriptors.
How such episodes are counted and logged is ``holdback``'s.
"""

import _socket
import collections
import errno
import logging
import select
import socket

from ..protocol import tls
from ..balancer.dial import Dial
from .duplex import Duplex, Tally
from .holdback import Holdback
from ..histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
from .intake import Intake
from ..loop import READ
from ..names import display_address

__all__ = ["Envelope", "Listener", "listen"]

log = logging.getLogger(__name__)

BACKLOG = 1024
ACCEPT_BATCH = 64  # accepts per readiness event, so one busy listener cannot starve the rest
FD_PAUSE = 0.1  # seconds to stop accepting after EMFILE/ENFILE
BUG_PAUSE = 1.0  # seconds to stop accepting after a bug in the accept path
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# Why a listener stopped accepting (the reason label of ltcp_listener_paused_seconds_total).
MAX_CONCURRENCY = "max_concurrency"
STREAM_BUDGET = "stream_budget"
OUT_OF_DESCRIPTORS = "out_of_descriptors"


class Envelope:
    """What is known about a stream when it is accepted, and the limits it runs under."""

    __slots__ = ("source", "destination", "dst_name", "accepted_at", "connect_deadline", "lifetime",
                 "idle_timeout", "server_name", "tls_version", "client_identity", "client_certified")

    def __init__(self, source, dst_name, accepted_at, connect_deadline, lifetime, idle_timeout):
        self.source = source  # (ip, port) of the client, from a PROXY header if one was read
        self.destination = None  # (ip, port) the client connected to, if a PROXY header said so
        self.dst_name = dst_name
        self.accepted_at = accepted_at  # reactor time
        self.connect_deadline = connect_deadline  # reactor time by which upstream must be up
        self.lifetime = lifetime  # seconds, or None
        self.idle_timeout = idle_timeout  # seconds, or None
        self.server_name = None  # the SNI of a terminated TLS stream
        self.tls_version = None  # of a terminated TLS stream ("TLSv1.3")
        self.client_identity = None  # from a verified client certificate (see tls.client_identity)
        self.client_certified = False  # the client presented a certificate the handshake verified

    def __repr__(self):
        return f"<Envelope {self.source} -> {self.dst_name}>"


def listen(config):
    """A listening socket for one server's address (OSError naming the address if it cannot be had)."""
    family = socket.AF_INET6 if ":" in config.ip else socket.AF_INET
    try:  # (the socket itself too: out of descriptors, the address is what the operator needs to hear)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Accepted sockets inherit TCP_NODELAY on Linux: one setsockopt here, none per client.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((config.ip, config.port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {config.address}: {exc.strerror}") from None
    return sock


def wants_server_names(config, client_config, logged):
    """Whether a terminating server's handshakes must note the SNI: a callback each, so only when a name, a
    PROXY v2 header or the access log (``logged``) uses it."""
    return "{sni}" in config.dst_name or "v2" in client_config.proxy_protocols or logged


def terminating_servers(config):
    """``(tls, names_wanted)`` of every server of ``config`` that terminates TLS, as its listeners build them."""
    return [(server.tls, wants_server_names(server, router.client, config.access_log is not None))
            for router in config.routers for server in router.servers if server.tls is not None]


class Listener:
    """One configured server: a listening socket and the streams it accepted.

    Who answers for a stream, so that its counts cannot leak: from accept until
    it ends, a stream is counted in ``active`` and in the budget, and one holder
    answers for it, an Intake or a Dial (in ``dials``) or a Duplex (in
    ``streams``).  A holder ends the stream by telling the listener
    (``dial_failed``, ``stream_closed``), and the reactor turns a bug in any of
    its callbacks into ``crashed``, which ends it too.  A stream changes hands
    only here, in ``_accepted``, ``dial`` and ``established``, and the old
    holder leaves its set only once the new one is in; between the two, the
    listener is the holder, so a bug there ends the stream here (``_lost``).
    Either way the end is counted once, as ``bug``, and both sockets are closed.
    """

    def __init__(self, reactor, config, binder, buffer, label, budget, material, sock=None, access_log=None,
                 unusable=None):
        """``material``: the TLS files' bytes to build this server's contexts from; ``unusable``: why this
        process cannot serve it at all (its router's client contexts failed), or None."""
        self.reactor = reactor
        self.budget = budget
        self.pipes = budget.pipes  # what a duplex of ours takes a splice pipe from
        self.config = config
        self.binder = binder
        self.buffer = buffer
        self.view = memoryview(buffer)  # made once, not per stream
        self.label = label
        self.sock = sock  # a listening socket opened by the supervisor, or None: start() opens one
        self.access_log = access_log  # an accesslog.StreamLog, or None
        self.address = None  # (ip, port) actually bound
        self.family = None  # the listening socket's, as a plain int
        self.origin = None  # (router label, address shown): how the access log names this server
        self.listening = False
        self.closed = False
        self.pause_timer = None
        self.holdback = Holdback(reactor, lambda: f"router {self.label} on {self.display_address}")
        self.active = 0
        self.accepted = 0
        self.finished = 0
        self.received = Tally()  # bytes from clients, counted as they are read
        self.sent = Tally()  # bytes from upstreams, towards clients
        self.failures = collections.Counter()  # cause -> streams that never reached an endpoint
        self.fallbacks = collections.Counter()  # cause -> streams sent to defaultDstName for want of SNI
        self.endings = collections.Counter()  # reason -> established streams that ended so
        self.handed_over = collections.Counter()  # outcome -> streams a drain offered to the next generation
        self.connect_latency = Histogram(LATENCY_BUCKETS)  # accept -> upstream established
        self.stream_duration = Histogram(DURATION_BUCKETS)  # upstream established -> closed
        self.dials = set()  # streams still connecting
        self.streams = set()  # established streams
        self._connect_timeout = config.connect_timeout_ms / 1000
        self._idle = config.idle_timeout_ms / 1000 if config.idle_timeout_ms else None
        self._lifetime = config.connection_lifetime_secs
        self.tls = None
        self.unusable = unusable  # why this process does not serve this server, or None
        self.context_failures = 0  # 1 if this process could not build its contexts (a count: workers' add up)
        if config.tls and unusable is None:
            names_wanted = wants_server_names(config, binder.client_config, access_log is not None)
            self.tls, self.unusable = tls.attempt(tls.server_context, config.tls, material, names_wanted)
        self._intake = bool(config.proxy_protocol or config.tls or "{sni}" in config.dst_name)
        # A name with placeholders is no name until the intake fills it in (logs show none meanwhile).
        self._dst_name = None if "{" in config.dst_name else config.dst_name

    def start(self):
        if self.unusable is not None:
            self._serve_nothing()
            return
        opened = self.sock is None
        if opened:
            self.sock = listen(self.config)
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        self.family = int(self.sock.family)  # (the property builds an enum on every read)
        self.origin = (self.label, self.display_address)
        self._listen()
        if opened:  # (a supervisor says it once for all its workers)
            log.info("router %s listening on %s for %s", self.label, self.display_address, self.config.dst_name)

    def _serve_nothing(self):
        """This process cannot build the server's TLS contexts: it leaves the socket to the others, counts it and
        says why.  Its other servers serve on, and so do other workers."""
        self.closed = True
        self.context_failures += 1
        if self.sock is not None:
            self.address = self.sock.getsockname()[:2]
            self.sock.close()
        log.error("router %s: %s is not served by this process: %s", self.label,
                  self.display_address if self.address else self.config.address, self.unusable)

    @property
    def display_address(self):
        return display_address(self.address)

    def _listen(self):
        if not self.listening and not self.closed:
            # Workers share the socket: each readiness wakes one of them, not all.
            self.reactor.register(self.sock, READ | select.EPOLLEXCLUSIVE, self._acceptable)
            self.listening = True
            if self.holdback.held is not None:
                self.holdback.release()

    def _unlisten(self):
        if self.listening:
            self.reactor.unregister(self.sock)
            self.listening = False

    def resume(self):
        """Listen again unless a limit or a descriptor pause still holds."""
        if self.pause_timer is None and self.active < self.config.max_concurrency:
            if self.budget.has_room():
                self._listen()
            else:
                self.budget.waiting.add(self)

    def _acceptable(self, mask):
        limit = self.config.max_concurrency
        budget = self.budget
        # socket.accept() builds two enums per client, and socket.socket wraps the C
        # socket in Python-level __init__ and close: a plain client needs neither.
        accept, family, wrap = self.sock._accept, self.family, _socket.socket
        for _ in range(ACCEPT_BATCH):
            if self.active >= limit or budget.used >= budget.capacity:
                self._saturated()
                return
            try:
                fd, source = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._out_of_descriptors(f"accept: {exc.strerror}")
                    return
                log.debug("accept on %s failed: %s", self.display_address, exc)
                continue  # ECONNABORTED and friends: that client is already gone
            self._accepted(wrap(family, socket.SOCK_STREAM, 0, fd), source)

    def _saturated(self):
        """At ``maxConcurrency`` or the stream budget: stop accepting until a stream ends."""
        limit, budget = self.config.max_concurrency, self.budget
        if self.active >= limit:
            self._held_back(MAX_CONCURRENCY, f"maxConcurrency {limit} reached")
        else:
            budget.waiting.add(self)
            self._held_back(STREAM_BUDGET, f"this process's descriptor budget of {budget.capacity} streams is in use")

    def _out_of_descriptors(self, what):
        """Stop accepting for a moment, never a busy loop; only the episode's first time is logged."""
        self.failures["out_of_descriptors"] += 1
        if self.closed:
            return  # (a connect of a stream still draining: there is no accepting to hold back)
        if self.pause_timer is None:
            self.pause_timer = self.reactor.call_later(FD_PAUSE, self._pause_over)
        self._held_back(OUT_OF_DESCRIPTORS, f"out of descriptors ({what})")

    def _held_back(self, reason, why):
        """A limit stops accepting (logged once per episode: ``Holdback``)."""
        if self.holdback.hold(reason, why, f"; trying again every {FD_PAUSE:g}s" if reason is OUT_OF_DESCRIPTORS
                              else ""):
            self._unlisten()

    def crashed(self, exc):
        """A bug while accepting: stop for a moment instead of failing again on every wakeup."""
        self._unlisten()
        if self.pause_timer is None:
            self.pause_timer = self.reactor.call_later(BUG_PAUSE, self._pause_over)

    def _pause_over(self):
        self.pause_timer = None
        self.resume()

    # -- streams changing hands (the ownership rule in the class docstring) ----------------

    def _accepted(self, client, source):
        self.accepted += 1
        self.active += 1
        self.budget.acquire()
        now = self.reactor.now
        envelope = Envelope(source, self._dst_name, now, now + self._connect_timeout, self._lifetime, self._idle)
        try:
            client.setblocking(False)
            if self._intake:
                self._hand_over(None, Intake(self, client, envelope))
            else:
                self._route(None, client, envelope)
        except Exception as exc:
            self._lost(exc, None, client, envelope)

    def dial(self, intake, client, envelope):
        """The intake is done: start connecting the stream to its destination."""
        try:
            self._route(intake, client, envelope)
        except Exception as exc:
            self._lost(exc, intake, client, envelope)

    def _route(self, previous, client, envelope):
        balancer = self.binder.bind(envelope.dst_name)
        if balancer is None:
            self.dials.discard(previous)
            self._ended_unconnected(client, envelope, None, "route_cache_full")
            return
        self._hand_over(previous, Dial(balancer, client, envelope, self))

    def _hand_over(self, previous, holder):
        """``holder`` (an Intake or a Dial) takes the stream over from ``previous``, and takes its first step.

        A bug in that step is the holder's to end, as in any of its callbacks.
        """
        self.dials.add(holder)
        self.dials.discard(previous)
        self.reactor.call_now(holder.start)

    def established(self, dial, endpoint, upstream, upstream_events):
        try:
            duplex = Duplex(self, (dial.balancer, endpoint, dial.envelope), dial.client, dial.events, upstream,
                            upstream_events, self.buffer)
        except Exception as exc:
            self._lost(exc, dial, dial.client, dial.envelope, upstream)
            return
        self.streams.add(duplex)
        self.dials.discard(dial)
        dial.balancer.stream_opened(endpoint)  # paired with stream_closed below
        self.connect_latency.observe(self.reactor.now - dial.envelope.accepted_at)

    def _lost(self, exc, previous, client, envelope, upstream=None):
        """A bug while the stream changed hands: no holder has it, so it ends here (cause ``bug``)."""
        log.error("%s %s: the stream from %s ended by a bug while it changed hands", self.label, envelope.dst_name,
                  envelope.source, exc_info=exc)
        self.dials.discard(previous)
        if upstream is not None:
            self.reactor.discard(upstream)
            upstream.close()
        self.reactor.discard(client)  # whoever registered it last
        self._ended_unconnected(client, envelope, getattr(previous, "endpoint", None), "bug")

    def dial_failed(self, dial, cause):
        """A stream ends before reaching an endpoint (``dial`` is a Dial or an Intake)."""
        self.dials.discard(dial)
        if cause == "resources":
            self._out_of_descriptors("connect")
        if log.isEnabledFor(logging.DEBUG):
            envelope = dial.envelope
            log.debug("%s %s: stream from %s failed: %s%s", self.label, envelope.dst_name, envelope.source, cause,
                      f" ({dial.failure})" if dial.failure else "")
        self._ended_unconnected(dial.client, dial.envelope, getattr(dial, "endpoint", None), cause)

    # -- streams handed between workers (dataplane.handover) ------------------------------

    def adopt(self, record, client, upstream):
        """A stream another worker ran until now: a held Duplex that this listener answers for, or None when
        this worker cannot take it (it is draining, full, or has no route to its destination)."""
        if self.closed or self.active >= self.config.max_concurrency or not self.budget.has_room():
            return None
        balancer = self.binder.bind(record.dst_name)
        if balancer is None:
            return None
        envelope = Envelope(record.source, record.dst_name, record.accepted_at, record.accepted_at,
                            record.lifetime, record.idle_timeout)
        envelope.destination = record.destination
        client.setblocking(False)
        upstream.setblocking(False)
        endpoint = balancer.stream_adopted(record.endpoint, record.client_ended or record.upstream_ended)
        duplex = Duplex(self, (balancer, endpoint, envelope), client, 0, upstream, 0, self.buffer, resumed=record)
        self.active += 1
        self.budget.acquire()
        self.streams.add(duplex)
        return duplex

    def let_go(self, duplex):
        """``duplex`` runs in another worker now: it leaves this one's counts without ending here."""
        self.streams.discard(duplex)
        duplex.balancer.stream_closed(duplex.endpoint, duplex.ending)
        duplex.let_go()
        self.active -= 1
        self.budget.release()

    def _ended_unconnected(self, client, envelope, endpoint, cause):
        """The end of a stream that never reached an endpoint (``endpoint``: the last one tried, if any)."""
        self.failures[cause] += 1
        client.close()
        self._logged(envelope, endpoint.address if endpoint else None, 0, 0, cause)
        self._stream_ended()

    def stream_closed(self, duplex):
        self.streams.discard(duplex)
        duplex.balancer.stream_closed(duplex.endpoint, duplex.ending)
        self.endings[duplex.reason] += 1
        self.stream_duration.observe(self.reactor.now - duplex.started)
        if duplex.detail and log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: stream from %s to %s ended: %s (%s)", self.label, duplex.envelope.dst_name,
                      duplex.envelope.source, duplex.endpoint.address, duplex.reason, duplex.detail)
        if self.access_log is not None:  # (checked here: this runs for every stream)
            self._logged(duplex.envelope, duplex.endpoint.address, duplex.from_client, duplex.to_client,
                         duplex.reason)
        self._stream_ended()

    def _logged(self, envelope, endpoint, from_client, to_client, end):
        """The stream's access log line, if there is a log (``endpoint``: an address, or None)."""
        if self.access_log is not None:
            self.access_log.record(self.origin, envelope, endpoint, from_client, to_client, end)

    def _stream_ended(self):
        self.active -= 1
        self.finished += 1
        if not self.listening:
            self.resume()
        self.budget.release()

    def close(self):
        """Stop accepting; streams already open carry on."""
        self.closed = True
        self._unlisten()
        if self.pause_timer is not None:
            self.pause_timer.cancel()
            self.pause_timer = None
        self.holdback.close()
        if self.sock is not None:
            self.sock.close()

    def close_streams(self):
        """End every stream now, connecting or established."""
        for dial in list(self.dials):
            dial.fail("shutdown")
        for duplex in list(self.streams):
            duplex.close("shutdown")
