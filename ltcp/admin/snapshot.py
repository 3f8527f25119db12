"""Plain data describing a reactor's routers, and the merge of several such snapshots.

A ``snapshot`` is taken on the reactor thread (a worker answers the
supervisor's request with one); ``merge`` adds up the snapshots of every
worker into the instance's view.  Pure data, no imports beyond the standard
library: a worker takes snapshots without loading ``prometheus_client``.
"""

import itertools

from ..histogram import Histogram
from ..wheel import LAG_BUCKETS

__all__ = ["MAX_LISTED_ENDPOINTS", "destination_names", "empty_snapshot", "finished", "merge", "only_destinations",
           "routers_json", "snapshot"]


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
        "access_log_dropped": app.access_log.dropped if app.access_log is not None else 0,
    }


def empty_snapshot():
    """The snapshot of no reactor: what there is to show while no worker serves, and none has counted."""
    return {"routers": [], "reactor_lag": Histogram(LAG_BUCKETS), "draining": False, "access_log_dropped": 0}


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
        "paused": listener.holdback.held,  # the limit holding it back now, or None
        "paused_seconds": listener.holdback.totals(),
        "active": listener.active,
        "accepted": listener.accepted,
        "closed": listener.finished,
        "received_bytes": listener.received.value,
        "sent_bytes": listener.sent.value,
        "failures": {**listener.failures, **{k: v for k, v in listener.endings.items() if k != "done"}},
        "sni_fallbacks": dict(listener.fallbacks),
        "handed_over": dict(listener.handed_over),
        "tls_context_failures": listener.context_failures,
        "connect_latency": listener.connect_latency.copy(),
        "stream_duration": listener.stream_duration.copy(),
    }


def _destination(balancer, listed):
    endpoints = list(itertools.islice(itertools.chain(balancer.endpoints.values(), balancer.retired.values()),
                                      listed))
    now = balancer.reactor.now
    decay = balancer.decay
    return {
        "name": balancer.name,
        "resolved": balancer.resolved,
        "last_update": balancer.last_update,
        "load_balancer": balancer.settings.load_balancer.kind,
        "waiters": len(balancer.waiters),
        "waiting_for_room": len(balancer.queue),
        "waited_for_room": balancer.queued,
        "pooled": len(balancer.pool),
        "streams": balancer.streams,
        "active": balancer.active,
        "connect_failures": dict(balancer.connect_failures),
        "endpoint_states": balancer.set.counts(),
        "endpoints": [{
            "address": e.address,
            "weight": e.weight,
            "state": e.shown_state,
            "open": e.active,
            "pending": e.pending,
            "consecutive_failures": e.failures,
            "connects": e.connects,
            "connect_failures": e.connect_failures,
            "ending": e.ending,
            "score": round(score, 4),
            "throughput": round(e.rate_now(now, decay)),
            "connect_ms": round(e.latency_now(now, decay) * 1000, 3),
            "weight_share": round(e.effective / e.weight, 3),
        } for e, score in zip(endpoints, balancer.scores(endpoints, now))],
    }


def routers_json(data):
    """The snapshot as /routers.json shows it (histograms left to /metrics).

    A supervisor's snapshot is shown by generation (``generations``): servers
    are the listening sockets every generation shares, with the instance's
    counts; a router's interpreter and destinations are the current
    generation's; each older generation still draining is listed apart with
    its open streams and destinations.  So no destination shows endpoints of
    two configurations.
    """
    shown = {"draining": data["draining"]}
    generations = data.get("generations")
    if generations is None:  # one reactor
        return {**shown, "routers": [_shown_router(r) for r in data["routers"]]}
    current = data["generation"]
    return {**shown, "generation": current, "workers": data["workers"],
            "routers": _current_routers(data["routers"], generations.get(current)),
            "draining_generations": [{"generation": number, "routers": [_draining_router(r) for r in g["routers"]]}
                                     for number, g in sorted(generations.items()) if number < current]}


def _shown_router(r):
    return {
        "label": r["label"],
        "interpreter": r["interpreter"],
        "servers": [{k: v for k, v in s.items() if k not in ("connect_latency", "stream_duration")}
                    for s in r["servers"]],
        "destinations": r["destinations"],
        "route_cache": r["route_cache"],
        "discovery": {k: v for k, v in r["discovery"].items() if k != "latency"},
    }


def _current_routers(totals, current):
    """The current generation's routers (``current``: its workers' snapshots merged, None if none answered)
    with the instance's counts (``totals``: every worker's) for their servers and route caches."""
    if current is None:
        return [_shown_router({**r, "destinations": []}) for r in totals]
    by_label = {r["label"]: r for r in totals}
    routers = []
    for router in current["routers"]:
        total = by_label[router["label"]]
        servers = {s["address"]: s for s in total["servers"]}
        routers.append(_shown_router({**total, "interpreter": router["interpreter"],
                                      "servers": [servers[s["address"]] for s in router["servers"]],
                                      "destinations": router["destinations"]}))
    return routers


def _draining_router(r):
    return {"label": r["label"], "interpreter": r["interpreter"], "streams": sum(s["active"] for s in r["servers"]),
            "destinations": r["destinations"]}


def destination_names(snapshots):
    """Every (router label, destination name) in ``snapshots``."""
    return {(r["label"], d["name"]) for data in snapshots for r in data["routers"] for d in r["destinations"]}


def only_destinations(data, names):
    """``data`` with only the destinations in ``names`` (see ``destination_names``): a new snapshot."""
    return {**data, "routers": [
        {**r, "destinations": [d for d in r["destinations"] if (r["label"], d["name"]) in names]}
        for r in data["routers"]]}


def finished(snapshots):
    """What finished reactors counted, merged: every counter, and none of the state they no longer hold
    (open streams, listening, endpoints, waiters), so they add to live reactors' counts and nothing else."""
    merged = merge(snapshots)
    return {**merged, "routers": [{
        **r,
        "servers": [{**s, "active": 0, "listening": False, "paused": None} for s in r["servers"]],
        "destinations": [{**d, "resolved": False, "waiters": 0, "waiting_for_room": 0, "pooled": 0, "active": 0,
                          "endpoints": [],
                          "endpoint_states": dict.fromkeys(d["endpoint_states"], 0)} for d in r["destinations"]],
    } for r in merged["routers"]]}


# -- merge: several snapshots (one per worker reactor) into one; pure -------------------

_KEYS = {"routers": "label", "servers": "address", "destinations": "name", "endpoints": "address"}
_LARGEST = {"last_update", "consecutive_failures", "score", "connect_ms"}  # the latest, longest or worst seen
_SHARED = {"weight", "weight_share", "load_balancer"}  # one value every reactor agrees on: kept, not summed
_WORST = ("unhealthy", "failed", "retired", "available")  # an endpoint's state, merged as the worst seen


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
    unhealthy = max(a["unhealthy"], b["unhealthy"])
    failed = min(max(a["failed"], b["failed"]), total - unhealthy)
    retired = min(max(a["retired"], b["retired"]), total - unhealthy - failed)
    return {"available": total - unhealthy - failed - retired, "failed": failed, "unhealthy": unhealthy,
            "retired": retired}


def _recount(destination):
    """With every endpoint listed, count their merged states, so list and counts agree."""
    endpoints = destination["endpoints"]
    if len(endpoints) == sum(destination["endpoint_states"].values()):
        destination["endpoint_states"] = {state: sum(e["state"] == state for e in endpoints)
                                          for state in _WORST}
    return destination
