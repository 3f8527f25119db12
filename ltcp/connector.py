"""One nonblocking connection attempt to one endpoint, bounded by a timeout."""

import errno
import socket

from .loop import WRITE

__all__ = ["Connect", "failure_cause"]

_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH}
_LOCAL = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}


def failure_cause(err):
    """Map an errno to the cause label counted for connect failures.

    "resources" is this process running short (descriptors, memory, local
    ports), which says nothing about the endpoint.
    """
    if err in _REFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:
        return "timeout"
    if err in _LOCAL:
        return "resources"
    return "other"


class Connect:
    """Connect to ``addr`` and call ``done(sock, None)`` or ``done(None, cause)`` once.

    The socket is closed on every failure path and on ``cancel()``; on success
    it is handed over unregistered, nonblocking, with TCP_NODELAY set.
    """

    __slots__ = ("reactor", "sock", "done", "timer")

    def __init__(self, reactor, family, addr, timeout, done):
        self.reactor = reactor
        self.done = done
        self.timer = None
        self.sock = None
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE and friends: this attempt fails, the process goes on
            reactor.call_soon(self._failed_at_once, failure_cause(exc.errno))
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            self.sock = sock
            reactor.register(sock, WRITE, self._writable)
            self.timer = reactor.call_later(timeout, self._timed_out)
        else:
            # Report on the next turn so callers never see a re-entrant callback.
            sock.close()
            reactor.call_soon(self._failed_at_once, failure_cause(err))

    def _failed_at_once(self, cause):
        self.done(None, cause)

    def _writable(self, mask):
        sock = self._release()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self.done(None, failure_cause(err))
        else:
            self.done(sock, None)

    def _timed_out(self):
        self.timer = None
        self._release().close()
        self.done(None, "timeout")

    def _release(self):
        sock, self.sock = self.sock, None
        self.reactor.unregister(sock)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return sock

    def cancel(self):
        """Abandon the attempt; ``done`` is never called."""
        if self.sock is not None:
            self._release().close()
        self.done = _ignore


def _ignore(sock, cause):
    if sock is not None:
        sock.close()
