"""Benchmark ltcp against HAProxy, a plain asyncio proxy and a direct connection, in one run.

    python scripts/bench.py [--quick] [--repeat N] [--rows direct,ltcp,ltcplog,haproxy,ltcp2,haproxy2,ltcpauto,asyncio]
                            [--workloads bulk,keepalive,connrate,latency,idle,scrapes,reloads]

Rows: ``ltcp`` runs one worker and ``haproxy`` one thread; ``ltcp2`` runs
``workers: 2`` and is compared with ``haproxy2`` (``nbthread 2``), as is
``ltcpauto`` (``workers: auto``, one per CPU: two on a two-core machine); ``ltcplog``
is ``ltcp`` writing a JSON access log, compared with ``ltcp`` (the log's cost).  CPU and
memory figures add up every process of a row (ltcp's supervisor and workers).

Everything runs on 127.0.0.1 and is started by this script: the backends (a
sink and an echo server of our own, plus nginx and an iperf3 server when they
are installed), each proxy row, and the load generators (wrk and iperf3 when
installed, else built-in Python clients).

Workloads:

  bulk       one stream, as fast as it goes (iperf3, else built-in); MB/s, and
             the proxy's CPU seconds per GB moved (the generators share the
             two cores, so throughput alone understates the proxy's cost)
  keepalive  50 keep-alive connections, small requests (wrk + nginx, else
             built-in 64-byte echo); requests/s
  connrate   a new connection per request, 50 at a time (wrk with
             "Connection: close", else built-in); connections/s
  tlsrate    run with connrate (no workload of its own): the same with the proxy
             terminating TLS (one test certificate from trustme, shared by every
             row), to nginx in plain HTTP; connections/s
  CPU each   for keepalive, connrate and tlsrate: the proxy's CPU time (from
             /proc) per request or connection, in microseconds
  latency    10 keep-alive connections; p50 and p99 in microseconds
  idle-rss   4,000 idle proxied connections: proxy RSS (MB) and KB per connection,
             and PSS (MB): the memory the row's processes hold between them, each
             page shared by several (ltcp's workers, forks of one template) counted once
  idle-cpu   CPU of the proxy over 5 s with those 4,000 connections idle and
             idle timeouts armed; percent of one core
  reloads    ltcp and HAProxy rows: keep-alive requests/s over 16 persistent
             connections (as pgbench's sessions) while the proxy reloads its
             configuration every second (ltcp: SIGHUP; HAProxy in master-worker
             mode: SIGUSR2), and as a percentage of the same without reloads
  scrapes    ltcp only: latency p99 with 2,000 streams open, without and with
             /metrics scraped 20 times a second, medians of interleaved runs
             (target: within 1.2x); and the same with five dashboards open
             (the page's /api/v1/state every 2 seconds each)

Each figure is the median of --repeat runs (3, or 1 with --quick).  Ratios are
to HAProxy with as many threads as the row has workers.  Install the peers with
``apt-get install haproxy nginx-light iperf3 wrk``.
"""

import argparse
import json
import multiprocessing
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGE = b"x" * 64
CHUNK = 256 * 1024
IDLE_CONNECTIONS = 4000


# -- our own backends (one process, one selector loop) --------------------------------

def _serve(sink_sock, echo_sock):
    """A byte-counting sink (answers the count at EOF) and an echo server."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the parent's handler would print a traceback at close)
    sel = selectors.DefaultSelector()
    buf = bytearray(CHUNK)
    counts = {}
    for sock, role in ((sink_sock, "sink"), (echo_sock, "echo")):
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, ("listen", role))
    while True:
        for key, _ in sel.select():
            sock, role = key.fileobj, key.data
            if isinstance(role, tuple):
                while True:
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    counts[conn] = 0
                    sel.register(conn, selectors.EVENT_READ, role[1])
                continue
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                n = 0
            if n == 0:
                sel.unregister(sock)
                if role == "sink":
                    try:
                        sock.setblocking(True)
                        sock.sendall(counts[sock].to_bytes(8, "big"))
                    except OSError:
                        pass
                del counts[sock]
                sock.close()
            elif role == "sink":
                counts[sock] += n
            else:
                _echo_back(sock, buf[:n])


def _echo_back(sock, data):
    """Send ``data`` back whole; a rare partial send finishes blocking (bulk clients read meanwhile)."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        return
    if sent < len(data):
        try:
            sock.setblocking(True)
            sock.sendall(data[sent:])
            sock.setblocking(False)
        except OSError:
            pass


