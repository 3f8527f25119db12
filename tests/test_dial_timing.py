"""Retry pauses and penalties on a clock the test moves: checked exactly, without waiting."""

import socket
import threading

import pytest

from ltcp.balancer.dial import FAILED as DIAL_FAILED
from ltcp.balancer import Balancer
from ltcp.balancer.dial import MAX_ATTEMPTS, PAUSED, Dial
from ltcp.config import Address, ClientSettings, FailFastConfig
from ltcp.balancer.endpoint import AVAILABLE, FAILED
from ltcp.loop import Reactor
from ltcp.dataplane.budget import StreamBudget
from ltcp.dataplane.server import Envelope
from netutil import refused_port, wait_for

NS = 1_000_000_000


class MovingClock:
    def __init__(self):
        self.ns = 1_000 * NS

    def __call__(self):
        return self.ns


@pytest.fixture
def reactor():
    clock = MovingClock()
    reactor = Reactor(clock=clock)
    reactor.clock = clock
    thread = threading.Thread(target=reactor.run, daemon=True)
    thread.start()
    yield reactor
    reactor.call_soon_threadsafe(reactor.stop)
    thread.join(5)
    reactor.close()


def on_reactor(reactor, fn):
    result, done = [], threading.Event()

    def run():
        result.append(fn())
        done.set()

    reactor.call_soon_threadsafe(run)
    assert done.wait(5)
    return result[0]


TICK = 10_000_000  # the reactor's timer wheel fires a timer in the first tick at or after it is due


def advance_to(reactor, ns):
    """Move the clock past ``ns`` by a tick, then let the reactor see it (its next turn fires what is due)."""
    reactor.clock.ns = max(reactor.clock.ns, ns + TICK)
    on_reactor(reactor, lambda: None)


class Owner:
    def __init__(self):
        self.failed = []

    def established(self, dial, endpoint, sock, events):
        raise AssertionError("nothing can be established here")

    def dial_failed(self, dial, cause):
        self.failed.append(cause)
        dial.client.close()


def test_pauses_double_from_25_ms_and_a_stream_stops_after_ten_attempts(reactor):
    holders = [refused_port() for _ in range(5)]
    settings = ClientSettings(fail_fast=FailFastConfig(max_consecutive_failures=1000))
    balancer = Balancer(reactor, "/svc/x", settings, StreamBudget(10), "test")
    on_reactor(reactor, lambda: balancer.update([Address("127.0.0.1", port) for _, port in holders]))
    client, peer = socket.socketpair()
    owner = Owner()
    now = reactor.time()
    dial = Dial(balancer, client, Envelope(("127.0.0.1", 1), "/svc/x", now, now + 100, None, None), owner)
    on_reactor(reactor, dial.start)
    pauses = []
    while not owner.failed:
        wait_for(lambda: on_reactor(reactor, lambda: dial.state is PAUSED or dial.state is DIAL_FAILED),
                 message="the dial to pause or fail")
        if dial.state is PAUSED:
            due = on_reactor(reactor, lambda: dial.timer.when)
            pauses.append(round((due - reactor.clock.ns) / NS, 3))
            advance_to(reactor, due)
    assert owner.failed == ["unreachable"] and dial.tries == MAX_ATTEMPTS
    assert pauses == [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0]  # after three quick attempts, up to 1 s
    assert on_reactor(reactor, lambda: balancer.dials) == 0
    peer.close()
    for holder, _ in holders:
        holder.close()


def test_an_ejected_endpoint_returns_when_its_penalty_is_over(reactor):
    holder, port = refused_port()
    settings = ClientSettings(fail_fast=FailFastConfig(max_consecutive_failures=1, failure_penalty_secs=60))
    balancer = Balancer(reactor, "/svc/x", settings, StreamBudget(10), "test")
    on_reactor(reactor, lambda: balancer.update([Address("127.0.0.1", port)]))
    endpoint = balancer.endpoints[("127.0.0.1", port)]
    client, peer = socket.socketpair()
    owner = Owner()
    now = reactor.time()
    dial = Dial(balancer, client, Envelope(("127.0.0.1", 1), "/svc/x", now, now + 0.001, None, None), owner)
    on_reactor(reactor, dial.start)
    wait_for(lambda: on_reactor(reactor, lambda: endpoint.state) is FAILED, message="the endpoint ejected")
    advance_to(reactor, reactor.clock.ns + 59 * NS)  # (a tick more than that)
    assert on_reactor(reactor, lambda: endpoint.state) is FAILED
    advance_to(reactor, reactor.clock.ns + 2 * NS)
    wait_for(lambda: on_reactor(reactor, lambda: endpoint.state) is AVAILABLE, message="the penalty over")
    assert endpoint.failures == 0  # one more failure sends it straight back (max_consecutive_failures - 1)
    peer.close()
    holder.close()
