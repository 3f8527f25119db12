"""merge: N reactors' snapshots of one instance, pure; counts add, facts about endpoints do not."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ltcp.admin.snapshot import destination_names, finished, merge, only_destinations

STATES = ("available", "failed", "unhealthy", "retired")
WORST_FIRST = ("unhealthy", "failed", "retired", "available")


def endpoint(address, state, **counts):
    return {"address": address, "weight": 1.5, "state": state, "open": 0, "pending": 0,
            "consecutive_failures": 0, "connects": 0, "connect_failures": 0, **counts}


def view(endpoints, last_update=None):
    """One reactor's snapshot, cut down to one destination."""
    counts = {state: sum(e["state"] == state for e in endpoints) for state in STATES}
    return {"routers": [{"label": "r", "destinations": [{
        "name": "/svc/a", "last_update": last_update, "endpoint_states": counts, "endpoints": endpoints}]}]}


def destination(data):
    return data["routers"][0]["destinations"][0]


views = st.lists(st.lists(st.tuples(st.sampled_from(STATES), st.integers(0, 50), st.integers(0, 9)),
                          min_size=3, max_size=3), min_size=1, max_size=4)


@given(views)
def test_reactors_views_of_the_same_endpoints(seen):
    """Each reactor sees the same three endpoints, in its own state, with its own traffic."""
    snapshots = [view([endpoint(f"127.0.0.1:{i}", state, connects=connects, consecutive_failures=streak)
                       for i, (state, connects, streak) in enumerate(reactor)])
                 for reactor in seen]
    merged = destination(merge(snapshots))
    assert sum(merged["endpoint_states"].values()) == 3  # three endpoints, however many reactors
    assert min(merged["endpoint_states"].values()) >= 0
    for i, e in enumerate(sorted(merged["endpoints"], key=lambda e: e["address"])):
        assert e["weight"] == 1.5
        assert e["connects"] == sum(reactor[i][1] for reactor in seen)
        assert e["consecutive_failures"] == max(reactor[i][2] for reactor in seen)
        assert e["state"] == min((reactor[i][0] for reactor in seen), key=WORST_FIRST.index)


def test_states_take_the_worst_view_and_still_add_up():
    one = view([endpoint("a", "failed"), endpoint("b", "available"), endpoint("c", "retired")])
    other = view([endpoint("a", "available"), endpoint("b", "failed"), endpoint("c", "available")])
    assert destination(merge([one, other]))["endpoint_states"] == {"available": 0, "failed": 2, "unhealthy": 0,
                                                                   "retired": 1}


def test_the_latest_update_wins_and_a_missing_one_does_not_hide_it():
    merged = merge([view([], last_update=None), view([], last_update=20.0), view([], last_update=10.0)])
    assert destination(merged)["last_update"] == 20.0


def test_one_snapshot_is_itself_and_none_is_an_error():
    one = view([endpoint("a", "available", connects=3)])
    assert merge([one]) == one
    with pytest.raises(ValueError):
        merge([])


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20), st.integers(0, 20)),
                min_size=1, max_size=5))
def test_counts_alone_merge_to_the_largest_set_seen(counts):
    """Endpoints not listed (a destination with thousands): counts merge without overshooting."""
    snapshots = [{"routers": [{"label": "r", "destinations": [{"name": "/a", "endpoints": [], "endpoint_states":
                  dict(zip(STATES, c))}]}]} for c in counts]
    merged = destination(merge(snapshots))["endpoint_states"]
    assert sum(merged.values()) == max(sum(c) for c in counts)
    assert merged["unhealthy"] == max(c[2] for c in counts)  # the worst view, first
    assert merged["failed"] <= max(c[1] for c in counts)  # then failed and retired, within what is left
    assert min(merged.values()) >= 0


def live_reactor(name, failures, open_streams):
    """A snapshot with one server and one destination (``name``), as a serving reactor sends it."""
    return {"routers": [{"label": "r",
                         "servers": [{"address": "127.0.0.1:1", "active": open_streams, "accepted": 10,
                                      "listening": True}],
                         "destinations": [{**view([endpoint("a", "failed")])["routers"][0]["destinations"][0],
                                           "name": name, "connect_failures": {"refused": failures}, "waiters": 2,
                                           "pooled": 1, "resolved": True}]}]}


def test_finished_reactors_add_their_counters_and_nothing_they_no_longer_hold():
    gone = finished([live_reactor("/svc/a", failures=5, open_streams=3)])
    merged = merge([live_reactor("/svc/a", failures=1, open_streams=1), gone])
    server, dst = merged["routers"][0]["servers"][0], destination(merged)
    assert (server["accepted"], server["active"], server["listening"]) == (20, 1, True)
    assert dst["connect_failures"] == {"refused": 6}  # once lost with the reactor that counted them
    assert (dst["waiters"], dst["pooled"], dst["resolved"], len(dst["endpoints"])) == (2, 1, True, 1)
    assert dst["endpoint_states"]["failed"] == 1


def test_only_the_destinations_named_are_kept_and_the_snapshot_is_new():
    data = merge([live_reactor("/svc/a", 1, 0), live_reactor("/svc/b", 1, 0)])
    assert destination_names([data]) == {("r", "/svc/a"), ("r", "/svc/b")}
    kept = only_destinations(data, {("r", "/svc/b"), ("other", "/svc/a")})
    assert [d["name"] for d in kept["routers"][0]["destinations"]] == ["/svc/b"]
    assert len(data["routers"][0]["destinations"]) == 2
