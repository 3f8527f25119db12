"""Slowloris against the admin port: what it costs ltcp and the streams it carries.

Starts ltcp (a subprocess) in front of an echo server, then opens --clients
connections to the admin port that drip one header byte every 3 s and never
finish their request.  Measures, during the attack and for 10 s after every
dripper has hung up: ltcp's thread count, the time a real /metrics scrape
takes, the slowest proxied echo round trip, and ltcp's CPU.

    python scripts/admin_attack.py [--clients 1500] [--seconds 15] [--ltcp-path DIR]

``--ltcp-path`` runs the ltcp package found in DIR (e.g. an older checkout).
"""

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import yaml

from bench import _cpu_seconds as cpu_seconds  # scripts/ is on the path when run as a script


def echo_server():
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def start_ltcp(echo_port, ltcp_path):
    document = {"admin": {"port": 0}, "routers": [{
        "label": "r", "interpreter": {"kind": "io.l5d.static", "names": {"/svc/echo": [f"127.0.0.1:{echo_port}"]}},
        "servers": [{"port": 0, "dstName": "/svc/echo"}]}]}
    env = dict(os.environ, PYTHONPATH=ltcp_path) if ltcp_path else None
    proc = subprocess.Popen([sys.executable, "-m", "ltcp", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ltcp_path)  # "-m" looks in the working directory first
    proc.stdin.write(yaml.safe_dump(document))
    proc.stdin.close()
    log = ""
    while "admin server on" not in log:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("ltcp did not start:\n" + log)
        log += line
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log).group(1))
    admin = re.search(r"admin server on (http://[\d.:]+)/", log).group(1)
    return proc, port, admin


def threads(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))


def scrape_seconds(admin):
    started = time.monotonic()
    try:
        urllib.request.urlopen(admin + "/metrics", timeout=10).read()
    except OSError:
        return float("inf")
    return time.monotonic() - started


class Watch:
    """Pings through ltcp every 50 ms and scrapes every second, keeping the worst of each."""

    def __init__(self, port, admin, pid):
        self.pid = pid
        self.worst_ping = self.worst_scrape = 0.0
        self.most_threads = 0
        self._stop = threading.Event()
        self._conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._threads = [threading.Thread(target=self._ping, daemon=True),
                         threading.Thread(target=self._scrape, args=(admin,), daemon=True)]
        for thread in self._threads:
            thread.start()

    def _ping(self):
        while not self._stop.wait(0.05):
            started = time.monotonic()
            try:
                self._conn.sendall(b"ping")
                self._conn.recv(4)
                took = time.monotonic() - started
            except OSError:
                took = float("inf")
            self.worst_ping = max(self.worst_ping, took)
            self.most_threads = max(self.most_threads, threads(self.pid))

    def _scrape(self, admin):
        while not self._stop.wait(1.0):
            self.worst_scrape = max(self.worst_scrape, scrape_seconds(admin))

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._conn.close()


def report(phase, watch, cpu=None):
    extra = f", CPU {cpu:.0f}% of a core" if cpu is not None else ""
    print(f"{phase}: up to {watch.most_threads} threads, slowest scrape {watch.worst_scrape * 1000:.0f} ms, "
          f"slowest proxied round trip {watch.worst_ping * 1000:.0f} ms{extra}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1500)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--ltcp-path", help="directory holding the ltcp package to run")
    args = parser.parse_args()
    proc, port, admin = start_ltcp(echo_server(), args.ltcp_path)
    host, admin_port = admin[len("http://"):].rsplit(":", 1)
    try:
        watch = Watch(port, admin, proc.pid)
        drippers = []
        for _ in range(args.clients):
            c = socket.create_connection((host, int(admin_port)), timeout=30)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
            drippers.append(c)
        ends = time.monotonic() + args.seconds
        while time.monotonic() < ends:
            time.sleep(3)
            for c in drippers:
                try:
                    c.send(b"x")
                except OSError:
                    pass
        watch.stop()
        report(f"during: {args.clients} clients dripping a byte every 3 s", watch)
        watch = Watch(port, admin, proc.pid)
        before = cpu_seconds(proc.pid)
        for c in drippers:
            c.close()
        time.sleep(10)
        cpu = (cpu_seconds(proc.pid) - before) / 10 * 100
        watch.stop()
        report("after: the 10 s after they hung up", watch, cpu)
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
