"""Signals an operator may send: none of them may cut open streams."""

import signal

import pytest

from netutil import LtcpProcess, echo, recv_exactly, wait_for

# What the supervisor logs for each; the configuration comes from standard input,
# so a reload or an upgrade (which must re-read it) is refused and nothing changes.
LOGGED = {
    signal.SIGHUP: "reload failed: still serving generation 1",
    signal.SIGUSR1: "received SIGUSR1: there is no access log to reopen",
    signal.SIGUSR2: "reload failed: still serving generation 1",
    signal.SIGQUIT: "received SIGQUIT: it has no meaning for ltcp yet; ignored",
}


@pytest.mark.parametrize("signum", list(LOGGED))
def test_signal_is_handled_and_streams_carry_on(backends, signum):
    backend = backends(echo)
    ltcp = LtcpProcess({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]})
    try:
        held = ltcp.connect()
        held.sendall(b"before")
        assert recv_exactly(held, 6) == b"before"
        ltcp.proc.send_signal(signum)
        wait_for(lambda: LOGGED[signum] in ltcp.log, message=f"{signal.Signals(signum).name} handled")
        held.sendall(b"after")
        assert recv_exactly(held, 5) == b"after"
        with ltcp.connect() as fresh:
            fresh.sendall(b"new")
            assert recv_exactly(fresh, 3) == b"new"
        assert ltcp.proc.poll() is None
        held.close()
    finally:
        assert ltcp.stop() == 0
