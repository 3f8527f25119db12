"""Open streams handed from a draining worker to a worker of the next generation.

On a reload or an upgrade the supervisor tells each old worker to drain and
names the new workers, each with a secret of its own.  The old worker
(``Mover``) connects to each new worker's hand-over socket (``Receiver``: a
``SOCK_SEQPACKET`` socket in the abstract namespace, named for the new
worker's pid), checks from the kernel's credentials that the pid it reached
is the one it was told, and proves itself with the secret.  Then, for every
stream with plain sockets on both sides (no TLS of ltcp's own; SNI
passthrough and PROXY-protocol streams are plain once routed), it:

1. stops reading both sockets: bytes that arrive from now on wait in the kernel;
2. waits until what it had already read is written out (pending bytes, splice
   pipes), for at most ``FLUSH_SECS``: a stream whose reader has stalled stays
   and drains as before;
3. sends the stream's record (``StreamRecord``) and both descriptors, up to
   ``BATCH`` streams a message;
4. on ``adopted`` closes its copies (never shutting the sockets down) and
   forgets the stream; on ``refused``, or if the connection ends before the
   answer, reads the stream again and lets it drain.

The new worker answers a batch before it reads a byte of any stream in it,
so no stream is ever read by two processes: if it dies after answering, its
streams die with it (as with any worker's crash); if before, the old worker
still has them.

The wire: each message is one JSON object; ``{"hello": secret}`` first, then
``{"streams": [record, ...]}`` with two descriptors per record (client, then
upstream), answered by ``{"adopted": [id, ...], "refused": [id, ...]}``.
"""

import hmac
import json
import logging
import os
import socket
import struct
from typing import NamedTuple, Optional, Tuple

from ..loop import READ, WRITE

__all__ = ["BATCH", "HandOverError", "Mover", "Receiver", "StreamRecord", "decode", "encode", "socket_name"]

log = logging.getLogger(__name__)

BATCH = 100  # streams per message: 200 descriptors, below the kernel's 253
FLUSH_SECS = 2.0  # longest a stream waits for its read bytes to be written out before it stays to drain
CONNECT_SECS = 1.0  # for the new worker to take a connection on its hand-over socket
POLL_SECS = 0.01  # how often streams still writing out are looked at again
MAX_MESSAGE = 256 << 10  # bytes: a full batch of records is about 30 KB
MAX_TEXT = 4096  # characters of a name or address in a record
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class HandOverError(ValueError):
    """A hand-over message that is not one."""


def socket_name(pid):
    """The abstract-namespace address of worker ``pid``'s hand-over socket."""
    return f"\0ltcp-hand-over-{pid}"


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it connect."""
    return _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))


def _seqpacket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)


# -- the record of one stream -----------------------------------------------------------------------

Address = Tuple[str, int]


class StreamRecord(NamedTuple):
    """What a stream needs to go on in another process; times are CLOCK_MONOTONIC, which every process shares."""

    id: int
    router: str  # the router's label
    listener: Address  # where the stream was accepted (the listening socket's address)
    dst_name: str
    endpoint: Address
    source: Address  # the client (from a PROXY header, if one was read)
    destination: Optional[Address]  # the address a PROXY header said the client connected to
    accepted_at: float
    started: float  # when the upstream connection was established: the lifetime counts from it
    last_active: float
    lifetime: Optional[float]
    idle_timeout: Optional[float]
    from_client: int  # bytes read so far from each side
    from_upstream: int
    client_ended: bool  # that side has finished sending (its end was passed on)
    upstream_ended: bool
    client_shut: bool  # ltcp has finished sending to that side
    upstream_shut: bool


def _address(value):
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and len(value[0]) <= MAX_TEXT
            and type(value[1]) is int and 0 <= value[1] <= 65535):
        return (value[0], value[1])
    raise HandOverError(f"not an address: {value!r:.80}")


def _text(value):
    if isinstance(value, str) and 0 < len(value) <= MAX_TEXT:
        return value
    raise HandOverError(f"not a name: {value!r:.80}")


def _count(value):
    if type(value) is int and 0 <= value < 1 << 63:
        return value
    raise HandOverError(f"not a count: {value!r:.80}")


def _time(value):
    if type(value) in (int, float) and 0 <= value < 1e12:
        return float(value)
    raise HandOverError(f"not a time: {value!r:.80}")


def _flag(value):
    if type(value) is bool:
        return value
    raise HandOverError(f"not true or false: {value!r:.80}")


def _optional(check):
    return lambda value: None if value is None else check(value)


_FIELDS = (_count, _text, _address, _text, _address, _address, _optional(_address), _time, _time, _time,
           _optional(_time), _optional(_time), _count, _count, _flag, _flag, _flag, _flag)


def record_from(value):
    """A StreamRecord from its JSON form, every field checked."""
    if not isinstance(value, list) or len(value) != len(_FIELDS):
        raise HandOverError(f"a record of {len(value) if isinstance(value, list) else type(value).__name__}")
    return StreamRecord(*(check(item) for check, item in zip(_FIELDS, value)))


def encode(message):
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data):
    """A message's JSON object; HandOverError for anything else."""
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandOverError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or len(message) not in (1, 2):
        raise HandOverError("not a hand-over message")
    return message


