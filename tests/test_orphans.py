"""Workers never outlive their supervisor, however early in their start it dies."""

import os
import re
import signal
import subprocess
import sys

import pytest

from netutil import LtcpProcess, echo, wait_for
from test_workers import alive, document

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("attempt", range(5))
def test_a_replacement_worker_ends_when_the_supervisor_dies_while_it_starts(backends, attempt):
    """SIGKILL a worker, then the supervisor while the replacement starts: a replacement once
    logged "drain finished" and then sat in epoll_wait for ever, deaf to SIGTERM."""
    backend = backends(echo)
    ltcp = LtcpProcess(document(backend, workers=2))
    try:
        first, second = ltcp.workers
        slot = re.search(rf"worker {first} started \(generation 1, slot (\d)\)", ltcp.log).group(1)
        os.kill(first, signal.SIGKILL)
        started = wait_for(lambda: re.findall(rf"worker (\d+) started \(generation 1, slot {slot}\)", ltcp.log)[1:],
                           timeout=30, message="the replacement to start")
        replacement = int(started[0])
        ltcp.proc.kill()
        ltcp.proc.wait(10)
        wait_for(lambda: not alive(second) and not alive(replacement), timeout=5,
                 message="every worker to end after the supervisor died")
    finally:
        for pid in ltcp.workers + [int(p) for p in re.findall(r"worker (\d+) started", ltcp.log)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        ltcp.stop()


def test_the_parent_death_signal_reaches_a_process_that_asked_for_it():
    """``die_with``: killing the parent (SIGKILL: no channel, no goodbye) ends the child at once."""
    child_code = ("import os, sys, time; from ltcp.process.lifeline import die_with; die_with(os.getppid()); "
                  "print(os.getpid(), flush=True); time.sleep(60)")
    parent_code = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                   "p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not alive(child), timeout=5, message="the child to get SIGTERM")
    finally:
        parent.kill()
        parent.wait(10)
        parent.stdout.close()
