"""The connect phase of one accepted stream: pick an endpoint, connect, try another on failure.

A ``Dial`` belongs to the stream from accept until its upstream socket is
connected; then it hands both sockets to its owner (the listener), which
starts the duplex.  The balancer decides where each attempt goes and keeps
the account of connects in flight.
"""

import socket
from typing import Protocol

from ..lifecycle import Lifecycle, State
from ..loop import ERRORS, HANGUP, WRITE, Registration
from .connector import CANCELLED, LOCAL_CAUSES, Connect

__all__ = ["DIAL", "Dial", "DialOwner", "MAX_ATTEMPTS"]

RETRY_BACKOFF = 0.025  # first pause once the quick attempts have failed; doubles up to 1 s
QUICK_ATTEMPTS = 3  # attempts a stream makes without a pause (each to another endpoint)
MAX_ATTEMPTS = 10  # attempts a stream makes in all before it gives up (cause "unreachable")


class DialOwner(Protocol):
    """What a dial reports to (a listener)."""

    def established(self, dial: "Dial", endpoint, sock, events: int) -> None: ...

    def dial_failed(self, dial: "Dial", cause: str) -> None: ...


NEW = State("new")
WAITING = State("waiting")  # for discovery's first answer, or for an endpoint with room
CONNECTING = State("connecting")
PAUSED = State("paused")  # between attempts, once the quick ones have failed
ESTABLISHED = State("established")  # handed over to its owner
FAILED = State("failed")
_ENDINGS = {"establish": ESTABLISHED, "fail": FAILED}
DIAL = Lifecycle("Dial", {
    NEW: {"wait": WAITING, "connect": CONNECTING, **_ENDINGS},
    WAITING: {"wait": WAITING, "connect": CONNECTING, **_ENDINGS},
    CONNECTING: {"wait": WAITING, "connect": CONNECTING, "pause": PAUSED, **_ENDINGS},
    PAUSED: {"wait": WAITING, "connect": CONNECTING, **_ENDINGS},
})


