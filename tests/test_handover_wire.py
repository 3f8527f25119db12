"""The hand-over protocol without workers: its messages, hostile bytes, and a new worker that dies at any
point of a hand-over (an old and a new side in this process, on one reactor, over a real socket)."""

import json
import os
import socket
import threading
import types

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from ltcp.dataplane import handover
from ltcp.dataplane.handover import Mover, Receiver
from netutil import echo, static_config, wait_for
from ltcp.dataplane.streamrecord import BATCH, HandOverError, StreamRecord, decode, encode, streams_of

texts = st.text(min_size=1, max_size=40)
addresses = st.tuples(st.sampled_from(["127.0.0.1", "::1", "10.0.0.7"]), st.integers(0, 65535))
times = st.floats(0, 1e9, allow_nan=False)
counts = st.integers(0, 1 << 62)
records = st.builds(StreamRecord, st.integers(0, 1 << 40), texts, addresses, texts, addresses, addresses,
                    st.none() | addresses, times, times, times, st.none() | times, st.none() | times, counts,
                    counts, st.booleans(), st.booleans(), st.booleans(), st.booleans())


@given(st.lists(records, min_size=1, max_size=BATCH))
def test_a_batch_of_records_crosses_as_it_was(batch):
    message = decode(encode({"streams": [list(record) for record in batch]}))
    fds = list(range(100, 100 + 2 * len(batch)))
    assert streams_of(message, fds) == [(record, fds[2 * i], fds[2 * i + 1]) for i, record in enumerate(batch)]


@given(st.binary(max_size=300))
def test_bytes_that_are_no_message_are_refused_cleanly(data):
    try:
        message = decode(data)
        streams_of(message, [])
    except HandOverError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=60)


@given(st.dictionaries(st.sampled_from(["streams", "hello", "adopted"]), json_values, min_size=1, max_size=2),
       st.integers(0, 6))
def test_well_formed_json_that_is_no_batch_is_refused_cleanly(message, descriptors):
    try:
        streams_of(message, list(range(descriptors)))
    except HandOverError:
        pass


def test_descriptors_that_do_not_match_the_records_are_refused():
    record = [0, "r", ["127.0.0.1", 1], "/svc/a", ["127.0.0.1", 2], ["127.0.0.1", 3], None, 1.0, 1.0, 1.0, None,
              None, 0, 0, False, False, False, False]
    assert streams_of({"streams": [record]}, [7, 8])[0][1:] == (7, 8)
    with pytest.raises(HandOverError, match="3 descriptors for 1 streams"):
        streams_of({"streams": [record]}, [7, 8, 9])
    with pytest.raises(HandOverError, match="not an address"):
        streams_of({"streams": [record[:2] + [["127.0.0.1", 70000]] + record[3:]]}, [7, 8])


# -- a hand-over cut at any point ---------------------------------------------------------------------

class OldStream:
    """What the mover needs of a stream (a Duplex's face), on two socketpairs of its own."""

    def __init__(self, number):
        self.number = number
        self.pairs = [socket.socketpair(), socket.socketpair()]
        self.client, self.upstream = (types.SimpleNamespace(fd=pair[0].fileno()) for pair in self.pairs)
        self.envelope = types.SimpleNamespace(source=("127.0.0.1", 40000 + number))
        self.closed, self.movable, self.quiet, self.held = False, True, True, False
        self.resumed = self.let_go = False

    def record(self, stream_id, router, listener):
        return StreamRecord(stream_id, router, listener, "/svc/a", ("127.0.0.1", 9), self.envelope.source, None,
                            1.0, 2.0, 2.0, None, None, self.number, 2 * self.number, False, False, False, False)

    def hold(self, held):
        self.held = held
        self.resumed |= not held

    def close(self):
        for pair in self.pairs:
            for sock in pair:
                sock.close()


