import threading

import pytest

from ltcp.loop import Reactor


@pytest.fixture
def reactor():
    """A reactor for the test's own thread; closed afterwards."""
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def running_reactor():
    """A reactor running on a background thread, stopped and joined afterwards."""
    r = Reactor()
    thread = threading.Thread(target=r.run, name="reactor", daemon=True)
    thread.start()
    yield r
    r.call_soon_threadsafe(r.stop)
    thread.join(5)
    assert not thread.is_alive(), "reactor did not stop"
    r.close()
