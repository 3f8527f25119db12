"""What crosses an upgrade still loads: frames from old workers and the state an old supervisor hands over.

During an upgrade the new code reads pickles written by the old one, and
pickles name classes by module (``ltcp.config.*``, ``ltcp.histogram``), so
moving a module would break an upgrade from the release before.  The files
under fixtures/wire were recorded by earlier code (see their record.py).
"""

import importlib.util
import pathlib
import pickle

import pytest

from ltcp.config import Config
from ltcp.control import Framer
from ltcp.histogram import Histogram
from ltcp.admin.metrics import render
from ltcp.admin.snapshot import merge
from ltcp.process.upgrade import UPGRADE_STATE_VERSION, read_upgrade_state

pytestmark = pytest.mark.timeout(30)

WIRE = pathlib.Path(__file__).parent / "fixtures" / "wire"


def test_an_old_workers_snapshot_frame_loads_and_renders():
    (message,) = Framer().feed((WIRE / "snapshot.frame").read_bytes())
    kind, token, counts = message
    assert (kind, token) == ("snapshot", 41)
    (server,) = counts["routers"][0]["servers"]
    assert isinstance(server["connect_latency"], Histogram) and server["accepted"] == 1
    families = {family.name: family for family in render(merge([counts, counts]))}
    assert sum(sample.value for sample in families["ltcp_accepted"].samples) == 2


def test_an_unnumbered_upgrade_state_is_read_by_name():
    state = read_upgrade_state(pickle.loads((WIRE / "upgrade-v1.state").read_bytes()))
    assert state["workers"] == [
        {"pid": 4242, "channel": 9, "generation": 3, "paused": True, "state": "serving"},
        {"pid": 4243, "channel": -1, "generation": 3, "paused": False, "state": "serving"},  # (older still: 3 fields)
    ]
    assert isinstance(state["config"], Config)
    assert [router.label for router in state["config"].routers] == ["edge", "files"]
    assert state["config"].routers[0].servers[0].tls.alpn_protocols == ("h2", "http/1.1")
    assert (state["reloads"], state["restarts"], state["admin_port"]) == ({"success": 2, "failure": 1}, 1, 9989)
    assert state["departed"]["routers"]


def test_fields_a_later_release_adds_are_skipped_and_missing_ones_have_defaults():
    later = {"version": UPGRADE_STATE_VERSION + 1, "listeners": {}, "config": None, "streams_in_flight": [1, 2],
             "workers": [{"pid": 7, "channel": 3, "generation": 9, "cpu_affinity": 1}]}
    state = read_upgrade_state(later)
    assert state["workers"] == [{"pid": 7, "channel": 3, "generation": 9, "paused": False, "state": "serving",
                                 "cpu_affinity": 1}]
    assert (state["reloads"], state["restarts"], state["departed"]) == ({"success": 0, "failure": 0}, 0, None)


@pytest.mark.parametrize("module", ["ltcp.worker", "ltcp.config", "ltcp.histogram", "ltcp.control"])
def test_modules_named_on_the_wire_stay_where_they_were(module):
    """An old supervisor starts ``python -m ltcp.worker`` from the installed code; pickles name the others."""
    assert importlib.util.find_spec(module) is not None
    assert module != "ltcp.control" or callable(importlib.import_module(module).frozen_mapping)
