"""A worker gives freed C heap back: only after streams ended, at most once a period, and for real."""

import subprocess
import sys

import pytest

from ltcp.dataplane.heaptrim import HeapTrim, malloc_trim
from ltcp.loop import Reactor
from netutil import run_reactor_until

pytestmark = pytest.mark.timeout(30)


def test_trims_once_a_period_and_only_after_streams_ended():
    reactor = Reactor()
    ended = [0]
    trims = []
    looks = []

    def count_ended():
        looks.append(reactor.time())
        return ended[0]

    HeapTrim(reactor, count_ended, lambda: trims.append(ended[0]), period=0.05)
    try:
        run_reactor_until(reactor, lambda: len(looks) >= 4)  # the first look is at start
        assert trims == []  # nothing ended: nothing freed, nothing to trim
        ended[0] = 3
        run_reactor_until(reactor, lambda: trims)
        assert trims == [3]
        seen = len(looks)
        run_reactor_until(reactor, lambda: len(looks) >= seen + 3)
        assert trims == [3]  # once for those three, not on every look after
        ended[0] = 4
        run_reactor_until(reactor, lambda: len(trims) == 2)
        assert trims == [3, 4]
        assert all(b - a >= 0.05 for a, b in zip(looks[1:], looks[2:]))  # a look a period at most
    finally:
        reactor.close()


FREED_HEAP = """
import os, sys
from ltcp.dataplane.heaptrim import malloc_trim

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

chunks = [bytes(2000) for _ in range(20000)]  # 40 MB from malloc (too large for Python's own allocator)
last = chunks[-1]
del chunks  # freed, but below a live chunk: glibc keeps it
before = resident()
malloc_trim()()
print(before - resident())
"""


@pytest.mark.skipif(malloc_trim() is None, reason="this C library has no malloc_trim (not glibc)")
def test_trimming_gives_freed_heap_back():
    out = subprocess.run([sys.executable, "-c", FREED_HEAP], capture_output=True, text=True, timeout=20, check=True)
    assert int(out.stdout) > 20 << 20, out
