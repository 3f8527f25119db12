"""Property tests of the timer wheel on an injected clock."""

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ltcp.wheel import TimerWheel

TICK = 10_000_000  # 10 ms in ns
SLOTS = 16  # small, so that revolutions wrap often
REVOLUTION = TICK * SLOTS


class FakeClock:
    def __init__(self, now=0):
        self.now = now

    def __call__(self):
        return self.now


class Record:
    """What the test knows about one timer."""

    def __init__(self, when, scheduled_at):
        self.when = when
        self.scheduled_at = scheduled_at
        self.cancelled = False
        self.fired_at = []
        self.timer = None


class WheelMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = FakeClock(7 * TICK + 3)
        self.wheel = TimerWheel(self.clock, tick=TICK / 1e9, slots=SLOTS)
        self.records = []

    def _schedule(self, delay, action=None):
        record = Record(self.clock.now + delay, self.clock.now)
        record.timer = self.wheel.call_at(record.when, self._fired, record, action)
        self.records.append(record)
        return record

    def _fired(self, record, action):
        record.fired_at.append(self.clock.now)
        if action:
            action()

    def _pending(self):
        return [r for r in self.records if not r.cancelled and not r.fired_at]

    @rule(delay=st.integers(-TICK, 3 * REVOLUTION))
    def schedule(self, delay):
        self._schedule(delay)

    @precondition(lambda self: self.records)
    @rule(data=st.data())
    def cancel(self, data):
        record = data.draw(st.sampled_from(self.records))
        if not record.fired_at:
            record.cancelled = True
        record.timer.cancel()

    @precondition(lambda self: self.records)
    @rule(data=st.data(), delay=st.integers(0, 2 * REVOLUTION))
    def schedule_nested(self, data, delay):
        """A callback that schedules a new timer and cancels another one."""
        victim = data.draw(st.sampled_from(self.records))

        def action():
            self._schedule(delay)
            if not victim.fired_at:
                victim.cancelled = True
            victim.timer.cancel()

        self._schedule(data.draw(st.integers(0, REVOLUTION)), action)

    @rule(delay=st.integers(0, REVOLUTION), gap=st.integers(0, TICK))
    def schedule_cancelling_pair(self, delay, gap):
        """A callback that cancels a timer due in the same tick or just after it."""
        later = []

        def action():
            if not later[0].fired_at:
                later[0].cancelled = True
            later[0].timer.cancel()

        self._schedule(delay, action)
        later.append(self._schedule(delay + gap))

    @rule(step=st.one_of(st.integers(0, 2 * TICK), st.integers(0, 3 * REVOLUTION)))
    def advance(self, step):
        self.clock.now += step
        self.wheel.advance()

    @rule()
    def sleep_as_told(self):
        """The reactor's way: sleep for timeout(), then advance."""
        timeout = self.wheel.timeout()
        if timeout is not None:
            self.clock.now += round(timeout * 1e9)
            self.wheel.advance()

    @invariant()
    def timeout_never_oversleeps(self):
        """Sleeping for timeout() never passes the tick at which a pending timer is due."""
        timeout = self.wheel.timeout()
        pending = self._pending()
        if not pending:
            assert timeout is None
            return
        next_tick = self.clock.now // TICK + 1
        due = min(max(-(-r.when // TICK), next_tick) for r in pending) * TICK
        assert self.clock.now + timeout * 1e9 <= due + 1000  # (float seconds)

    @invariant()
    def never_early(self):
        for r in self.records:
            assert all(t >= r.when for t in r.fired_at)

    @invariant()
    def at_most_one_tick_late(self):
        for r in self._pending():
            assert self.clock.now < max(r.when, r.scheduled_at) + TICK

    @invariant()
    def cancelled_never_fire_and_none_twice(self):
        for r in self.records:
            assert len(r.fired_at) <= 1
            if r.cancelled:
                assert not r.fired_at

    @invariant()
    def count_matches(self):
        assert len(self.wheel) == len(self._pending())

    @invariant()
    def only_slots_with_timers_are_kept(self):
        """An emptied slot is dropped (memory), and the bitmap names exactly the slots that hold timers."""
        held = {index for index, slot in enumerate(self.wheel._slots) if slot is not None}
        assert all(self.wheel._slots[index] for index in held)
        assert self.wheel._occupied == sum(1 << index for index in held)
        assert sum(len(self.wheel._slots[index]) for index in held) == len(self._pending())


WheelMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestWheel = WheelMachine.TestCase


def test_thousands_of_equal_deadlines_fire_once():
    clock = FakeClock(0)
    wheel = TimerWheel(clock, tick=TICK / 1e9, slots=SLOTS)
    fired = []
    for i in range(5000):
        wheel.call_at(REVOLUTION * 2 + 5, fired.append, i)
    clock.now = REVOLUTION * 2
    assert wheel.advance() == 0
    clock.now = REVOLUTION * 2 + TICK
    assert wheel.advance() == 5000
    assert sorted(fired) == list(range(5000))
    assert len(wheel) == 0 and wheel.next_tick() is None


def test_cancel_twice_and_after_firing_is_harmless():
    clock = FakeClock(0)
    wheel = TimerWheel(clock, tick=TICK / 1e9, slots=SLOTS)
    fired = []
    a = wheel.call_at(TICK, fired.append, "a")
    b = wheel.call_at(TICK, fired.append, "b")
    a.cancel()
    a.cancel()
    clock.now = TICK
    wheel.advance()
    b.cancel()
    assert fired == ["b"] and len(wheel) == 0


def test_timeout_is_next_occupied_tick():
    clock = FakeClock(0)
    wheel = TimerWheel(clock, tick=TICK / 1e9, slots=SLOTS)
    assert wheel.timeout() is None
    wheel.call_at(5 * TICK + 1, lambda: None)
    assert wheel.timeout() == 6 * TICK / 1e9
    far = wheel.call_at(3 * REVOLUTION, lambda: None)
    assert wheel.timeout() == 6 * TICK / 1e9
    clock.now = 6 * TICK
    wheel.advance()
    # Only `far` is left; its slot comes round before its revolution does,
    # so the wheel may wake early but never late.
    assert 0 < wheel.timeout() <= (3 * REVOLUTION - 6 * TICK) / 1e9
    far.cancel()
    assert wheel.timeout() is None


def test_failing_callback_does_not_stop_the_others():
    clock = FakeClock(0)
    errors, fired = [], []
    wheel = TimerWheel(clock, tick=TICK / 1e9, slots=SLOTS,
                       on_error=lambda timer, exc: errors.append(exc))
    wheel.call_at(TICK, lambda: 1 / 0)
    wheel.call_at(TICK, fired.append, 1)
    clock.now = TICK
    assert wheel.advance() == 2
    assert fired == [1] and isinstance(errors[0], ZeroDivisionError)
