"""Real-socket helpers for the tests: backends, a proxy runner, waiting on conditions."""

import concurrent.futures
import functools
import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time

import yaml

from ltcp.admin.server import AdminServer, ReactorView
from ltcp.dataplane.app import App
from ltcp.config import loads
from ltcp.interpreter.stats import DiscoveryStats


def wait_for(condition, timeout=10.0, interval=0.005, message="condition"):
    """Poll ``condition`` until true; fail the test if it is not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        time.sleep(interval)


def run_reactor_until(reactor, condition, timeout=5.0):
    """Run ``reactor`` on this thread, 10 ms at a time, until ``condition()`` holds (AssertionError after
    ``timeout`` seconds): for tests that drive a reactor themselves."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not done within {timeout}s")
        reactor.call_later(0.01, reactor.stop)
        reactor.run()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def recv_all(sock, limit=1 << 30):
    chunks, total = [], 0
    while total < limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def closed_without_data(sock, timeout=10):
    """Whether the peer closed ``sock`` (EOF or reset) without sending anything more."""
    sock.settimeout(timeout)
    try:
        return recv_all(sock) == b""
    except ConnectionResetError:
        return True


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"closed after {len(data)} of {n} bytes"
        data += chunk
    return data


@functools.lru_cache(maxsize=None)
def _hello_context(alpn):
    """A client context like a real one, minus the trust store (its hello is the same, 40 ms cheaper)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def client_hello(server_name, alpn=None):
    """The first bytes a real Python TLS client sends."""
    context = _hello_context(tuple(alpn or ()))
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a handshake cannot finish without the server")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def echo(conn):
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def first_line(proxy):
    """The first line the backend reached through ``proxy`` says (``named`` backends say their name)."""
    with proxy.connect() as conn:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(100)
            assert chunk, "closed before a backend answered"
            line += chunk
        return line.decode().strip()


def named(name):
    """A handler that says its name first, then echoes."""
    def handler(conn):
        conn.sendall(name.encode() + b"\n")
        echo(conn)
    return handler


class Backend:
    """A threaded TCP server on 127.0.0.1 running ``handler(conn)`` per connection.

    (DNS tests give another loopback ``ip``, so that A records can differ.)
    """

    def __init__(self, handler=echo, port=0, ip="127.0.0.1"):
        self.handler = handler
        self.ip = ip
        self.sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self.conns = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def addr(self):
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            with self._lock:
                self.open -= 1
            conn.close()

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
        with self._lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def refused_port():
    """A port on 127.0.0.1 where connects are refused (bound, never listening)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def blackhole():
    """A listener whose accept queue is full, so new SYNs go unanswered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(16):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
        time.sleep(0.02)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except (socket.timeout, BlockingIOError):
            probe.close()
            return sock, port, fillers
        fillers.append(probe)
    raise RuntimeError("could not fill the accept queue")


class Proxy:
    """An ltcp App running on a background thread (``material``: its TLS files' bytes, else read from disk)."""

    def __init__(self, document, admin=False, material=None):
        text = document if isinstance(document, str) else yaml.safe_dump(document)
        config = loads(text, "test.yaml", os.getcwd())
        self.app = App(config, material=material)
        self.app.start()
        self.admin = None
        if admin:
            self.admin = AdminServer(ReactorView(self.app), config.admin)
            self.admin.start()
        self.thread = threading.Thread(target=self.app.run, name="reactor", daemon=True)
        self.thread.start()

    def port(self, index=0):
        return self.app.listeners[index].address[1]

    @property
    def listener(self):
        return self.app.listeners[0]

    def connect(self, index=0, timeout=10):
        return socket.create_connection(("127.0.0.1", self.port(index)), timeout=timeout)

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the reactor thread and return its result."""
        future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.app.reactor.call_soon_threadsafe(run)
        return future.result(10)

    def balancer(self, name, router=0):
        return self.call(lambda: self.app.routers[router].binder.balancers.get(name))

    @property
    def admin_url(self):
        return "http://%s:%d" % self.admin.address

    def stop(self):
        if self.thread.is_alive():
            self.app.stop()
            self.thread.join(10)
            assert not self.thread.is_alive(), "proxy did not stop"
        if self.admin is not None:
            self.admin.close()


class Deliveries:
    """Collects what an interpreter delivers for one name, and lets a test wait for it."""

    def __init__(self):
        self.updates = []
        self.changed = threading.Condition()

    def __call__(self, addresses):
        with self.changed:
            self.updates.append(addresses)
            self.changed.notify_all()

    def wait(self, count=1, timeout=5):
        """The ``count``-th delivery, once it has come."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.updates) >= count, timeout), self.updates
            return self.updates[count - 1]


class SilentDiscovery:
    """Discovery that has not answered yet (namerd saying "pending")."""

    KIND = "silent"

    def __init__(self):
        self.stats = DiscoveryStats()

    def start(self):
        pass

    def close(self):
        pass

    def watch(self, name, deliver):
        pass

    def unwatch(self, name):
        pass


def settled(app):
    """Every count back where nothing runs (call on the reactor thread); a list of what is not.

    After a fault test: no stream counted in the budget or a listener, no dial
    or waiter left on a balancer, no connect or stream left on an endpoint,
    pooled connections all accounted for, no splice pipe, and nothing registered with the
    reactor but listeners, the wakeup pipe and pooled connections.
    """
    problems = []
    if app.budget.used:
        problems.append(f"budget: {app.budget.used} streams")
    pooled = 0
    for listener in app.listeners:
        if listener.active or listener.dials or listener.streams:
            problems.append(f"{listener.display_address}: active {listener.active}, {len(listener.dials)} dials, "
                            f"{len(listener.streams)} streams")
    for router in app.routers:
        for balancer in router.binder.balancers.values():
            pooled += len(balancer.pool) + balancer.pool.connecting
            if balancer.dials or balancer.waiters:
                problems.append(repr(balancer))
            endpoints = list(balancer.endpoints.values()) + list(balancer.retired.values())
            problems.extend(repr(endpoint) for endpoint in endpoints if endpoint.active)
            if sum(endpoint.pending for endpoint in endpoints) != balancer.pool.connecting:
                problems.append(f"{balancer!r}: connects pending on endpoints, {balancer.pool.connecting} for its pool")
    if app.budget.pool.used != pooled:
        problems.append(f"budget: {app.budget.pool.used} pooled, {pooled} in pools")
    if app.budget.pipes.used:
        problems.append(f"budget: {app.budget.pipes.used} splice pipes")
    registered = len(app.reactor._handlers)
    expected = 1 + sum(1 for listener in app.listeners if listener.listening) + pooled
    if registered != expected:
        problems.append(f"reactor: {registered} registrations, {expected} expected")
    return problems


def static_config(names, **server):
    """A one-router, one-server document over io.l5d.static."""
    server = {"port": 0, "dstName": "/svc/a", **server}
    client = server.pop("client", {})
    return {
        "admin": {"port": 0},
        "routers": [{
            "label": "test",
            "interpreter": {"kind": "io.l5d.static", "names": names},
            "servers": [server],
            "client": client,
        }],
    }


class LtcpProcess:
    """``python -m ltcp -`` in a subprocess, configured through stdin, its log collected."""

    def __init__(self, document, nofile=None, path=None, args=(), env=None, command=None, cwd=None):
        """``path``: write the configuration there and name it on the command line (it can be reloaded).

        ``args`` go on the command line before it; ``env`` adds to the environment; ``command``
        replaces ``python -m ltcp`` (a zip app, say)."""
        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        if path:
            with open(path, "w") as f:
                yaml.safe_dump(document, f)
        command = command or [sys.executable, "-m", "ltcp"]
        self.proc = subprocess.Popen([*command, *args, str(path or "-")], stdin=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                                     env={**os.environ, **(env or {})}, cwd=cwd)
        if not path:
            self.proc.stdin.write(yaml.safe_dump(document))
        self.proc.stdin.close()
        self.lines = []
        while not any("admin server on" in line for line in self.lines):
            line = self.proc.stderr.readline()
            assert line, "".join(self.lines)
            self.lines.append(line)
        self.ports = [int(port) for port in re.findall(r"listening on 127\.0\.0\.1:(\d+)", self.log)]
        self.workers = [int(pid) for pid in re.findall(r"worker (\d+) \(generation \d+\) serving", self.log)]
        self.port = self.ports[0]
        self.admin = re.search(r"admin server on (http://[\d.:]+)/", self.log).group(1)
        self.path = path
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    @property
    def log(self):
        return "".join(self.lines)

    def connect(self, index=0):
        return socket.create_connection(("127.0.0.1", self.ports[index]), timeout=10)

    def cpu_over(self, seconds):
        """CPU seconds the supervisor and its first workers used together during a window of ``seconds``."""
        pids = [self.proc.pid, *self.workers]
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(seconds)  # a window to measure over, not a wait for a condition
        return sum(cpu_seconds(pid) for pid in pids) - before

    def kill(self):
        """End it at once (SIGKILL: its workers drain on their own), and let go of its log pipe."""
        self.proc.kill()
        return self.stop()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(10)
        self.reader.join(10)  # (EOF once every process holding the pipe, workers too, has gone)
        if not self.reader.is_alive():
            self.proc.stderr.close()
        return code


class SelectEcho:
    """An echo server on one thread with a selector, for thousands of connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.open = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        while True:
            for key, _ in sel.select():
                if key.data == "stop":
                    for k in list(sel.get_map().values()):
                        if k.data == "conn":
                            k.fileobj.close()
                    sel.close()
                    return
                if key.data == "accept":
                    while True:
                        try:
                            conn, _ = self.sock.accept()
                        except BlockingIOError:
                            break
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ, "conn")
                        self.open += 1
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    try:
                        conn.send(data)
                    except OSError:
                        pass
                else:
                    sel.unregister(conn)
                    conn.close()
                    self.open -= 1

    def close(self):
        self._wake_w.send(b"x")
        self._thread.join(5)
        for s in (self.sock, self._wake_r, self._wake_w):
            s.close()
