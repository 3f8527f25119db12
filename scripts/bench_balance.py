"""Load balancing side by side: one slow backend among three, ltcp's balancers against HAProxy's and nginx's.

    python scripts/bench_balance.py [--quick] [--duration 5] [--slow delay,bandwidth,backlog]
                                    [--rows ltcp-p2c,ltcp-ewma,...]

All on 127.0.0.1, started by this script: three backends of our own (two fast,
the third slow), each row's proxy, and the load generator in a process of its
own.  A client sends a 64-byte request and reads the whole answer, whose first
byte names the backend that wrote it.  The slow backend (--slow, default all
three, a table each):

  delay      answers each request 20 ms late (answers are 1 KB)
  bandwidth  writes at most 256 KB/s per connection (answers are 64 KB, from
             every backend: 0.25 s from the slow one)
  backlog    listen(4), and accepts one connection every 5 ms: connects queue,
             then the kernel drops them (answers are 1 KB)

Loads, --duration seconds each (5, or 2 with --quick), each with a fresh proxy:
connrate (32 clients at once, a new connection per request) and keepalive (32
persistent connections, requests back to back).  Columns, for each load:

  p50, p99   a request's latency in ms, from connect (connrate) or send
             (keepalive) until its answer's last byte
  req/s      requests completed per second
  slow %     share of the completed requests that the slow backend answered
             (a third is what a balancer blind to speed would give it)
  err        connections that failed or ended before their answer

Rows: ltcp (``workers: 1``, io.l5d.static) with ``client.loadBalancer`` ``{kind:
p2c}``, ``{kind: ewma, decayTimeMs: 10000}``, ``{kind: roundRobin}``; HAProxy
``balance leastconn`` and ``roundrobin`` (mode tcp, ``nbthread 1``); nginx
stream ``least_conn`` (``worker_processes 1``).  A row that cannot run (its
configuration rejected, a peer not installed) is n/a, the reason below the
table.  Last line of a table: ltcp's CPU time (supervisor and worker, from
/proc) per new connection of connrate, ewma against p2c.  Peers:
``apt-get install haproxy nginx-light libnginx-mod-stream``.
"""

import argparse
import heapq
import itertools
import multiprocessing
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (ports, process rows and CPU accounting of the main benchmark)

REQUEST = b"q" * 63 + b"\n"
CLIENTS = 32
LOADS = ("connrate", "keepalive")
TICK = 0.01  # the bandwidth-limited backend writes every TICK seconds
SLOW_MARK = 2  # the slow backend is the third
ANSWER_BYTES = {"delay": 1024, "bandwidth": 64 * 1024, "backlog": 1024}
SLOW = {"delay": {"delay": 0.020}, "bandwidth": {"rate": 256 * 1024},
        "backlog": {"accept_every": 0.005, "backlog": 4}}
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


# -- backends -------------------------------------------------------------------------

class _Peer:
    """A backend's connection: request bytes not yet a whole request, answer bytes not yet sent."""

    __slots__ = ("got", "out")

    def __init__(self):
        self.got, self.out = 0, bytearray()


