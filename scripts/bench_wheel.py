"""Micro-benchmark: timer wheel schedule, cancel and advance cost with many live timers.

    python scripts/bench_wheel.py [--live N] [--ops N]

Compares with a heapq of (deadline, seq, callback) entries, the usual alternative.
"""

import argparse
import heapq
import itertools
import random
import time

from ltcp.wheel import TimerWheel


class FakeClock:
    now = 0

    def __call__(self):
        return self.now


def per_op(fn, ops):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / ops * 1e9


def bench_wheel(live, ops, rng):
    clock = FakeClock()
    wheel = TimerWheel(clock)
    noop = int
    delays = [rng.uniform(1, 60) for _ in range(ops)]
    base = [wheel.call_later(rng.uniform(1, 60), noop) for _ in range(live)]
    timers = []
    schedule = per_op(lambda: timers.extend(wheel.call_later(d, noop) for d in delays), ops)
    cancel = per_op(lambda: [t.cancel() for t in timers], ops)

    def tick_by_tick():
        for _ in range(ops):
            clock.now += wheel.tick_ns
            wheel.advance()

    advance = per_op(tick_by_tick, ops)
    sleep = per_op(lambda: [wheel.timeout() for _ in range(ops)], ops)
    assert len(wheel) + sum(not t.active for t in base) == live
    return schedule, cancel, advance, sleep


def bench_heap(live, ops, rng):
    heap, seq = [], itertools.count()
    for _ in range(live):
        heapq.heappush(heap, [rng.uniform(1, 60), next(seq), int])
    delays = [rng.uniform(1, 60) for _ in range(ops)]
    entries = []

    def schedule():
        for d in delays:
            entry = [d, next(seq), int]
            heapq.heappush(heap, entry)
            entries.append(entry)

    def cancel():  # lazy deletion, as asyncio does
        for entry in entries:
            entry[2] = None

    return per_op(schedule, ops), per_op(cancel, ops)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--ops", type=int, default=100_000)
    args = parser.parse_args()
    rng = random.Random(1)
    print(f"{'live timers':>12} {'schedule ns':>12} {'cancel ns':>10} {'advance ns/tick':>16} "
          f"{'timeout ns':>11} {'heap push ns':>13} {'heap cancel ns':>15}")
    for live in args.live:
        schedule, cancel, advance, sleep = bench_wheel(live, args.ops, rng)
        heap_push, heap_cancel = bench_heap(live, args.ops, rng)
        print(f"{live:>12,} {schedule:>12.0f} {cancel:>10.0f} {advance:>16.0f} {sleep:>11.0f} "
              f"{heap_push:>13.0f} {heap_cancel:>15.0f}")


if __name__ == "__main__":
    main()
