"""TLS session resumption across workers, and the worker CPU a resumed handshake saves.

    python scripts/tls_resumption.py [--workers 2] [--key rsa|ecdsa] [--connections 500]

Starts an echo backend and ltcp terminating TLS with a fresh trustme
certificate, then for TLS 1.2 and 1.3: 40 clients one after another resume
the session of a first one (how many resumed), and the workers' CPU time per
connection (from /proc, summed over the workers) for full and for resumed
handshakes, each over ``--connections`` connections, three rounds
interleaved.  Needs the test extras (trustme).
"""

import argparse
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import trustme
import yaml

from fd_per_stream import echo_backend  # scripts/ is on the path when run as a script

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def start_ltcp(root, workers, key, cert, backend):
    config = {"workers": workers, "admin": {"port": 0}, "routers": [{
        "label": "tls", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": [f"127.0.0.1:{backend}"]}},
        "servers": [{"port": 0, "dstName": "/svc/a", "idleTimeoutMs": 60000,
                     "tls": {"defaultIdentity": {"privateKey": key, "certs": [cert]}}}]}]}
    path = os.path.join(root, "ltcp.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    log = open(os.path.join(root, "ltcp.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "ltcp", path], stderr=log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log.seek(0)
        text = log.read()
        admin = re.search(r"admin server on http://[\d.]+:(\d+)/", text)
        ports = re.findall(r"router tls listening on [\d.]+:(\d+)", text)
        if admin and ports and text.count("serving") >= workers:
            return proc, log, int(ports[0]), int(admin.group(1))
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("ltcp did not start:\n" + text)


def worker_pids(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/routers.json", timeout=10) as answer:
        return [w["pid"] for w in json.load(answer)["workers"]]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exchange(context, port, session=None):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="web.example.com", session=session) as tls:
            tls.sendall(b"ping")
            tls.recv(4)  # (a TLS 1.3 ticket comes after the handshake)
            return tls.session_reused, tls.session


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--key", choices=["rsa", "ecdsa"], default="rsa")
    parser.add_argument("--connections", type=int, default=500)
    args = parser.parse_args()
    key_type = trustme.KeyType.RSA if args.key == "rsa" else trustme.KeyType.ECDSA
    ca = trustme.CA(key_type=key_type)
    issued = ca.issue_cert("web.example.com", key_type=key_type)
    with tempfile.TemporaryDirectory() as root:
        key, cert = os.path.join(root, "web.key"), os.path.join(root, "web.crt")
        issued.private_key_pem.write_to_path(key)
        issued.cert_chain_pems[0].write_to_path(cert)
        proc, log, port, admin = start_ltcp(root, args.workers, key, cert, echo_backend())
        try:
            pids = worker_pids(admin)
            for name, version in VERSIONS.items():
                context = ssl.create_default_context()
                ca.configure_trust(context)
                context.minimum_version = context.maximum_version = version
                _, session = exchange(context, port)
                resumed = sum(exchange(context, port, session)[0] for _ in range(40))
                spent = {"full": 0.0, "resumed": 0.0}
                for _ in range(3):
                    for kind, reuse in (("full", None), ("resumed", session)):
                        before = sum(map(cpu_seconds, pids))
                        for _ in range(args.connections):
                            exchange(context, port, reuse)
                        spent[kind] += sum(map(cpu_seconds, pids)) - before
                per = {kind: seconds / (3 * args.connections) * 1e6 for kind, seconds in spent.items()}
                print(f"TLS {name}, {args.key}, workers {args.workers}: {resumed}/40 resumed one after another; "
                      f"worker CPU per connection {per['full']:.0f} us full, {per['resumed']:.0f} us resumed")
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()


if __name__ == "__main__":
    main()
