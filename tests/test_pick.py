"""Pure balancing logic: how each loadBalancer kind picks among endpoints (no sockets)."""

import collections
import random

import hypothesis.strategies as st
import pytest
from hypothesis import given

from ltcp.balancer.endpoint import Endpoint
from ltcp.balancer.pick import PICKERS, EwmaPicker, P2cPicker, RoundRobinPicker

loads = st.integers(0, 10_000)
weights = st.floats(0.001, 1000)
pools = st.lists(st.tuples(loads, weights), min_size=1, max_size=20)
kinds = st.sampled_from(sorted(PICKERS))
NOW = 100.0


def endpoints_with(loads_and_weights):
    result = []
    for i, (load, weight) in enumerate(loads_and_weights):
        e = Endpoint("127.0.0.1", 1000 + i, weight)
        e.active = load
        result.append(e)
    return result


def measured(endpoint, rate=0.0, latency=0.0):
    """``endpoint`` with its averages set as of NOW."""
    endpoint.rate, endpoint.rate_at, endpoint.rate_moved = rate, NOW, endpoint.moved
    endpoint.latency, endpoint.latency_at = latency, NOW
    return endpoint


def score(e):
    return e.load / e.effective


@given(kinds, pools, st.integers(0, 50), st.randoms(use_true_random=False))
def test_a_pick_is_a_candidate_with_room_or_none_when_there_is_none(kind, pool, limit, rng):
    endpoints = endpoints_with(pool)
    chosen = PICKERS[kind](endpoints, limit).pick(rng.random, now=NOW)
    with_room = [e for e in endpoints if not limit or e.in_use < limit]
    assert chosen in with_room if with_room else chosen is None


@given(kinds, pools, st.randoms(use_true_random=False))
def test_the_avoided_endpoint_loses_when_there_is_another(kind, pool, rng):
    endpoints = endpoints_with(pool)
    chosen = PICKERS[kind](endpoints).pick(rng.random, avoid=endpoints[0], now=NOW)
    assert chosen is not endpoints[0] or len(endpoints) == 1


@pytest.mark.parametrize("kind", sorted(PICKERS))
def test_no_candidates_give_none(kind):
    assert PICKERS[kind]([]).pick(random.random, now=NOW) is None


@given(pools, st.randoms(use_true_random=False))
def test_p2c_never_picks_the_unique_worst(pool, rng):
    endpoints = endpoints_with(pool)
    chosen = P2cPicker(endpoints).pick(rng.random)
    scores = sorted(map(score, endpoints))
    if len(endpoints) >= 2 and scores[-1] > scores[-2]:
        assert score(chosen) < scores[-1]


@given(loads, loads, weights, weights, loads)
def test_p2c_prefers_less_load_and_more_weight(a_load, b_load, a_weight, b_weight, more):
    """Monotone: more load on ``a`` never makes it win where it lost; more weight never makes it lose."""
    picker = P2cPicker(())
    a, b = endpoints_with([(a_load, a_weight), (b_load, b_weight)])
    before = picker.prefers(a, b, NOW)
    a.active += more
    assert not picker.prefers(a, b, NOW) or before
    a.active -= more
    a.effective = a.weight = a_weight * 2
    assert picker.prefers(a, b, NOW) or not before


def test_p2c_spreads_idle_endpoints_by_weight():
    endpoints = endpoints_with([(0, 1.0), (0, 3.0), (0, 6.0)])
    picker = P2cPicker(endpoints)
    rng = random.Random(42)
    counts = collections.Counter(picker.pick(rng.random).port for _ in range(20_000))
    shares = [counts[e.port] / 20_000 for e in endpoints]
    # Ties go to the first draw, so each share is its chance to be drawn first.
    assert abs(shares[0] - 0.1) < 0.02 and abs(shares[1] - 0.3) < 0.02 and abs(shares[2] - 0.6) < 0.02


def test_p2c_keeps_held_streams_in_proportion_to_weight():
    endpoints = endpoints_with([(0, 1.0), (0, 2.0), (0, 5.0)])
    picker = P2cPicker(endpoints)
    rng = random.Random(7)
    for _ in range(800):  # long-lived streams: each pick adds load
        picker.pick(rng.random).active += 1
    held = [e.active for e in endpoints]
    assert abs(held[0] - 100) <= 10 and abs(held[1] - 200) <= 12 and abs(held[2] - 500) <= 15, held