def listening_socket(port=0):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
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
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


class Backends:
    """Our sink and echo servers, and nginx and iperf3 when installed."""

    def __init__(self, workdir):
        self.procs = []
        self.sink, self.echo = listening_socket(), listening_socket()
        server = multiprocessing.Process(target=_serve, args=(self.sink, self.echo), daemon=True)
        server.start()
        self.server = server
        self.ports = {"sink": self.sink.getsockname()[1], "echo": self.echo.getsockname()[1]}
        self.nginx = shutil.which("nginx") and shutil.which("wrk")
        self.iperf = shutil.which("iperf3")
        if self.nginx:
            self.ports["http"] = free_port()
            conf = os.path.join(workdir, "nginx.conf")
            with open(conf, "w") as f:
                f.write(f"""daemon off; worker_processes 1; user root; pid {workdir}/nginx.pid;
error_log {workdir}/nginx.err; events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 600s;
  server {{ listen 127.0.0.1:{self.ports['http']} backlog=4096; location / {{ return 200 "hello, world\\n"; }} }} }}
""")
            self.procs.append(subprocess.Popen(["nginx", "-p", workdir, "-c", conf]))
            wait_listening(self.ports["http"])
        if self.iperf:
            self.ports["iperf"] = free_port()
            self.procs.append(subprocess.Popen(["iperf3", "-s", "-p", str(self.ports["iperf"])],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_listening(self.ports["iperf"])
        self.identity = _identity(workdir) if self.nginx else None

    def close(self):
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)
        self.server.terminate()


def _identity(workdir):
    """(certificate, key, both in one file) for the TLS rows, or None without trustme."""
    try:
        import trustme
    except ImportError:
        print("trustme is not installed: no TLS row (pip install trustme)", file=sys.stderr)
        return None
    cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
    paths = [os.path.join(workdir, name) for name in ("tls-cert.pem", "tls-key.pem", "tls-both.pem")]
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    cert.private_key_and_cert_chain_pem.write_to_path(paths[2])
    return paths


# -- rows ------------------------------------------------------------------------------

class Row:
    """A way of reaching the backends: ``ports`` maps each backend to the port to use.

    ``peer`` names the row its ratios are taken against (HAProxy with as many threads).
    """

    proc = None
    peer = "haproxy"
    reload_signal = None

    def pid(self):
        return self.proc.pid if self.proc else None

    def pids(self):
        """The proxy's processes: its own and its children's (ltcp's workers)."""
        if self.proc is None:
            return []
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [self.proc.pid, *map(int, f.read().split())]
        except OSError:
            return [self.proc.pid]

    def reload(self):
        """Have the proxy load its configuration again (rows with a ``reload_signal``)."""
        self.proc.send_signal(self.reload_signal)

    def close(self):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Direct(Row):
    name = "direct"

    def __init__(self, backends, workdir):
        self.ports = dict(backends.ports)


class Ltcp(Row):
    name = "ltcp"
    workers = 1
    launch = ("-m", "ltcp")  # what the interpreter runs (bench_workers.py --calls: a profiled ltcp)
    reload_signal = signal.SIGHUP
    access_log = None

    def __init__(self, backends, workdir):
        self.ports = {role: free_port() for role in backends.ports}
        self.admin_port = free_port()
        config = {
            "workers": self.workers,
            "admin": {"port": self.admin_port},
            **({"accessLog": {"path": self.access_log}} if self.access_log else {}),
            "routers": [{
                "label": "bench",
                "interpreter": {"kind": "io.l5d.static", "names": {
                    f"/svc/{role}": [f"127.0.0.1:{port}"] for role, port in backends.ports.items()}},
                "servers": [{"port": self.ports[role], "dstName": f"/svc/{role}", "idleTimeoutMs": 600000}
                            for role in backends.ports],
            }],
        }
        if backends.identity:
            cert, key, _ = backends.identity
            self.ports["tls"] = free_port()
            config["routers"][0]["servers"].append({
                "port": self.ports["tls"], "dstName": "/svc/http", "idleTimeoutMs": 600000,
                "tls": {"defaultIdentity": {"privateKey": key, "certs": [cert]}}})
        path = os.path.join(workdir, f"{self.name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        self.proc = subprocess.Popen([sys.executable, *self.launch, "--log-level", "warning", path])
        for port in self.ports.values():
            wait_listening(port)


class LtcpLog(Ltcp):
    """One worker writing a JSON access log line per stream (to a file in the work directory)."""

    name = "ltcplog"
    peer = "ltcp"

    def __init__(self, backends, workdir):
        self.access_log = os.path.join(workdir, "access.log")
        super().__init__(backends, workdir)


class Ltcp2(Ltcp):
    name = "ltcp2"
    workers = 2
    peer = "haproxy2"


class LtcpAuto(Ltcp):
    name = "ltcpauto"
    workers = "auto"
    peer = "haproxy2"


class Haproxy(Row):
    name = "haproxy"
    threads = 1
    peer = None
    reload_signal = signal.SIGUSR2  # (in master-worker mode)

    def __init__(self, backends, workdir):
        self.ports = {role: free_port() for role in backends.ports}
        lines = ["global", f"  nbthread {self.threads}", "  maxconn 9000",
                 "defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 600s",
                 "  timeout server 600s", "  maxconn 9000"]
        for role, port in backends.ports.items():
            lines += [f"listen {role}", f"  bind 127.0.0.1:{self.ports[role]}",
                      f"  server s 127.0.0.1:{port}"]
        if backends.identity:
            self.ports["tls"] = free_port()
            lines += ["listen tls", f"  bind 127.0.0.1:{self.ports['tls']} ssl crt {backends.identity[2]}",
                      f"  server s 127.0.0.1:{backends.ports['http']}"]
        path = os.path.join(workdir, f"{self.name}.cfg")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        # Master-worker mode (-W), so that SIGUSR2 reloads as systemd's ExecReload does.
        self.proc = subprocess.Popen(["haproxy", "-W", "-db", "-f", path], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for port in self.ports.values():
            wait_listening(port)


class Haproxy2(Haproxy):
    name = "haproxy2"
    threads = 2


class Asyncio(Row):
    name = "asyncio"

    def __init__(self, backends, workdir):
        self.ports = {role: free_port() for role in backends.ports}
        pairs = [f"{self.ports[role]}:{port}" for role, port in backends.ports.items()]
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "asyncio_proxy.py"), *pairs],
                                     stdout=subprocess.DEVNULL)
        for port in self.ports.values():
            wait_listening(port)


