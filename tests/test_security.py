"""Security properties a user relies on without reading the code."""

import json
import logging
import socket
import ssl
import warnings

import pytest
import trustme
import urllib3
import yaml

from ltcp.config import loads
from netutil import named


@pytest.fixture
def identity(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("secure.example")
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    return ca, str(key_path), str(cert_path)


def tls_document(backend_addr, key, cert):
    return {"admin": {"port": 0}, "routers": [{
        "label": "secure",
        "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [backend_addr]}},
        "servers": [{"port": 0, "dstName": "/svc/a",
                     "tls": {"defaultIdentity": {"privateKey": key, "certs": [cert]}}}]}]}


def test_everything_listens_on_loopback_unless_told():
    config = loads(yaml.safe_dump({"routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {}},
        "servers": [{"port": 1, "dstName": "/a"}]}]}))
    assert config.admin.ip == "127.0.0.1"
    assert config.routers[0].servers[0].ip == "127.0.0.1"


def test_old_tls_versions_are_refused_and_compression_is_off(proxies, backends, identity):
    ca, key, cert = identity
    proxy = proxies(tls_document(backends(named("a")).addr, key, cert))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # old versions are the point here
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="secure.example")
    modern = ssl.create_default_context()
    ca.configure_trust(modern)
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as raw:
        with modern.wrap_socket(raw, server_hostname="secure.example") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            assert s.compression() is None
            assert s.recv(2) == b"a\n"


def test_private_keys_never_reach_logs_or_routers_json(proxies, backends, identity, caplog):
    ca, key, cert = identity
    caplog.set_level(logging.DEBUG)
    proxy = proxies(tls_document(backends(named("a")).addr, key, cert), admin=True)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with socket.create_connection(("127.0.0.1", proxy.port()), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="secure.example") as s:
            assert s.recv(2) == b"a\n"
    state = urllib3.PoolManager().request("GET", proxy.admin_url + "/routers.json").data.decode()
    json.loads(state)
    with open(key) as f:
        key_text = f.read()
    secret_line = key_text.splitlines()[1]
    for text in (state, caplog.text):
        assert "PRIVATE KEY" not in text and secret_line not in text and key not in text
