"""The pure parts of the process model: channel framing, reload plans, and one watch per name."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ltcp.config import Address, loads
from ltcp.control import MAX_FRAME, Framer, encode
from ltcp.interpreter.fanout import Hub
from ltcp.config.plan import listener_key, plan

messages = st.lists(st.tuples(st.sampled_from(["update", "snapshot", "subscribe"]),
                              st.text(max_size=20), st.one_of(st.none(), st.integers(), st.binary(max_size=300))),
                    max_size=20)


@given(messages, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_messages_come_out_whole_however_the_stream_is_cut(sent, cuts):
    stream = b"".join(encode(m) for m in sent)
    framer, received, at = Framer(), [], 0
    for size in cuts * (len(stream) // sum(cuts) + 1):
        received += framer.feed(stream[at:at + size])
        at += size
        if at >= len(stream):
            break
    assert received == sent


def test_a_frame_announcing_more_than_the_limit_is_refused_before_it_is_buffered():
    with pytest.raises(ValueError, match="frame"):
        Framer().feed((MAX_FRAME + 1).to_bytes(4, "big"))


def test_a_configuration_crosses_the_channel_unchanged():
    config = loads("""
workers: 2
routers:
- label: r
  interpreter: {kind: io.l5d.static, names: {/svc/a: ["127.0.0.1:1", {addr: "127.0.0.1:2", weight: 2}]}}
  servers: [{port: 7000, dstName: /svc/a}]
  client: {kind: io.l5d.static, configs: [{prefix: /svc/a, connectTimeoutMs: 100}]}
""")
    (message,) = Framer().feed(encode(("start", config, {}, 1)))
    assert message[1] == config


def _config(*servers, interpreter="io.l5d.static", label="r"):
    names = {"/svc/a": ["127.0.0.1:1"]} if interpreter == "io.l5d.static" else None
    source = {"kind": interpreter, "names": names} if names else {"kind": interpreter, "rootDir": "."}
    return loads(json.dumps({"routers": [{"label": label, "interpreter": source,
                                   "servers": [{"port": port, "dstName": "/svc/a"} for port in servers]}]}))


def test_a_reload_plan_keeps_every_address_still_configured_and_closes_the_rest():
    old, new = _config(7000, 7001), _config(7001, 7002)
    steps = plan(old, new)
    assert steps.keep == {("127.0.0.1", 7001)}
    assert steps.open == {("127.0.0.1", 7002)}
    assert steps.close == {("127.0.0.1", 7000)}
    assert steps.discovery == {"r"}  # same interpreter section: its watches carry over


def test_a_port_chosen_by_the_system_is_kept_by_its_place():
    old, new = _config(0, 7000), _config(0, 7000)
    assert plan(old, new).keep == {("r", 0, "127.0.0.1"), ("127.0.0.1", 7000)}
    assert listener_key("r", 0, new.routers[0].servers[0]) == ("r", 0, "127.0.0.1")


def test_a_changed_interpreter_starts_discovery_afresh():
    assert plan(_config(7000), _config(7000, interpreter="io.l5d.fs")).discovery == frozenset()
    assert plan(None, _config(7000)).open == {("127.0.0.1", 7000)}


class FakeInterpreter:
    def __init__(self):
        self.watching = {}
        self.unwatched = []

    def start(self):
        pass

    def watch(self, name, deliver):
        self.watching[name] = deliver

    def unwatch(self, name):
        self.unwatched.append(name)
        del self.watching[name]

    def close(self):
        pass


class Worker:
    def __init__(self):
        self.got = []

    def send(self, message):
        self.got.append(message)


def test_a_hub_watches_each_name_once_for_every_worker():
    interpreter = FakeInterpreter()
    hub = Hub("r", interpreter)
    one, two = Worker(), Worker()
    hub.subscribe(one, "/svc/a")
    hub.subscribe(two, "/svc/a")
    assert list(interpreter.watching) == ["/svc/a"]
    answer = [Address("127.0.0.1", 1, 1.0)]
    interpreter.watching["/svc/a"](answer)
    assert one.got == two.got == [("update", "r", "/svc/a", answer)]
    late = Worker()
    hub.subscribe(late, "/svc/a")  # the last answer, at once: no second lookup
    assert late.got == [("update", "r", "/svc/a", answer)] and hub.watched == 1
    hub.unsubscribe(one, "/svc/a")
    hub.drop(two)
    assert interpreter.unwatched == []
    hub.unsubscribe(late, "/svc/a")
    assert interpreter.unwatched == ["/svc/a"] and hub.watched == 0


def test_an_answer_after_the_last_unsubscription_goes_nowhere():
    interpreter = FakeInterpreter()
    hub = Hub("r", interpreter)
    worker = Worker()
    hub.subscribe(worker, "/svc/a")
    deliver = interpreter.watching["/svc/a"]
    hub.unsubscribe(worker, "/svc/a")
    deliver(None)
    assert worker.got == []
    hub.subscribe(worker, "/svc/a")  # watched afresh: no stale answer replayed
    assert worker.got == []


def test_a_scrape_leaves_a_workers_snapshot_as_it_was():
    """The merge of one snapshot is that snapshot: the supervisor's view must be a new one."""
    from ltcp.histogram import Histogram
    from ltcp.process.fleet import Generation, WorkerProcess
    from ltcp.process.supervisor import Supervisor
    from ltcp.wheel import LAG_BUCKETS

    config = _config(7000)
    supervisor = Supervisor(config, None, "-", "info")
    generation = Generation(1, config, {})
    worker = WorkerProcess(0, 1, pid=1)
    worker.state = "serving"
    answer = {"routers": [{"label": "r", "servers": [{"active": 1, "accepted": 3}], "destinations": []}],
              "reactor_lag": Histogram(LAG_BUCKETS), "draining": False}

    class Link:
        def send(self, message):
            worker.answered(message[1], answer)

    worker.link = Link()
    generation.workers[0] = worker
    supervisor.generations.append(generation)
    view = supervisor.snapshot()
    assert [{**w, "snapshot_age_secs": 0} for w in view["workers"]] == [
        {"pid": 1, "generation": 1, "state": "serving", "streams": 1, "accepted": 3, "snapshot_age_secs": 0,
         "stale": False}]
    assert worker.last is answer and set(answer) == {"routers", "reactor_lag", "draining"}


def test_a_worker_has_one_snapshot_question_at_a_time():
    """One that does not answer (stopped, stuck) is not asked again per scrape, to answer them all later."""
    import itertools

    from ltcp.process.fleet import WorkerProcess

    sent = []
    worker = WorkerProcess(0, 1, pid=1)
    worker.link = type("Link", (), {"send": lambda self, message: sent.append(message)})()
    tokens = itertools.count()
    first = worker.ask(0, tokens)
    assert worker.ask(1000, tokens) is first and sent == [("snapshot", first.token, 0)]
    worker.answered(first.token + 1, "not an answer to it")
    assert worker.last is None and not first.future.done()
    worker.answered(first.token, "answer")
    assert first.future.result(0) == "answer" and worker.last == "answer"
    second = worker.ask(1000, tokens)
    assert second is not first and sent[-1] == ("snapshot", second.token, 1000)
    worker.hung_up()
    assert second.future.cancelled() and worker.ask(0, tokens) is None and len(sent) == 2
