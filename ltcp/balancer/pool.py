"""A destination's pre-established connections (``minConnections``), ready before streams ask for them."""

import collections
import functools
import socket

from ..loop import READ, WRITE, Registration
from .connector import Connect
from .endpoint import RETIRED

__all__ = ["Pool", "PooledConnection"]

RETRY_SECS = 1.0  # pause before refilling the pool after a failure


class Pool:
    """Up to ``minConnections`` idle connections of one balancer, each drawing on the budget's pool share.

    A PROXY header names its client, so a balancer that sends one keeps no
    pool: a connection made before the client arrives could not carry it.
    """

    def __init__(self, balancer):
        self.balancer = balancer
        self.reactor = balancer.reactor
        self.share = balancer.budget.pool  # every balancer's pooled connections together
        self.ready = collections.deque()  # PooledConnection, to hand out oldest first
        self.connecting = 0
        self.timer = None  # a refill after a failure

    def __len__(self):
        return len(self.ready)

    def take(self):
        """A pooled (endpoint, socket) ready for a stream (not registered), or None.

        The stream's own budget covers the socket from now on.
        """
        if not self.ready:
            return None
        pooled = self.ready.popleft()
        pooled.want(0)  # its callback must not outlive it: the stream registers its own
        self.share.give_back()
        self.reactor.call_soon(self.fill)
        return pooled.endpoint, pooled.sock

    def fill(self):
        balancer = self.balancer
        if balancer.closed or self.timer is not None or balancer.proxy_header is not None:
            return
        settings = balancer.settings
        for _ in range(settings.min_connections - len(self.ready) - self.connecting):
            endpoint = balancer.pick()
            if endpoint is None or not self.share.take():
                return
            endpoint.begin_connect()
            self.connecting += 1
            Connect(self.reactor, endpoint.family, endpoint.sockaddr, settings.connect_timeout_ms / 1000,
                    functools.partial(self._connected, endpoint, self.reactor.time() if balancer.timed else None),
                    tls=balancer.tls)

    def _connected(self, endpoint, started, sock, cause, detail=""):
        balancer = self.balancer
        self.connecting -= 1
        balancer.attempt_ended(endpoint, cause, detail, None if started is None else self.reactor.now - started)
        if sock is None:
            self.share.give_back()
            self._refill_later()
            return
        if balancer.closed or endpoint.sockaddr not in balancer.endpoints:
            self.share.give_back()
            self.reactor.unregister(sock)
            sock.close()
            if endpoint.state is RETIRED:
                balancer.set.settle(endpoint)
            return
        self.ready.append(PooledConnection(self, endpoint, sock))  # takes over the WRITE registration

    def _refill_later(self):
        if self.timer is None and not self.balancer.closed:
            self.timer = self.reactor.call_later(RETRY_SECS, self._refill_now)

    def _refill_now(self):
        self.timer = None
        self.fill()

    def drop(self, condition):
        """Close the idle connections ``condition(pooled)`` picks."""
        keep = collections.deque()
        for pooled in self.ready:
            if condition(pooled):
                pooled.want(0)
                pooled.sock.close()
                self.share.give_back()
            else:
                keep.append(pooled)
        self.ready = keep

    def closed_by_endpoint(self, pooled):
        """A pooled connection was closed by its endpoint before use: drop it, and make another later."""
        self.drop(lambda p: p is pooled)
        self._refill_later()

    def close(self):
        self.drop(lambda pooled: True)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class PooledConnection(Registration):
    """An idle upstream connection waiting to be handed to a stream.

    While idle it is watched for readability: EOF means the endpoint closed it
    (drop and replace); data means the server speaks first, so the bytes are
    left in the kernel for the stream and the watch ends.
    """

    __slots__ = ("pool", "endpoint", "sock", "reactor", "fd", "events")

    def __init__(self, pool, endpoint, sock):
        self.pool = pool
        self.endpoint = endpoint
        self.sock = sock
        self.reactor = pool.reactor
        self.fd = sock.fileno()
        self.adopt(WRITE, READ)  # the connector left it registered for WRITE

    def on_event(self, mask):
        try:
            # Peek below TLS too: only "closed or not" matters here.
            data = socket.socket.recv(self.sock, 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.want(0)
        else:
            self.pool.closed_by_endpoint(self)

    def crashed(self, exc):
        self.pool.closed_by_endpoint(self)

    def __repr__(self):
        return f"<PooledConnection fd={self.fd} to {self.endpoint.address}{' watched' if self.events else ''}>"