class Backend:
    """One backend's loop.  Every REQUEST's worth of bytes read is answered with ``size`` bytes
    whose first is ``mark``, after ``delay`` s, at most ``rate`` bytes/s; with ``accept_every``,
    one connection is accepted that often and the others wait in a ``backlog`` queue."""

    def __init__(self, sock, mark, size, delay=0.0, rate=None, accept_every=None, backlog=4096):
        self.listener, self.answer = sock, bytes([mark]) + bytes(size - 1)
        self.delay, self.rate, self.accept_every = delay, rate, accept_every
        self.sel, self.timers, self.seq, self.peers = selectors.DefaultSelector(), [], itertools.count(), {}
        sock.setblocking(False)
        sock.listen(backlog)
        if accept_every:
            self._later(accept_every, self._accept)
        else:
            self.sel.register(sock, selectors.EVENT_READ, None)

    def run(self):
        while True:
            timeout = max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    self._accept()
                else:
                    self._ready(key.fileobj, key.data, mask)
            while self.timers and self.timers[0][0] <= time.monotonic():
                _, _, fn, arg = heapq.heappop(self.timers)
                fn(arg)

    def _later(self, seconds, fn, arg=None):
        heapq.heappush(self.timers, (time.monotonic() + seconds, next(self.seq), fn, arg))

    def _accept(self, _=None):
        """Every connection waiting; with ``accept_every``, one, and again that much later."""
        if self.accept_every:
            self._later(self.accept_every, self._accept)
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peers[conn] = peer = _Peer()
            self.sel.register(conn, selectors.EVENT_READ, peer)
            if self.accept_every:
                return

    def _ready(self, sock, peer, mask):
        if mask & selectors.EVENT_WRITE:
            self._flush(sock)
        if not mask & selectors.EVENT_READ or sock not in self.peers:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        requests, peer.got = divmod(peer.got + len(data), len(REQUEST))
        for _ in range(requests):
            self._later(self.delay, self._answer, sock)  # (due at once without a delay)

    def _answer(self, sock):
        peer = self.peers.get(sock)
        if peer is not None:
            idle = not peer.out
            peer.out += self.answer
            if idle:
                self._flush(sock)

    def _flush(self, sock):
        """Send what the rate allows (then again in TICK s), or all the socket takes (then on EVENT_WRITE)."""
        peer = self.peers.get(sock)
        if peer is None:
            return
        try:
            sent = sock.send(peer.out[:int(self.rate * TICK)] if self.rate else peer.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(sock)
            return
        del peer.out[:sent]
        if self.rate:
            if peer.out:
                self._later(TICK, self._flush, sock)
        else:
            self.sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.out else 0), peer)

    def _close(self, sock):
        self.sel.unregister(sock)
        del self.peers[sock]
        sock.close()


def _backend_main(sock, mark, size, options):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    Backend(sock, mark, size, **options).run()


class Backends:
    """Two fast backends and, third, the slow one of the ``slow`` variant: a process each."""

    def __init__(self, slow):
        self.size, self.procs, self.ports = ANSWER_BYTES[slow], [], []
        for mark, options in enumerate(({}, {}, SLOW[slow])):
            sock = bench.listening_socket()
            self.ports.append(sock.getsockname()[1])
            proc = multiprocessing.Process(target=_backend_main, args=(sock, mark, self.size, options), daemon=True)
            proc.start()
            sock.close()  # (the backend has its own)
            self.procs.append(proc)

    def close(self):
        for proc in self.procs:
            proc.terminate()
            proc.join(10)


# -- the load generator (in a process of its own) ------------------------------------

class _Slot:
    """One client: its connection, when its request started, answer bytes read, who answered."""

    __slots__ = ("sock", "started", "got", "mark")


class Load:
    """CLIENTS clients against ``port``, each with one request at a time, until the time is up."""

    def __init__(self, port, keepalive, size):
        self.port, self.keepalive, self.size = port, keepalive, size
        self.sel, self.buf = selectors.DefaultSelector(), bytearray(65536)
        self.latencies, self.slow, self.errors = [], 0, 0

    def run(self, duration):
        for _ in range(CLIENTS):
            self._connect(_Slot())
        end = time.perf_counter() + duration
        while (now := time.perf_counter()) < end:
            for key, mask in self.sel.select(end - now):
                if mask & selectors.EVENT_WRITE:
                    self._connected(key.data)
                else:
                    self._read(key.data)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        return self.latencies, self.slow, self.errors

    def _connect(self, slot):
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        slot.sock, slot.started, slot.got = sock, time.perf_counter(), 0
        sock.connect_ex(("127.0.0.1", self.port))
        self.sel.register(sock, selectors.EVENT_WRITE, slot)

    def _connected(self, slot):
        if slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._restart(slot, failed=True)
            return
        self.sel.modify(slot.sock, selectors.EVENT_READ, slot)
        self._send(slot)

    def _send(self, slot):
        try:
            slot.sock.send(REQUEST)
        except OSError:
            self._restart(slot, failed=True)

    def _read(self, slot):
        try:
            n = slot.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self._restart(slot, failed=True)
            return
        if slot.got == 0:
            slot.mark = self.buf[0]
        slot.got += n
        if slot.got < self.size:
            return
        now = time.perf_counter()
        self.latencies.append(now - slot.started)
        self.slow += slot.mark == SLOW_MARK
        if self.keepalive:
            slot.started, slot.got = now, 0
            self._send(slot)
        else:
            self._restart(slot)

    def _restart(self, slot, failed=False):
        """Close the client's connection (counting it if it ``failed``) and open the next."""
        self.errors += failed
        self.sel.unregister(slot.sock)
        slot.sock.close()
        self._connect(slot)


