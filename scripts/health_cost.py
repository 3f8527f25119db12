"""What active health checks cost: 1,000 endpoints checked every second.

    python scripts/health_cost.py [--endpoints 1000] [--seconds 10]

Starts 1,000 listening sockets on 127.0.0.1 (one process accepting and
closing), nginx as a real backend, and ltcp twice: once with
``healthCheck: {intervalMs: 1000}`` on the destination of the 1,000 and once
without.  Reports the supervisor's and the workers' CPU while the checks run,
the checks the endpoints saw per second, and the data plane's latency (wrk,
10 keep-alive connections through ltcp to nginx, p50/p99) in both runs.
Needs nginx and wrk (``apt-get install nginx-light wrk``).
"""

import argparse
import multiprocessing
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the peers, ports and wrk driver of the benchmark)


def _accept_and_close(socks, counter):
    """Accept every connection and close it at once, counting them."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            conn.close()
            with counter.get_lock():
                counter.value += 1


def _ltcp(workdir, ports, http_port, checked):
    port, admin = bench.free_port(), bench.free_port()
    probe_port = bench.free_port()
    client = {"kind": "io.l5d.static", "configs": []}
    if checked:
        client["configs"].append({"prefix": "/svc/many", "healthCheck": {"intervalMs": 1000, "timeoutMs": 500}})
    config = {
        "admin": {"port": admin},
        "routers": [{
            "label": "cost",
            "interpreter": {"kind": "io.l5d.static", "names": {
                "/svc/many": [f"127.0.0.1:{p}" for p in ports], "/svc/http": [f"127.0.0.1:{http_port}"]}},
            "client": client,
            "servers": [{"port": port, "dstName": "/svc/http"}, {"port": probe_port, "dstName": "/svc/many"}],
        }],
    }
    path = os.path.join(workdir, f"cost-{checked}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    proc = subprocess.Popen([sys.executable, "-m", "ltcp", "--log-level", "warning", path])
    bench.wait_listening(port)
    bench.wait_listening(probe_port)
    socket.create_connection(("127.0.0.1", probe_port)).close()  # the destination is in use: checks start
    return proc, port


def _cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = [bench.listening_socket() for _ in range(args.endpoints)]
    counter = multiprocessing.Value("l", 0)
    acceptor = multiprocessing.Process(target=_accept_and_close, args=(socks, counter), daemon=True)
    acceptor.start()
    ports = [s.getsockname()[1] for s in socks]
    with tempfile.TemporaryDirectory(prefix="ltcp-health-") as workdir:
        backends = bench.Backends(workdir)
        try:
            for checked in (False, True):
                proc, port = _ltcp(workdir, ports, backends.ports["http"], checked)
                try:
                    time.sleep(2)  # let the first round of checks pass before measuring
                    pids = bench.Row.pids(type("R", (), {"proc": proc})())
                    before = [_cpu(pid) for pid in pids]
                    checks_before = counter.value
                    started = time.monotonic()
                    rate, latency = bench._wrk(port, 10, int(args.seconds))
                    elapsed = time.monotonic() - started
                    cpu = [(_cpu(pid) - b) / elapsed * 100 for pid, b in zip(pids, before)]
                    checks = (counter.value - checks_before) / elapsed
                    print(f"{'with' if checked else 'without'} checks: supervisor {cpu[0]:.1f}% CPU, "
                          f"worker {sum(cpu[1:]):.1f}%, {checks:,.0f} checks/s seen by the endpoints; "
                          f"wrk through ltcp {rate:,.0f} req/s, p50 {latency['50']:,.0f} us, "
                          f"p99 {latency['99']:,.0f} us", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(10)
        finally:
            backends.close()
            acceptor.terminate()


if __name__ == "__main__":
    main()
