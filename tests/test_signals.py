"""Signals without a meaning yet are logged and ignored: none may cut open streams."""

import signal

import pytest

from netutil import LtcpProcess, echo, recv_exactly, wait_for


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT])
def test_signal_is_logged_and_streams_carry_on(backends, signum):
    backend = backends(echo)
    ltcp = LtcpProcess({"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend.addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]})
    try:
        held = ltcp.connect()
        held.sendall(b"before")
        assert recv_exactly(held, 6) == b"before"
        ltcp.proc.send_signal(signum)
        name = signal.Signals(signum).name
        wait_for(lambda: f"received {name}: it has no meaning for ltcp yet; ignored" in ltcp.log,
                 message=f"{name} logged")
        held.sendall(b"after")
        assert recv_exactly(held, 5) == b"after"
        with ltcp.connect() as fresh:
            fresh.sendall(b"new")
            assert recv_exactly(fresh, 3) == b"new"
        assert ltcp.proc.poll() is None
        held.close()
    finally:
        assert ltcp.stop() == 0
