"""Reloads as operators ask for them: many at once, ones that move the admin server, and a configuration
path that blocks.

Each test runs ``python -m ltcp FILE`` with workers and drives it through its admin port and signals.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import urllib3

from netutil import LtcpProcess, echo, wait_for
from test_workers import document, metrics, ping, reload_via_sighup, rewrite, routers, serving

pytestmark = pytest.mark.timeout(120)

http = urllib3.PoolManager(retries=False, timeout=10, maxsize=32)  # (a connection per concurrent request)


def timed(method, url):
    """(response, seconds) of one request."""
    started = time.monotonic()
    response = http.request(method, url)
    return response, time.monotonic() - started


def reloads(ltcp, outcome):
    return metrics(ltcp)[("ltcp_config_reloads_total", (("outcome", outcome),))]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url):
    """Whether an HTTP server answers on ``url`` (a refused connection: no)."""
    try:
        return http.request("GET", url + "/metrics").status == 200
    except urllib3.exceptions.HTTPError:
        return False


def replaced_promptly(ltcp, seconds=3.0):
    """Kill one serving worker; the seconds until a new one serves in its place."""
    before = serving(ltcp)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: len(serving(ltcp)) == len(before) and victim not in serving(ltcp), timeout=seconds,
             interval=0.02, message="the killed worker to be replaced")
    return time.monotonic() - killed


# -- many reloads at once ----------------------------------------------------------------------------------------


def test_concurrent_reloads_coalesce_every_caller_sees_its_change_and_admin_stays_responsive(instances, backends):
    first, second = backends(echo), backends(echo)
    ltcp = instances(document(first, workers=2))
    rewrite(ltcp, document(second, workers=2))
    outcomes = []
    gate = threading.Barrier(21)

    def post():
        gate.wait()
        response = http.request("POST", ltcp.admin + "/reload")
        outcomes.append((response.status, response.data.decode()))

    posters = [threading.Thread(target=post) for _ in range(20)]
    for thread in posters:
        thread.start()
    started = time.monotonic()
    gate.wait()
    wait_for(lambda: ltcp.log.count("reload requested through the admin server") == 20, message="20 reloads asked")
    # Once every admin thread held a reload: a scrape meanwhile waited 2.9 s.
    response, scrape = timed("GET", ltcp.admin + "/metrics")
    for thread in posters:
        thread.join(60)
    took = time.monotonic() - started
    assert response.status == 200 and scrape < 1.5, scrape
    assert len(outcomes) == 20 and all(status == 200 for status, _ in outcomes), outcomes
    # Each answer comes from a reload that began after its request; one under way takes all that come meanwhile.
    generations = {int(re.match(r"generation (\d+) serving with 2 workers", text).group(1)) for _, text in outcomes}
    done = len(generations)
    assert generations == set(range(2, 2 + done)) and done <= 3, generations  # once 20, one after another: 3.6 s
    wait_for(lambda: reloads(ltcp, "success") == done, message="the reloads counted")  # (past the 1 s page cache)
    assert reloads(ltcp, "failure") == 0
    assert routers(ltcp)["generation"] == 1 + done
    for _ in range(4):
        assert ping(ltcp.port)
    assert second.accepted == 4 and first.accepted == 0
    print(f"20 concurrent reloads: {took:.2f}s, {done} generations; /metrics meanwhile {scrape * 1000:.0f} ms")


def test_a_reload_asked_while_one_runs_is_answered_by_one_that_began_after_it(instances, backends):
    """The second caller's change is seen: it is not answered by the reload already running."""
    first, second, third = backends(echo), backends(echo), backends(echo)
    ltcp = instances(document(first, workers=2))
    rewrite(ltcp, document(second, workers=2))
    early = []
    poster = threading.Thread(target=lambda: early.append(http.request("POST", ltcp.admin + "/reload")))
    poster.start()
    wait_for(lambda: "(generation 2) serving" in ltcp.log, message="the first reload to start its workers")
    rewrite(ltcp, document(third, workers=2))
    late = http.request("POST", ltcp.admin + "/reload")
    poster.join(30)
    assert early[0].status == 200 and late.status == 200, (early[0].data, late.data)
    for _ in range(3):
        assert ping(ltcp.port)
    assert third.accepted == 3


# -- the admin section changed ------------------------------------------------------------------------------------


def upgrade(ltcp):
    """SIGUSR2, then wait until the new code serves."""
    ltcp.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: "upgrade: generation" in ltcp.log, timeout=60, message="the upgrade to finish")


def refused_move(ltcp, old, new):
    """A reload of a file whose admin server moved from ``old`` to ``new``: refused, saying what moves it."""
    response = http.request("POST", f"http://127.0.0.1:{old}/reload")
    assert response.status == 409, response.data
    assert (f"admin: a reload cannot move the admin server from 127.0.0.1:{old} to 127.0.0.1:{new}; an upgrade "
            "(SIGUSR2, which keeps every stream) or a restart moves it") in response.data.decode()
    assert answers(f"http://127.0.0.1:{old}") and not answers(f"http://127.0.0.1:{new}")
    assert metrics_at(old)[("ltcp_config_reloads_total", (("outcome", "failure"),))] == 1


def metrics_at(port):
    return metrics(types.SimpleNamespace(admin=f"http://127.0.0.1:{port}"))


