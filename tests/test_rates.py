"""Rates from the admin server's own samples of the counts: independent of how often anyone asks."""

import pytest

from ltcp.admin.rates import SPAN, STEP, WINDOW, Rates


def rising(rates, per_second, every, until, start=0.0, base=0):
    """Observe a count rising ``per_second`` from ``base``, sampled ``every`` seconds from ``start`` to ``until``."""
    t = start
    while t <= until + 1e-9:
        rates.observe(t, {"k": base + per_second * (t - start)})
        t += every
    return rates


def test_nothing_is_known_before_two_samples():
    rates = Rates()
    assert rates.rate("k") is None and rates.history("k") == []
    rates.observe(0.0, {"k": 5})
    assert rates.rate("k") is None and rates.history("k") == []
    rates.observe(1.0, {"k": 15})
    assert rates.rate("k") == 10.0 and rates.rate("missing") is None


@pytest.mark.parametrize("every", [1.0, 1.3, 2.0, 7.0])
def test_the_rate_does_not_depend_on_the_rhythm_of_the_samples(every):
    """The page once computed rates itself, and showed none when it polled faster than the state's cache."""
    assert rising(Rates(), 100, every, until=60).rate("k") == pytest.approx(100)


def test_the_rate_follows_the_last_window():
    rates = rising(Rates(), 100, 1.0, until=60)  # up to 6000, then 10 a second
    rising(rates, 10, 1.0, start=61, until=61 + 2 * WINDOW, base=6010)
    assert rates.rate("k") == pytest.approx(10)


def test_a_count_that_falls_is_no_increase():
    """A killed worker takes what it counted since the last scrape: never a negative rate."""
    rates = Rates()
    rates.observe(0.0, {"k": 100})
    rates.observe(2.0, {"k": 40})
    assert rates.rate("k") == 0.0 and rates.history("k") == [[0.0, 0.0]]


def test_the_history_has_a_point_per_step_over_its_span():
    rates = rising(Rates(), 50, 1.0, until=3 * SPAN)
    points = rates.history("k")
    assert len(points) == pytest.approx(SPAN / STEP, abs=2)
    assert points[0][0] <= SPAN + STEP and points[-1][0] == 0.0
    assert all(value == pytest.approx(50) for _, value in points)
    assert [ago for ago, _ in points] == sorted((ago for ago, _ in points), reverse=True)


def test_a_key_that_appears_later_has_a_history_from_then():
    rates = Rates()
    rates.observe(0.0, {"old": 0})
    rates.observe(STEP, {"old": 5, "new": 0})
    rates.observe(2 * STEP, {"old": 10, "new": 20})
    assert rates.history("new") == [[0.0, 20 / STEP]] and len(rates.history("old")) == 2
