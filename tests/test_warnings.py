"""What the operator is told about a configuration that is valid but risky, or that cannot be served.

Warnings come from the supervisor (and ``--check``) once per load, never
once per worker: certificates out of their validity period, servers that
never time a stream out.
"""

import datetime
import os
import re
import resource
import socket
import ssl
import subprocess
import sys

import pytest
import trustme

from ltcp.protocol.tls import TlsMaterial, expiry_warnings
from netutil import echo
from test_workers import document, metrics, ping, reload_via_sighup, rewrite, serving

pytestmark = pytest.mark.timeout(120)

UTC = datetime.timezone.utc
TIMEOUTS = {"idleTimeoutMs": 60000}


def at(*date):
    return datetime.datetime(*date, tzinfo=UTC)


def test_expiry_warnings_name_the_file_the_subject_and_the_date():
    """Dates before 2050 are UTCTime, later ones GeneralizedTime (RFC 5280): both are read."""
    ca = trustme.CA()
    dated = ca.issue_cert("a.example", common_name="a.example", not_before=at(2020, 1, 1), not_after=at(2030, 6, 1, 12, 30))
    default = ca.issue_cert("b.example")  # valid from 2000 to 3000
    material = TlsMaterial({"/pki/a.pem": dated.cert_chain_pems[0].bytes() + default.cert_chain_pems[0].bytes(),
                            "/pki/a.key": dated.private_key_pem.bytes()})
    assert expiry_warnings(material, at(2025, 1, 1)) == []
    (expired,) = expiry_warnings(material, at(2031, 1, 1))
    assert re.fullmatch(r"/pki/a\.pem: certificate 1 \(O=trustme v[\d.]+, OU=Testing cert #\S+, CN=a\.example\) expired "
                        r"on 2030-06-01 12:30:00 UTC \(notAfter\); loaded all the same", expired), expired
    (early,) = expiry_warnings(material, at(2019, 1, 1))
    assert "/pki/a.pem: certificate 1 (" in early and "is not valid before 2020-01-01 00:00:00 UTC (notBefore)" in early
    assert [line.split(" (")[0] for line in expiry_warnings(material, at(3001, 1, 1))] == [
        "/pki/a.pem: certificate 1", "/pki/a.pem: certificate 2"]


def test_out_of_date_certificates_are_warned_about_and_served(instances, backends, tmp_path):
    """They once passed --check and reloads without a word; they are still served, as by HAProxy and nginx."""
    ca, now = trustme.CA(), datetime.datetime.now(UTC).replace(microsecond=0)
    month = datetime.timedelta(days=30)
    issued = {"expired": ca.issue_cert("web.example.com", common_name="web.example.com", not_before=now - month,
                                       not_after=now - month / 30),
              "future": ca.issue_cert("web.example.com", common_name="web.example.com", not_before=now + month / 30,
                                      not_after=now + month)}
    identities = {}
    for name, cert in issued.items():
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.crt"))
        identities[name] = {"privateKey": str(tmp_path / f"{name}.key"), "certs": [str(tmp_path / f"{name}.crt")]}

    def config(name):
        return document(backends(echo), workers=2, servers=[{"port": 0, "dstName": "/svc/a", **TIMEOUTS,
                                                             "tls": {"defaultIdentity": identities[name]}}])

    def served(port):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # (out of date: no client would verify it)
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()

    ltcp = instances(config("expired"))
    expired = (f"{tmp_path}/expired.crt: certificate 1 (O=trustme v{trustme.__version__}, OU=Testing cert #",
               f"CN=web.example.com) expired on {now - month / 30:%Y-%m-%d %H:%M:%S} UTC (notAfter); loaded all the same")
    assert ltcp.log.count(expired[0]) == 1 and expired[1] in ltcp.log  # (once, not once per worker)
    assert served(ltcp.port) == issued["expired"].cert_chain_pems[0].bytes()
    rewrite(ltcp, config("future"))
    reload_via_sighup(ltcp, expect=True)
    assert f"is not valid before {now + month / 30:%Y-%m-%d %H:%M:%S} UTC (notBefore); loaded all the same" in ltcp.log
    assert served(ltcp.port) == issued["future"].cert_chain_pems[0].bytes()
    check = subprocess.run([sys.executable, "-m", "ltcp", "--check", str(ltcp.path)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0 and f"{tmp_path}/future.crt: certificate 1 (" in check.stderr, check.stderr


def test_servers_without_timeouts_are_warned_about_once_each_at_start_and_reload(instances, backends):
    warning = "neither idleTimeoutMs nor connectionLifetimeSecs is set, so a stream whose peer stops reading is held"
    servers = [{"port": 0, "dstName": "/svc/a", **TIMEOUTS},
               {"port": 0, "dstName": "/svc/a", "connectionLifetimeSecs": 60},
               {"port": 0, "dstName": "/svc/a"}]
    ltcp = instances(document(backends(echo), workers=2, servers=servers))
    assert ltcp.log.count(warning) == 1
    assert f"routers[0].servers[2] (router r, 127.0.0.1:0): {warning}" in ltcp.log
    reload_via_sighup(ltcp, expect=True)
    assert ltcp.log.count(warning) == 2


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