class Dial(Registration):
    """The connect phase of one accepted stream.

    Picks an endpoint, connects within the client's per-attempt timeout, and on
    failure tries another while the server's connect deadline allows: up to
    ``QUICK_ATTEMPTS`` straight away, then with a doubling pause, and at most
    ``MAX_ATTEMPTS`` in all, so a destination whose endpoints all refuse can
    never spin the loop.  One timer does for the stream's deadline, the
    attempt's timeout and the pause, whichever its state waits for first.
    Meanwhile the client is watched: one that resets ends the dial at once.
    Ends in exactly one of ``owner.established(dial, endpoint, sock, events)``
    or ``owner.dial_failed(dial, cause)``, the two moves out of its lifecycle
    (``DIAL``); the client socket is handed over registered for ``events``,
    and from then on the stream is the owner's, even should taking it over fail.
    """

    __slots__ = ("balancer", "client", "envelope", "owner", "endpoint", "attempt", "attempted", "state", "timer",
                 "expiring", "tries", "failure", "reactor", "fd", "events")

    def __init__(self, balancer, client, envelope, owner: DialOwner):
        self.balancer = balancer
        self.client = client
        self.envelope = envelope
        self.owner = owner
        self.endpoint = None
        self.attempt = None
        self.attempted = 0.0  # when the attempt under way began (timed balancers only)
        self.state = NEW
        self.timer = None
        self.expiring = False  # the timer is for the stream's deadline (not an attempt's, not a pause's end)
        self.tries = 0
        self.failure = ""  # the last attempt's failure, for the log
        self.reactor = balancer.reactor
        self.fd = client.fileno()
        self.events = 0

    def __repr__(self):
        return (f"<Dial fd={self.fd} {self.balancer.prefix} {self.state.name} tries={self.tries}"
                f"{' to ' + self.endpoint.address if self.endpoint else ''}"
                f"{' last: ' + self.failure if self.failure else ''}>")

    def start(self):
        self.balancer.dials += 1  # undone by the move to established or failed, exactly once
        self.want(HANGUP)
        self.balancer.dial(self)

    def wait(self):
        self.state = self.state.moves["wait"]
        self._wake_at(self.envelope.connect_deadline)

    def _wake_at(self, when):
        """(Re)arm the one timer: at ``when``, or at the stream's deadline if that comes first."""
        if self.timer is not None:
            self.timer.cancel()
        deadline = self.envelope.connect_deadline
        self.expiring = when >= deadline  # decided now: when it fires, the loop's clock may lag behind
        self.timer = self.reactor.call_at(min(when, deadline), self._woken)

    def _woken(self):
        self.timer = None
        if self.expiring:
            self.fail("timeout")
        elif self.state is CONNECTING:  # the attempt took longer than the client's connectTimeoutMs
            self.attempt.cancel()
            self.attempt = None
            self._connected(None, "timeout", "no answer in time")
        else:  # a pause between attempts is over
            self.next_attempt()

    def on_event(self, mask):
        """The client reset, or shut down its side; after a reset nobody is left to serve.

        A shutdown alone may be a half-close by a client that has said all it
        will and waits for the answer, so the dial goes on, watching only for
        a reset from then on.
        """
        if mask & HANGUP:
            try:
                socket.socket.recv(self.client, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.fail("closed")
                return
            self.want(ERRORS)
            return
        self.fail("closed")  # a reset, or a full hang-up, after a half-close

    def next_attempt(self):
        balancer = self.balancer
        pooled = balancer.pool.take() if balancer.pool.ready else None
        if pooled is not None:
            endpoint, sock = pooled
            self.endpoint = endpoint
            self._finish(endpoint, sock, 0)
            return
        endpoint = balancer.pick(avoid=self.endpoint)
        if endpoint is None:
            if balancer.set.limit and balancer.set.picker.candidates:  # every one is at its limit
                balancer.wait_for_room(self)
            else:
                self.fail("no_endpoints")
            return
        preface = None
        if balancer.proxy_header is not None:
            envelope = self.envelope
            tls = envelope.tls_version and (envelope.tls_version, envelope.client_certified, envelope.client_identity,
                                            envelope.server_name)
            destination = envelope.destination or self.client.getsockname()[:2]
            preface = balancer.proxy_header(envelope.source, destination, tls or None)
        self.state = self.state.moves["connect"]
        self.endpoint = endpoint
        self.tries += 1
        reactor = self.reactor
        if balancer.timed:  # (the clock, not the turn's stamp: what ran before in this turn is not the endpoint's)
            self.attempted = reactor.time()
        self._wake_at(reactor.now + balancer.settings.connect_timeout_ms / 1000)
        self.attempt = Connect(reactor, endpoint.family, endpoint.sockaddr, None, self._connected, preface,
                               balancer.tls)
        endpoint.begin_connect()  # (once the attempt exists: fail() ends what began, and only that)

    def _connected(self, sock, cause, detail=""):
        self.attempt = None
        endpoint = self.endpoint
        balancer = self.balancer
        balancer.attempt_ended(endpoint, cause, detail, self.reactor.now - self.attempted if balancer.timed else None)
        if sock is not None:
            self._finish(endpoint, sock, WRITE)
            return
        self.failure = f"{endpoint.address}: {cause}{f' ({detail})' if detail else ''}"
        if cause in LOCAL_CAUSES:
            self.fail(cause)
        elif self.tries >= MAX_ATTEMPTS:
            self.fail("unreachable")
        elif self.tries < min(QUICK_ATTEMPTS, len(balancer.set.endpoints)):
            self.next_attempt()
        else:
            self.state = self.state.moves["pause"]
            self._wake_at(self.reactor.now + min(1.0, RETRY_BACKOFF * 2 ** max(0, self.tries - QUICK_ATTEMPTS)))

    def _finish(self, endpoint, sock, events):
        """Hand the connected socket (registered for ``events``, or not at all) to the owner."""
        self.state = self.state.moves["establish"]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.balancer.dials -= 1
        self.owner.established(self, endpoint, sock, events)

    def fail(self, cause):
        self.state = self.state.moves["fail"]
        if cause == "no_endpoints":
            self.balancer.connect_failures[cause] += 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.balancer.dials -= 1
        self.balancer.forget(self)
        self.want(0)
        if self.attempt is not None:
            self.attempt.cancel()
            self.attempt = None
            self.balancer.attempt_ended(self.endpoint, CANCELLED)
            self.failure = f"{self.endpoint.address}: cut off"
        self.owner.dial_failed(self, cause)

    def crashed(self, exc):
        """A bug in one of our callbacks: end the stream if it is still ours."""
        if self.state is not ESTABLISHED and self.state is not FAILED:
            self.fail("bug")