ROWS = {"direct": Direct, "ltcp": Ltcp, "ltcplog": LtcpLog, "haproxy": Haproxy, "ltcp2": Ltcp2, "haproxy2": Haproxy2,
        "ltcpauto": LtcpAuto, "asyncio": Asyncio}


# -- workloads ---------------------------------------------------------------------------

def bulk(row, backends, duration):
    """(MB/s of one stream, CPU seconds the proxy spent per GB moved)."""
    pid = row.pid()
    cpu_before = _cpu_seconds(row) if pid else 0.0
    rate = _bulk_rate(row, backends, duration)
    cpu = (_cpu_seconds(row) - cpu_before) / (rate * duration / 1000) if pid else 0.0
    return rate, cpu


def _bulk_rate(row, backends, duration):
    if backends.iperf:
        for _ in range(5):  # the iperf3 server serves one test at a time; it may still be busy
            out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(row.ports["iperf"]),
                                  "-t", str(duration), "-J"], capture_output=True, text=True, timeout=duration + 30)
            report = json.loads(out.stdout)
            if "error" not in report:
                return report["end"]["sum_received"]["bits_per_second"] / 8 / 1e6
            time.sleep(0.5)
        raise RuntimeError(f"iperf3: {report['error']}")
    payload = memoryview(bytearray(CHUNK))
    with socket.create_connection(("127.0.0.1", row.ports["sink"])) as s:
        start = time.perf_counter()
        sent = 0
        while time.perf_counter() - start < duration:
            s.sendall(payload)
            sent += CHUNK
        s.shutdown(socket.SHUT_WR)
        counted = int.from_bytes(s.recv(8), "big")
        elapsed = time.perf_counter() - start
    if counted != sent:
        raise RuntimeError(f"sink counted {counted} of {sent} bytes")
    return sent / elapsed / 1e6


