"""Descriptors per stream, idle and bulk, and whether a low descriptor limit holds.

    python scripts/fd_per_stream.py [--streams 40] [--nofile 0] [--megabytes 2]

Starts an echo backend and ltcp with one worker (its descriptor limit set to
``--nofile`` when given), then counts the worker's open descriptors
(/proc/PID/fd) three times: with no stream, with ``--streams`` streams open
that carry nothing yet, and with as many streams that have each moved
``--megabytes`` both ways (bulk: the duplex splices through pipes) and are
still open.  Reports descriptors per stream, idle and bulk, the budget the
worker announced, how many streams finished byte-exact, and the worker's
"out of descriptors" log lines.
"""

import argparse
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import yaml


def echo_backend():
    """A threaded echo server on 127.0.0.1; its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1024)

    def serve(conn):
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


class Worker:
    """ltcp with one worker, configured through stdin; its log lines collected."""

    def __init__(self, backend_port, nofile):
        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        names = {"/svc/echo": [f"127.0.0.1:{backend_port}"]}
        config = {"workers": 1, "admin": {"port": 0}, "routers": [{
            "label": "fd", "interpreter": {"kind": "io.l5d.static", "names": names},
            "servers": [{"port": 0, "dstName": "/svc/echo", "connectTimeoutMs": 30000}]}]}
        self.proc = subprocess.Popen([sys.executable, "-m", "ltcp", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=limit)
        self.proc.stdin.write(yaml.safe_dump(config))
        self.proc.stdin.close()
        self.lines = []
        while not any("admin server on" in line for line in self.lines):
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("ltcp did not start:\n" + "".join(self.lines))
            self.lines.append(line)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        log = "".join(self.lines)
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log).group(1))
        self.pid = int(re.search(r"worker (\d+) \(generation \d+\) serving", log).group(1))
        self.budget = re.search(r"descriptor limit \d+: at most .*", log).group(0)

    def descriptors(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def settle(worker, expected, timeout=10):
    """The worker's descriptor count once it stops changing and reaches ``expected`` (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    count = worker.descriptors()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = worker.descriptors()
        if now == count and now >= expected:
            break
        count = now
    return count


def pattern(size, seed):
    block = bytes((i * 131 + seed) & 0xFF for i in range(65521))
    return (block * (size // len(block) + 1))[:size]


def bulk_stream(port, payload, moved, release, results):
    """Send ``payload`` and read its echo; hold the stream open until ``release``, then check the bytes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            writer = threading.Thread(target=sock.sendall, args=(payload,))
            writer.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
            writer.join()
            moved.release()
            release.wait()
            sock.shutdown(socket.SHUT_WR)
            results.append(got == payload and sock.recv(1) == b"")
    except OSError:
        results.append(False)
        moved.release()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--nofile", type=int, default=0, help="the worker's descriptor limit (0: as inherited)")
    parser.add_argument("--megabytes", type=float, default=2.0, help="moved each way by each bulk stream")
    args = parser.parse_args()
    worker = Worker(echo_backend(), args.nofile)
    try:
        n = args.streams
        base = settle(worker, 0)
        idle = [socket.create_connection(("127.0.0.1", worker.port)) for _ in range(n)]
        with_idle = settle(worker, base + 2 * n)
        for sock in idle:
            sock.close()
        settle(worker, 0)
        moved, release, results = threading.Semaphore(0), threading.Event(), []
        size = int(args.megabytes * (1 << 20))
        clients = [threading.Thread(target=bulk_stream, args=(worker.port, pattern(size, i), moved, release, results))
                   for i in range(n)]
        for client in clients:
            client.start()
        for _ in clients:
            moved.acquire()
        with_bulk = worker.descriptors()
        release.set()
        for client in clients:
            client.join(60)
        warnings = [line.strip() for line in worker.lines if "out of descriptors" in line]
        print(f"{worker.budget}")
        print(f"{n} streams: {base} descriptors with none, {with_idle} idle ({(with_idle - base) / n:.2f} per stream), "
              f"{with_bulk} after {args.megabytes:g} MiB each way ({(with_bulk - base) / n:.2f} per stream)")
        print(f"byte-exact: {sum(results)} of {n}; 'out of descriptors' lines: {len(warnings)}")
        for line in warnings[:3]:
            print("  " + line)
    finally:
        worker.close()


if __name__ == "__main__":
    main()
