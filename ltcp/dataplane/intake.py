"""What happens between accept and dial when a server needs to look first.

In order, each only if configured:

1. ``proxyProtocol: accept`` — read the PROXY header an upstream balancer sent
   and take the client's address from it;
2. ``tls`` — complete the TLS handshake (the SNI picks the identity), or, for a
   plain server whose ``dstName`` uses ``{sni}``, read the ClientHello without
   consuming it;
3. fill in the destination name and hand the stream to its balancer.

Bytes are only peeked until a header or hello is complete, so nothing is lost
for the backend.  While a peeked prefix is incomplete the socket stays
readable, so instead of waiting on readiness (which would spin) the intake
looks again after a short, growing pause, watching only for the client
hanging up meanwhile: a prefix the client will never finish ends the stream
at once.  The whole intake runs inside the server's connect deadline.
"""

import socket

from ..protocol import proxyproto
from ..protocol import tls
from ..protocol.tlssocket import TlsSocket
from ..lifecycle import Lifecycle, State
from ..loop import HANGUP, READ, Registration

__all__ = ["INTAKE", "Intake"]

FIRST_RETRY = 0.005
LAST_RETRY = 0.1


PROXY_HEADER = State("proxy_header")  # reading the PROXY header
HANDSHAKE = State("handshake")  # terminating TLS
HELLO = State("hello")  # peeking at the ClientHello
ROUTED = State("routed")  # handed to its dial
FAILED = State("failed")
_ENDINGS = {"route": ROUTED, "fail": FAILED}
INTAKE = Lifecycle("Intake", {
    PROXY_HEADER: {"handshake": HANDSHAKE, "hello": HELLO, **_ENDINGS},
    HANDSHAKE: _ENDINGS,
    HELLO: _ENDINGS,
})


