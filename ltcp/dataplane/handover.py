"""Open streams handed from a draining worker to a worker of the next generation.

On a reload or an upgrade the supervisor tells each old worker to drain and
names the new workers, each with a secret of its own.  The old worker
(``Mover``) connects to each new worker's hand-over socket (``Receiver``: a
``SOCK_SEQPACKET`` socket in the abstract namespace, named after a hash of
the secret, so that nobody can take the name first), checks from the
kernel's credentials that the process it reached is the pid it was told,
and proves itself with the secret.  Then, for every stream with plain
sockets on both sides (no TLS of ltcp's own; SNI passthrough and
PROXY-protocol streams are plain once routed), it:

1. stops reading both sockets: bytes that arrive from now on wait in the kernel;
2. waits until what it had already read is written out (pending bytes, splice
   pipes), for at most ``FLUSH_SECS``: a stream whose reader has stalled stays
   and drains as before;
3. sends the stream's record (``streamrecord.StreamRecord``) and both
   descriptors, up to ``BATCH`` streams a message;
4. on ``adopted`` closes its copies (never shutting the sockets down) and
   forgets the stream; on ``refused``, or once the connection is over, reads
   the stream again and lets it drain.

A stream is never read by two processes.  The new worker starts a stream
only once its answer is sent, and drops it (closing only its copies) if the
answer cannot be sent.  The old worker, before it takes back streams it has
no answer for, shuts the connection down, so that no answer can be sent any
more, and reads every answer already queued, even after the kernel reports
that the new worker died.  A new worker that dies takes with it only the
streams it had answered for, as any worker's crash would.
"""

import hashlib
import hmac
import logging
import os
import socket
import struct

from ..loop import READ, WRITE
from .streamrecord import BATCH, HandOverError, answer_of, decode, encode, streams_of

__all__ = ["Mover", "Receiver", "socket_name"]

log = logging.getLogger(__name__)

