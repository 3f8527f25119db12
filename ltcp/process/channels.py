"""The supervisor's main-thread event queue, and its end of each worker's control channel.

``Events`` is where signals, worker exits, admin requests and reads of the
configuration meet the main thread; a ``Link`` reads and writes one worker's
frames on threads of its own.
"""

import collections
import logging
import os
import queue
import select
import signal
import socket
import threading
import time

from ..control import Framer, encode

log = logging.getLogger(__name__)

class Events:
    """The main thread's work queue, which signals wake too.

    Every thread of the supervisor blocks the signals it handles, except the
    main thread while it waits here: so a signal is taken exactly there (never
    by a thread that would leave its handler pending), stays pending while the
    main thread is busy, and survives an upgrade's exec.  ``select`` also
    watches a pipe that ``signal.set_wakeup_fd`` writes to.
    """

    def __init__(self, signals=()):
        self._signals = signals
        self._items = collections.deque()
        self._read, self.wakeup_fd = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self.wakeup_fd, False)

    def put(self, item):
        self._items.append(item)
        try:
            os.write(self.wakeup_fd, b"\0")
        except BlockingIOError:
            pass  # full of wakeups already

    def get(self, timeout):
        """The next item, waiting up to ``timeout`` seconds (None: for ever); None if there is none."""
        if not self._items:
            blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
            try:
                select.select([self._read], [], [], timeout)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # (handlers of signals taken run here)
        try:
            os.read(self._read, 4096)
        except BlockingIOError:
            pass
        return self._items.popleft() if self._items else None

    def take(self, wanted):
        """The queued items ``wanted(item)`` picks, removed; the others stay, in order (main thread)."""
        kept, taken = [], []
        while self._items:
            item = self._items.popleft()
            (taken if wanted(item) else kept).append(item)
        self._items.extendleft(reversed(kept))  # (before anything put meanwhile)
        return taken

    def take_all(self):
        """Every item queued, without waiting (nor taking signals)."""
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items


class Link:
    """The supervisor's end of one worker's control channel.

    A reader thread hands each message to ``on_message`` and, at the end,
    calls ``on_closed``; a writer thread sends what ``send`` queued, so a
    worker slow to read holds up nobody else.
    """

    def __init__(self, sock, name, on_message, on_closed):
        self.sock = sock
        self.name = name
        self.on_message = on_message
        self.on_closed = on_closed
        self._queue = queue.SimpleQueue()
        self._paused = threading.Event()  # the worker said ("paused", token): the reader stopped at that frame
        self._pausing = None  # the token of the pause asked for, if one is
        self._threads = ()

    def start(self):
        self._paused.clear()
        self._threads = (threading.Thread(target=self._read, name=f"{self.name}-read", daemon=True),
                         threading.Thread(target=self._write, name=f"{self.name}-write", daemon=True))
        for thread in self._threads:
            thread.start()

    def request_pause(self, token):
        """Begin handing the channel over (an upgrade's new code will take it): ask the worker to pause.

        The worker answers ("paused", token) and then holds what it would send;
        our writer stops after the request, our reader after that answer (an
        answer to an earlier request, come too late, is ignored).
        """
        self._pausing = token
        self._queue.put(encode(("pause", token)))
        self._queue.put(None)

    def paused_by(self, deadline):
        """Whether the channel stopped at a frame boundary both ways by ``deadline`` (monotonic)."""
        reader, writer = self._threads
        writer.join(max(0.0, deadline - time.monotonic()))
        if not self._paused.wait(max(0.0, deadline - time.monotonic())):
            return False
        reader.join(max(0.0, deadline - time.monotonic()))
        return not reader.is_alive() and not writer.is_alive()

    @property
    def reading(self):
        return bool(self._threads) and self._threads[0].is_alive()

    def resume(self):
        """Use the channel again (after a pause, in this process or the next): the worker may send."""
        self._pausing = None
        self._paused.clear()
        reader, writer = self._threads or (None, None)
        if reader is None or not reader.is_alive():  # (one that did not stop keeps reading)
            reader = threading.Thread(target=self._read, name=f"{self.name}-read", daemon=True)
            reader.start()
        if writer is not None:
            writer.join(2)  # (one stuck in a write finishes it first: frames never interleave)
        writer = threading.Thread(target=self._write, name=f"{self.name}-write", daemon=True)
        writer.start()
        self._threads = (reader, writer)
        self.send(("resume",))

    def send(self, message):
        """Queue a message, or a frame already encoded (``bytes``)."""
        self._queue.put(message if isinstance(message, bytes) else encode(message))

    def close(self):
        """Close the channel: the worker reads EOF, and drains."""
        self._queue.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self):
        while (frame := self._queue.get()) is not None:
            try:
                self.sock.sendall(frame)
            except OSError:
                return

    def _read(self):
        framer = Framer()
        try:
            while data := self.sock.recv(1 << 20):
                for message in framer.feed(data):
                    if message[0] == "paused":
                        if self._pausing is not None and message[1] == self._pausing:
                            self._paused.set()  # (the worker sends nothing after it)
                            return  # the channel stays open, for whoever takes it over
                        continue  # a late answer to a pause given up on
                    self.on_message(message)
        except ConnectionResetError:
            pass  # the worker was killed, or closed its end with our messages unread
        except (OSError, ValueError) as exc:
            log.warning("%s: control channel failed: %s", self.name, exc)
        except Exception:
            log.exception("%s: control message failed", self.name)
        self._queue.put(None)
        self.sock.close()  # first: a finished worker waits for it before exiting
        self.on_closed()