class Intake(Registration):
    """The looking-first phase of one accepted stream; its state says which look it is at.

    Ends in exactly one of ``listener.dial(intake, client, envelope)`` or
    ``listener.dial_failed(intake, cause)``.
    """

    __slots__ = ("listener", "client", "envelope", "state", "timer", "retry_timer", "hello_timer", "delay",
                 "hung_up", "peeked", "failure", "reactor", "fd", "events")

    def __init__(self, listener, client, envelope):
        self.listener = listener
        self.client = client
        self.envelope = envelope
        self.reactor = listener.reactor
        self.fd = client.fileno()
        self.events = 0
        self.timer = self.retry_timer = self.hello_timer = None
        self.delay = FIRST_RETRY
        self.hung_up = False  # the client has shut down its side: what it sent is all there will be
        self.peeked = 0  # bytes seen at the last look
        self.failure = ""  # why it failed, for the log
        self.state = PROXY_HEADER  # (where every intake begins; a server without PROXY moves on at once)

    def __repr__(self):
        return (f"<Intake fd={self.fd} {self.state.name} peeked={self.peeked}"
                f"{' hung up' if self.hung_up else ''}{' ' + self.failure if self.failure else ''}>")

    def start(self):
        self.timer = self.reactor.call_at(self.envelope.connect_deadline, self._expired)
        if self.listener.config.proxy_protocol:
            self._read_proxy_header()
        else:
            self._after_proxy_header()

    def _step(self):
        """Look again at whatever the current state waits for."""
        if self.state is PROXY_HEADER:
            self._read_proxy_header()
        elif self.state is HANDSHAKE:
            self._handshake()
        elif self.state is HELLO:
            self._peek_hello()

    # -- waiting ------------------------------------------------------------------

    def on_event(self, mask):
        if mask & HANGUP:
            self.hung_up = True
            if self.retry_timer is not None:
                self.retry_timer.cancel()
                self.retry_timer = None
        self._step()

    def _incomplete(self, cause):
        """An incomplete prefix: look again after a pause, unless the client can send no more."""
        if self.hung_up:
            self.fail(cause)
            return
        self.want(HANGUP)  # the socket stays readable: only a hang-up may wake us before the timer
        self.retry_timer = self.reactor.call_later(self.delay, self._retry)
        self.delay = min(self.delay * 2, LAST_RETRY)

    def _retry(self):
        self.retry_timer = None
        self._step()

    def _grew(self, data):
        """Whether ``data`` holds more than the last look saw; if not, wait again without parsing."""
        if len(data) == self.peeked and not self.hung_up:
            self._incomplete(None)
            return False
        self.peeked = len(data)
        return True

    def crashed(self, exc):
        """A bug in one of our callbacks: end this stream, releasing what it holds."""
        if self.state not in (ROUTED, FAILED):
            self.fail("bug")

    def _peek(self, size):
        """Bytes waiting on the socket, left in place; None if none yet, b"" at EOF."""
        try:
            return self.client.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self.want(READ)
            return None
        except OSError:
            return b""

    # -- steps --------------------------------------------------------------------

    def _read_proxy_header(self):
        data = self._peek(proxyproto.PEEK_BYTES)
        if data is None:
            return
        if data and not self._grew(data):
            return
        header = proxyproto.parse_header(data)
        if header.status == proxyproto.NEED_MORE and data:
            self._incomplete("proxy_protocol")
            return
        if header.status != proxyproto.PARSED:
            self.failure = header.reason
            self.fail("proxy_protocol" if data else "closed")
            return
        try:
            self.client.recv(header.length)  # consume exactly the header
        except OSError:
            self.fail("closed")
            return
        if header.source is not None:
            self.envelope.source = header.source
            self.envelope.destination = header.destination
        self.delay = FIRST_RETRY
        self.peeked = 0
        self._after_proxy_header()

    def _after_proxy_header(self):
        if self.listener.tls is not None:
            self.state = self.state.moves["handshake"]
            # A new object on the same descriptor: the registration, by descriptor, carries on.
            self.client = TlsSocket(self.client, self.listener.tls.default, server_side=True)
            self._handshake()
        elif "{sni}" not in self.listener.config.dst_name:
            self._route(None)  # nothing to peek for: a server-speaks-first client would wait in vain
        else:
            # A client that has not finished its hello in half the connect
            # timeout (or speaks only after the server) goes to the fallback.
            self.state = self.state.moves["hello"]
            envelope = self.envelope
            wait = (envelope.connect_deadline - envelope.accepted_at) / 2
            self.hello_timer = self.reactor.call_at(envelope.accepted_at + wait, self._hello_late)
            self._peek_hello()

    def _hello_late(self):
        self.hello_timer = None
        self._route(None, "slow")

    def _handshake(self):
        try:
            waiting = self.client.handshake()
        except OSError as exc:  # (ssl.SSLError included)
            self.failure = tls.describe_error(exc)
            self.fail("tls")
            return
        if waiting:
            self.want(waiting)
            return
        envelope = self.envelope
        server_name = self.listener.tls.server_name(self.client)
        envelope.tls_version = self.client.version()
        envelope.client_identity, envelope.client_certified = tls.client_identity(self.client)
        self._route_by(server_name)

    def _peek_hello(self):
        data = self._peek(tls.HELLO_WINDOW)
        if data is None:
            return
        if not data:
            self.fail("closed")
            return
        if not self._grew(data):
            return
        hello = tls.parse_client_hello(data)
        if hello.status == tls.NEED_MORE:
            self._incomplete("closed")
        elif hello.status == tls.HELLO:
            self._route_by(hello.server_name)
        else:
            self.failure = hello.reason
            self._route(None, hello.status)

    def _route_by(self, server_name):
        """Route by a client's SNI; only a valid name is kept (for logs and PROXY headers), never raw bytes."""
        name, cause = tls.routing_name(server_name)
        self.envelope.server_name = name
        self._route(name, cause)

    def _route(self, server_name, cause="no_sni"):
        """Fill in the destination and start dialing; without a usable name, fall back or fail.

        ``{sni}`` takes ``server_name`` (None: unusable, for ``cause``), and
        ``{client}`` the verified client certificate's identity.
        """
        listener = self.listener
        name = listener.config.dst_name
        if "{sni}" in name:
            name = name.replace("{sni}", server_name) if server_name is not None else None
        if name is not None and "{client}" in name:
            identity, cause = tls.routing_identity(self.envelope.client_identity)
            name = name.replace("{client}", identity) if identity is not None else None
        if name is None:
            if listener.config.default_dst_name is None:
                self.fail(cause)
                return
            name = listener.config.default_dst_name
            listener.fallbacks[cause] += 1
        self.state = self.state.moves["route"]
        self._stop()
        self.envelope.dst_name = name
        listener.dial(self, self.client, self.envelope)

    # -- ending -------------------------------------------------------------------

    def _stop(self):
        self.want(0)
        for timer in (self.timer, self.retry_timer, self.hello_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.retry_timer = self.hello_timer = None

    def _expired(self):
        self.timer = None
        self.fail("timeout")

    def fail(self, cause):
        self.state = self.state.moves["fail"]
        self._stop()
        self.listener.dial_failed(self, cause)
