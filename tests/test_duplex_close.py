"""How a finished stream lets go of its sockets: each peer gets its FIN, and nothing stays in the epoll set.

A stream this worker alone holds closes with the fewest syscalls (the close sends the last FIN, and takes the
socket out of epoll).  A stream whose sockets another process may hold too, once offered in a hand-over, even
if taken back, must shut down and unregister by hand: closing one descriptor of a shared socket does neither.
"""

import os
import socket
import types

import pytest

from ltcp.dataplane.duplex import Duplex, Tally
from ltcp.loop import Reactor
from netutil import recv_all, run_reactor_until

pytestmark = pytest.mark.timeout(20)


class Pipes:
    """A share of splice pipes with room for every stream."""

    def take(self):
        return True

    def give_back(self):
        pass


class Owner:
    """What a listener is to its duplexes, and no more."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.received, self.sent = Tally(), Tally()
        self.buffer = bytearray(16384)
        self.view = memoryview(self.buffer)
        self.pipes = Pipes()
        self.ended = []

    def stream_closed(self, duplex):
        self.ended.append(duplex.reason)


def connected_pair():
    """(the far end, our nonblocking end) of a TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        far = socket.create_connection(listener.getsockname(), timeout=5)
        ours, _ = listener.accept()
    ours.setblocking(False)
    return far, ours


@pytest.fixture
def stream():
    """A running Duplex between a client and an upstream: (reactor, owner, duplex, client, upstream)."""
    reactor = Reactor()
    owner = Owner(reactor)
    client, client_end = connected_pair()
    upstream, upstream_end = connected_pair()
    endpoint = types.SimpleNamespace(moved=0, ending=0, sockaddr=("127.0.0.1", upstream.getsockname()[1]))
    envelope = types.SimpleNamespace(dst_name="/svc/a", source=client.getsockname(), destination=None,
                                     accepted_at=reactor.now, lifetime=0, idle_timeout=0)
    duplex = Duplex(owner, (None, endpoint, envelope), client_end, 0, upstream_end, 0, owner.buffer)
    yield reactor, owner, duplex, client, upstream
    client.close()
    upstream.close()
    reactor.close()


def finish(reactor, owner, client, upstream):
    """Both sides send their bytes and their end; each should read the other's, then EOF."""
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    upstream.sendall(b"answer")
    upstream.shutdown(socket.SHUT_WR)
    run_reactor_until(reactor, lambda: owner.ended)
    assert owner.ended == ["done"]
    assert recv_all(upstream) == b"request"
    assert recv_all(client) == b"answer"  # (to EOF: a timeout here is a FIN that never came)


def test_a_stream_held_here_alone_closes_out_of_epoll(stream):
    reactor, owner, duplex, client, upstream = stream
    finish(reactor, owner, client, upstream)
    assert reactor._poller.poll(0) == []


def test_a_stream_offered_to_another_worker_and_taken_back_still_ends_with_a_fin(stream):
    """The other worker still holds its sockets (a message not read yet): the review's reproduction lost the
    client's FIN, and left the closed socket in epoll, firing for whatever took its number next."""
    reactor, owner, duplex, client, upstream = stream
    duplex.record(1, "r", ("127.0.0.1", 1))  # offered...
    held_elsewhere = [os.dup(duplex.client.fd), os.dup(duplex.upstream.fd)]  # ... and held over there
    try:
        finish(reactor, owner, client, upstream)
        assert reactor._poller.poll(0) == []
    finally:
        for fd in held_elsewhere:
            os.close(fd)
