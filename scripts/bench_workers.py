"""Where a proxy's CPU goes per new connection, process by process: ltcp with one and two workers beside HAProxy
with one and two threads.

    python scripts/bench_workers.py [--rows ltcp,ltcp2,haproxy,haproxy2] [--seconds 5] [--repeat 3] [--calls]

For each row it runs wrk with ``Connection: close`` (50 connections, nginx behind, as ``bench.py connrate``)
and reads, over the same seconds:

  conn/s           what wrk got through
  user, sys        CPU microseconds per connection in user and kernel mode, every process of the row summed
                   (from /proc/PID/stat); the per-process split shows the supervisor's share
  vol, invol       context switches per connection: the process slept (epoll_wait) or was preempted
                   (from /proc/PID/status)
  syscalls         with ``perf`` (tracepoints need root): per connection, accept4 calls and those that failed
                   (EAGAIN: a worker woken for a connection another took), epoll_wait, epoll_ctl and all

With ``--calls``, each ltcp row also runs once with its workers under cProfile (``profiled_ltcp.py``) and
reports, worker by worker, the Python calls (functions and builtins) and the loop turns per connection: the
work a connection takes, which profiling slows but does not change.

Medians of ``--repeat`` runs, the rows interleaved so that a slower minute of a shared machine falls on each.
Needs wrk and nginx, like ``bench.py``.
"""

import argparse
import glob
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import bench

TICKS = os.sysconf("SC_CLK_TCK")
PROFILED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiled_ltcp.py")
SYSCALLS = {"accept4": "syscalls:sys_enter_accept4", "accept4 failed": "syscalls:sys_exit_accept4",
            "epoll_wait": "syscalls:sys_enter_epoll_wait", "epoll_ctl": "syscalls:sys_enter_epoll_ctl",
            "all": "raw_syscalls:sys_enter"}