def _load_main(pipe, port, keepalive, size, duration):
    pipe.send(Load(port, keepalive, size).run(duration))


def run_load(port, keepalive, size, duration):
    """(latencies in seconds, how many the slow backend answered, errors), from a separate process."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.Process(target=_load_main, args=(writer, port, keepalive, size, duration))
    proc.start()
    try:
        if not reader.poll(duration + 60):
            raise RuntimeError("the load generator did not report")
        return reader.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


# -- rows -----------------------------------------------------------------------------

class Unavailable(Exception):
    """A row that cannot run here; the message says why."""


def _check(argv, what, workdir):
    """Run a proxy's own configuration check; Unavailable with its first complaint if it fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise Unavailable(f"{argv[0]} is not installed") from None
    if out.returncode == 0:
        return
    lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
    complaint = next((line for line in lines if re.search(r"ALERT|emerg", line)), lines[0] if lines else "")
    complaint = re.sub(re.escape(workdir) + r"/\S*?:\s*", "", complaint).strip()
    raise Unavailable(f"{what}: {complaint[:160]}{'…' if len(complaint) > 160 else ''}")


class Proxy(bench.Row):
    """A row's proxy process, listening on ``port``; ``note`` says what it ran instead of what was asked."""

    note = None

    def _start(self, argv, **options):
        self.proc = subprocess.Popen(argv, **options)
        try:
            bench.wait_listening(self.port)
        except RuntimeError:
            self.close()
            raise Unavailable(f"{argv[0]} did not start (exit status {self.proc.returncode})") from None


class Ltcp(Proxy):
    """ltcp with the first of ``balancers`` it accepts (None: no loadBalancer key, the default)."""

    def __init__(self, name, balancers, ports, workdir):
        self.port = bench.free_port()
        path = os.path.join(workdir, f"{name}.yaml")
        router = {"label": "balance",
                  "interpreter": {"kind": "io.l5d.static", "names": {"/svc/b": [f"127.0.0.1:{p}" for p in ports]}},
                  "servers": [{"port": self.port, "dstName": "/svc/b", "idleTimeoutMs": 60000}]}
        for balancer in balancers:
            router["client"] = {"loadBalancer": balancer} if balancer else {}
            with open(path, "w") as f:
                yaml.safe_dump({"workers": 1, "admin": {"port": bench.free_port()}, "routers": [router]}, f)
            try:
                _check([sys.executable, "-m", "ltcp", "--check", path], "config rejected", workdir)
                break
            except Unavailable as error:
                self.note = self.note or str(error)
        else:
            raise Unavailable(self.note)
        if self.note:
            self.note = f"ran without the loadBalancer key (the default is p2c): {self.note}"
        self._start([sys.executable, "-m", "ltcp", "--log-level", "warning", path])


