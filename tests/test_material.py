"""TLS material: what a generation checked is what all its workers serve, whatever the disk says later.

The supervisor reads every key, certificate and CA file once per load or
reload and hands the bytes to its workers; these tests change the files
behind its back and kill workers, and check nothing on disk leaks in
unchecked.
"""

import os
import pickle
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest
import trustme
import yaml

from ltcp.config import loads
from ltcp.admin.metrics import render
from ltcp.admin.snapshot import snapshot
from ltcp.protocol.tls import TlsMaterial, client_contexts, material_problems, read_material
from netutil import echo, recv_exactly, wait_for
from test_tls import tls_backend
from test_workers import http, metrics, reload_via_sighup, routers, serving

pytestmark = pytest.mark.timeout(120)

GARBAGE = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


class Pki:
    """Two CAs, each with a certificate for web.example.com (served) and backend.example.com (a TLS backend).

    The configuration points at "live" files; ``install(i)`` copies CA ``i``'s there, ``spoil()`` writes garbage.
    """

    def __init__(self, root):
        self.root = root
        self.cas = [trustme.CA(), trustme.CA()]
        self.web = [ca.issue_cert("web.example.com") for ca in self.cas]
        self.backend = [ca.issue_cert("backend.example.com") for ca in self.cas]
        self.key, self.cert, self.ca = (str(root / name) for name in ("live.key", "live.crt", "live-ca.pem"))

    def install(self, index):
        web = self.web[index]
        web.private_key_pem.write_to_path(self.key)
        web.cert_chain_pems[0].write_to_path(self.cert)
        self.cas[index].cert_pem.write_to_path(self.ca)

    def spoil(self):
        for path in (self.key, self.cert, self.ca):
            with open(path, "wb") as f:
                f.write(GARBAGE)

    def served_by(self, port):
        """Which of the two web certificates the server on ``port`` presents (0 or 1)."""
        context = ssl.create_default_context()
        for ca in self.cas:
            ca.configure_trust(context)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="web.example.com") as tls:
                der = tls.getpeercert(binary_form=True)
        return [ssl.PEM_cert_to_DER_cert(web.cert_chain_pems[0].bytes().decode()) for web in self.web].index(der)


@pytest.fixture
def pki(tmp_path):
    pki = Pki(tmp_path)
    pki.install(0)
    return pki


