"""The control channel between the supervisor and a worker: framed messages on a socketpair.

A message is a tuple whose first item names it; a frame is its pickle behind
a 4-byte big-endian length.  Both ends are ltcp processes of one instance
(the worker is the supervisor's child and trusts nothing else), so pickle's
trust model holds, and configurations and snapshots cross as they are.

supervisor -> worker::

    ("start", config, material, sockets, generation, secret)
                                             first, once: the TLS files' bytes (tls.TlsMaterial) as the
                                             supervisor checked them; sockets maps listener_key -> fd;
                                             secret: what old workers handing streams over must show
    ("update", label, name, addresses)       a watched name's endpoint set (None: resolves to nothing)
    ("snapshot", token, listed)              please answer with your snapshot
    ("drain", targets)                       stop accepting, hand plain streams to the new workers targets
                                             [(pid, secret)] (dataplane.handover), finish the others within
                                             graceSecs, exit
    ("pause", token)                         an upgrade: answer ("paused", token), then send nothing more...
    ("resume",)                              ... until the new supervisor says so (on the same channel)

worker -> supervisor::

    ("ready", pid)                           listening and serving
    ("draining",)                            accepting no more (the answer to "drain")
    ("subscribe", label, name) / ("unsubscribe", label, name)
    ("snapshot", token, data)
    ("log", data, lines)                     access log lines (whole, encoded) for the supervisor to write

A worker whose channel closes (the supervisor died) drains as on ``("drain",)``.
"""

import copyreg
import errno
import logging
import pickle
import struct
import types

from .interpreter.stats import DiscoveryStats
from .loop import READ, WRITE

__all__ = ["Channel", "Framer", "RemoteDiscovery", "encode", "update_frame", "MAX_FRAME"]

log = logging.getLogger(__name__)

HEADER = struct.Struct(">I")
MAX_FRAME = 256 << 20  # a snapshot or endpoint set larger than this is a bug, not data
READ_CHUNK = 256 << 10


def frozen_mapping(items):
    return types.MappingProxyType(items)


# Configurations freeze their mappings as read-only proxies, which pickle cannot take as they are.
copyreg.pickle(types.MappingProxyType, lambda proxy: (frozen_mapping, (dict(proxy),)))


def encode(message):
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"a {message[0]!r} message of {len(payload)} bytes is over the frame limit")
    return HEADER.pack(len(payload)) + payload


def update_frame(message):
    """An ("update", label, name, addresses) message as a frame, encoded once for every worker.

    Addresses travel as plain (ip, port, weight) tuples: pickle rebuilds those
    several times faster than named tuples, which matters to a worker's
    reactor when an answer lists tens of thousands of endpoints.
    """
    kind, label, name, addresses = message
    return encode((kind, label, name, None if addresses is None else [tuple(a) for a in addresses]))


class Framer:
    """Bytes in, whole messages out (pure; both ends use it)."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data):
        """The messages completed by ``data``; ValueError if the stream cannot be a channel's."""
        buffer = self._buffer
        buffer += data
        messages = []
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if size > MAX_FRAME:
                raise ValueError(f"a frame of {size} bytes announced")
            end = HEADER.size + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(memoryview(buffer)[HEADER.size:end]))
            del buffer[:end]
        return messages


class Channel:
    """A worker's end, driven by its reactor: nonblocking reads and queued writes.

    ``on_message(message)`` is called for each message; ``on_closed()`` once,
    when the supervisor's end is gone (or the stream is garbled).
    """

    def __init__(self, reactor, sock, on_message, on_closed, framer=None):
        self.reactor = reactor
        self.sock = sock
        self.on_message = on_message
        self.on_closed = on_closed
        self.framer = framer or Framer()  # one that may already hold the start of a frame
        self.outgoing = bytearray()
        self.limit = None  # while held: how many bytes of ``outgoing`` may still be written
        self.closed = False
        sock.setblocking(False)
        reactor.register(sock, READ, self._ready)

    def send(self, message):
        if self.closed:
            return
        writing = bool(self.outgoing)
        self.outgoing += encode(message)
        if not writing and self.limit is None:
            self._flush()

    def hold(self):
        """Write what is queued now, then nothing until ``release`` (the supervisor is being replaced)."""
        self.limit = len(self.outgoing)

    def release(self):
        self.limit = None
        if self.outgoing and not self.closed:
            self._flush()

    def _ready(self, mask):
        if mask & WRITE:
            self._flush()
        if mask & READ and not self.closed:
            self._read()

    def _read(self):
        try:
            data = self.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(f"read failed: {exc.strerror}")
            return
        if not data:
            self._close("the supervisor closed it")
            return
        try:
            messages = self.framer.feed(data)
        except Exception as exc:  # a garbled stream: nothing later on it can be trusted
            self._close(f"unreadable: {exc}")
            return
        for message in messages:
            self.on_message(message)

    def _flush(self):
        allowed = self.outgoing if self.limit is None else bytes(self.outgoing[:self.limit])
        try:
            sent = self.sock.send(allowed) if allowed else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                log.warning("control channel: write failed: %s", exc.strerror)
            self._close("write failed")
            return
        del self.outgoing[:sent]
        if self.limit is not None:
            self.limit -= sent
        waiting = self.outgoing if self.limit is None else self.limit
        self.reactor.modify(self.sock, READ | WRITE if waiting else READ, self._ready)

    def _close(self, why):
        if not self.closed:
            self.closed = True
            log.info("control channel closed: %s", why)
            self.reactor.unregister(self.sock)
            self.sock.close()
            self.on_closed()

    def close(self):
        if not self.closed:
            self.closed = True
            self.reactor.discard(self.sock)
            self.sock.close()


class RemoteDiscovery:
    """A worker's interpreter for one router: the supervisor watches, this forwards.

    It offers the interpreter calls the binder uses; each name watched here is
    one subscription at the supervisor, which runs one watch per name for all
    workers together.
    """

    KIND = "remote"

    def __init__(self, label, send):
        self.label = label
        self.send = send  # a message to the supervisor
        self.stats = DiscoveryStats()  # lookups are counted where they happen, at the supervisor
        self.delivers = {}  # name -> deliver

    def start(self):
        pass

    def watch(self, name, deliver):
        self.delivers[name] = deliver
        self.send(("subscribe", self.label, name))

    def unwatch(self, name):
        if self.delivers.pop(name, None) is not None:
            self.send(("unsubscribe", self.label, name))

    def deliver(self, name, addresses):
        deliver = self.delivers.get(name)
        if deliver is not None:
            deliver(addresses)

    def close(self):
        self.delivers.clear()
