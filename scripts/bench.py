"""Benchmark ltcp against a direct connection on loopback, in one run.

    python scripts/bench.py [--quick] [--repeat N] [--rows direct,ltcp]

Starts its own backends (a sink and an echo server, in a separate process),
starts ltcp as ``python -m ltcp`` on an io.l5d.static configuration, and drives
each workload against each row from this process:

* bulk      one stream sending as fast as it can; MB/s counted by the sink
* reqresp   50 keep-alive connections doing 64-byte request/response; requests/s
* connrate  10 at a time: connect, one request/response, close; connections/s
* latency   10 keep-alive connections; p50 and p99 of request/response in microseconds

Every figure is the median of --repeat runs; ratios are to the direct row.
"""

import argparse
import multiprocessing
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

MESSAGE = b"x" * 64
CHUNK = 256 * 1024


# -- backends (run in their own process) -----------------------------------------

def _serve(sink_sock, echo_sock):
    """One selector loop for both backends: a byte-counting sink and an echo server."""
    sel = selectors.DefaultSelector()
    buf = bytearray(CHUNK)
    counts = {}

    def accept(listener, role):
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            counts[conn] = 0
            sel.register(conn, selectors.EVENT_READ, role)

    for sock, role in ((sink_sock, "sink"), (echo_sock, "echo")):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, ("listen", role))
    while True:
        for key, _ in sel.select():
            sock, role = key.fileobj, key.data
            if isinstance(role, tuple):
                accept(sock, role[1])
                continue
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                n = 0
            if n == 0:
                sel.unregister(sock)
                try:
                    if role == "sink":
                        sock.setblocking(True)
                        sock.sendall(counts[sock].to_bytes(8, "big"))
                except OSError:
                    pass
                del counts[sock]
                sock.close()
            elif role == "sink":
                counts[sock] += n
            else:
                try:
                    sock.send(buf[:n])  # 64-byte messages always fit
                except OSError:
                    pass


def listening_socket():
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# -- workloads (run here, against one port each) ----------------------------------

def bulk(port, total):
    payload = memoryview(bytearray(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(payload)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        counted = int.from_bytes(s.recv(8), "big")
        elapsed = time.perf_counter() - start
    if counted != sent:
        raise RuntimeError(f"sink counted {counted} of {sent} bytes")
    return sent / elapsed / 1e6


def _keepalive(port, conns, duration, latencies=None):
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks.append(s)
    sent_at = {}
    done = 0
    start = time.perf_counter()
    end = start + duration
    for s in socks:
        sel.register(s, selectors.EVENT_READ, bytearray())
        sent_at[s] = time.perf_counter()
        s.send(MESSAGE)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, _ in sel.select(end - now):
            s, got = key.fileobj, key.data
            got += s.recv(4096)
            if len(got) >= len(MESSAGE):
                del got[:len(MESSAGE)]
                done += 1
                t = time.perf_counter()
                if latencies is not None:
                    latencies.append(t - sent_at[s])
                sent_at[s] = t
                s.send(MESSAGE)
    elapsed = time.perf_counter() - start
    for s in socks:
        sel.unregister(s)
        s.close()
    return done / elapsed


def reqresp(port, duration):
    return _keepalive(port, 50, duration)


def latency(port, duration):
    samples = []
    _keepalive(port, 10, duration, samples)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def connrate(port, duration, parallel=10):
    sel = selectors.DefaultSelector()
    done = 0

    def start_one():
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # no TIME_WAIT pile-up
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE, None)

    for _ in range(parallel):
        start_one()
    start = time.perf_counter()
    end = start + duration
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, mask in sel.select(end - now):
            s = key.fileobj
            if mask & selectors.EVENT_WRITE:
                s.send(MESSAGE)
                sel.modify(s, selectors.EVENT_READ, bytearray())
                continue
            try:
                chunk = s.recv(4096)
            except OSError:
                chunk = b""
            key.data.extend(chunk)
            if len(key.data) >= len(MESSAGE) or not chunk:
                sel.unregister(s)
                s.close()
                done += 1 if chunk else 0
                start_one()
    elapsed = time.perf_counter() - start
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return done / elapsed


# -- rows ---------------------------------------------------------------------------

class Ltcp:
    """ltcp in a subprocess with a static route to each backend."""

    name = "ltcp"

    def __init__(self, sink_port, echo_port):
        self.ports = {"sink": free_port(), "echo": free_port()}
        config = {
            "admin": {"port": 0},
            "routers": [{
                "label": "bench",
                "interpreter": {"kind": "io.l5d.static", "names": {
                    "/svc/sink": [f"127.0.0.1:{sink_port}"], "/svc/echo": [f"127.0.0.1:{echo_port}"]}},
                "servers": [{"port": self.ports["sink"], "dstName": "/svc/sink", "maxConcurrency": 1000000},
                            {"port": self.ports["echo"], "dstName": "/svc/echo", "maxConcurrency": 1000000}],
            }],
        }
        self.file = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump(config, self.file)
        self.file.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "ltcp", "--log-level", "warning", self.file.name])
        for port in self.ports.values():
            wait_listening(port)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        os.unlink(self.file.name)


class Direct:
    name = "direct"

    def __init__(self, sink_port, echo_port):
        self.ports = {"sink": sink_port, "echo": echo_port}

    def close(self):
        pass


ROWS = {"direct": Direct, "ltcp": Ltcp}


def median(runs):
    if isinstance(runs[0], tuple):
        return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))
    return statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 20 s in all)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (median reported)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    args = parser.parse_args()
    duration = 1.0 if args.quick else 5.0
    repeat = args.repeat or (1 if args.quick else 3)
    bulk_bytes = (256 if args.quick else 2048) * 1024 * 1024

    print(f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}; {repeat} run(s) each, median shown")
    sink, echo = listening_socket(), listening_socket()
    server = multiprocessing.Process(target=_serve, args=(sink, echo), daemon=True)
    server.start()
    results = {}
    try:
        for name in args.rows.split(","):
            row = ROWS[name](sink.getsockname()[1], echo.getsockname()[1])
            try:
                results[name] = {
                    "bulk MB/s": median([bulk(row.ports["sink"], bulk_bytes) for _ in range(repeat)]),
                    "reqresp req/s": median([reqresp(row.ports["echo"], duration) for _ in range(repeat)]),
                    "connrate conn/s": median([connrate(row.ports["echo"], duration) for _ in range(repeat)]),
                    "latency p50/p99 us": median([latency(row.ports["echo"], duration) for _ in range(repeat)]),
                }
            finally:
                row.close()
    finally:
        server.terminate()
    print_table(results)


def print_table(results):
    names = list(results)
    metrics = list(next(iter(results.values())))
    base = results.get("direct")
    print(f"{'workload':<20}" + "".join(f"{n:>22}" for n in names))
    for metric in metrics:
        cells = []
        for n in names:
            value = results[n][metric]
            ratio = ""
            if base is not None and n != "direct":
                b = base[metric]
                ratio = f" ({value[1] / b[1]:.2f}x)" if isinstance(value, tuple) else f" ({value / b:.2f}x)"
            shown = f"{value[0]:.0f}/{value[1]:.0f}" if isinstance(value, tuple) else f"{value:,.0f}"
            cells.append(f"{shown + ratio:>22}")
        print(f"{metric:<20}" + "".join(cells))


if __name__ == "__main__":
    main()
