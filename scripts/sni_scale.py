"""Discovery at SNI scale: how fast names resolve when clients bring thousands of them.

Runs ltcp (a subprocess, SNI passthrough routing ``/svc/{sni}``) against the
namerd-API test server and measures three things:

* churn: after many ClientHellos with distinct unknown names, how long a known
  name takes to connect, and how many namerd watches are left open;
* first answers: distinct known names each used once (``periodSecs: 2``,
  connect timeout 2 s), how many are routed and how fast;
* hanging names: with three names namerd never answers, how long a fresh
  resolvable name takes.

    python scripts/sni_scale.py [--churn 1000] [--names 1100] [--ltcp-path DIR]

``--ltcp-path`` runs the ltcp package (and its namerd test server) found in
DIR, e.g. an older checkout, to compare before and after.
"""

import argparse
import concurrent.futures
import os
import re
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time

import yaml

CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE


def client_hello(name):
    tls = CONTEXT.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()


class EchoServer:
    """Echoes on one thread with a selector: enough for thousands of short streams."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        key.fileobj.send(data)
                    except OSError:
                        pass
                else:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()


class Ltcp:
    def __init__(self, namerd_url, ltcp_path, connect_ms, period):
        document = {"admin": {"port": 0}, "routers": [{
            "label": "sni",
            "interpreter": {"kind": "io.l5d.namerd.http", "baseUrl": namerd_url, "periodSecs": period},
            "servers": [{"port": 0, "dstName": "/svc/{sni}", "connectTimeoutMs": connect_ms}]}]}
        env = dict(os.environ, PYTHONPATH=ltcp_path) if ltcp_path else None
        # "-m" looks in the working directory first: run from the tree under test.
        self.proc = subprocess.Popen([sys.executable, "-m", "ltcp", "-"], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ltcp_path)
        self.proc.stdin.write(yaml.safe_dump(document))
        self.proc.stdin.close()
        log = ""
        while "admin server on" not in log:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("ltcp did not start:\n" + log)
            log += line
        self.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log).group(1))
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def hello(self, name, timeout=10):
        """Seconds until the backend echoed the hello back, or None if the stream was refused."""
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as c:
                c.sendall(client_hello(name))
                return time.monotonic() - started if c.recv(1) else None
        except OSError:
            return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def churn(args, namerd, echo):
    namerd.set("/svc/good.example", [f"127.0.0.1:{echo.port}"])
    ltcp = Ltcp(namerd.url, args.ltcp_path, 3000, 20)
    try:
        assert ltcp.hello("good.example") is not None, "good.example does not resolve at all"
        started = time.monotonic()
        probes = []
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            for batch in range(0, args.churn, 100):  # after every 100 churned names, try the known one
                list(pool.map(ltcp.hello, (f"churn{i}.example" for i in range(batch, batch + 100))))
                probes.append(ltcp.hello("good.example"))
        traffic = time.monotonic() - started
        open_watches = sum(namerd.watchers(f"/svc/churn{i}.example") for i in range(args.churn))
        open_watches += namerd.watchers("/svc/good.example")
        routed = [t for t in probes if t is not None]
        worst = f"{max(routed) * 1000:.0f} ms" if routed else "-"
        print(f"churn: {args.churn} distinct unknown names in {traffic:.1f}s; good.example probed every 100 names: "
              f"{len(probes) - len(routed)} of {len(probes)} refused, slowest routed {worst}; "
              f"namerd watch connections still open: {open_watches}")
    finally:
        ltcp.stop()


def first_answers(args, namerd, echo):
    names = [f"once{i}.example" for i in range(args.names)]
    for name in names:
        namerd.set(f"/svc/{name}", [f"127.0.0.1:{echo.port}"])
    ltcp = Ltcp(namerd.url, args.ltcp_path, 2000, 2)
    try:
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            times = list(pool.map(ltcp.hello, names))
        elapsed = time.monotonic() - started
        routed = sorted(t for t in times if t is not None)
        p99 = routed[int(len(routed) * 0.99) - 1] * 1000 if routed else float("nan")
        print(f"first answers: {len(routed)} of {len(names)} names routed in {elapsed:.1f}s "
              f"(50 clients at a time; p99 time to first byte {p99:.0f} ms)")
    finally:
        ltcp.stop()


def hanging(args, namerd, echo):
    for i in range(3):
        namerd.stall(f"/svc/hang{i}.example")
    names = [f"fresh{i}.example" for i in range(20)]
    for name in names:
        namerd.set(f"/svc/{name}", [f"127.0.0.1:{echo.port}"])
    ltcp = Ltcp(namerd.url, args.ltcp_path, 2000, 2)
    try:
        # Fill the 16 streaming slots first, so the names below are polled.
        warm = [f"warm{i}.example" for i in range(16)]
        for name in warm:
            namerd.set(f"/svc/{name}", [f"127.0.0.1:{echo.port}"])
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            held = list(pool.map(lambda n: socket.create_connection(("127.0.0.1", ltcp.port)), warm))
            for sock, name in zip(held, warm):
                sock.sendall(client_hello(name))
                sock.recv(1)
            list(pool.map(lambda n: ltcp.hello(n, timeout=3), (f"hang{i}.example" for i in range(3))))
        times = [ltcp.hello(name) for name in names]
        routed = [t for t in times if t is not None]
        worst = f"{max(routed) * 1000:.0f} ms" if routed else "-"
        print(f"hanging names: with 3 names namerd never answers, {len(routed)} of {len(names)} fresh names "
              f"routed; slowest {worst}")
        for sock in held:
            sock.close()
    finally:
        ltcp.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--churn", type=int, default=1000)
    parser.add_argument("--names", type=int, default=1100)
    parser.add_argument("--ltcp-path", help="directory holding the ltcp package to run")
    args = parser.parse_args()
    sys.path.insert(0, args.ltcp_path or os.path.join(os.path.dirname(__file__), ".."))
    from ltcp.testing.namerd import NamerdServer  # the test server of the ltcp under test

    echo = EchoServer()
    for scenario in (churn, first_answers, hanging):
        namerd = NamerdServer().start()
        try:
            scenario(args, namerd, echo)
        finally:
            namerd.close()


if __name__ == "__main__":
    main()