def process_counters(pid):
    """(user ticks, system ticks, voluntary switches, involuntary switches) of one process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    switches = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.endswith("ctxt_switches"):
                switches[key] = int(value)
    return int(fields[11]), int(fields[12]), switches["voluntary_ctxt_switches"], \
        switches["nonvoluntary_ctxt_switches"]


def count_syscalls(pids, seconds):
    """Syscall counts of ``pids`` over ``seconds`` (perf stat on tracepoints), or None without perf."""
    if not shutil.which("perf"):
        return None
    command = ["perf", "stat", "-x,", "-p", ",".join(map(str, pids))]
    for name, event in SYSCALLS.items():
        command += ["-e", event] + (["--filter", "ret < 0"] if name == "accept4 failed" else [])
    result = subprocess.run([*command, "--", "sleep", str(seconds)], capture_output=True, text=True)
    counts = {}
    for line in result.stderr.splitlines():
        value, _, event, *_ = line.split(",") + [""] * 3
        name = next((n for n, e in SYSCALLS.items() if e == event), None)
        if name and value.isdigit():
            counts[name] = int(value)
    return counts or None


def measure(row, seconds):
    """One run: conn/s, and per connection each process's counters and the row's syscalls."""
    pids = row.pids()
    rate = {}
    load = threading.Thread(target=lambda: rate.update(value=bench._wrk(row.ports["http"], 50, seconds + 2,
                                                                        close=True)[0]))
    load.start()
    time.sleep(1)  # past wrk's start
    before = {pid: process_counters(pid) for pid in pids}
    syscalls = count_syscalls(pids, seconds)
    if syscalls is None:
        time.sleep(seconds)
    after = {pid: process_counters(pid) for pid in pids}
    load.join()
    connections = rate["value"] * seconds
    per_process = {}
    for pid in pids:
        delta = [b - a for a, b in zip(before[pid], after[pid])]
        per_process[pid] = (delta[0] / TICKS * 1e6 / connections, delta[1] / TICKS * 1e6 / connections,
                            delta[2] / connections, delta[3] / connections)
    return rate["value"], per_process, {k: v / connections for k, v in (syscalls or {}).items()}


def count_calls(name, backends, workdir, seconds):
    """[(connections, Python calls per connection, loop turns per connection)] for each worker of an ltcp row,
    from one run with every reactor under cProfile."""
    profiles = os.path.join(workdir, f"profiles-{name}")
    os.makedirs(profiles)
    os.environ["LTCP_PROFILE_DIR"] = profiles  # (inherited by the row's processes)
    row = type(name, (bench.ROWS[name],), {"launch": (PROFILED,)})(backends, workdir)
    try:
        time.sleep(1)
        bench._wrk(row.ports["http"], 50, seconds, close=True)
    finally:
        row.close()  # (the workers drain, and write their statistics as their reactors stop)
    workers = []
    for path in sorted(glob.glob(os.path.join(profiles, "worker.*"))):
        stats = pstats.Stats(path).stats  # (file, line, function) -> (primitive calls, calls, ...)
        connections = sum(v[1] for k, v in stats.items() if k[2] == "_accepted")
        turns = sum(v[1] for k, v in stats.items() if k[2] == "<method 'poll' of 'select.epoll' objects>")
        if connections:
            workers.append((connections, sum(v[1] for v in stats.values()) / connections, turns / connections))
    return workers


def summarise(runs):
    """Medians over runs: conn/s, the row's totals, each process's role and figures, the syscalls."""
    rate = statistics.median(r[0] for r in runs)
    roles = [sorted(r[1].items()) for r in runs]
    processes = [tuple(statistics.median(run[i][1][k] for run in roles) for k in range(4))
                 for i in range(min(map(len, roles)))]
    totals = tuple(sum(p[k] for p in processes) for k in range(4))
    syscalls = {k: statistics.median(r[2][k] for r in runs) for k in SYSCALLS if all(k in r[2] for r in runs)}
    return rate, totals, processes, syscalls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="ltcp,ltcp2,haproxy,haproxy2")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", action="store_true", help="also count Python calls and loop turns per connection")
    args = parser.parse_args()
    names = args.rows.split(",")
    runs = {name: [] for name in names}
    profiled = {}
    with tempfile.TemporaryDirectory() as workdir:
        backends = bench.Backends(workdir)
        try:
            if args.calls:
                for name in names:
                    if issubclass(bench.ROWS[name], bench.Ltcp):
                        profiled[name] = count_calls(name, backends, workdir, args.seconds)
            for _ in range(args.repeat):
                for name in names:
                    row = bench.ROWS[name](backends, workdir)
                    try:
                        time.sleep(1)  # (workers forked and listening)
                        runs[name].append(measure(row, args.seconds))
                    finally:
                        row.close()
                    print(f"  {name}: {runs[name][-1][0]:,.0f} conn/s", file=sys.stderr, flush=True)
        finally:
            backends.close()
    print(f"{'row':10}{'conn/s':>9}{'user':>8}{'sys':>8}{'vol':>7}{'invol':>7}   per process (user+sys us, switches)"
          "   syscalls per connection")
    for name in names:
        rate, totals, processes, syscalls = summarise(runs[name])
        shown = "  ".join(f"{u + s:.0f}us/{v + i:.2f}" for u, s, v, i in processes)
        calls = "  ".join(f"{k}={v:.2f}" for k, v in syscalls.items())
        user, system, voluntary, involuntary = totals
        print(f"{name:10}{rate:9,.0f}{user:8.1f}{system:8.1f}{voluntary:7.2f}{involuntary:7.2f}   {shown}   {calls}")
    print("user, sys: CPU us per connection; vol, invol: context switches per connection; processes in pid order "
          "(ltcp: supervisor, template, workers; HAProxy: master, worker)")
    for name, workers in profiled.items():
        shown = "; ".join(f"{n:,} connections, {per:.1f} calls and {turns:.3f} loop turns each"
                          for n, per, turns in workers)
        print(f"{name} under cProfile, by worker: {shown}")


if __name__ == "__main__":
    main()