@pytest.mark.parametrize("kind", ["p2c", "ewma"])
def test_a_serial_client_is_spread_by_weight_though_its_last_stream_is_still_open(kind):
    """Issue 27: 1:3 split 187:213 when the last stream (its client gone, so ending) still counted."""
    light, heavy = endpoints = endpoints_with([(0, 1.0), (0, 3.0)])
    picker = PICKERS[kind](endpoints)
    rng = random.Random(3)
    counts = collections.Counter()
    last = None
    for _ in range(4000):
        chosen = picker.pick(rng.random, now=NOW)
        counts[chosen.port] += 1
        chosen.active += 1
        if last is not None:
            last.active -= 1
            last.ending -= 1
        chosen.ending += 1  # read its line and closed: ending, not yet released at the next pick
        last = chosen
    assert abs(counts[light.port] / 4000 - 0.25) < 0.03, counts


def test_ewma_prefers_less_load_throughput_and_latency_and_more_weight():
    cases = st.tuples(loads, weights, st.floats(0, 1e9), st.floats(0, 10))

    @given(cases, cases, st.integers(1, 100), st.floats(1, 1e9), st.floats(1e-4, 10))
    def monotone(a_case, b_case, more_load, more_rate, more_latency):
        picker = EwmaPicker((), decay=10.0)

        def pair(a_extra=(0, 0.0, 0.0, 0.0)):
            (al, aw, ar, at), (bl, bw, br, bt) = a_case, b_case
            a, b = endpoints_with([(al + a_extra[0], aw + a_extra[3]), (bl, bw)])
            return measured(a, ar + a_extra[1], at + a_extra[2]), measured(b, br, bt)

        before = picker.prefers(*pair(), NOW)
        for worse in [(more_load, 0.0, 0.0, 0.0), (0, more_rate, 0.0, 0.0), (0, 0.0, more_latency, 0.0)]:
            assert not picker.prefers(*pair(worse), NOW) or before, worse
        assert picker.prefers(*pair((0, 0.0, 0.0, a_case[1])), NOW) or not before

    monotone()


def test_ewma_sends_few_new_streams_to_the_endpoint_moving_bulk_data():
    """Issue 27: 4 bulk streams on one endpoint, 4 idle on the other; 60 new streams split about evenly."""
    bulk, idle = endpoints = endpoints_with([(4, 1.0), (4, 1.0)])
    measured(bulk, rate=50e6)
    measured(idle)
    picker = EwmaPicker(endpoints, decay=10.0)
    rng = random.Random(5)
    for _ in range(60):
        picker.pick(rng.random, now=NOW).active += 1
    assert bulk.active - 4 <= 15, (bulk.active, idle.active)


def test_ewma_avoids_an_endpoint_that_connects_slowly_until_its_record_fades():
    slow, fast = endpoints = endpoints_with([(0, 1.0), (0, 1.0)])
    measured(slow, latency=1.0)  # a full accept queue: the SYN went again after a second
    measured(fast, latency=0.0002)
    picker = EwmaPicker(endpoints, decay=1.0)
    rng = random.Random(9)
    for _ in range(12):
        picker.pick(rng.random, now=NOW).active += 1
    assert slow.active == 0, (slow.active, fast.active)
    assert picker.prefers(fast, slow, NOW)  # 12 streams on a fast endpoint beat none on the slow one
    assert picker.prefers(slow, fast, NOW + 30)  # but not once 30 time constants have passed


def test_round_robin_splits_exactly_and_interleaves():
    light, heavy = endpoints = endpoints_with([(0, 1.0), (0, 3.0)])
    picker = RoundRobinPicker(endpoints)
    order = [picker.pick(random.random).port for _ in range(400)]
    assert order.count(light.port) == 100 and order.count(heavy.port) == 300
    assert "".join("l" if p == light.port else "h" for p in order[:8]) == "hlhhhlhh"  # never two of the light one in a row, nor four heavy


def test_round_robin_ignores_load():
    busy, idle = endpoints = endpoints_with([(1000, 1.0), (0, 1.0)])
    picker = RoundRobinPicker(endpoints)
    assert collections.Counter(picker.pick(random.random) for _ in range(10)) == {busy: 5, idle: 5}


@pytest.mark.parametrize("kind", sorted(PICKERS))
def test_full_endpoints_are_passed_over(kind):
    full, roomy = endpoints = endpoints_with([(2, 10.0), (0, 1.0)])
    picker = PICKERS[kind](endpoints, limit=2)
    assert {picker.pick(random.Random(i).random, now=NOW) for i in range(50)} == {roomy}
    roomy.active = 2
    assert picker.pick(random.random, now=NOW) is None