def test_a_reload_that_moves_the_admin_server_is_refused_and_an_upgrade_moves_it(instances, backends):
    """Once silently ignored: the old port kept answering and nothing was logged."""
    backend = backends(echo)
    old = free_port()
    ltcp = instances(document(backend, workers=1, admin={"port": old}))
    new = free_port()
    rewrite(ltcp, document(backend, workers=1, admin={"port": new}))
    refused_move(ltcp, old, new)
    assert ping(ltcp.port)
    upgrade(ltcp)
    assert answers(f"http://127.0.0.1:{new}") and not answers(f"http://127.0.0.1:{old}")
    assert ping(ltcp.port)


def test_the_old_admin_port_given_to_a_server_is_refused_clearly_and_an_upgrade_applies_it(instances, backends):
    """Passed --check, then failed the reload with "Address already in use"."""
    backend = backends(echo)
    old = free_port()
    ltcp = instances(document(backend, workers=2, admin={"port": old}))
    new = free_port()
    swapped = document(backend, workers=2, admin={"port": new},
                       servers=[{"port": 0, "dstName": "/svc/a"}, {"port": old, "dstName": "/svc/a"}])
    rewrite(ltcp, swapped)
    check = subprocess.run([sys.executable, "-m", "ltcp", "--check", str(ltcp.path)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr  # (valid for a start, and for an upgrade: see below)
    refused_move(ltcp, old, new)
    assert "Address already in use" not in ltcp.log
    assert serving(ltcp) == sorted(ltcp.workers) and ping(ltcp.port)
    upgrade(ltcp)
    assert answers(f"http://127.0.0.1:{new}")
    wait_for(lambda: ping(old), message="the old admin port to proxy")
    assert ping(ltcp.port)


# -- a configuration path that blocks ----------------------------------------------------------------------------


def test_a_fifo_as_the_configuration_is_refused_at_once_and_workers_are_still_replaced(instances, backends):
    ltcp = instances(document(backends(echo), workers=2))
    os.unlink(ltcp.path)
    os.mkfifo(ltcp.path)  # no writer: opening it to read once blocked the supervisor for ever
    response, took = timed("POST", ltcp.admin + "/reload")
    assert response.status == 409 and took < 5, (response.status, took)
    assert f"{ltcp.path}: cannot read configuration: not a regular file (a FIFO)" in response.data.decode()
    assert reloads(ltcp, "failure") == 1
    ltcp.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: reloads(ltcp, "failure") == 2, message="the SIGHUP's reload to fail too")
    assert replaced_promptly(ltcp) < 3
    for path in ("/metrics", "/routers.json"):
        response, took = timed("GET", ltcp.admin + path)
        assert response.status == 200 and took < 1.5, (path, took)


# Runs ltcp with the configuration read made to hang while a marker file exists, as a hung NFS or FUSE
# mount would (the test's fault, injected here: a regular file cannot be made to block otherwise).
HANGING = """
import os, sys, time
import ltcp.process.reloads as reloads
marker = sys.argv.pop(1)
reloads.READ_TIMEOUT = 1.0
real = reloads.prepare
def prepare(path):
    while os.path.exists(marker):
        time.sleep(0.02)
    return real(path)
reloads.prepare = prepare
from ltcp.cli import main
sys.exit(main())
"""


@pytest.fixture
def hanging(tmp_path, backends):
    marker = tmp_path / "hang"
    ltcp = LtcpProcess(document(backends(echo), workers=2), path=tmp_path / "ltcp.yaml",
                       command=[sys.executable, "-c", HANGING, str(marker)])
    yield ltcp, marker
    marker.unlink(missing_ok=True)
    assert ltcp.stop() == 0
    assert "Traceback" not in ltcp.log, ltcp.log


def test_a_configuration_read_that_hangs_fails_the_reload_and_the_supervisor_carries_on(hanging):
    ltcp, marker = hanging
    marker.touch()
    response = {}
    poster = threading.Thread(target=lambda: response.update(r=http.request("POST", ltcp.admin + "/reload")))
    poster.start()
    wait_for(lambda: "reload requested through the admin server" in ltcp.log, message="the reload to begin")
    # Meanwhile the supervisor replaces a killed worker, and every page answers at once.
    assert replaced_promptly(ltcp) < 3
    _, took = timed("GET", ltcp.admin + "/metrics")
    assert took < 1.5
    poster.join(30)
    assert response["r"].status == 409
    assert f"reading {ltcp.path} took longer than 1s" in response["r"].data.decode()
    # The read has not returned: a reload asked now is refused at once, without another thread.
    again, took = timed("POST", ltcp.admin + "/reload")
    assert again.status == 409 and took < 1.5
    assert f"the last read of {ltcp.path} has not returned" in again.data.decode()
    wait_for(lambda: reloads(ltcp, "failure") == 2, message="both failures counted")  # (past the 1 s page cache)
    marker.unlink()
    wait_for(lambda: http.request("POST", ltcp.admin + "/reload").status == 200, timeout=20, interval=0.2,
             message="a reload to succeed once the read returns")
    wait_for(lambda: reloads(ltcp, "success") == 1, message="the success counted")  # (past the 1 s page cache)
    reload_via_sighup(ltcp, expect=True)
