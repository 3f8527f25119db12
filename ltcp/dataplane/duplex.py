"""The byte pump between an accepted client and its upstream connection.

Each socket is a ``Leg``.  Reading a leg moves bytes through the reactor's
shared buffer straight into the other leg's socket; only what the other side
cannot take right now is copied into that leg's ``pending`` bytes, and while
anything is pending the source leg is not read (backpressure).  EOF on a leg is
passed on as ``shutdown(SHUT_WR)`` to the other once its pending bytes are out;
the stream ends when both directions have ended this way, or at once on an
error, a timeout or ``close()``.

Interest in readiness follows state: a leg wants READ while it can still send
bytes somewhere, and WRITE while bytes are pending for it.  A leg that wants
nothing is unregistered, so a hung-up socket cannot wake the loop in vain.
"""

import fcntl
import math
import os
import socket
import struct
from typing import Protocol

from ..lifecycle import Lifecycle, State
from ..loop import READ, WRITE, Registration
from ..protocol.tls import describe_error
from ..protocol.tlssocket import TlsSocket
from .streamrecord import StreamRecord

__all__ = ["Duplex", "DuplexOwner", "Tally", "READING", "WRITING"]

_LINGER_RESET = struct.pack("ii", 1, 0)
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
PIPE_SIZE = 1 << 18  # bytes one splice may move; the kernel caps it at fs.pipe-max-size
SPLICE_ROUNDS = 4  # splices per wakeup while the other side keeps up
# Seconds a stream must have been open before its bytes count in its endpoint's throughput: the bytes of
# request-and-answer streams are an endpoint's work done, those of long streams its load (balancer.load).
LONG_LIVED = 1.0
_WOULD_BLOCK = (BlockingIOError, InterruptedError)  # not an error, just "not now"


