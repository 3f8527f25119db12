"""What the admin server reports: a snapshot of reactor-owned state, as JSON or Prometheus.

The counters live as plain ints on reactor objects.  A scrape asks the reactor
for a ``snapshot`` (one ``call_soon_threadsafe`` round trip, so it is a
consistent copy taken between two events) and turns it into metric families
on the admin thread.  Nothing here runs on the data-plane hot path.
"""

import concurrent.futures
import itertools
import os
import resource

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .histogram import Histogram


__all__ = ["MAX_LISTED_ENDPOINTS", "snapshot", "merge", "render", "on_reactor", "LtcpCollector",
           "ProcessCollector", "routers_json"]


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


MAX_LISTED_ENDPOINTS = 1000  # per destination in /routers.json; all are counted


def snapshot(app, listed=0):
    """Plain data describing every router; call on the reactor thread.

    Endpoints are counted by state; up to ``listed`` of each destination are
    also described one by one (what /routers.json shows), so a scrape of
    /metrics builds nothing per endpoint.
    """
    return {
        "routers": [_router(router, listed) for router in app.routers],
        "reactor_lag": app.reactor.wheel.lag.copy(),
        "draining": app.draining,
    }


def _router(router, listed):
    return {
        "label": router.label,
        "interpreter": router.interpreter_kind,
        "servers": [_server(listener) for listener in router.listeners],
        "destinations": [_destination(b, listed) for b in router.binder.balancers.values()],
        "route_cache": {"hits": router.binder.hits, "creations": router.binder.creations,
                        "evictions": router.binder.evictions},
        "discovery": router.interpreter.stats.snapshot(),
    }


def _server(listener):
    return {
        "address": listener.display_address if listener.address else None,
        "dst_name": listener.config.dst_name,
        "listening": listener.listening,
        "active": listener.active,
        "accepted": listener.accepted,
        "closed": listener.finished,
        "received_bytes": listener.received.value,
        "sent_bytes": listener.sent.value,
        "failures": {**listener.failures, **{k: v for k, v in listener.endings.items() if k != "done"}},
        "sni_fallbacks": dict(listener.fallbacks),
        "connect_latency": listener.connect_latency.copy(),
        "stream_duration": listener.stream_duration.copy(),
    }


def _destination(balancer, listed):
    endpoints = itertools.chain(balancer.endpoints.values(), balancer.retired.values())
    return {
        "name": balancer.name,
        "resolved": balancer.resolved,
        "last_update": balancer.last_update,
        "waiters": len(balancer.waiters),
        "pooled": len(balancer.pool),
        "connect_failures": dict(balancer.connect_failures),
        "endpoint_states": balancer.set.counts(),
        "endpoints": [{
            "address": e.address,
            "weight": e.weight,
            "state": e.state.name,
            "open": e.active,
            "pending": e.pending,
            "consecutive_failures": e.failures,
            "connects": e.connects,
            "connect_failures": e.connect_failures,
        } for e in itertools.islice(endpoints, listed)],
    }


def routers_json(data):
    """The snapshot as /routers.json shows it (histograms left to /metrics)."""
    return {
        "draining": data["draining"],
        "routers": [{
            "label": r["label"],
            "interpreter": r["interpreter"],
            "servers": [{k: v for k, v in s.items() if k not in ("connect_latency", "stream_duration")}
                        for s in r["servers"]],
            "destinations": r["destinations"],
            "route_cache": r["route_cache"],
        } for r in data["routers"]],
    }


# -- merge: several snapshots (one per worker reactor) into one; pure -------------------

_KEYS = {"routers": "label", "servers": "address", "destinations": "name", "endpoints": "address"}
_LARGEST = {"last_update", "consecutive_failures"}  # the latest time, the longest failure streak
_SHARED = {"weight"}  # one value every reactor agrees on: kept, not summed
_WORST = ("failed", "retired", "available")  # an endpoint's state, merged as the worst any reactor saw


def merge(snapshots):
    """One snapshot for several reactors: counts summed, histograms merged, flags or'ed.

    Routers are matched by label, servers by address, destinations by name and
    endpoints by address, so N reactors' views of one instance add up exactly.
    Facts about the endpoints themselves (weight, state, how many there are) are
    not multiplied by the number of reactors that saw them.
    """
    snapshots = list(snapshots)
    if not snapshots:
        raise ValueError("merge needs at least one snapshot")
    merged = snapshots[0]
    for data in snapshots[1:]:
        merged = _merge_value(merged, data, None)
    return merged


