"""The reactor: readiness, deferred calls, timers, cross-thread wakeups."""

import logging
import os
import select
import socket
import threading

import pytest

from ltcp.loop import READ, WRITE, Reactor


class RecordingPoller:
    """A real epoll, remembering every timeout it was asked to sleep for (-1: forever)."""

    def __init__(self):
        self.epoll = select.epoll()
        self.timeouts = []

    def poll(self, timeout, maxevents):
        self.timeouts.append(timeout)
        return self.epoll.poll(timeout, maxevents)

    def __getattr__(self, name):
        return getattr(self.epoll, name)


def test_call_soon_runs_in_order_and_stop_ends_run(reactor):
    seen = []
    reactor.call_soon(seen.append, 1)
    reactor.call_soon(seen.append, 2)
    reactor.call_soon(reactor.stop)
    reactor.run()
    assert seen == [1, 2]


def test_call_later_fires_after_its_delay(reactor):
    start = reactor.time()
    fired = []
    reactor.call_later(0.05, lambda: (fired.append(reactor.time()), reactor.stop()))
    cancelled = reactor.call_later(0.01, fired.append, "never")
    cancelled.cancel()
    reactor.run()
    assert len(fired) == 1 and fired[0] - start >= 0.05


def test_select_sleeps_until_the_next_timer_and_forever_when_idle():
    selector = RecordingPoller()
    reactor = Reactor(poller=selector)
    try:
        reactor.call_later(0.25, reactor.stop)
        reactor.run()
        # Woken by the timer, not by polling: a handful of selects at most.
        assert len(selector.timeouts) <= 3
        assert 0.2 <= selector.timeouts[0] <= 0.26

        selector.timeouts.clear()
        thread = threading.Thread(target=reactor.run)
        thread.start()
        waker = threading.Timer(0.1, reactor.call_soon_threadsafe, (reactor.stop,))
        waker.start()
        thread.join(5)
        waker.join()
        assert selector.timeouts[0] == -1
        assert len(selector.timeouts) <= 2
    finally:
        reactor.close()


def test_idle_reactor_uses_no_cpu():
    """Over half a second with one timer far away the loop stays asleep."""
    reactor = Reactor()
    usage = []
    reactor.call_later(60, lambda: None)
    reactor.call_soon(lambda: usage.append(os.times()))
    reactor.call_later(0.5, lambda: (usage.append(os.times()), reactor.stop()))
    try:
        reactor.run()
    finally:
        reactor.close()
    before, after = usage
    assert (after.user - before.user) + (after.system - before.system) < 0.05


def test_threadsafe_calls_from_many_threads_all_run(running_reactor):
    done = threading.Event()
    count = []
    total = 8 * 2000

    def bump():
        count.append(1)
        if len(count) == total:
            done.set()

    def producer():
        for _ in range(2000):
            running_reactor.call_soon_threadsafe(bump)

    threads = [threading.Thread(target=producer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert done.wait(10)
    assert len(count) == total


def test_wakeups_coalesce_and_never_block(reactor):
    """Without a running loop, 100,000 wakeups leave one byte in the pipe."""
    for _ in range(100_000):
        reactor.call_soon_threadsafe(lambda: None)
    assert os.read(reactor._wake_r, 65536) == b"\0"


@pytest.mark.allow_errors
def test_failing_callbacks_are_logged_and_the_loop_goes_on(reactor, caplog):
    seen = []
    reactor.call_soon(lambda: 1 / 0)
    reactor.call_later(0, lambda: {}["missing"])
    reactor.call_later(0.02, lambda: (seen.append("after"), reactor.stop()))
    with caplog.at_level(logging.ERROR, logger="ltcp"):
        reactor.run()
    assert seen == ["after"]
    messages = "\n".join(r.getMessage() + str(r.exc_info) for r in caplog.records)
    assert "ZeroDivisionError" in messages and "KeyError" in messages


def test_readiness_dispatch_and_modify(reactor):
    a, b = socket.socketpair()
    a.setblocking(False)
    got = []

    def on_event(mask):
        if mask & READ:
            got.append(a.recv(100))
            reactor.modify(a, WRITE, on_event)
        else:
            got.append("writable")
            reactor.unregister(a)
            reactor.stop()

    try:
        reactor.register(a, READ, on_event)
        b.send(b"ping")
        reactor.run()
        assert got == [b"ping", "writable"]
    finally:
        a.close()
        b.close()


def test_a_forgotten_socket_leaves_the_epoll_set_when_closed(reactor):
    """``forget`` spares the ``epoll_ctl`` a close does anyway: once the socket is closed, its peer's bytes
    wake nobody; while another descriptor of it is open, they still would, which is why a socket handed to
    another process is unregistered instead."""
    a, b = socket.socketpair()
    reactor.register(a, READ, lambda mask: None)
    reactor.forget(a.fileno())
    kept = os.dup(a.fileno())
    a.close()
    try:
        b.send(b"ping")
        assert reactor._poller.poll(0, 8), "a descriptor left open keeps the registration"
        os.close(kept)
        assert reactor._poller.poll(0, 8) == []
    finally:
        b.close()


class Broken:
    """An object whose callbacks raise, recording what the reactor tells it."""

    def __init__(self):
        self.calls = 0
        self.crashes = []

    def on_event(self, mask):
        self.calls += 1
        raise RuntimeError("bug")

    def later(self):
        self.calls += 1
        raise RuntimeError("bug in a timer")

    def crashed(self, exc):
        self.crashes.append(str(exc))


@pytest.mark.allow_errors
def test_a_failing_io_callback_is_told_and_never_fires_again(reactor, caplog):
    a, b = socket.socketpair()
    broken = Broken()
    reactor.register(a, READ, broken.on_event)
    b.send(b"x")  # stays unread: level-triggered readiness would fire on every turn
    turns = []
    for i in range(5):
        reactor.call_later(0.01 * (i + 1), turns.append, i)
    reactor.call_later(0.06, reactor.stop)
    reactor.run()
    assert broken.calls == 1 and broken.crashes == ["bug"] and turns == [0, 1, 2, 3, 4]
    assert [r.levelno for r in caplog.records if r.name == "ltcp.loop"] == [logging.ERROR]
    a.close()
    b.close()


@pytest.mark.allow_errors
def test_failing_timers_and_soon_calls_are_reported_to_their_object(reactor):
    broken = Broken()
    reactor.call_later(0.01, broken.later)
    reactor.call_soon(broken.later)
    reactor.call_later(0.03, reactor.stop)
    reactor.run()
    assert broken.crashes == ["bug in a timer", "bug in a timer"]


def test_a_stop_before_run_is_not_lost(reactor):
    """A worker that drained before its loop started (its supervisor gone) then ran for ever."""
    reactor.stop()
    reactor.run()  # returns at once: the timeout guards against the old behaviour
    fired = []
    reactor.call_soon(lambda: (fired.append(1), reactor.stop()))
    reactor.run()  # a later run is a normal one
    assert fired == [1]
