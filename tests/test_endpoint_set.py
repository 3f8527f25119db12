"""The endpoint set without sockets, reactor or clock: any sequence of discovery updates,
connect outcomes, penalties ending, streams coming, ending and going, and slow starts keeps its invariants."""

import random

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ltcp.config import Address
from ltcp.balancer.endpoint import AVAILABLE, ENDPOINT, FAILED, RETIRED, Endpoint, EndpointSet
from ltcp.balancer.load import MIN_RAMP
from ltcp.lifecycle import IllegalMove

UNIVERSE = [Address("127.0.0.1", port, weight) for port, weight in zip(range(1, 9), (1, 2, 1, 3, 1, 1, 5, 1))]
MAX_FAILURES = 2
SLOW_START = 1.0


class EndpointSetMachine(RuleBasedStateMachine):
    """Drives an EndpointSet as a balancer would, and checks it after every step."""

    def __init__(self):
        super().__init__()
        self.set = EndpointSet(MAX_FAILURES, slow_start=SLOW_START)
        self.now = 0.0
        self.open = []  # [endpoint, ending] per stream
        self.connecting = []  # endpoints with a connect in flight, one entry per connect
        self.known = set()  # every Endpoint object the set ever handed out

    def _all(self):
        return list(self.set.endpoints.values()) + list(self.set.retired.values())

    @rule(chosen=st.lists(st.sampled_from(UNIVERSE), unique=True, max_size=len(UNIVERSE)))
    def discovery_answers(self, chosen):
        fresh = {}
        self.set.collect(chosen, fresh, self.now)
        before = {key: e for key, e in self.set.endpoints.items()}
        serving = any(e.state is AVAILABLE for e in before.values())
        added, removed = self.set.replace(fresh, self.now)
        assert {e.sockaddr for e in removed} == set(before) - set(fresh)
        for endpoint in removed:  # retired, and kept only while something runs on it
            assert endpoint.state is RETIRED
            assert (endpoint.sockaddr in self.set.retired) == bool(endpoint.in_use)
        for key in set(fresh) - set(before):  # a newcomer beside serving endpoints starts slowly
            assert (fresh[key] in self.set.ramping) == serving
        self.known.update(fresh.values())

    @precondition(lambda self: self.set.endpoints)
    @rule(data=st.data())
    def a_connect_begins(self, data):
        endpoint = self.set.picker.pick(random.Random(data.draw(st.integers())).random, now=self.now)
        endpoint.begin_connect()
        self.connecting.append(endpoint)

    @precondition(lambda self: self.connecting)
    @rule(data=st.data(), succeeds=st.booleans())
    def a_connect_ends(self, data, succeeds):
        endpoint = self.connecting.pop(data.draw(st.integers(0, len(self.connecting) - 1)))
        endpoint.end_connect()  # the balancer's order: the connect is over before its stream opens
        if succeeds:  # no settling in between: the stream is about to run on it
            self.set.connect_succeeded(endpoint)
            endpoint.acquire()
            self.open.append([endpoint, False])
        else:
            self.set.connect_failed(endpoint)
            self.set.settle(endpoint)
        if endpoint.state is RETIRED:
            assert (endpoint.sockaddr in self.set.retired) == (endpoint.in_use > 0)

    @precondition(lambda self: any(not ending for _, ending in self.open))
    @rule(data=st.data())
    def one_side_of_a_stream_finishes(self, data):
        stream = data.draw(st.sampled_from([s for s in self.open if not s[1]]))
        stream[0].ending += 1
        stream[1] = True

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def a_stream_ends(self, data):
        endpoint, ending = self.open.pop(data.draw(st.integers(0, len(self.open) - 1)))
        was_retired = endpoint.state is RETIRED
        endpoint.release(ending)
        self.set.settle(endpoint)
        if was_retired:  # gone exactly when its last stream ended, ending or not
            assert (endpoint.sockaddr in self.set.retired) == (endpoint.in_use > 0)

    @rule(seconds=st.floats(0.01, 2 * SLOW_START))
    def time_passes(self, seconds):
        self.now += seconds
        self.set.ramp_step(self.now)

    @precondition(lambda self: self.set.endpoints)
    @rule(data=st.data())
    def a_connect_fails(self, data):
        endpoint = data.draw(st.sampled_from(sorted(self.set.endpoints.values(), key=lambda e: e.port)))
        endpoint.begin_connect()
        was = endpoint.state
        endpoint.end_connect()
        ejected = self.set.connect_failed(endpoint)
        self.set.settle(endpoint)
        assert ejected == (was is AVAILABLE and endpoint.failures >= MAX_FAILURES)

    @precondition(lambda self: self.set.ejected)
    @rule(data=st.data())
    def a_penalty_ends(self, data):
        endpoint = data.draw(st.sampled_from(sorted(self.set.ejected, key=lambda e: e.port)))
        self.set.revive(endpoint, self.now)
        assert endpoint.state is AVAILABLE and endpoint.failures == MAX_FAILURES - 1
        assert endpoint in self.set.ramping and endpoint.effective == MIN_RAMP * endpoint.weight

    @invariant()
    def states_and_collections_agree(self):
        for endpoint in self.set.endpoints.values():
            assert endpoint.state in (AVAILABLE, FAILED)
            assert (endpoint.state is FAILED) == (endpoint in self.set.ejected)  # never both
        for endpoint in self.set.retired.values():
            assert endpoint.state is RETIRED and endpoint.in_use > 0
        assert self.set.ejected <= set(self.set.endpoints.values())

    @invariant()
    def nothing_with_load_is_lost(self):
        """An endpoint something runs on stays reachable, so its counts can still come back down."""
        for endpoint in self.known:
            if endpoint.in_use:
                assert (self.set.endpoints.get(endpoint.sockaddr) is endpoint
                        or self.set.retired.get(endpoint.sockaddr) is endpoint)

    @invariant()
    def the_picker_offers_only_usable_endpoints_unless_all_failed(self):
        offered = set(self.set.picker.candidates)
        usable = {e for e in self.set.endpoints.values() if e.state is AVAILABLE}
        assert offered == (usable or set(self.set.endpoints.values()))

    @invariant()
    def counts_are_never_negative_and_match_the_streams(self):
        for endpoint in self.known:
            assert endpoint.active >= endpoint.ending >= 0 and endpoint.pending >= 0
        assert sum(e.active for e in self.known) == len(self.open)
        assert sum(e.ending for e in self.known) == sum(ending for _, ending in self.open)
        assert sum(e.pending for e in self.known) == len(self.connecting)
        counts = self.set.counts()
        assert sum(counts.values()) == len(self.set.endpoints) + len(self.set.retired)

    @invariant()
    def a_slow_start_gives_a_share_of_the_weight_until_it_is_over(self):
        assert self.set.ramping <= set(self.set.endpoints.values())
        for endpoint in self.set.endpoints.values():
            assert (endpoint.since is not None) == (endpoint in self.set.ramping)
            if endpoint.since is None:
                assert endpoint.effective == endpoint.weight
            else:
                assert MIN_RAMP * endpoint.weight <= endpoint.effective < endpoint.weight
                assert self.now - endpoint.since < SLOW_START


EndpointSetMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_endpoint_set_invariants = EndpointSetMachine.TestCase


def test_illegal_moves_are_refused():
    endpoint = Endpoint("127.0.0.1", 1)
    with pytest.raises(IllegalMove, match="Endpoint: no move .revive. from available"):
        endpoint.move("revive")
    endpoint.move("retire")
    with pytest.raises(IllegalMove):
        endpoint.move("eject")
    with pytest.raises(RuntimeError, match="never acquired"):
        endpoint.release()
    with pytest.raises(RuntimeError, match="never began"):
        endpoint.end_connect()
    assert "| available | eject | failed |" in ENDPOINT.describe()
