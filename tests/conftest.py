import logging
import signal
import ssl
import threading

import pytest
import trustme

from ltcp.loop import Reactor
from netutil import Backend, LtcpProcess, Proxy


@pytest.fixture
def reactor():
    """A reactor for the test's own thread; closed afterwards."""
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def running_reactor():
    """A reactor running on a background thread, stopped and joined afterwards."""
    r = Reactor()
    thread = threading.Thread(target=r.run, name="reactor", daemon=True)
    thread.start()
    yield r
    r.call_soon_threadsafe(r.stop)
    thread.join(5)
    assert not thread.is_alive(), "reactor did not stop"
    r.close()


@pytest.fixture
def proxies():
    """Start proxies with ``proxies(document)``; all are stopped afterwards."""
    started = []

    def start(document, admin=False, material=None):
        proxy = Proxy(document, admin, material)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def backends():
    """Start backends with ``backends(handler)``; all are closed afterwards."""
    started = []

    def start(*args, **kwargs):
        backend = Backend(*args, **kwargs)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.close()


@pytest.fixture
def instances(tmp_path):
    """Start ``python -m ltcp FILE`` with ``instances(document)`` (reloadable: the file is rewritable); each is
    stopped with SIGTERM afterwards, must exit 0 and must have logged no traceback."""
    started = []

    def start(config, **kwargs):
        ltcp = LtcpProcess(config, path=tmp_path / f"ltcp{len(started)}.yaml", **kwargs)
        started.append(ltcp)
        return ltcp

    yield start
    for ltcp in started:
        if ltcp.proc.poll() is None:
            ltcp.proc.send_signal(signal.SIGTERM)
            assert ltcp.proc.wait(30) == 0
        ltcp.reader.join(5)
        ltcp.proc.stderr.close()
        assert "Traceback" not in ltcp.log, ltcp.log


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_errors: the test expects ltcp to log errors")
    config.addinivalue_line("markers", "slow: starts ltcp or a real server (dnsmasq, Chromium) as a process of its own")


# What makes a test end-to-end: a fixture that starts processes, or a call that does.
PROCESS_FIXTURES = {"instances", "browser", "dnsmasq", "ltcp", "hanging"}
PROCESS_NAMES = {"LtcpProcess", "subprocess", "Popen"}


def pytest_collection_modifyitems(items):
    """Mark the end-to-end tests ``slow``, so that ``pytest -m "not slow"`` runs the rest in seconds."""
    for item in items:
        code = getattr(getattr(item, "function", None), "__code__", None)
        names = set(code.co_names) if code else set()
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or PROCESS_NAMES & names:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_logged_errors(request, caplog):
    """Any ERROR from ltcp (the reactor logs every failed callback so) fails the test."""
    caplog.set_level(logging.WARNING, logger="ltcp")
    yield
    if request.node.get_closest_marker("allow_errors"):
        return
    errors = [r for r in caplog.get_records("call") if r.name.startswith("ltcp") and r.levelno >= logging.ERROR]
    assert not errors, "ltcp logged errors:\n" + "\n".join(r.getMessage() for r in errors)


@pytest.fixture
def certificates(tmp_path):
    """Two CAs, each with a certificate for web.example.com; a client context that trusts both."""
    root = tmp_path / "pki"
    root.mkdir()
    cas = [trustme.CA(), trustme.CA()]
    issued = []
    for i, ca in enumerate(cas):
        cert = ca.issue_cert("web.example.com")
        key, crt = root / f"web{i}.key", root / f"web{i}.crt"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(crt))
        issued.append((key.read_bytes(), crt.read_bytes()))
    context = ssl.create_default_context()
    for ca in cas:
        context.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    live = {"privateKey": str(root / "live.key"), "certs": [str(root / "live.crt")]}

    def install(index):
        """Put certificate ``index`` where the configuration points."""
        key, crt = issued[index]
        (root / "live.key").write_bytes(key)
        (root / "live.crt").write_bytes(crt)

    install(0)
    return live, install, context, cas