class Tally:
    """A running count shared by many streams (a listener's bytes in or out), read at scrape time."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


OPEN = State("open")  # reading from it
ENDED = State("ended")  # this socket's peer has finished sending (EOF)
READING = Lifecycle("Leg reading", {OPEN: {"eof": ENDED}})

SENDING = State("open")  # writing to it
NOTIFYING = State("notifying")  # TLS: our close_notify waits until no record is left to read, then to be sent
SHUT = State("shut")  # we have finished sending to this socket
WRITING = Lifecycle("Leg writing", {SENDING: {"shut": SHUT, "notify": NOTIFYING}, NOTIFYING: {"notified": SHUT}})


class Leg(Registration):
    """One socket of a duplex and the bytes waiting to be written to it.

    Its lifecycle is two small state machines, one per direction of the
    socket: ``reading`` (from it: open, then ended at EOF) and ``writing`` (to
    it: open, then shut, through notifying for TLS).  Interest in readiness
    is derived from them and from the buffers, in ``wanted`` alone.

    Bytes for this socket wait either in ``pending`` (a private copy, after a
    partial ``send``) or, once the direction carries bulk data between two
    plain sockets, in ``pipe``: the peer splices from its socket into the pipe
    and from the pipe into ours, so the bytes never enter Python.
    """

    __slots__ = ("duplex", "reactor", "sock", "fd", "tls", "peer", "events", "pending", "pipe", "piped",
                 "reading", "writing", "received", "tally")

    def __init__(self, duplex, sock, tally):
        self.duplex = duplex
        self.reactor = duplex.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.tls = self.__class__ is TlsLeg
        self.peer = None
        self.events = 0  # interest registered with the reactor; 0 = not registered
        self.pending = None  # memoryview of bytes still to write to this socket
        self.pipe = None  # (read end, write end) carrying spliced bytes to this socket
        self.piped = 0  # bytes in the pipe
        self.reading = OPEN
        self.writing = SENDING
        self.received = 0
        self.tally = tally  # the owner's running total of bytes read from this side

    def __repr__(self):
        return (f"<Leg fd={self.fd}{' tls' if self.tls else ''} reading={self.reading.name} "
                f"writing={self.writing.name} pending={len(self.pending) if self.pending is not None else 0} "
                f"piped={self.piped} events={self.events}>")

    def on_event(self, mask):
        if mask & WRITE:
            if self.piped:
                self.drain_pipe()
            else:
                self.flush()
        if mask & READ and self.events & READ:
            if self.peer.pipe is not None:
                self.splice_in()
            else:
                self.pump()

    def pump(self):
        """Read once from this leg and forward to the peer."""
        duplex = self.duplex
        try:
            n = self.sock.recv_into(duplex.buffer)
        except _WOULD_BLOCK:
            if self.writing is NOTIFYING:
                self.close_notify()
            return
        except OSError as exc:
            duplex.abort(exc)
            return
        if not n:
            self.reached_eof()
            return
        # arrived(n), spelled out: this is the path every small message takes.
        self.received += n
        self.tally.value += n
        now = duplex.last_active = self.reactor.now
        if now - duplex.started >= LONG_LIVED:
            duplex.endpoint.moved += n
        peer = self.peer
        try:
            sent = peer.sock.send(duplex.view[:n])
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            duplex.abort(exc)
            return
        if sent < n:
            peer.pending = memoryview(duplex.buffer[sent:n])
            self.want(self.wanted())
            peer.want(peer.wanted())
        elif self.tls and self.sock.pending():
            # Decrypted bytes already inside the TLS layer raise no readiness event.
            self.reactor.call_soon(self.pump_more)
        elif n == len(duplex.buffer) and not (self.tls or peer.tls):
            peer.open_pipe()  # a full buffer: bulk data, splice from now on

    def pump_more(self):
        if self.events & READ:
            self.pump()

    def crashed(self, exc):
        self.duplex.crashed(exc)

    def arrived(self, n):
        """Account for a read of ``n`` bytes; at EOF, pass the end on and answer False."""
        if n == 0:
            self.reached_eof()
            return False
        self.received += n
        self.tally.value += n
        duplex = self.duplex
        now = duplex.last_active = self.reactor.now
        if now - duplex.started >= LONG_LIVED:
            duplex.endpoint.moved += n
        return True

    def reached_eof(self):
        self.reading = self.reading.moves["eof"]
        duplex = self.duplex
        if not duplex.ending:  # one side has finished: the stream no longer steers picks
            duplex.ending = True
            duplex.endpoint.ending += 1
        if self.writing is NOTIFYING:
            self.close_notify()
        peer = self.peer
        if peer.pending is None and not peer.piped:  # nothing backlogged for it
            peer.shutdown_write()
        if not duplex.closed:
            self.want(self.wanted())

    # -- the splice path ------------------------------------------------------------

    def open_pipe(self):
        """Splice to this socket from now on, if the budget's share of pipes has one left.

        Otherwise stay on the copying path (and ask again at the next full buffer).
        """
        pipes = self.duplex.owner.pipes
        if not pipes.take():
            return
        try:
            read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pipes.give_back()
            return  # out of descriptors all the same: stay on the copying path
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # keep the default size
        self.pipe = (read_end, write_end)

    def splice_in(self):
        """Move what this socket has into the peer's pipe, and on to the peer's socket.

        Repeats while the peer takes everything, so a fast stream costs one
        wakeup for several chunks rather than one each.
        """
        duplex = self.duplex
        peer = self.peer
        for _ in range(SPLICE_ROUNDS):
            try:
                n = os.splice(self.fd, peer.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                duplex.abort(exc)
                return
            if not self.arrived(n):
                return
            peer.piped += n
            peer.drain_pipe()
            if peer.piped or duplex.closed:
                return

    def drain_pipe(self):
        """Splice the pipe's bytes into this socket; when it is empty, let the peer read again."""
        try:
            sent = os.splice(self.pipe[0], self.fd, self.piped, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.duplex.abort(exc)
            return
        self.piped -= sent
        if self.piped:
            if not self.events & WRITE:
                self.want(self.wanted())
                self.peer.want(self.peer.wanted())
            return
        if sent:
            self.duplex.last_active = self.reactor.now
        self.drained()

    # -- writing out --------------------------------------------------------------------

    def flush(self):
        """Write pending bytes; when they are out, let the peer read again."""
        try:
            sent = self.sock.send(self.pending)
        except _WOULD_BLOCK:
            return
        except OSError as exc:
            self.duplex.abort(exc)
            return
        self.duplex.last_active = self.reactor.now
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = None
        self.drained()

    def drained(self):
        """Nothing waits for this socket any more."""
        peer = self.peer
        if peer.reading is ENDED:
            if self.writing is SENDING:
                self.shutdown_write()
            if self.duplex.closed:
                return
        self.want(self.wanted())
        peer.want(peer.wanted())
        if peer.tls and peer.events & READ and peer.sock.pending():
            self.reactor.call_soon(peer.pump_more)

    def shutdown_write(self):
        self.writing = self.writing.moves["shut"]
        # The stream is done once both sides have ended, and its close sends the end as well; unless another
        # process holds the socket too: closing this descriptor would then send nothing.
        if self.peer.writing is not SHUT or self.duplex.shared:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the other end is gone; its reads will tell
        self.sent_all()

    def sent_all(self):
        """This socket has had everything, its end included: once both have, the stream is done."""
        if self.peer.writing is SHUT:
            self.duplex.close("done")

    def wanted(self):
        """The readiness this leg waits for, from its states and the buffers: the one place it is decided."""
        # Backlogged (bytes wait to be written to it) is spelled out, not a property:
        # this runs on every readiness change.
        events = WRITE if self.pending is not None or self.piped else 0
        if self.reading is OPEN and not self.duplex.held:
            peer = self.peer
            if peer.pending is None and not peer.piped:
                events |= READ
        return events

    def release(self, reset):
        """Close this leg's socket (``reset``: with an RST).

        Closing a socket's last descriptor takes it out of the epoll set, so the
        reactor is only told to forget it, one ``epoll_ctl`` fewer per socket;
        the socket of a ``shared`` stream, which another process may hold too,
        must be withdrawn from the set by hand.
        """
        if self.duplex.shared:
            self.want(0)
        elif self.events:
            self.reactor.forget(self.fd)
            self.events = 0
        if reset:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.sock.close()
        self.pending = None
        if self.pipe is not None:
            for end in self.pipe:
                os.close(end)
            self.pipe = None
            self.piped = 0
            self.duplex.owner.pipes.give_back()


class TlsLeg(Leg):
    """A leg over a ``TlsSocket``: plaintext moves as on a plain socket, but its end differs.

    Ending our half is a close_notify, then a FIN beneath TLS.  Sealing it
    while the TLS engine holds a whole record could lose that record (see
    ``tlssocket``), so while the socket is still read from it waits for the
    next read that finds nothing; and it may then wait for the kernel to take
    it, with any record the engine wrote on its own.  ``NOTIFYING`` covers
    both waits.  TLS legs never splice.
    """

    __slots__ = ()

    def shutdown_write(self):
        self.writing = self.writing.moves["notify"]
        self.close_notify()

    def close_notify(self):
        if self.reading is OPEN and self.sock.pending():
            return  # the next read that finds nothing calls this again
        try:
            sent = self.sock.close_notify()
        except OSError:  # (a broken session, or the other end gone: nothing more can be sent; its reads will tell)
            sent = True
        if not sent:
            self.want(self.wanted())  # WRITE: flush() finishes it
            return
        self.writing = self.writing.moves["notified"]
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_WR)
        except OSError:
            pass
        self.sent_all()
        if not self.duplex.closed:
            self.want(self.wanted())

    def flush(self):
        if self.pending is not None:
            Leg.flush(self)
            return
        # Only records of the engine's own wait: a close_notify, the answer to a key update.
        try:
            empty = self.sock.flush()
        except OSError as exc:
            self.duplex.abort(exc)
            return
        if empty and self.writing is NOTIFYING:
            self.close_notify()
        elif empty:
            self.want(self.wanted())

    def wanted(self):
        events = Leg.wanted(self)
        return events | WRITE if self.sock.backlogged else events


