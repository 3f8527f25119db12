"""What the admin server reports: a snapshot of reactor-owned state, as JSON or Prometheus.

The counters live as plain ints on reactor objects.  A scrape asks the reactor
for a ``snapshot`` (one ``call_soon_threadsafe`` round trip, so it is a
consistent copy taken between two events) and turns it into metric families
on the admin thread.  Nothing here runs on the data-plane hot path.
"""

import concurrent.futures
import os
import resource

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


__all__ = ["render", "on_reactor", "supervisor_families", "LtcpCollector", "ProcessCollector"]


def on_reactor(reactor, fn, timeout=5.0):
    """Run ``fn()`` on the reactor thread and return its result (from any other thread)."""
    future = concurrent.futures.Future()

    def run():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    reactor.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    finally:
        future.cancel()


# -- render: a snapshot as Prometheus metric families; pure --------------------------------

_SERVER, _DST = ["router", "server"], ["router", "dst"]
FAMILIES = {  # key: (family class, name, help, labels)
    "accepted": (CounterMetricFamily, "ltcp_accepted", "Connections accepted", _SERVER),
    "closed": (CounterMetricFamily, "ltcp_closed", "Streams finished, by any ending", _SERVER),
    "active": (GaugeMetricFamily, "ltcp_active_streams", "Streams open (connecting or established)", _SERVER),
    "received": (CounterMetricFamily, "ltcp_received_bytes", "Bytes received from clients", _SERVER),
    "sent": (CounterMetricFamily, "ltcp_sent_bytes", "Bytes sent to clients", _SERVER),
    "stream_failures": (CounterMetricFamily, "ltcp_stream_failures", "Streams that did not end cleanly, by cause",
                        _SERVER + ["cause"]),
    "connect_latency": (HistogramMetricFamily, "ltcp_connect_latency_seconds", "Accept to upstream established",
                        _SERVER),
    "duration": (HistogramMetricFamily, "ltcp_stream_duration_seconds", "Upstream established to stream closed",
                 _SERVER),
    "fallbacks": (CounterMetricFamily, "ltcp_sni_fallbacks", "Streams sent to defaultDstName, by cause",
                  _SERVER + ["cause"]),
    "handed_over": (CounterMetricFamily, "ltcp_streams_handed_over",
                    "Open streams a drain offered to the next generation's workers, by outcome (moved, kept to "
                    "drain, failed)", _SERVER + ["outcome"]),
    "context_failures": (CounterMetricFamily, "ltcp_tls_context_failures",
                         "Workers that could not build the server's TLS contexts, and so did not serve it", _SERVER),
    "paused": (CounterMetricFamily, "ltcp_listener_paused_seconds",
               "Time a listener held back accepting, by the limit that stopped it", _SERVER + ["reason"]),
    "connect_failures": (CounterMetricFamily, "ltcp_connect_failures",
                         "Failed connects to endpoints (and streams with none), by cause", _DST + ["cause"]),
    "endpoints": (GaugeMetricFamily, "ltcp_endpoints", "Endpoints by state", _DST + ["state"]),
    "dst_streams": (CounterMetricFamily, "ltcp_destination_streams", "Streams established to the destination", _DST),
    "waiters": (GaugeMetricFamily, "ltcp_waiters", "Streams waiting for discovery", _DST),
    "room_waiters": (GaugeMetricFamily, "ltcp_endpoint_limit_waiters",
                     "Streams waiting for an endpoint below maxConnectionsPerEndpoint", _DST),
    "room_waits": (CounterMetricFamily, "ltcp_endpoint_limit_waits",
                   "Streams that found every endpoint at maxConnectionsPerEndpoint and waited", _DST),
    "last_update": (GaugeMetricFamily, "ltcp_discovery_last_update_timestamp_seconds",
                    "When discovery last answered for a name", _DST),
    "cache_hits": (CounterMetricFamily, "ltcp_route_cache_hits", "Streams whose balancer existed", ["router"]),
    "cache_creations": (CounterMetricFamily, "ltcp_route_cache_creations", "Balancers created", ["router"]),
    "cache_evictions": (CounterMetricFamily, "ltcp_route_cache_evictions", "Idle balancers evicted", ["router"]),
    "discovery_requests": (CounterMetricFamily, "ltcp_discovery_requests",
                           "Discovery lookups (namerd requests, fs reads, DNS lookups) by outcome",
                           ["router", "outcome"]),
    "discovery_latency": (HistogramMetricFamily, "ltcp_discovery_request_duration_seconds",
                          "A discovery lookup until its answer (namerd: response headers)", ["router"]),
    "discovery_ttl": (GaugeMetricFamily, "ltcp_discovery_ttl_seconds",
                      "How long discovery's last answer for a name holds (DNS: its TTL)", _DST),
    "lag": (HistogramMetricFamily, "ltcp_reactor_lag_seconds", "How late reactor timers fired", []),
    "draining": (GaugeMetricFamily, "ltcp_draining", "1 while a graceful shutdown is under way", []),
    "access_log": (CounterMetricFamily, "ltcp_access_log_lines",
                   "Access log lines written, or dropped (the disk or the supervisor fell behind)", ["outcome"]),
}