FLUSH_SECS = 2.0  # longest a stream waits for its read bytes to be written out before it stays to drain
ANSWER_SECS = 5.0  # longest a new worker may take to answer for a batch before the old one takes it back
POLL_SECS = 0.01  # how often streams still writing out are looked at again
MAX_MESSAGE = 256 << 10  # bytes: a full batch of records is about 30 KB
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_name(secret):
    """The abstract-namespace address of the hand-over socket of the worker with ``secret``: it names the
    socket without giving the secret away (/proc/net/unix shows every name to everyone)."""
    return "\0ltcp-hand-over-" + hashlib.sha256(secret.encode()).hexdigest()[:32]


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it connect."""
    return _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))


def _seqpacket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


# -- the old worker's side ----------------------------------------------------------------------------

class Target:
    """One new worker, as the mover sends to it."""

    __slots__ = ("pid", "sock", "unsent", "in_flight", "events", "due")

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.unsent = []  # (message, descriptors) waiting for room in the socket
        self.in_flight = set()  # ids sent, not answered
        self.events = 0
        self.due = None  # reactor time by which the next answer must come, while any is awaited


class Mover:
    """Hands a draining worker's plain streams to the new workers named in ``targets`` [(pid, secret)].

    ``listeners``: the worker's listeners (each knows its streams).
    ``moved(listener, duplex)``: the stream is the other process's now.
    ``counted(listener, outcome)`` is told what became of each stream offered:
    ``moved``, ``kept`` (it stays and drains) or ``failed`` (the hand-over went
    wrong; it stays and drains); ``given_back(self, listener, duplex)`` is
    told of the last two, so that a newer mover may offer it again.  Streams
    already held (another mover's, or adopted and not yet started) are left
    alone; ``count_unmovable``: count the streams that cannot move (TLS) as
    kept, once per drain.
    """

    def __init__(self, reactor, listeners, targets, moved, counted, given_back=None, count_unmovable=True):
        self.reactor = reactor
        self.listeners = listeners
        self.moved = moved
        self.counted = counted
        self.given_back = given_back
        self.count_unmovable = count_unmovable
        self.named = targets  # [(pid, secret)]: connected again if an offer comes once all is done
        self.targets = self._connect_all()
        self.waiting = {}  # id -> (listener, duplex): held until quiet
        self.sent = {}  # id -> (listener, duplex, target)
        self.next_id = 0
        self.turn = 0  # round robin over the targets
        self.deadline = reactor.now + FLUSH_SECS
        self.timer = None  # looks again at streams still writing out
        self.answer_timer = None

    def _connect_all(self):
        return [t for t in (self._connect(pid, secret) for pid, secret in self.named) if t is not None]

    def _connect(self, pid, secret):
        """A connection to the new worker ``pid``, or None.  Never waits: a backlog that is full is a failure."""
        sock = _seqpacket()
        try:
            sock.connect(socket_name(secret))
            if peer_credentials(sock)[:2] != (pid, os.getuid()):
                raise OSError(0, f"the socket of worker {pid} is held by another process")
            sock.send(encode({"hello": secret}))
        except OSError as exc:
            log.warning("hand-over: cannot reach worker %d: %s", pid, exc.strerror or exc)
            sock.close()
            return None
        target = Target(pid, sock)
        self._watch(target, READ)
        return target

    def start(self):
        """Hold every movable stream; False if no new worker can be reached."""
        if not self.targets:
            return False
        for listener in self.listeners:
            for duplex in list(listener.streams):
                if duplex.movable and not duplex.held:
                    duplex.hold(True)
                    self.waiting[self.next_id] = (listener, duplex)
                    self.next_id += 1
                elif not duplex.movable and self.count_unmovable:
                    self.counted(listener, "kept")
        log.info("hand-over: moving %d streams to workers %s", len(self.waiting),
                 ", ".join(str(t.pid) for t in self.targets))
        self._send_quiet()
        return True

    @property
    def finished(self):
        return not self.waiting and not self.sent

    def offer(self, listener, duplex):
        """One more stream to move (one an older mover's targets refused); whether this mover takes it."""
        if duplex.closed or not duplex.movable or duplex.held:
            return False
        if not any(t.sock is not None for t in self.targets):  # (all was done, and the connections closed)
            self.targets = self._connect_all()
            if not self.targets:
                return False
        duplex.hold(True)
        self.waiting[self.next_id] = (listener, duplex)
        self.next_id += 1
        self.deadline = max(self.deadline, self.reactor.now + FLUSH_SECS)
        if self.timer is None:
            self.timer = self.reactor.call_later(0, self._send_quiet)
        return True

    def _send_quiet(self):
        """Send every held stream with nothing left to write; keep the others until the flush deadline."""
        self.timer = None
        late = self.reactor.now >= self.deadline
        batch = []
        for stream_id, (listener, duplex) in list(self.waiting.items()):
            if duplex.closed:  # (it ended meanwhile: nothing to move)
                del self.waiting[stream_id]
            elif duplex.quiet:
                del self.waiting[stream_id]
                batch.append((stream_id, listener, duplex))
                if len(batch) == BATCH:
                    self._send(batch)
                    batch = []
            elif late:  # its reader does not take what was read: it stays, and drains
                del self.waiting[stream_id]
                duplex.hold(False)
                self.counted(listener, "kept")
        if batch:
            self._send(batch)
        if self.waiting:
            self.timer = self.reactor.call_later(POLL_SECS, self._send_quiet)
        self._close_if_finished()

    def _send(self, batch):
        target = self._next_target()
        if target is None:
            for _, listener, duplex in batch:
                self._give_back(listener, duplex, "failed")
            return
        records, fds = [], []
        for stream_id, listener, duplex in batch:
            records.append(duplex.record(stream_id, listener.label, listener.address))
            fds += [duplex.client.fd, duplex.upstream.fd]
            self.sent[stream_id] = (listener, duplex, target)
            target.in_flight.add(stream_id)
        target.unsent.append((encode({"streams": records}), fds))
        if target.due is None:
            target.due = self.reactor.now + ANSWER_SECS
            self._time_answers()
        self._flush(target)

    def _next_target(self):
        live = [t for t in self.targets if t.sock is not None]
        if not live:
            return None
        self.turn += 1
        return live[self.turn % len(live)]

    def _flush(self, target):
        while target.unsent and target.sock is not None:
            data, fds = target.unsent[0]
            try:
                socket.send_fds(target.sock, [data], fds)
            except (BlockingIOError, InterruptedError):
                self._watch(target, READ | WRITE)
                return
            except OSError as exc:
                self._lost(target, f"send failed: {exc.strerror}")
                return
            target.unsent.pop(0)
        if target.sock is not None:
            self._watch(target, READ)

    def _watch(self, target, events):
        if events != target.events:
            callback = lambda mask: self._ready(target, mask)  # noqa: E731
            if target.events:
                self.reactor.modify(target.sock, events, callback)
            else:
                self.reactor.register(target.sock, events, callback)
            target.events = events

    def _ready(self, target, mask):
        if mask & WRITE:
            self._flush(target)
        if target.sock is not None and mask & READ:
            ended = self._read_answers(target)
            if ended is not None:
                self._lost(target, ended)

    def _read_answers(self, target):
        """Take every answer queued; why the connection is over, if it is (else None)."""
        ended = None
        while target.sock is not None:
            try:
                data = target.sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionResetError:
                # It ended with our messages unread.  The kernel says so before the answers it did send,
                # which are still queued: each must be read, or a stream it ran would run here again.
                ended = "it ended"
                continue
            except OSError as exc:
                return f"receive failed: {exc.strerror}"
            if not data:
                return ended or "it closed the connection"
            try:
                self._answered(target, *answer_of(decode(data)))
            except HandOverError as exc:
                return f"it answered nonsense: {exc}"
        return ended

    def _answered(self, target, adopted, refused):
        for stream_id in adopted:
            if stream_id in target.in_flight:
                target.in_flight.discard(stream_id)
                listener, duplex, _ = self.sent.pop(stream_id)
                if not duplex.closed:  # (closed here meanwhile, it was counted here: the other runs it uncounted)
                    self.moved(listener, duplex)
                self.counted(listener, "moved")
        for stream_id in refused:
            if stream_id in target.in_flight:
                target.in_flight.discard(stream_id)
                listener, duplex, _ = self.sent.pop(stream_id)
                self._give_back(listener, duplex, "kept")
        target.due = self.reactor.now + ANSWER_SECS if target.in_flight else None
        self._close_if_finished()

    def _time_answers(self):
        if self.answer_timer is None:
            self.answer_timer = self.reactor.call_later(ANSWER_SECS, self._answers_due)

    def _answers_due(self):
        """A new worker that has not answered in ANSWER_SECS: its streams come back (they were never read)."""
        self.answer_timer = None
        now = self.reactor.now
        for target in self.targets:
            if target.due is not None and target.due <= now and target.sock is not None:
                self._lost(target, f"no answer in {ANSWER_SECS:g}s")
        if any(t.due is not None for t in self.targets):
            self._time_answers()

    def _lost(self, target, why):
        """The connection to ``target`` is over: what it did not answer for is still ours, and drains here.

        Shut down first: from then on the new worker cannot answer (so it drops
        what it has not answered for), and every answer it did send is queued.
        """
        if target.sock is not None:
            try:
                target.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._read_answers(target)
        if target.in_flight:
            log.warning("hand-over to worker %d: %s; %d streams stay here", target.pid, why, len(target.in_flight))
        for stream_id in sorted(target.in_flight):
            listener, duplex, _ = self.sent.pop(stream_id)
            self._give_back(listener, duplex, "failed")
        target.in_flight.clear()
        target.unsent.clear()
        target.due = None
        self._close(target)
        self._close_if_finished()

    def _give_back(self, listener, duplex, outcome):
        duplex.hold(False)
        self.counted(listener, outcome)
        if self.given_back is not None:
            self.given_back(self, listener, duplex)

    def _close(self, target):
        if target.sock is not None:
            self.reactor.discard(target.sock)
            target.sock.close()
            target.sock = None
            target.events = 0

    def _close_if_finished(self):
        if self.finished:
            for target in self.targets:
                self._close(target)
            if self.answer_timer is not None:
                self.answer_timer.cancel()
                self.answer_timer = None

    def close(self):
        """Give up (the grace period is over): every answer already sent counts, the rest stays here."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for _, duplex in self.waiting.values():
            duplex.hold(False)
        self.waiting.clear()
        for target in self.targets:
            if target.sock is not None:
                self._lost(target, "the grace period is over")


# -- the new worker's side ----------------------------------------------------------------------------

class Receiver:
    """A new worker's hand-over socket: takes the streams old workers send, through ``adopt``.

    ``adopt(record, client sock, upstream sock)`` answers a held duplex (and
    owns both sockets), or None (the caller closes them).  Each adopted stream
    starts reading once the answer naming it is sent; ``drop(duplex)`` undoes
    the adoption of one whose answer could not be.
    """

    def __init__(self, reactor, secret, adopt, drop):
        self.reactor = reactor
        self.secret = secret.encode()
        self.adopt = adopt
        self.drop = drop
        self.peers = set()
        self.sock = _seqpacket()
        try:
            self.sock.bind(socket_name(secret))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        reactor.register(self.sock, READ, self._acceptable)

    def _acceptable(self, mask):
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("hand-over: accept failed: %s", exc.strerror)
                return
            conn.setblocking(False)
            if peer_credentials(conn)[1] != os.getuid():
                log.warning("hand-over: a process of another user connected; closed")
                conn.close()
                continue
            self.peers.add(Peer(self, conn))

    def close(self):
        for peer in list(self.peers):
            peer.close()
        self.reactor.discard(self.sock)
        self.sock.close()


class Peer:
    """One old worker's connection to a new worker's hand-over socket."""

    __slots__ = ("receiver", "sock", "trusted", "unsent", "events")

    def __init__(self, receiver, sock):
        self.receiver = receiver
        self.sock = sock
        self.trusted = False
        self.unsent = []  # (answer, duplexes it adopts): to start once it is sent
        self.events = READ
        receiver.reactor.register(sock, READ, self._ready)

    def _ready(self, mask):
        if mask & WRITE:
            self._flush()
        if not mask & READ or self.sock is None:
            return
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 2 * BATCH, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("hand-over: receive failed: %s", exc.strerror)
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                raise HandOverError("a message or its descriptors cut short")
            self._received(decode(data), fds)
        except HandOverError as exc:
            log.warning("hand-over: %s; connection closed", exc)
            for fd in fds:
                os.close(fd)
            self.close()

    def _received(self, message, fds):
        if not self.trusted:
            secret = message.get("hello")
            if fds or not isinstance(secret, str) or not hmac.compare_digest(secret.encode(), self.receiver.secret):
                raise HandOverError("not introduced with this worker's secret")
            self.trusted = True
            return
        streams = streams_of(message, fds)
        adopted, refused, started = [], [], []
        for record, client_fd, upstream_fd in streams:
            client = socket.socket(fileno=client_fd)
            upstream = socket.socket(fileno=upstream_fd)
            duplex = None
            try:
                duplex = self.receiver.adopt(record, client, upstream)
            except Exception:  # (a bug adopting one stream: the old worker keeps it)
                log.exception("hand-over: adopting stream %d failed", record.id)
            if duplex is None:
                client.close()
                upstream.close()
                refused.append(record.id)
            else:
                adopted.append(record.id)
                started.append(duplex)
        self.unsent.append((encode({"adopted": adopted, "refused": refused}), started))
        self._flush()

    def _flush(self):
        while self.unsent and self.sock is not None:
            answer, started = self.unsent[0]
            try:
                self.sock.send(answer)
            except (BlockingIOError, InterruptedError):
                self._want(READ | WRITE)
                return
            except OSError:  # the old worker has taken them back (or is gone): they are not ours
                self.close()
                return
            self.unsent.pop(0)
            for duplex in started:  # only now: no byte of them is read before the old worker knows
                duplex.hold(False)
        self._want(READ)

    def _want(self, events):
        if self.sock is not None and events != self.events:
            self.receiver.reactor.modify(self.sock, events, self._ready)
            self.events = events

    def close(self):
        """The connection is over: streams whose answer was never sent go back to nobody here (the old worker
        has them), their copies closed."""
        if self.sock is not None:
            self.receiver.reactor.discard(self.sock)
            self.sock.close()
            self.sock = None
        for _, started in self.unsent:
            for duplex in started:
                self.receiver.drop(duplex)
        self.unsent.clear()
        self.receiver.peers.discard(self)