def _wrk(port, connections, duration, close=False, scheme="http"):
    args = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(args + [f"{scheme}://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=duration + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    return rate, {k: _micros(v) for k, v in percentiles.items()}


def _micros(text):
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def keepalive(row, backends, duration):
    if backends.nginx:
        return _wrk(row.ports["http"], 50, duration)[0]
    return _echo_clients(row.ports["echo"], 50, duration)


def connrate(row, backends, duration):
    if backends.nginx:
        return _wrk(row.ports["http"], 50, duration, close=True)[0]
    return _connect_clients(row.ports["echo"], 50, duration)


def tlsrate(row, backends, duration):
    return _wrk(row.ports["tls"], 50, duration, close=True, scheme="https")[0]


def reloads(row, backends, duration):
    """(requests/s over 16 persistent connections with a reload every second, % of the same without)."""
    def persistent(seconds):
        if backends.nginx:
            return _wrk(row.ports["http"], 16, seconds)[0]
        return _echo_clients(row.ports["echo"], 16, seconds)

    seconds = 2 * duration  # (a reload a second: enough of them to count)
    calm = persistent(seconds)
    stop = threading.Event()

    def reload_every_second():
        while not stop.wait(1.0):
            row.reload()

    reloader = threading.Thread(target=reload_every_second)
    reloader.start()
    try:
        busy = persistent(seconds)
    finally:
        stop.set()
        reloader.join()
    return busy, busy / calm * 100


def _with_cpu(row, fn, backends, duration):
    """(requests per second, the proxy's CPU microseconds per request): a figure other machines can compare."""
    pid = row.pid()
    before = _cpu_seconds(row) if pid else 0.0
    rate = fn(row, backends, duration)
    return rate, (_cpu_seconds(row) - before) / (rate * duration) * 1e6 if pid else None


def latency(row, backends, duration):
    if backends.nginx:
        percentiles = _wrk(row.ports["http"], 10, duration)[1]
        return percentiles["50"], percentiles["99"]
    samples = []
    _echo_clients(row.ports["echo"], 10, duration, samples)
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def _echo_clients(port, conns, duration, latencies=None):
    sel = selectors.DefaultSelector()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    sent_at, done = {}, 0
    for s in socks:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, bytearray())
        sent_at[s] = time.perf_counter()
        s.send(MESSAGE)
    start = time.perf_counter()
    end = start + duration
    while (now := time.perf_counter()) < end:
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
        s.close()
    return done / elapsed


def _connect_clients(port, parallel, duration):
    sel = selectors.DefaultSelector()
    done = 0

    def start_one():
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE, None)

    for _ in range(parallel):
        start_one()
    start = time.perf_counter()
    end = start + duration
    while (now := time.perf_counter()) < end:
        for key, mask in sel.select(end - now):
            s = key.fileobj
            if mask & selectors.EVENT_WRITE:
                try:
                    s.send(MESSAGE)
                except OSError:
                    pass
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
                done += bool(chunk)
                start_one()
    elapsed = time.perf_counter() - start
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return done / elapsed


