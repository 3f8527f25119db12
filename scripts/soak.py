"""Soak test: mixed traffic through ltcp for a while, watching for drift.

    python scripts/soak.py [--minutes 10] [--plot soak.png]

Runs ltcp (a subprocess) over io.l5d.fs discovery whose file is rewritten
every few seconds (discovery churn), in front of two echo backends, and drives
at the same time: bulk streams (8 MiB each way), short connections, and TLS
connections terminated by ltcp (when trustme is installed).  Every few
seconds it samples ltcp's RSS, open descriptors and threads from /proc, and
its counters from /metrics.  At the end it prints a summary (and a plot with
matplotlib, if asked and installed).  Not part of the test suite.
"""

import argparse
import multiprocessing
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import _serve, listening_socket, wait_listening  # noqa: E402

SAMPLE_EVERY = 5


class Traffic:
    """Client threads and their tallies."""

    def __init__(self, port, tls_port, tls_context, stop):
        self.port, self.tls_port, self.tls_context, self.stop = port, tls_port, tls_context, stop
        self.counts = {"bulk": 0, "short": 0, "tls": 0}
        self.errors = {"bulk": 0, "short": 0, "tls": 0}
        self.lock = threading.Lock()

    def _tally(self, kind, ok):
        with self.lock:
            (self.counts if ok else self.errors)[kind] += 1

    def _echo(self, sock, payload):
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := sock.recv(1 << 16):
            got += chunk
        sender.join()
        return bytes(got) == payload

    def bulk(self):
        payload = os.urandom(8 << 20)
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    self._tally("bulk", self._echo(s, payload))
            except OSError:
                self._tally("bulk", False)

    def short(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                    s.sendall(b"ping")
                    self._tally("short", s.recv(4) == b"ping")
            except OSError:
                self._tally("short", False)

    def tls(self):
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.tls_port), timeout=10) as raw:
                    with self.tls_context.wrap_socket(raw, server_hostname="soak.example") as s:
                        s.sendall(b"secret ping")
                        self._tally("tls", s.recv(11) == b"secret ping")
            except OSError:
                self._tally("tls", False)
            time.sleep(0.01)


def proc_sample(pid):
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


