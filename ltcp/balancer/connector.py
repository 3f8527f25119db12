"""One nonblocking connection attempt to one endpoint (timed by itself or by its caller)."""

import _socket
import errno
import socket

from ..protocol.tls import describe_error
from ..protocol.tlssocket import TlsSocket
from ..lifecycle import Lifecycle, State
from ..loop import HANGUP, WRITE, Registration

__all__ = ["CANCELLED", "CONNECT", "Connect", "LOCAL_CAUSES", "failure_cause"]

LOCAL_CAUSES = ("resources", "bug")  # connect failures that say nothing about the endpoint
CANCELLED = "cancelled"  # an attempt its stream abandoned: no failure at all
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


def _errno_name(err):
    return errno.errorcode.get(err, str(err))


CONNECTING = State("connecting")
HANDSHAKING = State("handshaking")  # TLS, after the TCP handshake (and the PROXY preface)
DONE = State("done")  # connected and handed over, failed, or cancelled: done() is called at most once
CONNECT = Lifecycle("Connect", {
    CONNECTING: {"handshake": HANDSHAKING, "end": DONE},
    HANDSHAKING: {"end": DONE},
})


class Connect(Registration):
    """Connect to ``addr`` and call ``done(sock, None)`` or ``done(None, cause, detail)`` once.

    After the TCP handshake it writes ``preface`` (a PROXY header) if given,
    then completes a TLS handshake if ``tls`` is ``(context, server_name)``;
    all of it within ``timeout`` (None: the caller times it, and cancels).
    The socket is closed on every failure path
    and on ``cancel()``; ``detail`` says what failed (an errno name, a TLS
    reason).  On success the socket is handed over nonblocking, with
    TCP_NODELAY set, and still registered with the reactor for WRITE, so the
    new owner adopts it with one ``modify`` (or unregisters it).
    """

    __slots__ = ("reactor", "sock", "fd", "events", "done", "timer", "preface", "tls", "state")

    def __init__(self, reactor, family, addr, timeout, done, preface=None, tls=None):
        self.reactor = reactor
        self.done = done
        self.timer = None
        self.sock = None
        self.fd = -1
        self.events = 0
        self.preface = preface
        self.tls = tls
        self.state = CONNECTING
        try:
            # The C socket: no Python-level __init__ or close per connection.
            sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE and friends: this attempt fails, the process goes on
            reactor.call_soon(self._failed_at_once, exc.errno)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            self.sock = sock
            self.fd = sock.fileno()
            # HANGUP as well: a failed handshake is reported with it (the reactor hands trouble on as every
            # event asked for), so a plain WRITE is a connection made, and needs no SO_ERROR to prove it.
            self.want(WRITE | HANGUP)
            if timeout is not None:  # (a dial times its attempts itself)
                self.timer = reactor.call_later(timeout, self._timed_out)
        else:
            # Report on the next turn so callers never see a re-entrant callback.
            sock.close()
            reactor.call_soon(self._failed_at_once, err)

    def __repr__(self):
        return f"<Connect fd={self.fd} {self.state.name}>"

    def _failed_at_once(self, err):
        if self.state is CONNECTING:  # (not cancelled meanwhile)
            self.state = self.state.moves["end"]
            self.done(None, failure_cause(err), _errno_name(err))

    def on_event(self, mask):
        if self.state is DONE:
            return  # handed over still registered: its new owner takes the descriptor before it can fire
        if self.state is HANDSHAKING:
            self._handshake()
            return
        if mask & HANGUP:  # refused, reset, unreachable; or accepted and at once closed by the peer
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(failure_cause(err), _errno_name(err))
                return
        if self.preface:
            try:
                sent = self.sock.send(self.preface)
            except OSError:
                sent = -1
            if sent != len(self.preface):  # a fresh socket's buffer always has room for it
                self._fail("other", "the PROXY header did not fit")
                return
        if self.tls is None:
            self._succeed()
            return
        context, server_name = self.tls
        self.state = self.state.moves["handshake"]
        # A new object on the same descriptor: the registration, by descriptor, carries on.
        self.sock = TlsSocket(self.sock, context, server_hostname=server_name)
        self._handshake()

    def _handshake(self):
        try:
            waiting = self.sock.handshake()
        except OSError as exc:  # (ssl.SSLError included)
            self._fail("tls", describe_error(exc))
            return
        if waiting:
            self.want(waiting)
        else:
            self._succeed()

    def _succeed(self):
        if not self.events & WRITE:
            self.want(WRITE)  # the registration the new owner adopts...
        self.events = 0  # ... goes with the socket
        self.done(self._release(), None)

    def _fail(self, cause, detail):
        self._release().close()
        self.done(None, cause, detail)

    def _timed_out(self):
        self.timer = None
        self._fail("timeout", "no answer in time")

    def _release(self):
        """End the attempt: stop watching and timing; the socket, for the caller to hand on or close."""
        self.state = self.state.moves["end"]
        if self.events:
            self.want(0)
        sock, self.sock = self.sock, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return sock

    def crashed(self, exc):
        """A bug in our callbacks, or in ``done``: release the socket and make sure the owner hears of it."""
        if self.state is not DONE:  # done was not called yet
            self._fail("bug", repr(exc))
            return
        owner_crashed = getattr(getattr(self.done, "__self__", None), "crashed", None)
        if owner_crashed is not None:  # the owner raised inside done
            owner_crashed(exc)

    def cancel(self):
        """Abandon the attempt; ``done`` is never called."""
        if self.state is not DONE:
            sock = self._release()
            if sock is not None:
                sock.close()