def _rss_kb(row):
    """Resident memory of every process of the row (ltcp: supervisor and workers)."""
    total = 0
    for pid in row.pids():
        with open(f"/proc/{pid}/status") as f:
            total += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return total


def _pss_kb(row):
    """Proportional memory of every process of the row: summed, each physical page counts once."""
    total = 0
    for pid in row.pids():
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += int(re.search(r"^Pss:\s+(\d+)", f.read(), re.MULTILINE).group(1))
    return total


def _cpu_seconds(row):
    total = 0.0
    for pid in row.pids():
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _open_idle(row, count):
    """``count`` proxied connections to the echo backend, each known to be through the proxy."""
    socks = []
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", row.ports["echo"]))
            socks.append(s)
            if i % 500 == 499 or i == count - 1:  # make sure they are proxied, not just queued
                s.sendall(b"x")
                s.recv(1)
    except BaseException:
        _close_all(socks)
        raise
    return socks


def _close_all(socks):
    for s in socks:
        s.close()


def idle(row, backends, duration):
    """(RSS MB, PSS MB, KB per connection, % CPU) with IDLE_CONNECTIONS idle proxied connections."""
    pid = row.pid()
    if pid is None:
        return None
    before = _rss_kb(row)
    socks = _open_idle(row, IDLE_CONNECTIONS)
    try:
        time.sleep(1.0)  # let the proxy settle before measuring
        after, pss = _rss_kb(row), _pss_kb(row)
        cpu_before = _cpu_seconds(row)
        time.sleep(duration)
        cpu = (_cpu_seconds(row) - cpu_before) / duration * 100
    finally:
        _close_all(socks)
    return after / 1024, pss / 1024, (after - before) / IDLE_CONNECTIONS, cpu


def scrapes(row, backends, duration, pairs, per_second=20, streams=2000, path="/metrics"):
    """(latency p99 µs, p99 µs while ``path`` is fetched ``per_second``), with ``streams`` open.

    The two are measured in ``pairs`` interleaved runs and the medians kept:
    p99 on two shared cores drifts more from minute to minute than scrapes move it.
    """
    socks = _open_idle(row, streams)
    url = f"http://127.0.0.1:{row.admin_port}{path}"
    quiet, scraped = [], []
    try:
        for _ in range(pairs):
            quiet.append(latency(row, backends, duration)[1])
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape, args=(url, per_second, stop))
            scraper.start()
            try:
                scraped.append(latency(row, backends, duration)[1])
            finally:
                stop.set()
                scraper.join()
    finally:
        _close_all(socks)
    return statistics.median(quiet), statistics.median(scraped)


def _scrape(url, per_second, stop):
    while not stop.wait(1 / per_second):
        urllib.request.urlopen(url, timeout=10).read()


# -- running and reporting -------------------------------------------------------------

WORKLOADS = ("bulk", "keepalive", "connrate", "latency", "idle", "scrapes", "reloads")


