"""Streams across reloads: how long a hand-over takes, when old workers exit, and memory after many reloads.

    python scripts/handover.py [--streams 10000] [--reloads 50] [--workers 2] [--hand-over/--no-hand-over]

Starts an echo backend (sni_scale's: one selector loop) and ltcp
with ``--workers`` workers and ``graceSecs: 600``, opens ``--streams`` idle
streams (each echoes a line first), then sends SIGHUP ``--reloads`` times,
one after the other.  For each reload it reports the seconds from SIGHUP
until the reload is done (the new workers serve) and until every old worker
has exited, and the RSS and PSS of all ltcp's processes together
(supervisor, template, workers).  At the end every stream must echo again,
byte for byte; the streams that do not are counted.  With
``--no-hand-over`` the old workers keep their streams: the same run shows
what a reload cost before.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sni_scale import EchoServer  # noqa: E402  (the echo backend of the SNI benchmark)


class Ltcp:
    def __init__(self, config):
        self.file = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump(config, self.file)
        self.file.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "ltcp", self.file.name], stderr=subprocess.PIPE,
                                     text=True)
        lines = []
        while not any("admin server on" in line for line in lines):
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("ltcp did not start:\n" + "".join(lines))
            lines.append(line)
        self.log = "".join(lines)
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log).group(1))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.log += line

    def workers(self):
        """Worker pid -> generation, from the log."""
        return {int(pid): int(generation)
                for pid, generation in re.findall(r"worker (\d+) started \(generation (\d+)", self.log)}

    def reloads(self):
        return self.log.count("reload: generation")

    def processes(self):
        """The supervisor and every process under it."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            except FileNotFoundError:
                pass
        return found

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self.file.name)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def memory(pids):
    """(RSS, PSS) in MB of ``pids`` together."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line and not line.startswith("5"))
        except FileNotFoundError:
            continue
        rss += int(fields["Rss"].split()[0])
        pss += int(fields["Pss"].split()[0])
    return rss / 1024, pss / 1024


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def echoes(sock, payload):
    sock.sendall(payload)
    data = b""
    while len(data) < len(payload):
        chunk = sock.recv(len(payload) - len(data))
        if not chunk:
            return False
        data += chunk
    return data == payload


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--reloads", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hand-over", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    backend = EchoServer()
    ltcp = Ltcp({"workers": args.workers, "handOver": args.hand_over, "admin": {"port": 0, "graceSecs": 600},
                 "routers": [{"label": "bench", "interpreter": {"kind": "io.l5d.static", "names": {
                     "/svc/echo": [f"127.0.0.1:{backend.port}"]}},
                     "servers": [{"port": 0, "dstName": "/svc/echo", "connectTimeoutMs": 60000}],
                     "client": {"connectTimeoutMs": 10000}}]})
    try:
        streams = [socket.create_connection(("127.0.0.1", ltcp.port), timeout=30) for _ in range(args.streams)]
        broken = sum(not echoes(sock, b"hello\n") for sock in streams)
        rss, pss = memory(ltcp.processes())
        print(f"{args.streams} idle streams through {args.workers} workers (handOver: {args.hand_over}); "
              f"{broken} failed to echo; RSS {rss:.0f} MB, PSS {pss:.0f} MB")
        print(f"{'reload':>6} {'done s':>7} {'old gone s':>10} {'processes':>9} {'RSS MB':>7} {'PSS MB':>7}")
        for number in range(1, args.reloads + 1):
            old = [pid for pid in ltcp.workers() if alive(pid)]
            reloads = ltcp.reloads()
            started = time.monotonic()
            ltcp.proc.send_signal(signal.SIGHUP)
            wait_until(lambda reloads=reloads: ltcp.reloads() > reloads, 60)
            done = time.monotonic() - started
            gone = wait_until(lambda old=old: not any(alive(pid) for pid in old), 60 if args.hand_over else 0.5)
            took = f"{time.monotonic() - started:10.2f}" if gone else f"{'(stay)':>10}"
            processes = ltcp.processes()
            rss, pss = memory(processes)
            if number <= 3 or number % 10 == 0 or number == args.reloads:
                print(f"{number:6d} {done:7.2f} {took} {len(processes):9d} {rss:7.0f} {pss:7.0f}")
        broken = sum(not echoes(sock, b"after the reloads\n") for sock in streams)
        print(f"after {args.reloads} reloads: {args.streams - broken} of {args.streams} streams echo byte for byte")
        for sock in streams:
            sock.close()
    finally:
        ltcp.stop()


if __name__ == "__main__":
    main()
