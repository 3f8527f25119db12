"""Restarting workers: killed from outside (an operator, the OOM killer) vs crashing on their own.

Each test runs ``python -m ltcp FILE`` with two workers and kills them as the outside world would.
"""

import os
import re
import signal
import time

import pytest

from ltcp.process.fleet import crashed_on_its_own
from netutil import echo, wait_for
from test_workers import document, metrics, ping, serving

pytestmark = pytest.mark.timeout(120)


def slots(ltcp):
    """slot -> the pid of the worker last started in it."""
    return {int(slot): int(pid) for pid, slot in re.findall(r"worker (\d+) started \(generation \d+, slot (\d+)\)",
                                                           ltcp.log)}


def serving_count(ltcp):
    return metrics(ltcp)[("ltcp_workers", (("state", "serving"),))]


def test_workers_killed_from_outside_are_restarted_at_once_and_one_always_serves(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    waits, samples = [], []
    for kill in range(20):
        slot = kill % 2
        victim = slots(ltcp)[slot]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # Once the backoff grew to 4 s for both slots at once, and no worker served for seconds.
        while time.monotonic() - killed < 0.3:  # the killer's rhythm; sampled meanwhile
            samples.append(serving_count(ltcp))
            assert samples[-1] >= 1, f"no worker serving after kill {kill + 1}"
        wait_for(lambda slot=slot, victim=victim: slots(ltcp)[slot] != victim and slots(ltcp)[slot] in serving(ltcp),
                 timeout=5,
                 interval=0.02, message=f"slot {slot} to serve again after kill {kill + 1}")
        waits.append(time.monotonic() - killed)
    assert max(waits) < 1.5, waits  # each replaced within the 0.3 s rhythm, give or take a loaded machine
    assert ping(ltcp.port)
    # (admin pages are cached for a second: the last restart may not be in the first scrape after it)
    wait_for(lambda: metrics(ltcp)[("ltcp_worker_restarts_total", ())] == 20, timeout=5,
             message="20 restarts counted")
    assert "restarting it in" not in ltcp.log  # no backoff at all
    print(f"restart after an outside SIGKILL: worst {max(waits):.2f}s; serving sampled {len(samples)} times, "
          f"min {min(samples):g}")


def test_a_worker_crashing_on_its_own_backs_off_and_its_sibling_is_unaffected(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    sibling = slots(ltcp)[1]
    for crash, delay in enumerate(["", " in 0.5s", " in 1s"], start=1):
        victim = slots(ltcp)[0]
        os.kill(victim, signal.SIGSEGV)  # as a crash in the interpreter would end it
        line = f"worker {victim} exited unexpectedly (killed by SIGSEGV); restarting it{delay}\n"
        wait_for(lambda line=line: line in ltcp.log, message=f"crash {crash} to be handled")
        wait_for(lambda victim=victim: slots(ltcp)[0] != victim, timeout=5, message=f"restart after crash {crash}")
    # Killed from outside now, it is back at once: an outside kill does not count as a crash.
    victim = slots(ltcp)[0]
    wait_for(lambda: victim in serving(ltcp), message="the restarted worker to serve")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"worker {victim} exited unexpectedly (killed by SIGKILL); restarting it\n" in ltcp.log,
             message="the kill to be handled")
    assert slots(ltcp)[1] == sibling and sibling in serving(ltcp)


@pytest.mark.parametrize("code, own", [
    (1, True), (2, True), (-signal.SIGSEGV, True), (-signal.SIGABRT, True), (-signal.SIGBUS, True),
    (-signal.SIGILL, True), (-signal.SIGFPE, True),
    (0, False), (-signal.SIGKILL, False), (-signal.SIGTERM, False), (-signal.SIGINT, False),
])
def test_which_exits_are_crashes_of_the_worker_itself(code, own):
    assert crashed_on_its_own(code) is own
