"""One nonblocking connection attempt to one endpoint, bounded by a timeout."""

import errno
import socket
import ssl

from .loop import READ, WRITE

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

    After the TCP handshake it writes ``preface`` (a PROXY header) if given,
    then completes a TLS handshake if ``tls`` is ``(context, server_name)``;
    all of it within ``timeout``.  The socket is closed on every failure path
    and on ``cancel()``.  On success it is handed over nonblocking, with
    TCP_NODELAY set, and still registered with the reactor for WRITE, so the
    new owner changes its interest with one ``modify`` (or unregisters it).
    """

    __slots__ = ("reactor", "sock", "done", "timer", "preface", "tls", "events")

    def __init__(self, reactor, family, addr, timeout, done, preface=None, tls=None):
        self.reactor = reactor
        self.done = done
        self.timer = None
        self.sock = None
        self.preface = preface
        self.tls = tls
        self.events = 0
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE and friends: this attempt fails, the process goes on
            reactor.call_soon(self._failed_at_once, failure_cause(exc.errno))
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            self.sock = sock
            self._wait(WRITE, self._connected)
            self.timer = reactor.call_later(timeout, self._timed_out)
        else:
            # Report on the next turn so callers never see a re-entrant callback.
            sock.close()
            reactor.call_soon(self._failed_at_once, failure_cause(err))

    def _failed_at_once(self, cause):
        self.done(None, cause)

    def _wait(self, events, callback):
        if not self.events:
            self.reactor.register(self.sock, events, callback)
        else:
            self.reactor.modify(self.sock, events, callback)
        self.events = events

    def _connected(self, mask):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(failure_cause(err))
            return
        if self.preface:
            try:
                sent = self.sock.send(self.preface)
            except OSError:
                sent = -1
            if sent != len(self.preface):  # a fresh socket's buffer always has room for it
                self._fail("other")
                return
        if self.tls is None:
            self._succeed()
            return
        context, server_name = self.tls
        self._unwatch()  # wrapping makes a new object for the same descriptor
        self.sock = context.wrap_socket(self.sock, server_hostname=server_name, do_handshake_on_connect=False)
        self._handshake(0)

    def _handshake(self, mask):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(READ, self._handshake)
            return
        except ssl.SSLWantWriteError:
            self._wait(WRITE, self._handshake)
            return
        except (ssl.SSLError, OSError):
            self._fail("tls")
            return
        self._succeed()

    def _succeed(self):
        if self.events != WRITE:
            self._wait(WRITE, _ignore_event)
        self.events = 0  # the registration goes with the socket
        sock = self._release()
        self.done(sock, None)

    def _fail(self, cause):
        self._release().close()
        self.done(None, cause)

    def _timed_out(self):
        self.timer = None
        self._fail("timeout")

    def _unwatch(self):
        if self.events:
            self.reactor.unregister(self.sock)
            self.events = 0

    def _release(self):
        self._unwatch()
        sock, self.sock = self.sock, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return sock

    def crashed(self, exc):
        """A bug in our callbacks, or in ``done``: release the socket and make sure the owner hears of it."""
        if self.sock is not None:  # done was not called yet
            self._release().close()
            self.done(None, "bug")
            return
        owner_crashed = getattr(getattr(self.done, "__self__", None), "crashed", None)
        if owner_crashed is not None:  # the owner raised inside done
            owner_crashed(exc)

    def cancel(self):
        """Abandon the attempt; ``done`` is never called."""
        if self.sock is not None:
            self._release().close()
        self.done = _ignore


def _ignore_event(mask):
    pass


def _ignore(sock, cause):
    if sock is not None:
        sock.close()
