"""Pure balancing logic: the score and the weighted power-of-two-choices pick."""

import random

import hypothesis.strategies as st
from hypothesis import given

from ltcp.balancer.endpoint import Endpoint, Picker, score

loads = st.integers(0, 10_000)
weights = st.floats(0.001, 1000)


@given(loads, loads, weights)
def test_score_grows_with_load(a, b, w):
    if a < b:
        assert score(a, w) < score(b, w)


@given(loads, weights, weights)
def test_score_never_grows_with_weight(load, w1, w2):
    if w1 < w2:
        assert score(load, w1) >= score(load, w2)


def endpoints_with(loads_and_weights):
    result = []
    for i, (load, weight) in enumerate(loads_and_weights):
        e = Endpoint("127.0.0.1", 1000 + i, weight)
        e.active = load
        result.append(e)
    return result


pools = st.lists(st.tuples(loads, weights), min_size=1, max_size=20)


@given(pools, st.randoms(use_true_random=False))
def test_pick_is_a_candidate_and_never_the_unique_worst(pool, rng):
    endpoints = endpoints_with(pool)
    chosen = Picker(endpoints).pick(rng.random)
    assert chosen in endpoints
    scores = sorted(score(e.load, e.weight) for e in endpoints)
    if len(endpoints) >= 2 and scores[-1] > scores[-2]:
        assert score(chosen.load, chosen.weight) < scores[-1]


@given(pools, st.randoms(use_true_random=False))
def test_avoided_endpoint_loses_when_there_is_another(pool, rng):
    endpoints = endpoints_with(pool)
    avoid = endpoints[0]
    chosen = Picker(endpoints).pick(rng.random, avoid=avoid)
    assert chosen is not avoid or len(endpoints) == 1


def test_empty_picker_gives_none():
    assert Picker([]).pick(random.random) is None


def test_idle_endpoints_are_drawn_by_weight():
    endpoints = endpoints_with([(0, 1.0), (0, 3.0), (0, 6.0)])
    picker = Picker(endpoints)
    rng = random.Random(42)
    counts = {e.port: 0 for e in endpoints}
    for _ in range(20_000):
        counts[picker.pick(rng.random).port] += 1
    shares = [counts[e.port] / 20_000 for e in endpoints]
    # Ties go to the first draw, so each share is its chance to be drawn first.
    assert abs(shares[0] - 0.1) < 0.02 and abs(shares[1] - 0.3) < 0.02 and abs(shares[2] - 0.6) < 0.02


def test_loaded_endpoints_converge_to_load_proportional_to_weight():
    endpoints = endpoints_with([(0, 1.0), (0, 2.0), (0, 5.0)])
    picker = Picker(endpoints)
    rng = random.Random(7)
    for _ in range(800):  # long-lived streams: each pick adds load
        picker.pick(rng.random).active += 1
    loads_ = [e.active for e in endpoints]
    assert abs(loads_[0] - 100) <= 10 and abs(loads_[1] - 200) <= 12 and abs(loads_[2] - 500) <= 15, loads_
