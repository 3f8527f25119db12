"""The arithmetic of load: moving averages, the ewma score and the slow-start ramp (no sockets)."""

import math

import hypothesis.strategies as st
from hypothesis import given

from ltcp.balancer.load import LATENCY_FLOOR, MIN_RAMP, RATE_FLOOR, decayed_rate, ewma_score, peak_ewma, ramp

rates = st.floats(0, 1e10)
seconds = st.floats(1e-3, 1e3)
latencies = st.floats(0, 60)
loads = st.integers(0, 100_000)
weights = st.floats(0.001, 1000)


@given(rates, st.floats(0, 1e12), seconds, seconds)
def test_a_rate_moves_toward_what_was_measured_and_no_further(rate, moved, elapsed, decay):
    measured = moved / elapsed
    after = decayed_rate(rate, moved, elapsed, decay)
    assert min(rate, measured) * (1 - 1e-9) <= after <= max(rate, measured) * (1 + 1e-9)


def test_a_steady_rate_is_learned_and_forgotten():
    rate = 0.0
    for _ in range(100):  # 10 s of 1 MB/s, sampled every 0.1 s, with a 1 s time constant
        rate = decayed_rate(rate, 100_000, 0.1, 1.0)
    assert abs(rate - 1e6) < 1e3
    for _ in range(50):  # then 5 s of nothing
        rate = decayed_rate(rate, 0, 0.1, 1.0)
    assert rate < 1e6 * math.exp(-5) * 1.01


@given(latencies, latencies, seconds, seconds)
def test_a_slower_connect_is_taken_at_once_and_a_faster_one_averaged_in(average, sample, elapsed, decay):
    after = peak_ewma(average, sample, elapsed, decay)
    faded = peak_ewma(average, None, elapsed, decay)
    assert 0 <= faded <= average
    if sample >= faded:
        assert after == sample
    else:
        assert sample <= after <= faded


@given(latencies, seconds, seconds, seconds)
def test_a_latency_record_fades_with_time(average, first, later, decay):
    assert peak_ewma(average, None, first + later, decay) <= peak_ewma(average, None, first, decay)


@given(loads, weights, rates, latencies, rates, latencies, loads)
def test_the_ewma_score_grows_with_load_throughput_and_latency(load, weight, rate, latency, per_weight, fastest,
                                                                more):
    base = ewma_score(load, weight, rate, latency, per_weight, fastest)
    assert ewma_score(load + more, weight, rate, latency, per_weight, fastest) >= base
    assert ewma_score(load, weight, rate * 2 + 1, latency, per_weight, fastest) >= base
    assert ewma_score(load, weight, rate, latency * 2 + 1e-3, per_weight, fastest) >= base


@given(loads, weights, weights, rates, latencies, rates, latencies)
def test_the_ewma_score_falls_with_weight(load, w1, w2, rate, latency, per_weight, fastest):
    low, high = sorted((w1, w2))
    assert ewma_score(load, high, rate, latency, per_weight, fastest) <= \
        ewma_score(load, low, rate, latency, per_weight, fastest) * (1 + 1e-9) + 1e-12


@given(loads, weights, latencies)
def test_an_endpoint_with_its_share_of_bytes_and_the_fastest_connects_scores_as_in_p2c(load, weight, latency):
    per_weight = 10 * RATE_FLOOR
    score = ewma_score(load, weight, per_weight * weight, latency, per_weight, latency)
    assert math.isclose(score, load / weight, rel_tol=1e-9, abs_tol=1e-9)


def test_twice_its_share_of_bytes_counts_four_times_and_slow_connects_count_in_proportion():
    assert ewma_score(3, 1.0, 4 * RATE_FLOOR, 0.0, 2 * RATE_FLOOR, 0.0) == (4 * 4 - 1)
    slowness = (1.0 + LATENCY_FLOOR) / (0.001 + LATENCY_FLOOR)
    assert math.isclose(ewma_score(0, 1.0, 0.0, 1.0, 0.0, 0.001), slowness - 1)
    assert slowness > 19


def test_traffic_below_the_floor_says_nothing():
    assert ewma_score(2, 1.0, RATE_FLOOR / 2, 0.0, RATE_FLOOR / 4, 0.0) == 2


@given(st.floats(0, 1e4), st.floats(0, 1e4), st.floats(0, 1e3))
def test_a_slow_start_ramps_from_a_tenth_to_all_of_the_weight(t1, t2, slow_start):
    early, late = sorted((t1, t2))
    assert MIN_RAMP <= ramp(early, slow_start) <= ramp(late, slow_start) <= 1.0
    if late >= slow_start:
        assert ramp(late, slow_start) == 1.0


def test_no_slow_start_is_full_weight_at_once():
    assert ramp(0.0, 0.0) == 1.0