def scrape(admin_port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    totals = {}
    for name in ("ltcp_accepted_total", "ltcp_closed_total", "ltcp_active_streams", "ltcp_stream_failures_total"):
        totals[name] = sum(float(v) for v in re.findall(rf"^{name}\{{.*\}} (\S+)$", text, re.M))
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--plot", help="write a PNG of the samples here (needs matplotlib)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="ltcp-soak-")
    sinks = [(listening_socket(), listening_socket()) for _ in range(2)]
    servers = [multiprocessing.Process(target=_serve, args=pair, daemon=True) for pair in sinks]
    for server in servers:
        server.start()
    echo_ports = [pair[1].getsockname()[1] for pair in sinks]
    disco = os.path.join(work, "disco")
    os.mkdir(disco)
    with open(os.path.join(disco, "echo"), "w") as f:
        f.write("".join(f"127.0.0.1 {p}\n" for p in echo_ports))

    port, tls_port, admin_port = (listening_socket().getsockname()[1] for _ in range(3))
    server_list = [{"port": port, "dstName": "/svc/echo", "idleTimeoutMs": 30000}]
    tls_context = None
    try:
        import trustme
        ca = trustme.CA()
        cert = ca.issue_cert("soak.example")
        cert.private_key_pem.write_to_path(os.path.join(work, "key.pem"))
        cert.cert_chain_pems[0].write_to_path(os.path.join(work, "cert.pem"))
        tls_context = ssl.create_default_context()
        ca.configure_trust(tls_context)
        server_list.append({"port": tls_port, "dstName": "/svc/echo", "idleTimeoutMs": 30000,
                            "tls": {"defaultIdentity": {"privateKey": "key.pem", "certs": ["cert.pem"]}}})
    except ImportError:
        print("trustme is not installed: no TLS traffic")
    config = {"admin": {"port": admin_port},
              "routers": [{"label": "soak", "interpreter": {"kind": "io.l5d.fs", "rootDir": "disco",
                                                            "periodSecs": 0.5},
                           "servers": server_list}]}
    with open(os.path.join(work, "ltcp.yaml"), "w") as f:
        yaml.safe_dump(config, f)
    ltcp = subprocess.Popen([sys.executable, "-m", "ltcp", "--log-level", "warning", os.path.join(work, "ltcp.yaml")],
                            stderr=open(os.path.join(work, "ltcp.log"), "w"))
    wait_listening(port)
    wait_listening(admin_port)

    stop = threading.Event()
    traffic = Traffic(port, tls_port, tls_context, stop)
    workers = [traffic.bulk] * 2 + [traffic.short] * 4 + ([traffic.tls] * 2 if tls_context else [])
    threads = [threading.Thread(target=w, daemon=True) for w in workers]

    def churn():  # discovery: one endpoint, both, the other, both, ...
        states = [echo_ports[:1], echo_ports, echo_ports[1:], echo_ports]
        for i in range(10 ** 9):
            if stop.wait(3):
                return
            with open(os.path.join(disco, "echo.tmp"), "w") as f:
                f.write("".join(f"127.0.0.1 {p} {random.choice([1, 2])}\n" for p in states[i % 4]))
            os.replace(os.path.join(disco, "echo.tmp"), os.path.join(disco, "echo"))

    threads.append(threading.Thread(target=churn, daemon=True))
    for t in threads:
        t.start()

    samples = []
    start = time.monotonic()
    end = start + args.minutes * 60
    try:
        while time.monotonic() < end and ltcp.poll() is None:
            time.sleep(SAMPLE_EVERY)
            rss, fds, nthreads = proc_sample(ltcp.pid)
            samples.append((time.monotonic() - start, rss, fds, nthreads, scrape(admin_port), dict(traffic.errors)))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        final = scrape(admin_port) if ltcp.poll() is None else {}
        ltcp.terminate()
        code = ltcp.wait(30)
        for server in servers:
            server.terminate()
    report(samples, traffic, final, code, os.path.join(work, "ltcp.log"))
    if args.plot:
        plot(samples, args.plot)


def report(samples, traffic, final, code, log_path):
    warm = samples[min(len(samples) - 1, 60 // SAMPLE_EVERY)] if samples else None
    last = samples[-1] if samples else None
    print(f"duration: {last[0] / 60:.1f} min, {len(samples)} samples every {SAMPLE_EVERY}s")
    print(f"completed: {traffic.counts}; client-side errors: {traffic.errors}")
    if last:
        rss = [s[1] for s in samples]
        fds = [s[2] for s in samples]
        threads = [s[3] for s in samples]
        print(f"RSS MB: min {min(rss):.1f}, max {max(rss):.1f}, after 1 min {warm[1]:.1f}, last {last[1]:.1f}")
        print(f"open fds: min {min(fds)}, max {max(fds)}, last {last[2]}")
        print(f"threads: min {min(threads)}, max {max(threads)}, last {last[3]}")
    if final:
        print(f"ltcp counters: accepted {final['ltcp_accepted_total']:.0f}, closed {final['ltcp_closed_total']:.0f}, "
              f"active {final['ltcp_active_streams']:.0f}, stream failures {final['ltcp_stream_failures_total']:.0f}")
    with open(log_path) as f:
        log = f.read()
    print(f"ltcp exit status {code}; log: {log.count(' WARNING ')} warnings, {log.count(' ERROR ')} errors, "
          f"{log.count('Traceback')} tracebacks")


def plot(samples, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    minutes = [s[0] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for ax, index, label in zip(axes, (1, 2, 3), ("RSS (MB)", "open descriptors", "threads")):
        ax.plot(minutes, [s[index] for s in samples])
        ax.set_ylabel(label)
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