def _merge_value(a, b, key):
    if a is None or b is None:
        return b if a is None else a
    if key == "endpoint_states":
        return _merge_states(a, b)
    if isinstance(a, dict):
        merged = {k: _merge_value(a[k], b[k], k) if k in a and k in b else a.get(k, b.get(k))
                  for k in {**a, **b}}
        return _recount(merged) if "endpoint_states" in merged else merged
    if isinstance(a, list):
        by = _KEYS.get(key)
        found = {item[by]: item for item in a}
        for item in b:
            found[item[by]] = _merge_value(found[item[by]], item, None) if item[by] in found else item
        return list(found.values())
    if isinstance(a, Histogram):
        return a.merged(b)
    if isinstance(a, bool):
        return a or b
    if isinstance(a, str):
        return min(a, b, key=_WORST.index) if key == "state" else a
    if key in _SHARED:
        return a
    return max(a, b) if key in _LARGEST else a + b


def _merge_states(a, b):
    """Endpoints by state when not all are listed: the worst of the reactors' counts."""
    total = max(sum(a.values()), sum(b.values()))
    failed = max(a["failed"], b["failed"])
    retired = min(max(a["retired"], b["retired"]), total - failed)
    return {"available": total - failed - retired, "failed": failed, "retired": retired}


def _recount(destination):
    """With every endpoint listed, count their merged states, so list and counts agree."""
    endpoints = destination["endpoints"]
    if len(endpoints) == sum(destination["endpoint_states"].values()):
        destination["endpoint_states"] = {state: sum(e["state"] == state for e in endpoints)
                                          for state in ("available", "failed", "retired")}
    return destination


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
    "connect_failures": (CounterMetricFamily, "ltcp_connect_failures",
                         "Failed connects to endpoints (and streams with none), by cause", _DST + ["cause"]),
    "endpoints": (GaugeMetricFamily, "ltcp_endpoints", "Endpoints by state", _DST + ["state"]),
    "waiters": (GaugeMetricFamily, "ltcp_waiters", "Streams waiting for discovery", _DST),
    "last_update": (GaugeMetricFamily, "ltcp_discovery_last_update_timestamp_seconds",
                    "When discovery last answered for a name", _DST),
    "cache_hits": (CounterMetricFamily, "ltcp_route_cache_hits", "Streams whose balancer existed", ["router"]),
    "cache_creations": (CounterMetricFamily, "ltcp_route_cache_creations", "Balancers created", ["router"]),
    "cache_evictions": (CounterMetricFamily, "ltcp_route_cache_evictions", "Idle balancers evicted", ["router"]),
    "discovery_requests": (CounterMetricFamily, "ltcp_discovery_requests",
                           "Discovery lookups (namerd requests, fs reads) by outcome", ["router", "outcome"]),
    "discovery_latency": (HistogramMetricFamily, "ltcp_discovery_request_duration_seconds",
                          "A discovery lookup until its answer (namerd: response headers)", ["router"]),
    "lag": (HistogramMetricFamily, "ltcp_reactor_lag_seconds", "How late reactor timers fired", []),
    "draining": (GaugeMetricFamily, "ltcp_draining", "1 while a graceful shutdown is under way", []),
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
    _add_histogram(f["lag"], [], data["reactor_lag"])
    f["draining"].add_metric([], 1 if data["draining"] else 0)
    return list(f.values())


def _render_server(f, values, server):
    for key, field in (("accepted", "accepted"), ("closed", "closed"), ("active", "active"),
                       ("received", "received_bytes"), ("sent", "sent_bytes")):
        f[key].add_metric(values, server[field])
    for cause, count in sorted(server["failures"].items()):
        f["stream_failures"].add_metric(values + [cause], count)
    for cause, count in sorted(server["sni_fallbacks"].items()):
        f["fallbacks"].add_metric(values + [cause], count)
    _add_histogram(f["connect_latency"], values, server["connect_latency"])
    _add_histogram(f["duration"], values, server["stream_duration"])


def _render_destination(f, values, dst):
    for cause, count in sorted(dst["connect_failures"].items()):
        f["connect_failures"].add_metric(values + [cause], count)
    for state, count in dst["endpoint_states"].items():
        f["endpoints"].add_metric(values + [state], count)
    f["waiters"].add_metric(values, dst["waiters"])
    if dst["last_update"] is not None:
        f["last_update"].add_metric(values, dst["last_update"])


def _add_histogram(family, values, histogram):
    buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), count)
               for bound, count in histogram.cumulative()]
    family.add_metric(values, buckets, histogram.sum)


class LtcpCollector:
    """A prometheus_client collector: snapshot (on the reactor), then render."""

    def __init__(self, app):
        self.app = app

    def describe(self):
        return []  # families are only known at scrape time; skip registration-time collection

    def collect(self):
        return render(on_reactor(self.app.reactor, lambda: snapshot(self.app)))


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