class Haproxy(Proxy):
    def __init__(self, name, balance, ports, workdir):
        self.port = bench.free_port()
        lines = ["global", "  nbthread 1", "  maxconn 4000", "defaults", "  mode tcp", "  timeout connect 5s",
                 "  timeout client 60s", "  timeout server 60s", "listen balance",
                 f"  bind 127.0.0.1:{self.port}", f"  balance {balance}"]
        lines += [f"  server b{i} 127.0.0.1:{port}" for i, port in enumerate(ports)]
        path = os.path.join(workdir, f"{name}.cfg")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        _check(["haproxy", "-c", "-f", path], "haproxy -c", workdir)
        self._start(["haproxy", "-db", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Nginx(Proxy):
    def __init__(self, name, balance, ports, workdir):
        self.port = bench.free_port()
        servers = " ".join(f"server 127.0.0.1:{port};" for port in ports)
        module = f"load_module {STREAM_MODULE};\n" if os.path.exists(STREAM_MODULE) else ""
        path = os.path.join(workdir, f"{name}.conf")
        with open(path, "w") as f:
            f.write(f"""{module}daemon off; worker_processes 1; pid {workdir}/{name}.pid;
error_log {workdir}/{name}.err; events {{ worker_connections 10000; }}
stream {{ upstream balance {{ {balance}; {servers} }}
  server {{ listen 127.0.0.1:{self.port}; proxy_pass balance; }} }}
""")
        _check(["nginx", "-t", "-p", workdir, "-c", path], "nginx -t (stream module: libnginx-mod-stream)",
               workdir)
        self._start(["nginx", "-p", workdir, "-c", path])


ROWS = {
    "ltcp-p2c": (Ltcp, ({"kind": "p2c"}, None)),
    "ltcp-ewma": (Ltcp, ({"kind": "ewma", "decayTimeMs": 10000},)),
    "ltcp-roundRobin": (Ltcp, ({"kind": "roundRobin"},)),
    "haproxy-leastconn": (Haproxy, "leastconn"),
    "haproxy-roundrobin": (Haproxy, "roundrobin"),
    "nginx-least_conn": (Nginx, "least_conn"),
}


# -- measuring and reporting ----------------------------------------------------------

def measure(row, keepalive, size, duration):
    """One cell: latency percentiles, rate, slow share, errors, and the proxy's CPU µs per request."""
    cpu = bench._cpu_seconds(row)
    latencies, slow, errors = run_load(row.port, keepalive, size, duration)
    cpu = bench._cpu_seconds(row) - cpu
    latencies.sort()
    n = len(latencies)
    if not n:
        return {"errors": errors}
    return {"p50": latencies[n // 2] * 1e3, "p99": latencies[min(n - 1, int(n * 0.99))] * 1e3,
            "rate": n / duration, "slow": slow / n * 100, "errors": errors, "cpu_us": cpu / n * 1e6}


def run_row(name, backends, duration, workdir):
    """{load: cell, "note": why it is n/a or what it ran instead}, with a fresh proxy for each load
    (no balancer state, such as an ejection or an average, carried from one load to the next)."""
    kind, setting = ROWS[name]
    result = {"note": None}
    for load in LOADS:
        try:
            row = kind(name, setting, backends.ports, workdir)
        except Unavailable as error:
            return {"note": f"n/a ({error})"}
        try:
            result[load], result["note"] = measure(row, load == "keepalive", backends.size, duration), row.note
        finally:
            row.close()
    return result


COLUMNS = "  p50 ms  p99 ms   req/s slow %  err"


def _cell(c):
    if "p50" not in c:
        return f"{'n/a':>{len(COLUMNS) - 5}}{c.get('errors', ''):>5}"
    return f"{c['p50']:8.1f}{c['p99']:8.1f}{c['rate']:8.0f}{c['slow']:7.1f}{c['errors']:5d}"


def print_table(slow, results):
    print(f"\nslow backend: {slow} ({ANSWER_BYTES[slow] // 1024} KB answers, {CLIENTS} clients)")
    print(f"{'':<20}" + "".join(f"{load:<{len(COLUMNS)}}" for load in LOADS))
    print(f"{'row':<20}" + COLUMNS * len(LOADS))
    for name, result in results.items():
        print(f"{name:<20}" + "".join(_cell(result.get(load, {})) for load in LOADS))
    for name, result in results.items():
        if result["note"]:
            print(f"  {name}: {result['note']}")
    print(cpu_line(results))


def cpu_line(results):
    """ltcp's CPU µs per new connection (connrate), ewma against p2c."""
    cost = {kind: results.get(f"ltcp-{kind}", {}).get("connrate", {}).get("cpu_us") for kind in ("ewma", "p2c")}
    shown = ", ".join(f"{kind} {us:.0f} µs" if us else f"{kind} n/a" for kind, us in cost.items())
    ratio = f", ewma/p2c {cost['ewma'] / cost['p2c']:.3f}" if all(cost.values()) else ""
    return f"ltcp CPU per new connection (connrate, supervisor + worker): {shown}{ratio}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-second loads")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load and row (default 5)")
    parser.add_argument("--slow", default=",".join(SLOW), help=f"comma-separated, from {', '.join(SLOW)}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    args = parser.parse_args()
    slows, rows = args.slow.split(","), args.rows.split(",")
    for wanted, known in ((slows, SLOW), (rows, ROWS)):
        if set(wanted) - set(known):
            parser.error(f"unknown: {', '.join(sorted(set(wanted) - set(known)))}")
    duration = args.duration or (2 if args.quick else 5)
    print(f"{os.cpu_count()} cores; {duration:g} s per load and row; client load in its own process", flush=True)
    with tempfile.TemporaryDirectory(prefix="ltcp-balance-") as workdir:
        for slow in slows:
            backends = Backends(slow)
            try:
                results = {}
                for name in rows:
                    results[name] = run_row(name, backends, duration, workdir)
                    print(f"  {slow} {name}: done", file=sys.stderr, flush=True)
            finally:
                backends.close()
            print_table(slow, results)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
