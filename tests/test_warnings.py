"""What the operator is told about a configuration that is valid but risky, or that cannot be served."""

import os
import re
import resource

import pytest

from netutil import echo
from test_workers import document, metrics, ping, reload_via_sighup, rewrite, serving

pytestmark = pytest.mark.timeout(120)

TIMEOUTS = {"idleTimeoutMs": 60000}


def test_a_reload_out_of_descriptors_names_the_address_and_what_it_needs(instances, backends):
    """It was refused with a bare "Too many open files"."""
    backend = backends(echo)
    ltcp = instances(document(backend, workers=1, servers=[{"port": 0, "dstName": "/svc/a", **TIMEOUTS}]))
    rewrite(ltcp, document(backend, workers=1, servers=[{"port": 0, "dstName": "/svc/a", **TIMEOUTS}] * 40))
    soft, hard = resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{ltcp.proc.pid}/fd"))
    resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE, (in_use + 10, hard))
    try:
        reload_via_sighup(ltcp, expect=False)
    finally:
        resource.prlimit(ltcp.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    refusal = re.search(r"reload refused: cannot listen on 127\.0\.0\.1:0: Too many open files: 39 new listening "
                        r"sockets are needed and (\d+) of the (\d+) descriptors this process may open are free", ltcp.log)
    assert refusal, ltcp.log[-2000:]
    assert int(refusal[1]) < 39 and int(refusal[2]) == in_use + 10
    assert metrics(ltcp)[("ltcp_config_reloads_total", (("outcome", "failure"),))] == 1
    assert serving(ltcp) == ltcp.workers and ping(ltcp.port)
