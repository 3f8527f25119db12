"""Handing items to a thread that sleeps in a selector: a queue, and a socket pair to wake it."""

import queue
import socket

__all__ = ["Mailbox"]


class Mailbox:
    """``put`` from any thread; the owner registers the mailbox with its selector (it has a
    ``fileno``) and calls ``take`` whenever it is readable."""

    def __init__(self):
        self._items = queue.SimpleQueue()
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)

    def fileno(self):
        return self._read.fileno()

    def put(self, item):
        self._items.put(item)
        self.wake()

    def wake(self):
        try:
            self._write.send(b"\0")
        except OSError:
            pass  # full: the owner is awake anyway; closed: it is gone

    def take(self):
        """Every item put so far, oldest first."""
        try:
            while self._read.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        items = []
        while True:
            try:
                items.append(self._items.get_nowait())
            except queue.Empty:
                return items

    def close(self):
        self._read.close()
        self._write.close()
