import hypothesis.strategies as st
from hypothesis import given

from ltcp.histogram import Histogram


@given(st.lists(st.floats(0, 1e6, allow_nan=False), max_size=200))
def test_cumulative_counts_match_the_observations(values):
    bounds = (0.1, 1.0, 10.0, 1000.0)
    h = Histogram(bounds)
    for v in values:
        h.observe(v)
    cumulative = h.cumulative()
    assert [b for b, _ in cumulative] == [*bounds, float("inf")]
    for bound, count in cumulative:
        assert count == sum(1 for v in values if v <= bound)
    assert h.count == len(values)
    assert abs(h.sum - sum(values)) <= 1e-6 * max(1.0, sum(values))
    snapshot = h.copy()
    h.observe(5.0)
    assert snapshot.count == len(values)
