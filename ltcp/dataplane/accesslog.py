"""The access log: one line per stream when it ends, never blocking a reactor.

Two halves.  ``StreamLog`` lives on a reactor: it formats a stream's line
when the stream ends and keeps the lines in memory, handing them to its
``sink`` as one chunk every ``FLUSH_SECS`` (or sooner, once ``CHUNK_BYTES``
have gathered).  ``FileWriter`` lives on the control plane (the supervisor,
or an in-process app): one thread appends the chunks to the file.  A worker's
sink is its control channel, so with N workers one writer sees every chunk
and whole lines never interleave.  If the disk stalls, chunks wait in a
bounded queue and then are dropped and counted, by lines; the reactors never
wait.  ``reopen()`` (SIGUSR1) starts a new file where logrotate moved the old.
"""

import logging
import os
import queue
import sys
import threading
import time
from json.encoder import encode_basestring_ascii

from ..names import display_address

__all__ = ["FileWriter", "StreamLog", "FORMATS"]

log = logging.getLogger(__name__)

FORMATS = ("json", "text")
FLUSH_SECS = 0.1
CHUNK_BYTES = 64 * 1024
MAX_QUEUED = 256  # chunks waiting for the disk: at most about 16 MB, then lines are dropped


def _quote(value):
    """A JSON string (ASCII, escaped by the C encoder), or null."""
    return "null" if value is None else encode_basestring_ascii(value)


def _json_line(start, duration_ms, origin, client, envelope, endpoint, from_client, to_client, end):
    # Built by hand rather than by json.dumps of a dict: this runs once per stream on the reactor.
    # (Addresses, times, versions and causes are ASCII without quotes; names are escaped.)
    router, server = origin
    endpoint = f'"{endpoint}"' if endpoint else "null"
    return (f'{{"start": "{start}", "duration_ms": {duration_ms}, "router": {_quote(router)}, '
            f'"server": "{server}", "client": "{client}", "sni": {_quote(envelope.server_name)}, '
            f'"tls": {_quote(envelope.tls_version)}, "client_identity": {_quote(envelope.client_identity)}, '
            f'"dst": {_quote(envelope.dst_name)}, "endpoint": {endpoint}, '
            f'"bytes_from_client": {from_client}, "bytes_to_client": {to_client}, "end": "{end}"}}\n')


def _text_line(start, duration_ms, origin, client, envelope, endpoint, from_client, to_client, end):
    """``START DURATIONms ROUTER SERVER <- CLIENT sni=.. tls=.. identity=.. DST -> ENDPOINT in=N out=N END``."""
    router, server = origin
    return (f"{start} {duration_ms}ms {router} {server} <- {client} sni={_printable(envelope.server_name)} "
            f"tls={envelope.tls_version or '-'} identity={_printable(envelope.client_identity)} "
            f"{_printable(envelope.dst_name)} -> {endpoint or '-'} in={from_client} out={to_client} {end}\n")


def _printable(name):
    """A name on a text line: one token, never a line break (names may come from clients)."""
    if name is None:
        return "-"
    return name if name.isprintable() and " " not in name else encode_basestring_ascii(name)


class _Clock:
    """RFC 3339 times in UTC with milliseconds, formatting each second's date and time once."""

    __slots__ = ("second", "prefix")

    def __init__(self):
        self.second = None
        self.prefix = ""

    def format(self, epoch_seconds):
        second = int(epoch_seconds)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.prefix}.{int((epoch_seconds - second) * 1000):03d}Z"


class StreamLog:
    """A reactor's side: lines made as streams end, handed to ``sink(data, lines)`` in chunks.

    ``sink`` answers whether it took the chunk; what it refuses is counted in
    ``dropped`` (lines).
    """

    def __init__(self, reactor, fmt, sink):
        self.reactor = reactor
        self.format = _json_line if fmt == "json" else _text_line
        self.sink = sink
        self.pending = []
        self.size = 0
        self.lines = 0  # lines made
        self.dropped = 0  # lines the sink refused
        self.timer = None
        self.clock = _Clock()

    def record(self, origin, envelope, endpoint, from_client, to_client, end):
        """One stream has ended: its line.

        ``origin`` is (router label, listening address); ``endpoint`` an
        address, or None if the stream never connected.
        """
        took = self.reactor.now - envelope.accepted_at
        line = self.format(self.clock.format(time.time() - took), f"{took * 1000:.3f}", origin,
                           display_address(envelope.source), envelope, endpoint, from_client, to_client, end)
        self.pending.append(line)
        self.size += len(line)
        self.lines += 1
        if self.size >= CHUNK_BYTES:
            self.flush()
        elif self.timer is None:
            self.timer = self.reactor.call_later(FLUSH_SECS, self._flush_due)

    def _flush_due(self):
        self.timer = None
        self.flush()

    def take(self):
        """(data, lines) not handed on yet, which the caller now owns; (b"", 0) if none."""
        data, count = "".join(self.pending).encode("utf-8", "replace"), len(self.pending)
        self.pending, self.size = [], 0
        return data, count

    def flush(self):
        data, count = self.take()
        if count and not self.sink(data, count):
            self.dropped += count

    def close(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class FileWriter:
    """The control plane's side: one thread appending chunks to ``path`` ("-": standard error)."""

    def __init__(self, path):
        self.path = path
        self.written = 0  # lines
        self.dropped = 0  # lines: the queue was full, or a write failed
        self._queue = queue.Queue(MAX_QUEUED)
        self._reopen = threading.Event()
        self._closed = False
        self._lock = threading.Lock()  # the counts
        self._fd = self._open()  # (here, so a path that cannot be opened is an error at start)
        self._thread = threading.Thread(target=self._run, name="ltcp-access-log", daemon=True)
        self._thread.start()

    def _open(self):
        if self.path == "-":
            return sys.stderr.fileno()
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def submit(self, data, lines):
        """Queue a chunk of whole lines (any thread); False, and counted, if the queue is full or closed."""
        if not self._closed:
            try:
                self._queue.put_nowait((data, lines))
                return True
            except queue.Full:
                pass
        with self._lock:
            self.dropped += lines
        return False

    def reopen(self):
        """Open the path afresh before the next write (logrotate has moved the file)."""
        self._reopen.set()
        try:
            self._queue.put_nowait((b"", 0))  # wake the thread even when nothing is being logged
        except queue.Full:
            pass  # (then it is busy, and sees the flag before its next write)

    def close(self, timeout=2.0):
        """Write what is queued (for up to ``timeout``), then stop."""
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self.path != "-" and not self._thread.is_alive():
            os.close(self._fd)

    def counts(self):
        """(lines written, lines dropped) so far."""
        with self._lock:
            return self.written, self.dropped

    def _run(self):
        failing = False
        torn = False  # a write failed part way: the file ends inside a line
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._reopen.is_set():
                self._reopen.clear()
                self._swap()
            data, lines = item
            if not data:
                continue
            try:
                if torn:
                    os.write(self._fd, b"\n")
                    torn = False
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                    torn = bool(view)
                failing = False
                with self._lock:
                    self.written += lines
            except OSError as exc:
                if not failing:
                    log.error("access log %s: write failed (%s); lines are dropped and counted until it works",
                              self.path, exc.strerror)
                failing = True
                with self._lock:
                    self.dropped += lines

    def _swap(self):
        if self.path == "-":
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("access log %s: cannot reopen (%s); still writing to the old file", self.path, exc.strerror)
            return
        os.close(self._fd)
        self._fd = fd
        log.info("access log %s reopened", self.path)
