"""Stream accounting: whatever raises between accept and close ends that one stream, once.

A bug met while a stream changes hands (accept -> intake -> dial -> duplex)
once left it counted as active forever, holding a budget slot: drains then
waited their whole grace period, and enough of them closed the listener.
Each case injects a failure at one step and checks that the stream ended as
``bug``, its client saw the close, every count is back (``settled``), the
error was logged once with its traceback, and the listener still accepts.
"""

import errno
import logging
import re
import signal
import ssl
import time

import pytest
import trustme
import urllib3

from ltcp.dataplane import server
from ltcp.balancer import Balancer, dial
from ltcp.dataplane.binder import Binder
from ltcp.dataplane.duplex import Leg
from netutil import LtcpProcess, closed_without_data, echo, recv_exactly, settled, static_config, wait_for

PROXY_HEADER = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 7474\r\n"


def injected(*args, **kwargs):
    raise RuntimeError("an injected bug")


def upstream_not_watched(self, registered, events):
    """epoll refusing the upstream leg (ENOSPC: max_user_watches), after the client leg was taken over."""
    if self is self.duplex.upstream:
        raise OSError(errno.ENOSPC, "No space left on device")
    return ORIGINAL_ADOPT(self, registered, events)


ORIGINAL_ADOPT = Leg.adopt

# phase: (what breaks, as a monkeypatch.setattr's arguments; server settings)
PHASES = {
    "bind": ((Binder, "bind", injected), {}),
    "bind_after_intake": ((Binder, "bind", injected), {"proxyProtocol": "accept"}),
    "pick": ((Balancer, "pick", injected), {}),
    "connect": ((dial, "Connect", injected), {}),
    "duplex": ((server, "Duplex", injected), {}),
    # (an idle timer a half-built duplex left behind would fire during the test)
    "duplex_half_built": ((Leg, "adopt", upstream_not_watched), {"idleTimeoutMs": 100}),
    "first_write": ((Leg, "pump", injected), {}),
}


def errors_logged(caplog):
    return [r for r in caplog.records if r.name.startswith("ltcp") and r.levelno >= logging.ERROR]


def counted(proxy):
    listener = proxy.listener
    return proxy.call(lambda: {**listener.failures, **listener.endings, "accepted": listener.accepted,
                               "finished": listener.finished})


@pytest.mark.allow_errors
@pytest.mark.parametrize("phase", PHASES)
def test_a_bug_at_any_step_ends_that_stream_once(proxies, backends, caplog, monkeypatch, phase):
    patch, settings = PHASES[phase]
    backend = backends(echo)
    proxy = proxies(static_config({"/svc/a": [backend.addr]}, **settings))
    preamble = PROXY_HEADER if "proxyProtocol" in settings else b""
    monkeypatch.setattr(*patch)
    with proxy.connect() as victim:
        victim.sendall(preamble + b"ping")
        assert closed_without_data(victim)
    wait_for(lambda: counted(proxy)["finished"] == 1, message="the stream counted as ended")
    monkeypatch.undo()
    assert proxy.call(settled, proxy.app) == []
    counts = counted(proxy)
    assert counts.get("bug") == 1 and counts["accepted"] == 1, counts
    errors = errors_logged(caplog)
    assert len(errors) == 1 and errors[0].exc_info, [r.getMessage() for r in errors]
    assert proxy.call(lambda: proxy.listener.listening), "the listener stopped accepting"
    with proxy.connect() as c:
        c.sendall(preamble + b"still served")
        assert recv_exactly(c, 12) == b"still served"
    wait_for(lambda: proxy.call(settled, proxy.app) == [], message="the second stream released")
    assert proxy.call(lambda: proxy.app.reactor.wheel.__len__()) == 0, "a timer outlived its stream"


def test_a_worker_whose_client_ca_went_bad_serves_on_and_drains_at_once_with_every_count(backends, tmp_path):
    """As reported: the CA file passed the check at start and went bad before the first stream needed it.

    Each stream then raised while binding and stayed counted for ever; now the
    worker trusts the bytes its generation checked, so the streams are served,
    and a drain finds nothing left open.
    """
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    backend_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("backend.example.com").configure_cert(backend_context)

    def tls_echo(conn):
        with backend_context.wrap_socket(conn, server_side=True) as tls_conn:
            echo(tls_conn)

    backend = backends(tls_echo)
    document = static_config({"/svc/a": [backend.addr]},
                             client={"tls": {"dnsName": "backend.example.com", "trustCerts": [str(ca_file)]}})
    document["admin"]["graceSecs"] = 30
    ltcp = LtcpProcess(document)
    try:
        ca_file.write_text("no longer a certificate\n")
        for _ in range(10):
            with ltcp.connect() as c:
                c.sendall(b"ping")
                assert recv_exactly(c, 4) == b"ping"
        text = urllib3.PoolManager(retries=False, timeout=10).request("GET", ltcp.admin + "/metrics").data.decode()
        assert re.search(r'^ltcp_closed_total\{[^}]*\} 10\.0$', text, re.M), text
        assert not re.search(r'^ltcp_stream_failures_total', text, re.M), text
        assert re.search(r"^ltcp_active_streams\{[^}]*\} 0\.0$", text, re.M)
        started = time.monotonic()
        ltcp.proc.send_signal(signal.SIGTERM)
        assert ltcp.proc.wait(20) == 0
        assert time.monotonic() - started < 10, "the drain waited for streams that no longer exist"
        assert "drain finished" in ltcp.log and "SIGKILL" not in ltcp.log
    finally:
        ltcp.stop()
