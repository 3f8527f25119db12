"""TLS sessions resume on every worker: the template builds a generation's contexts before forking its workers,
so they share one set of session ticket keys, and keeps them across a reload that leaves the material alone."""

import socket
import ssl
import threading

import pytest

from netutil import echo, recv_exactly, wait_for
from test_material import Pki
from test_workers import reload_via_sighup, routers, serving

pytestmark = pytest.mark.timeout(120)

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture(params=sorted(VERSIONS))
def client(request, tmp_path):
    """A client context for one TLS version, trusting the live CA, and the PKI behind it."""
    pki = Pki(tmp_path)
    pki.install(0)
    context = ssl.create_default_context(cafile=pki.ca)
    context.minimum_version = context.maximum_version = VERSIONS[request.param]
    return context, pki


def terminating(pki, backend, workers=2):
    return {"workers": workers, "admin": {"port": 0}, "routers": [{
        "label": "tls", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a", "idleTimeoutMs": 60000,
                     "tls": {"defaultIdentity": {"privateKey": pki.key, "certs": [pki.cert]}}}]}]}


def exchange(context, port, session=None):
    """One echo over TLS; (whether the session was resumed, the session to resume next time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="web.example.com", session=session) as tls:
            tls.sendall(b"ping")
            assert recv_exactly(tls, 4) == b"ping"  # (a TLS 1.3 ticket comes after the handshake: read it)
            return tls.session_reused, tls.session


def resumed_on_every_worker(ltcp, context, session):
    """Resume ``session`` from 8 clients at once until each serving worker took some; how many did, of how many."""
    workers = serving(ltcp)
    before = {w["pid"]: w["accepted"] for w in routers(ltcp)["workers"]}
    outcomes, stop = [], threading.Event()

    def clients():
        while not stop.is_set():
            outcomes.append(exchange(context, ltcp.port, session)[0])

    threads = [threading.Thread(target=clients) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(w["accepted"] > before.get(w["pid"], 0) + 2
                             for w in routers(ltcp)["workers"] if w["pid"] in workers),
                 interval=0.1, message="every worker to take connections")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    return sum(outcomes), len(outcomes)


def test_a_session_begun_on_one_worker_resumes_on_every_other(instances, backends, client):
    context, pki = client
    ltcp = instances(terminating(pki, backends(echo)))
    reused, session = exchange(context, ltcp.port)
    assert not reused
    resumed, tried = resumed_on_every_worker(ltcp, context, session)
    assert resumed == tried, f"{tried - resumed} of {tried} handshakes were full ones"


def test_sessions_survive_a_reload_that_leaves_the_material_alone(instances, backends, client):
    context, pki = client
    ltcp = instances(terminating(pki, backends(echo)))
    _, session = exchange(context, ltcp.port)
    old = serving(ltcp)
    reload_via_sighup(ltcp, expect=True)
    wait_for(lambda: serving(ltcp) and not set(serving(ltcp)) & set(old), message="the new generation to serve")
    resumed, tried = resumed_on_every_worker(ltcp, context, session)
    assert resumed == tried, f"{tried - resumed} of {tried} handshakes were full ones"


def test_new_material_brings_new_keys(instances, backends, client):
    """A reload with another certificate must not resume sessions made under the old one."""
    context, pki = client
    ltcp = instances(terminating(pki, backends(echo), workers=1))
    _, session = exchange(context, ltcp.port)
    pki.web[0] = pki.cas[0].issue_cert("web.example.com")  # same CA, so the client trusts it; new key
    pki.install(0)
    reload_via_sighup(ltcp, expect=True)
    wait_for(lambda: len(routers(ltcp)["workers"]) == 1, message="the old generation to finish")
    assert exchange(context, ltcp.port, session)[0] is False