def three_routers(pki, workers, plain, origin):
    """A terminating server (the live key and certificate), a plain one, and one that originates TLS trusting the
    live CA file; ``plain`` and ``origin`` are backend addresses."""
    def router(label, address, **more):
        return {"label": label, "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [address]}}, **more}

    return {"workers": workers, "admin": {"port": 0}, "routers": [
        router("tls", plain, servers=[{"port": 0, "dstName": "/svc/a", "idleTimeoutMs": 60000,
                                       "tls": {"defaultIdentity": {"privateKey": pki.key, "certs": [pki.cert]}}}]),
        router("plain", plain, servers=[{"port": 0, "dstName": "/svc/a", "idleTimeoutMs": 60000}]),
        router("origin", origin, servers=[{"port": 0, "dstName": "/svc/a", "idleTimeoutMs": 60000}],
               client={"tls": {"dnsName": "backend.example.com", "trustCerts": [pki.ca]}}),
    ]}


def tls_echo(backends, pki, index):
    """An echo backend terminating TLS with CA ``index``'s backend.example.com certificate."""
    cert = pki.backend[index]
    cert.private_key_pem.write_to_path(str(pki.root / f"backend{index}.key"))
    cert.cert_chain_pems[0].write_to_path(str(pki.root / f"backend{index}.crt"))
    return tls_backend(backends, {"backend": {"privateKey": str(pki.root / f"backend{index}.key"),
                                              "certs": [str(pki.root / f"backend{index}.crt")]}}, "backend", echo)


def echoes(port, payload=b"ping"):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(payload)
        return recv_exactly(conn, len(payload)) == payload


def serving_now(ltcp):
    """The newest generation's serving workers; none while no worker can answer (the only one was just killed)."""
    return serving(ltcp) if http.request("GET", ltcp.admin + "/routers.json").status == 200 else []


def accepted_by(ltcp, pid):
    return next((w["accepted"] for w in routers(ltcp)["workers"] if w["pid"] == pid), 0)


def burst(pki, port, count=20):
    """Which certificates ``count`` TLS clients connecting at once are served (at once: so every worker takes some)."""
    served, threads = [], [threading.Thread(target=lambda: served.append(pki.served_by(port))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(served) == count, "a client failed"
    return set(served)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("change", ["spoil", "replace"])
def test_a_replacement_worker_serves_what_its_generation_checked(instances, backends, pki, workers, change):
    """Files changed on disk, then a worker killed: its replacement serves the checked bytes, not the disk's.

    Spoiled files once made it crash-loop (with one worker, plain routers went down too); replaced ones made one
    generation serve two certificates."""
    origin = tls_echo(backends, pki, 0)
    ltcp = instances(three_routers(pki, workers, backends(echo).addr, origin.addr))
    tls_port, plain_port, origin_port = ltcp.ports
    assert pki.served_by(tls_port) == 0 and echoes(plain_port) and echoes(origin_port)
    pki.spoil() if change == "spoil" else pki.install(1)
    victim = ltcp.workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(serving_now(ltcp)) == workers and victim not in serving_now(ltcp), timeout=20,
             message="a replacement worker")
    replacement = (set(serving(ltcp)) - set(ltcp.workers)).pop()
    served = set()

    def replacement_served():
        served.update(burst(pki, tls_port))
        return accepted_by(ltcp, replacement) > 0

    wait_for(replacement_served, timeout=30, message="the replacement to take some clients")
    assert served == {0}
    assert all(echoes(plain_port) and echoes(origin_port) for _ in range(5))
    assert metrics(ltcp)[("ltcp_worker_restarts_total", ())] == 1
    assert ltcp.log.count("exited unexpectedly") == 1  # (the kill: the replacement never crashed)


def test_a_reload_with_a_garbage_client_ca_is_refused_and_the_old_generation_serves(instances, backends, pki):
    """The client context was cached by its path, so a reload never read the file again: it passed, and every
    stream on the router then failed with a traceback."""
    origin = tls_echo(backends, pki, 0)
    ltcp = instances(three_routers(pki, 1, backends(echo).addr, origin.addr))
    origin_port = ltcp.ports[2]
    assert echoes(origin_port)
    with open(pki.ca, "wb") as f:
        f.write(b"this is not a certificate\n")
    reload_via_sighup(ltcp, expect=False)
    refusal = f"routers[2].client.tls: {pki.ca}: holds no PEM certificate"
    assert f"reload refused: {refusal}" in ltcp.log
    check = subprocess.run([sys.executable, "-m", "ltcp", "--check", str(ltcp.path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 2 and refusal in check.stderr  # (the two agree)
    assert metrics(ltcp)[("ltcp_config_reloads_total", (("outcome", "failure"),))] == 1
    assert serving(ltcp) == ltcp.workers
    assert all(echoes(origin_port) for _ in range(5))


def test_contexts_are_built_from_the_bytes_read_once(pki):
    """Once read, the files are not needed: every context comes from the material, which crosses to a worker
    whole (pickled) and never shows its bytes."""
    config = loads(yaml.safe_dump(three_routers(pki, 1, "127.0.0.1:1", "127.0.0.1:2")))
    material = read_material(config)
    assert material.paths == (pki.key, pki.cert, pki.ca)
    for path in material.paths:
        os.remove(path)
    carried = pickle.loads(pickle.dumps(material))
    assert material_problems(config, carried) == []  # (every context built)
    (client,) = client_contexts(config.routers[2].client, carried).values()
    assert client.cert_store_stats()["x509_ca"] == 1
    assert "PRIVATE KEY" not in repr(carried) and "3 files" in repr(carried)


@pytest.mark.allow_errors
def test_a_server_whose_contexts_cannot_be_built_leaves_the_other_routers_serving(proxies, backends, pki, caplog):
    """A worker once died of one server's bad material, taking every router with it."""
    proxy = proxies(three_routers(pki, 1, backends(echo).addr, "127.0.0.1:9"), material=TlsMaterial({}))
    tls_server, plain, origin = proxy.app.listeners
    assert echoes(plain.address[1])
    servers = [server for router in proxy.call(snapshot, proxy.app)["routers"] for server in router["servers"]]
    assert [(s["listening"], s["tls_context_failures"]) for s in servers] == [(False, 1), (True, 0), (False, 1)]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"router tls: 127.0.0.1:0 is not served by this process: {pki.cert}: not read with the "
                      "configuration",
                      f"router origin: 127.0.0.1:0 is not served by this process: client.tls: {pki.ca}: not read "
                      "with the configuration"]
    (family,) = [f for f in render(proxy.call(snapshot, proxy.app)) if f.name == "ltcp_tls_context_failures"]
    assert sum(sample.value for sample in family.samples) == 2