def _leg(duplex, sock, tally):
    return TlsLeg(duplex, sock, tally) if sock.__class__ is TlsSocket else Leg(duplex, sock, tally)


class DuplexOwner(Protocol):
    """What a duplex reports to (a listener): two running byte tallies, and its end; where its pipes come from."""

    received: Tally
    sent: Tally
    view: memoryview  # of the shared transfer buffer, made once
    pipes: object  # the budget's share of splice pipes (a budget.Share): take() one, give_back() it

    def stream_closed(self, duplex: "Duplex") -> None: ...


class Duplex:
    """An established stream: client leg, upstream leg, idle and lifetime limits.

    ``owner.stream_closed(duplex)`` is called exactly once when it ends;
    ``reason`` then says why ("done", "error", "idle", "lifetime", "shutdown",
    "bug") and ``detail`` what went wrong, for an error (an errno name).  The
    owner's ``received`` and ``sent`` tallies count bytes as they are read.
    """

    __slots__ = ("reactor", "client", "upstream", "owner", "balancer", "endpoint", "envelope", "buffer", "view",
                 "started", "last_active", "timer", "closed", "ending", "held", "reason", "detail", "from_client",
                 "to_client", "shared")

    def __init__(self, owner: DuplexOwner, route, client_sock, client_events, upstream_sock, upstream_events,
                 buffer, resumed=None):
        """Take over the client and upstream sockets (left registered for ``*_events``) of a stream routed
        ``route`` (balancer, endpoint, envelope).

        ``buffer`` is the shared transfer buffer, and ``owner.view`` a memoryview of it.  ``resumed``: a
        stream another worker ran until now (``handover.StreamRecord``): its counts, the ends already passed
        on, and its start go on; it waits, held, for ``hold(False)``.
        """
        reactor = self.reactor = owner.reactor
        self.balancer, self.endpoint, envelope = route
        self.envelope = envelope
        self.owner = owner
        self.buffer = buffer
        self.view = owner.view
        self.closed = False
        self.ending = False  # counted in its endpoint's ``ending``: one side has finished sending
        self.held = resumed is not None  # reading neither side: a hand-over waits for what was read to be out
        self.shared = resumed is not None  # another process may hold its sockets too (see ``record``)
        self.reason = None
        self.detail = ""
        self.from_client = self.to_client = 0  # bytes, once closed: read from the client, written to it
        self.started = self.last_active = reactor.now
        client = self.client = _leg(self, client_sock, owner.received)
        upstream = self.upstream = _leg(self, upstream_sock, owner.sent)
        client.peer = upstream
        upstream.peer = client
        if resumed is not None:
            self._resume(resumed)
        client.adopt(client_events, client.wanted())
        upstream.adopt(upstream_events, upstream.wanted())
        for leg in (client, upstream):
            if leg.tls and leg.sock.pending():  # bytes that came with the end of the handshake raise no event
                reactor.call_soon(leg.pump_more)
        # One timer for both limits, at whichever could come first; armed last, so
        # that a duplex whose construction failed leaves nothing behind to fire.
        self.timer = None
        self._arm_limits()

    def _arm_limits(self):
        """Look at the limits when the first could be reached (from the stream's start and last byte)."""
        lifetime, idle = self.envelope.lifetime, self.envelope.idle_timeout
        if lifetime or idle:
            due = min(self.started + lifetime if lifetime else math.inf,
                      self.last_active + idle if idle else math.inf)
            self.timer = self.reactor.call_at(due, self._check_limits)

    def record(self, stream_id, router, listener):
        """What another worker needs to go on with this stream (``streamrecord.StreamRecord``); ``_resume``
        reads it back.

        From now on the stream's sockets may be held by another process as well (in a message it has not
        read, or adopted), even if this one takes the stream back: it is ``shared`` for good.
        """
        self.shared = True
        envelope, client, upstream = self.envelope, self.client, self.upstream
        return StreamRecord(
            stream_id, router, listener, envelope.dst_name, self.endpoint.sockaddr, tuple(envelope.source[:2]),
            envelope.destination and tuple(envelope.destination[:2]), envelope.accepted_at, self.started,
            self.last_active, envelope.lifetime, envelope.idle_timeout, client.received, upstream.received,
            client.reading is ENDED, upstream.reading is ENDED, client.writing is SHUT, upstream.writing is SHUT)

    def _resume(self, record):
        self.started, self.last_active = record.started, record.last_active
        self.ending = record.client_ended or record.upstream_ended
        for leg, received, ended, shut in ((self.client, record.from_client, record.client_ended, record.client_shut),
                                           (self.upstream, record.from_upstream, record.upstream_ended,
                                            record.upstream_shut)):
            leg.received = received
            if ended:
                leg.reading = leg.reading.moves["eof"]
            if shut:
                leg.writing = leg.writing.moves["shut"]

    def hold(self, held):
        """Stop (or start again) reading both sockets: what was read goes on being written meanwhile."""
        if self.held != held and not self.closed:
            self.held = held
            for leg in (self.client, self.upstream):
                leg.want(leg.wanted())
            if not held and self.timer is None:
                self._arm_limits()

    @property
    def movable(self):
        """Plain sockets on both sides: the stream can be handed to another process as it is."""
        return not (self.closed or self.client.tls or self.upstream.tls)

    @property
    def quiet(self):
        """Held, with nothing read left to write: handing it over now loses no byte."""
        client, upstream = self.client, self.upstream
        return (self.held and not self.closed and client.pending is None and not client.piped
                and upstream.pending is None and not upstream.piped)

    def let_go(self):
        """This process hands the stream to another: its sockets are closed here (never shut down, the other
        process holds them), and nobody is told of an end."""
        self.closed = True
        self.reason = "moved"
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client.release(False)  # (shared: it was recorded, or adopted)
        self.upstream.release(False)
        self.client.peer = self.upstream.peer = None
        self.client = self.upstream = None

    def __repr__(self):
        if self.client is None:
            return f"<Duplex {self.balancer.prefix} {self.envelope.source} -> {self.endpoint.address} moved>"
        state = f"closed ({self.reason}{': ' + self.detail if self.detail else ''})" if self.closed else "open"
        return (f"<Duplex {self.balancer.prefix} {self.envelope.source} -> {self.endpoint.address} {state} "
                f"client={self.client!r} upstream={self.upstream!r}>")

    def _check_limits(self):
        """End the stream at its lifetime or once idle too long; else look again when one could be reached.

        Re-armed only when it fires, never per read.
        """
        self.timer = None
        if self.held:  # (a hand-over under way decides its fate; it lets go, or hold(False) looks again)
            return
        envelope = self.envelope
        now = self.reactor.now
        lifetime_left = self.started + envelope.lifetime - now if envelope.lifetime else math.inf
        idle_left = self.last_active + envelope.idle_timeout - now if envelope.idle_timeout else math.inf
        if lifetime_left <= 0:
            self.close("lifetime")
        elif idle_left <= 0:
            self.close("idle")
        else:
            self.timer = self.reactor.call_later(min(lifetime_left, idle_left), self._check_limits)

    def abort(self, exc=None):
        """An error on either socket: reset both so neither end mistakes it for a clean end."""
        if exc is not None:
            self.detail = describe_error(exc)
        self.close("error", reset=True)

    def crashed(self, exc):
        """A bug in one of our callbacks: end the stream (cause ``bug``), releasing both sockets."""
        self.detail = repr(exc)
        self.close("bug", reset=True)

    def close(self, reason, reset=False):
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        client, upstream = self.client, self.upstream
        self.from_client = client.received
        # What was read from upstream, less what never made it out to the client.
        self.to_client = upstream.received - client.piped - (len(client.pending) if client.pending is not None else 0)
        self.client.release(reset)
        self.upstream.release(reset)
        self.owner.stream_closed(self)
        # Unlink the legs so reference counting frees the stream now, not a GC pass later.
        self.client.peer = self.upstream.peer = None
        self.client = self.upstream = None