def streams_of(message, fds):
    """The (record, client fd, upstream fd) of a ``streams`` message and its descriptors."""
    records = message.get("streams")
    if not isinstance(records, list) or not 0 < len(records) <= BATCH:
        raise HandOverError("not a batch of streams")
    if len(fds) != 2 * len(records):
        raise HandOverError(f"{len(fds)} descriptors for {len(records)} streams")
    return [(record_from(record), fds[2 * i], fds[2 * i + 1]) for i, record in enumerate(records)]


def answer_of(message):
    """The (adopted ids, refused ids) of an answer."""
    adopted, refused = message.get("adopted", []), message.get("refused", [])
    if not (isinstance(adopted, list) and isinstance(refused, list)
            and all(type(i) is int for i in adopted + refused)):
        raise HandOverError("not an answer")
    return adopted, refused


def record_of(stream_id, listener, duplex):
    """A stream's record, as its old worker sends it."""
    envelope, client, upstream = duplex.envelope, duplex.client, duplex.upstream
    ended, shut = client.reading.name == "ended", client.writing.name == "shut"
    return StreamRecord(
        stream_id, listener.label, listener.address, envelope.dst_name, duplex.endpoint.sockaddr,
        tuple(envelope.source[:2]), envelope.destination and tuple(envelope.destination[:2]),
        envelope.accepted_at, duplex.started, duplex.last_active, envelope.lifetime, envelope.idle_timeout,
        client.received, upstream.received, ended, upstream.reading.name == "ended", shut,
        upstream.writing.name == "shut")


# -- the old worker's side ----------------------------------------------------------------------------

class Target:
    """One new worker, as the mover sends to it."""

    __slots__ = ("pid", "sock", "unsent", "in_flight", "events")

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.unsent = []  # (message, fds, ids) waiting for room in the socket
        self.in_flight = set()  # ids sent, not answered
        self.events = 0