def measure(row, backends, args):
    duration = 2 if args.quick else 5
    wanted = args.workloads
    results = {}
    if "bulk" in wanted:
        bulk_runs = [bulk(row, backends, duration) for _ in range(args.repeat)]
        results["bulk MB/s"] = statistics.median(rate for rate, _ in bulk_runs)
        if row.name != "direct":
            results["bulk CPU s/GB"] = statistics.median(cpu for _, cpu in bulk_runs)
    workloads = [(name, fn) for name, fn in (("keepalive req/s", keepalive), ("connrate conn/s", connrate))
                 if name.split()[0] in wanted]
    if "tls" in row.ports and "connrate" in wanted:
        workloads.append(("tlsrate conn/s", tlsrate))
    for name, fn in workloads:
        runs = [_with_cpu(row, fn, backends, duration) for _ in range(args.repeat)]
        results[name] = statistics.median(rate for rate, _ in runs)
        if row.pid():
            results[name.split()[0] + " CPU us each"] = statistics.median(cpu for _, cpu in runs)
    if "latency" in wanted:
        runs = [latency(row, backends, duration) for _ in range(args.repeat)]
        results["latency p50/p99 us"] = tuple(statistics.median(r[i] for r in runs) for i in range(2))
    if row.name != "direct" and "idle" in wanted:
        rss, pss, per_conn, cpu = idle(row, backends, duration)
        results["idle RSS MB"] = rss
        results["idle PSS MB"] = pss
        results["idle KB/conn"] = per_conn
        results["idle CPU %"] = cpu
    if hasattr(row, "admin_port") and "scrapes" in wanted:
        pairs = 3 if args.quick else 5
        results["p99 us, 20 scrapes/s"] = scrapes(row, backends, duration, pairs)
        # Five open dashboards: each page asks for the state every two seconds.
        results["p99 us, 5 dashboards"] = scrapes(row, backends, duration, pairs, per_second=2.5,
                                                  path="/api/v1/state")
    if row.reload_signal and "reloads" in wanted:
        runs = [reloads(row, backends, duration) for _ in range(args.repeat)]
        results["reloading req/s"] = statistics.median(rate for rate, _ in runs)
        results["reloading % kept"] = statistics.median(kept for _, kept in runs)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-second workloads, one run each")
    parser.add_argument("--repeat", type=int, default=None, help="runs per figure (median reported)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    args = parser.parse_args()
    args.workloads = set(args.workloads.split(","))
    if args.workloads - set(WORKLOADS):
        parser.error(f"unknown workloads: {', '.join(sorted(args.workloads - set(WORKLOADS)))}")
    args.repeat = args.repeat or (1 if args.quick else 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = [r for r in args.rows.split(",") if r != "haproxy" or shutil.which("haproxy")]

    with tempfile.TemporaryDirectory(prefix="ltcp-bench-") as workdir:
        backends = Backends(workdir)
        tools = ["iperf3" if backends.iperf else "built-in bulk client",
                 "wrk + nginx" if backends.nginx else "built-in echo clients"]
        print(f"machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
              f"Python {platform.python_version()}; tools: {', '.join(tools)}; "
              f"{args.repeat} run(s) per figure, median shown", flush=True)
        results = {}
        try:
            for name in rows:
                row = ROWS[name](backends, workdir)
                try:
                    results[name] = measure(row, backends, args)
                finally:
                    row.close()
                print(f"  {name}: done", file=sys.stderr, flush=True)
        finally:
            backends.close()
    print_table(results)


def print_table(results):
    names = list(results)
    metrics = list(dict.fromkeys(m for r in results.values() for m in r))
    reference = "haproxy" if "haproxy" in results else "direct"
    base = results.get(reference)
    width = 24
    print(f"{'workload':<20}" + "".join(f"{n:>{width}}" for n in names))
    for metric in metrics:
        cells = []
        for n in names:
            value = results[n].get(metric)
            if value is None:
                cells.append(f"{'-':>{width}}")
                continue
            shown = (f"{value[0]:,.0f}/{value[1]:,.0f}" if isinstance(value, tuple)
                     else f"{value:,.2f}" if value < 10 else f"{value:,.1f}")
            peer = results.get(ROWS[n].peer) if n in ROWS and ROWS[n].peer else base
            against = peer.get(metric) if peer and n != reference else None
            if against:
                ratio = value[1] / against[1] if isinstance(value, tuple) else value / against
                shown += f" ({ratio:.2f}x)"
            cells.append(f"{shown:>{width}}")
        print(f"{metric:<20}" + "".join(cells))
    if base:
        print(f"ratios in brackets are to {reference}, or to haproxy2 for ltcp2 and ltcpauto (latency: p99)")
    for key, what in (("p99 us, 20 scrapes/s", "20 scrapes/s"), ("p99 us, 5 dashboards", "5 open dashboards")):
        scraped = results.get("ltcp", {}).get(key)
        if scraped:
            print(f"{what}: ltcp p99 {scraped[0]:,.0f} us without, {scraped[1]:,.0f} us with, "
                  f"2,000 streams open ({scraped[1] / scraped[0]:.2f}x)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
