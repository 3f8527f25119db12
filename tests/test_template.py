"""Workers forked from the template: the supervisor's children, and a fresh interpreter when the template fails."""

import os
import re
import signal

import pytest

from netutil import LtcpProcess, echo, wait_for
from test_workers import alive, document, reload_via_sighup, serving

pytestmark = pytest.mark.timeout(120)


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def command(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def templates(ltcp):
    return [int(pid) for pid in re.findall(r"worker template (\d+) started", ltcp.log)]


def replace_a_worker(ltcp):
    """Kill the first worker; the pid of the one that replaces it."""
    killed = ltcp.workers[0]
    slot = re.search(rf"worker {killed} started \(generation 1, slot (\d)\)", ltcp.log).group(1)
    os.kill(killed, signal.SIGKILL)
    started = wait_for(lambda: re.findall(rf"worker (\d+) started \(generation 1, slot {slot}\)", ltcp.log)[1:],
                       timeout=30, message="the replacement to start")
    replacement = int(started[0])
    wait_for(lambda: f"worker {replacement} (generation 1) serving" in ltcp.log, message="it to serve")
    return replacement


@pytest.fixture
def ltcp(backends):
    process = LtcpProcess(document(backends(echo), workers=2))
    yield process
    process.stop()


def test_workers_are_forks_of_the_template_and_children_of_the_supervisor(ltcp):
    template, = templates(ltcp)
    assert parent(template) == ltcp.proc.pid
    assert command(template) == command(ltcp.proc.pid)  # the first template is a fork of the supervisor
    for pid in ltcp.workers:
        assert parent(pid) == ltcp.proc.pid
        assert command(pid) == command(template)  # a fork, never an exec: the pages, shared


def test_the_template_starts_as_a_new_program_would(ltcp):
    """A fork of the supervisor, it holds none of its descriptors, and a signal meant for it is not the
    supervisor's to handle: SIGTERM ends it."""
    template, = templates(ltcp)
    held = {int(fd): os.readlink(f"/proc/{template}/fd/{fd}") for fd in os.listdir(f"/proc/{template}/fd")}
    assert len(held) == 4 and {0, 1, 2} < set(held), held  # stdio and its channel: a socket
    (channel,) = (target for fd, target in held.items() if fd > 2)
    assert channel.startswith("socket:")
    os.kill(template, signal.SIGTERM)
    wait_for(lambda: not alive(template), message="the template to exit")
    assert alive(ltcp.proc.pid) and all(map(alive, ltcp.workers))


def test_a_killed_template_is_started_again_for_the_next_worker(ltcp):
    first, = templates(ltcp)
    os.kill(first, signal.SIGKILL)
    replacement = replace_a_worker(ltcp)
    second = templates(ltcp)[-1]
    assert second != first and alive(second) and not alive(first)
    # With the supervisor's threads running, the new template is a new interpreter, and the worker its fork.
    assert "ltcp.process.template" in command(second)
    assert command(replacement) == command(second) and parent(replacement) == ltcp.proc.pid


def test_a_template_that_hangs_is_replaced_and_the_worker_starts_anyway(ltcp):
    """A template that does not answer within 2 s: the worker starts as a fresh interpreter."""
    stuck, = templates(ltcp)
    os.kill(stuck, signal.SIGSTOP)
    try:
        replacement = replace_a_worker(ltcp)
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGCONT)
    assert "starting the worker as a new interpreter" in ltcp.log
    assert "ltcp.worker" in command(replacement) and parent(replacement) == ltcp.proc.pid
    wait_for(lambda: not alive(stuck), message="the stuck template to be killed")


def test_a_template_that_hangs_while_preparing_a_generation_is_replaced_and_the_reload_serves(instances, backends):
    """Once the preparation of a generation's TLS contexts failed, the worker was asked of a closed template."""
    ltcp = instances(document(backends(echo), workers=2))
    stuck, = templates(ltcp)
    os.kill(stuck, signal.SIGSTOP)
    try:
        reload_via_sighup(ltcp, expect=True)
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGCONT)
    assert "each worker of generation 2 builds its own TLS contexts" in ltcp.log
    assert "starting the worker as a new interpreter" in ltcp.log
    wait_for(lambda: not alive(stuck), message="the stuck template to be killed")
    reload_via_sighup(ltcp, expect=True)  # the next generation is forked by a new template
    assert len(templates(ltcp)) == 2
    assert all(command(pid) == command(templates(ltcp)[-1]) for pid in serving(ltcp))