def render(data):
    """The metric families of a (merged) snapshot."""
    f = {key: kind(name, doc, labels=labels) for key, (kind, name, doc, labels) in FAMILIES.items()}
    for router in data["routers"]:
        label = router["label"]
        for server in router["servers"]:
            _render_server(f, [label, server["address"] or ""], server)
        for dst in router["destinations"]:
            _render_destination(f, [label, dst["name"]], dst)
        for key in ("hits", "creations", "evictions"):
            f["cache_" + key].add_metric([label], router["route_cache"][key])
        for outcome, count in sorted(router["discovery"]["requests"].items()):
            f["discovery_requests"].add_metric([label, outcome], count)
        _add_histogram(f["discovery_latency"], [label], router["discovery"]["latency"])
        for name, state in sorted(router["discovery"].get("names", {}).items()):
            if "ttl" in state:
                f["discovery_ttl"].add_metric([label, name], state["ttl"])
    _add_histogram(f["lag"], [], data["reactor_lag"])
    f["draining"].add_metric([], 1 if data["draining"] else 0)
    for outcome, count in data.get("access_log", {}).items():
        f["access_log"].add_metric([outcome], count)
    return list(f.values())


def _render_server(f, values, server):
    for key, field in (("accepted", "accepted"), ("closed", "closed"), ("active", "active"),
                       ("received", "received_bytes"), ("sent", "sent_bytes")):
        f[key].add_metric(values, server[field])
    for cause, count in sorted(server["failures"].items()):
        f["stream_failures"].add_metric(values + [cause], count)
    for cause, count in sorted(server["sni_fallbacks"].items()):
        f["fallbacks"].add_metric(values + [cause], count)
    for outcome, count in sorted(server.get("handed_over", {}).items()):  # (absent from workers before it)
        f["handed_over"].add_metric(values + [outcome], count)
    f["context_failures"].add_metric(values, server.get("tls_context_failures", 0))  # (absent before this version)
    for reason, seconds in sorted(server.get("paused_seconds", {}).items()):  # (workers older than it: none)
        f["paused"].add_metric(values + [reason], seconds)
    _add_histogram(f["connect_latency"], values, server["connect_latency"])
    _add_histogram(f["duration"], values, server["stream_duration"])


def _render_destination(f, values, dst):
    for cause, count in sorted(dst["connect_failures"].items()):
        f["connect_failures"].add_metric(values + [cause], count)
    for state, count in dst["endpoint_states"].items():
        f["endpoints"].add_metric(values + [state], count)
    f["waiters"].add_metric(values, dst["waiters"])
    f["room_waiters"].add_metric(values, dst.get("waiting_for_room", 0))  # (absent from workers before it)
    f["room_waits"].add_metric(values, dst.get("waited_for_room", 0))
    f["dst_streams"].add_metric(values, dst["streams"])
    if dst["last_update"] is not None:
        f["last_update"].add_metric(values, dst["last_update"])


def _add_histogram(family, values, histogram):
    buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), count)
               for bound, count in histogram.cumulative()]
    family.add_metric(values, buckets, histogram.sum)


def supervisor_families(state):
    """The process model's own families: workers by state and their snapshots' ages, restarts, reloads."""
    workers = GaugeMetricFamily("ltcp_workers", "Worker processes, by state", labels=["state"])
    for name in ("starting", "serving", "draining"):
        workers.add_metric([name], state["workers"].count(name))
    reloads = CounterMetricFamily("ltcp_config_reloads", "Configuration reloads (and upgrades), by outcome",
                                  labels=["outcome"])
    for outcome, count in sorted(state["reloads"].items()):
        reloads.add_metric([outcome], count)
    ages = GaugeMetricFamily("ltcp_worker_snapshot_age_seconds",
                             "How old the counts shown for a worker are (large: it stopped answering)",
                             labels=["pid"])
    for pid, age in sorted(state["snapshot_ages"].items()):
        ages.add_metric([str(pid)], age)
    return [
        workers,
        ages,
        CounterMetricFamily("ltcp_worker_restarts", "Workers started again after exiting unexpectedly",
                            value=state["restarts"]),
        reloads,
        GaugeMetricFamily("ltcp_config_last_reload_success_timestamp_seconds",
                          "When the configuration being served was loaded", value=state["last_reload_success"]),
    ]


class LtcpCollector:
    """A prometheus_client collector: the admin view's snapshot, rendered, and the view's own families."""

    def __init__(self, view):
        self.view = view

    def describe(self):
        return []  # families are only known at scrape time; skip registration-time collection

    def collect(self):
        data = self.view.snapshot()
        return render(data) + self.view.families(data)


class ProcessCollector:
    """The standard ``process_*`` families, read from /proc at scrape time.

    Written here rather than taken from prometheus_client for one reason:
    counting open descriptors by listing /proc/self/fd costs milliseconds
    with thousands of streams open, contending for the GIL with the reactor
    at every entry; Linux 6.2 and later give the count as the directory's
    size, so one stat() does (older kernels report 0, and get the listing).
    """

    def __init__(self):
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = resource.getpagesize()
        with open("/proc/stat") as f:
            self._boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))

    def describe(self):
        return []

    def collect(self):
        with open("/proc/self/stat") as f:
            # Split after the command name, which may hold spaces: fields[0] is proc(5)'s field 3.
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime
        return [
            CounterMetricFamily("process_cpu_seconds_total", "User and system CPU time", value=cpu),
            GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size", value=int(fields[20])),
            GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size",
                              value=int(fields[21]) * self._page),
            GaugeMetricFamily("process_start_time_seconds", "Start time since the Unix epoch",
                              value=self._boot + int(fields[19]) / self._ticks),
            GaugeMetricFamily("process_open_fds", "Open file descriptors", value=_open_descriptors()),
            GaugeMetricFamily("process_max_fds", "Limit of open file descriptors",
                              value=resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        ]


def _open_descriptors():
    return os.stat("/proc/self/fd").st_size or len(os.listdir("/proc/self/fd"))


def resident_bytes(pid):
    """A process's resident memory, from /proc; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
        return 0