class NewStream:
    """What the receiver's side made of an adopted stream."""

    def __init__(self, record, client, upstream):
        self.record, self.socks, self.started = record, (client, upstream), False

    def hold(self, held):
        self.started |= not held

    def dropped(self):
        """Its answer could not be sent: the old side has it, this side closes its copies."""
        assert not self.started
        for sock in self.socks:
            sock.close()


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 2 * BATCH + 30), st.integers(0, 3 * BATCH), st.sets(st.integers(0, 3 * BATCH)))
def test_a_new_worker_dying_at_any_point_leaves_each_stream_to_exactly_one_side(reactor, streams, dies_after,
                                                                                refused):
    """The new side adopts streams until ``dies_after`` of them (refusing those in ``refused``), then dies
    as a killed process would: its sockets closed, nothing said.  Whatever it answered for before is moved
    (the old side lets it go; it started it); everything else is the old side's again, and was never started
    by the new side."""
    before = open_descriptors()
    adopted, offered = [], []

    def adopt(record, client, upstream):
        offered.append(record.id)
        if len(offered) > dies_after:
            die()
            return None
        if record.id in refused:
            return None
        stream = NewStream(record, client, upstream)
        adopted.append(stream)
        return stream

    def die():
        for peer in list(receiver.peers):
            reactor.discard(peer.sock)
            peer.sock.close()
            peer.sock = None
        receiver.peers.clear()
        reactor.discard(receiver.sock)
        receiver.sock.close()
        for stream in adopted:
            for sock in stream.socks:
                sock.close()

    receiver = Receiver(reactor, "s3cret", adopt, lambda stream: stream.dropped())
    old = [OldStream(n) for n in range(streams)]
    listener = types.SimpleNamespace(label="r", address=("127.0.0.1", 7474), streams=set(old))
    outcomes = {}
    moved = set()

    def let_go(listener, stream):
        stream.let_go = True
        moved.add(stream)

    def counted(listener, outcome):
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    mover = Mover(reactor, [listener], [(os.getpid(), "s3cret")], let_go, counted)
    assert mover.start()

    def stop_when_finished():
        if mover.finished:
            reactor.stop()
        else:
            reactor.call_later(0.005, stop_when_finished)

    reactor.call_soon(stop_when_finished)
    reactor.run()
    try:
        assert sum(outcomes.values()) == streams
        started = {stream.record.source[1] - 40000 for stream in adopted if stream.started}  # (stream numbers)
        by_number = {int(s.envelope.source[1]) - 40000: s for s in old}
        for number, stream in by_number.items():
            assert stream.let_go != stream.resumed, number  # exactly one side has it
            assert stream.let_go == (number in started), number  # moved exactly when the new side started it
        assert outcomes.get("moved", 0) == len(started)
    finally:
        if receiver.sock.fileno() >= 0:
            receiver.close()
        for stream in adopted:
            for sock in stream.socks:
                sock.close()
        for stream in old:
            stream.close()
    assert open_descriptors() == before


def test_a_held_stream_outlives_its_idle_limit_while_its_answer_is_awaited(proxies, backends):
    """Found by review: the idle timer closed a stream whose batch was in flight, and the answer then
    released it a second time (and raised on the reactor).  Held, it is the hand-over's to end."""
    proxy = proxies(static_config({"/svc/a": [backends(echo).addr]}, idleTimeoutMs=200))
    client = proxy.connect()
    client.sendall(b"hi")
    assert client.recv(2) == b"hi"
    listener = proxy.listener
    (duplex,) = proxy.call(lambda: list(listener.streams))
    secret = "s3cret"
    new_worker = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    new_worker.bind(handover.socket_name(secret))
    new_worker.listen(1)
    answer, received = threading.Event(), []

    def slow_new_worker():
        conn, _ = new_worker.accept()
        with conn:
            conn.recv(handover.MAX_MESSAGE)  # hello
            data, fds, _, _ = socket.recv_fds(conn, handover.MAX_MESSAGE, 2)
            received.extend(fds)
            answer.wait(10)
            conn.send(json.dumps({"adopted": [json.loads(data)["streams"][0][0]], "refused": []}).encode())
            conn.recv(1)

    thread = threading.Thread(target=slow_new_worker, daemon=True)
    thread.start()
    proxy.call(proxy.app.drain, [(os.getpid(), secret)])
    wait_for(lambda: received, message="the batch to arrive")
    idle_until = proxy.call(lambda: duplex.last_active + 0.2)
    wait_for(lambda: proxy.call(proxy.app.reactor.time) > idle_until + 0.1, message="its idle limit to pass")
    assert proxy.call(lambda: not duplex.closed)
    answer.set()
    proxy.thread.join(10)  # (its last stream gone, the drained app stops)
    assert not proxy.thread.is_alive()
    assert (listener.handed_over["moved"], listener.active, dict(listener.endings), proxy.app.budget.used) == \
        (1, 0, {}, 0)
    thread.join(10)
    new_worker.close()
    client.close()
    for fd in received:
        os.close(fd)