class Mover:
    """Hands a draining worker's plain streams to the new workers named in ``targets`` [(pid, secret hex)].

    ``listeners``: the worker's listeners (each knows its streams);
    ``counted(listener, outcome)`` is told what became of each stream:
    ``moved``, ``kept`` (it stays and drains) or ``failed`` (the hand-over went
    wrong; it stays and drains).
    """

    def __init__(self, reactor, listeners, targets, moved, counted):
        self.reactor = reactor
        self.listeners = listeners
        self.moved = moved  # moved(listener, duplex): the stream is the other process's now
        self.counted = counted
        self.targets = [t for t in (self._connect(pid, secret) for pid, secret in targets) if t is not None]
        self.waiting = {}  # id -> (listener, duplex): held until quiet
        self.sent = {}  # id -> (listener, duplex, target)
        self.next_id = 0
        self.turn = 0  # round robin over the targets
        self.deadline = reactor.now + FLUSH_SECS
        self.timer = None

    def _connect(self, pid, secret):
        sock = _seqpacket()
        try:
            sock.settimeout(CONNECT_SECS)  # (a Unix connect waits only while the peer's backlog is full)
            sock.connect(socket_name(pid))
            sock.setblocking(False)
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
        """Hold every movable stream; the others are counted as kept.  False if no new worker can be reached."""
        if not self.targets:
            return False
        for listener in self.listeners:
            for duplex in list(listener.streams):
                if duplex.movable:
                    duplex.hold(True)
                    self.waiting[self.next_id] = (listener, duplex)
                    self.next_id += 1
                else:
                    self.counted(listener, "kept")
        log.info("hand-over: moving %d streams to workers %s", len(self.waiting),
                 ", ".join(str(t.pid) for t in self.targets))
        self._send_quiet()
        return True

    @property
    def finished(self):
        return not self.waiting and not self.sent

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
            records.append(record_of(stream_id, listener, duplex))
            fds += [duplex.client.fd, duplex.upstream.fd]
            self.sent[stream_id] = (listener, duplex, target)
            target.in_flight.add(stream_id)
        target.unsent.append((encode({"streams": records}), fds))
        self._flush(target)

    def _next_target(self):
        live = [t for t in self.targets if t.sock is not None]
        if not live:
            return None
        self.turn += 1
        return live[self.turn % len(live)]

    def _flush(self, target):
        while target.unsent:
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
                self.moved(listener, duplex)
                self.counted(listener, "moved")
        for stream_id in refused:
            if stream_id in target.in_flight:
                target.in_flight.discard(stream_id)
                listener, duplex, _ = self.sent.pop(stream_id)
                self._give_back(listener, duplex, "kept")
        self._close_if_finished()

    def _lost(self, target, why):
        """The connection to ``target`` is over: what it did not answer for is still ours, and drains here."""
        if target.sock is not None:
            self._read_answers(target)  # (a failed send says nothing of the answers already queued)
        if target.in_flight:
            log.warning("hand-over to worker %d: %s; %d streams stay here", target.pid, why, len(target.in_flight))
        for stream_id in sorted(target.in_flight):
            listener, duplex, _ = self.sent.pop(stream_id)
            self._give_back(listener, duplex, "failed")
        target.in_flight.clear()
        target.unsent.clear()
        self._close(target)
        self._close_if_finished()

    def _give_back(self, listener, duplex, outcome):
        duplex.hold(False)
        self.counted(listener, outcome)

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

    def close(self):
        """Give up (the grace period is over): streams still unanswered are closed with the others."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for _, duplex in self.waiting.values():
            duplex.hold(False)
        self.waiting.clear()
        self.sent.clear()
        for target in self.targets:
            self._close(target)


# -- the new worker's side ----------------------------------------------------------------------------

class Receiver:
    """A new worker's hand-over socket: takes the streams old workers send, through ``adopt``.

    ``adopt(record, client sock, upstream sock)`` answers a held duplex (and
    owns both sockets), or None (the caller closes them).  Each adopted stream
    starts reading once the answer naming it is sent.
    """

    def __init__(self, reactor, secret, adopt):
        self.reactor = reactor
        self.secret = secret
        self.adopt = adopt
        self.peers = set()
        self.sock = _seqpacket()
        self.sock.bind(socket_name(os.getpid()))
        self.sock.listen(64)
        reactor.register(self.sock, READ, self._acceptable)

    def _acceptable(self, mask):
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
            return
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
        self.unsent = []  # (answer, duplexes to start once it is sent)
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
            if fds or not isinstance(secret, str) or not hmac.compare_digest(secret, self.receiver.secret):
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
            except OSError:  # the old worker is gone: it may not know these are ours, but we have them
                pass
            self.unsent.pop(0)
            for duplex in started:  # only now: no byte of them is read before the old worker knows
                duplex.hold(False)
        self._want(READ)

    def _want(self, events):
        if self.sock is not None and events != self.events:
            self.receiver.reactor.modify(self.sock, events, self._ready)
            self.events = events

    def close(self):
        if self.sock is not None:
            self.receiver.reactor.discard(self.sock)
            self.sock.close()
            self.sock = None
            for _, started in self.unsent:  # (never answered: start them anyway, they are ours)
                for duplex in started:
                    duplex.hold(False)
            self.unsent.clear()
        self.receiver.peers.discard(self)
