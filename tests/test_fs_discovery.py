"""io.l5d.fs: the address file parser, the mapping of names to files, and following files safely."""

import logging
import os
import threading
import time

import hypothesis.strategies as st
import pytest
from hypothesis import given

from ltcp.config import Address
from ltcp.interpreter import fs as fs_module
from ltcp.interpreter.fs import FsInterpreter, name_to_path, parse_addresses
from netutil import Deliveries, named


def test_parse_lines_weights_comments():
    text = "# endpoints\n127.0.0.1 80\n\n::1 8080 2.5  # v6\n  10.0.0.1   443 0.5\n"
    addresses, problems = parse_addresses(text, "f")
    assert addresses == [Address("127.0.0.1", 80, 1.0), Address("::1", 8080, 2.5), Address("10.0.0.1", 443, 0.5)]
    assert problems == []


def test_bad_lines_are_named_by_file_and_line_and_skipped():
    text = "127.0.0.1\nhost.example 80\n127.0.0.1 99999\n127.0.0.1 80 -1\n127.0.0.1 80 nan\n127.0.0.1 81\n127.0.0.1 81\n"
    addresses, problems = parse_addresses(text, "disco/web")
    assert addresses == [Address("127.0.0.1", 81, 1.0)]
    assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "4", "5", "7"]
    assert problems[1] == "disco/web:2: 'host.example' is not an IP address literal"


@given(st.text(max_size=300))
def test_parser_never_raises(text):
    addresses, problems = parse_addresses(text)
    assert all(a.weight > 0 and 0 < a.port <= 65535 for a in addresses)
    assert len(set((a.ip, a.port) for a in addresses)) == len(addresses)


def test_names_map_under_the_root_and_never_climb_out(tmp_path):
    root = str(tmp_path)
    assert name_to_path(root, "/svc/web") == os.path.join(root, "web")
    assert name_to_path(root, "/svc/a/b") == os.path.join(root, "a", "b")
    for bad in ["/svc/../etc/passwd", "/svc/..", "/svc/", "/svc", "svc/web", "/svc/a//b",
                "/svc/./x", "/svc/a\0b"]:
        assert name_to_path(root, bad) is None, bad


@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"]), max_size=8), min_size=1, max_size=4))
def test_no_name_climbs_out_of_the_root(segments):
    root = "/tmp/ltcp-root-that-need-not-exist"
    path = name_to_path(root, "/" + "/".join(segments))
    if path is not None:
        assert os.path.normpath(path).startswith(root + os.sep)


def test_watch_delivers_changes_and_refuses_escapes(tmp_path, caplog):
    (tmp_path / "web").write_text("127.0.0.1 80\nbad line here x\n")
    updates = []
    changed = threading.Event()

    def deliver(addresses):
        updates.append(addresses)
        changed.set()

    interpreter = FsInterpreter(str(tmp_path), 0.02)
    interpreter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="ltcp"):
            interpreter.watch("/svc/web", deliver)
            assert changed.wait(5)
            assert updates == [[Address("127.0.0.1", 80, 1.0)]]
            assert any(f"{tmp_path}/web:2:" in r.getMessage() for r in caplog.records)
            changed.clear()
            (tmp_path / "web").write_text("127.0.0.1 80 3\n")
            assert changed.wait(5)
            assert updates[-1] == [Address("127.0.0.1", 80, 3.0)]
            changed.clear()
            (tmp_path / "web").unlink()
            assert changed.wait(5)
            assert updates[-1] is None
            refused = []
            interpreter.watch("/svc/../../etc/passwd", refused.append)
            assert refused == [None]
    finally:
        interpreter.close()
    assert not interpreter._thread.is_alive()


@pytest.fixture
def fs(tmp_path):
    interpreter = FsInterpreter(str(tmp_path), 0.05)
    interpreter.start()
    yield interpreter
    interpreter.close()
    assert not interpreter._thread.is_alive()


def test_a_fifo_fails_fast_and_never_blocks_other_names(fs, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "web").write_text("127.0.0.1 80\n")
    pipe, web = Deliveries(), Deliveries()
    fs.watch("/svc/pipe", pipe)
    assert pipe.wait() is None
    fs.watch("/svc/web", web)
    assert web.wait() == [Address("127.0.0.1", 80, 1.0)]


@pytest.mark.parametrize("kind", ["directory", "symlink loop", "too big"])
def test_names_that_can_never_resolve_fail_fast_and_warn_once(fs, tmp_path, caplog, kind):
    if kind == "directory":
        (tmp_path / "web").mkdir()
    elif kind == "symlink loop":
        os.symlink(tmp_path / "web", tmp_path / "web2")
        os.symlink(tmp_path / "web2", tmp_path / "web")
    else:
        (tmp_path / "web").write_bytes(b"# padding\n" * 200_000)
    web, other = Deliveries(), Deliveries()
    with caplog.at_level(logging.WARNING, logger="ltcp"):
        fs.watch("/svc/web", web)
        assert web.wait() is None
        for round_ in range(1, 6):  # five more looks at every file, each after a period
            (tmp_path / f"other{round_}").write_text("127.0.0.1 80\n")
            fs.watch(f"/svc/other{round_}", other)
            other.wait(round_)
    warnings = [r for r in caplog.records if "io.l5d.fs: /svc/web" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert web.updates == [None]


def test_a_resolved_name_keeps_its_set_when_its_file_breaks(fs, tmp_path):
    (tmp_path / "web").write_text("127.0.0.1 80\n")
    web = Deliveries()
    fs.watch("/svc/web", web)
    assert web.wait() == [Address("127.0.0.1", 80, 1.0)]
    (tmp_path / "web").unlink()
    (tmp_path / "web").mkdir()
    (tmp_path / "probe").write_text("127.0.0.1 81\n")
    probe = Deliveries()
    fs.watch("/svc/probe", probe)
    probe.wait()
    time.sleep(fs_module.VANISH_SECS + 0.2)  # a window in which nothing may be delivered
    assert web.updates == [[Address("127.0.0.1", 80, 1.0)]]


def test_a_deleted_file_empties_the_set_once_it_stays_deleted(fs, tmp_path):
    (tmp_path / "web").write_text("127.0.0.1 80\n")
    web = Deliveries()
    fs.watch("/svc/web", web)
    web.wait()
    deleted = time.monotonic()
    (tmp_path / "web").unlink()
    assert web.wait(2) is None
    assert time.monotonic() - deleted >= fs_module.VANISH_SECS


def test_rewrites_in_place_never_fail_a_client(proxies, backends, tmp_path):
    a, b = backends(named("a")), backends(named("b"))
    path = tmp_path / "web"
    path.write_text(f"127.0.0.1 {a.port}\n")
    proxy = proxies({"routers": [{
        "label": "fs", "interpreter": {"kind": "io.l5d.fs", "rootDir": str(tmp_path), "periodSecs": 0.05},
        "servers": [{"port": 0, "dstName": "/svc/web", "connectTimeoutMs": 2000}]}]})
    with proxy.connect() as c:
        assert c.recv(2) == b"a\n"
    done = threading.Event()

    def rewrite():
        for i in range(1, 11):  # a writer that truncates, then takes its time to write
            with open(path, "w") as f:
                f.flush()
                time.sleep(0.04)
                f.write(f"127.0.0.1 {(a, b)[i % 2].port}\n")
            time.sleep(0.2)
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    answers = []
    while not done.is_set():
        with proxy.connect() as c:
            answers.append(c.recv(2))
    writer.join()
    assert answers.count(b"a\n") > 10 and answers.count(b"b\n") > 10  # every change was followed
    assert set(answers) == {b"a\n", b"b\n"}, [x for x in answers if x not in (b"a\n", b"b\n")][:3]
    assert proxy.listener.failures == {}


def test_a_file_swapped_for_a_link_outside_the_root_is_not_read(fs, tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("127.0.0.1 81\nthe secret line\n")
    (root / "dir").mkdir()
    (root / "dir" / "web").write_text("127.0.0.1 80\n")
    interpreter = FsInterpreter(str(root), 0.05)
    interpreter.start()
    try:
        web, probe = Deliveries(), Deliveries()
        with caplog.at_level(logging.WARNING, logger="ltcp"):
            interpreter.watch("/svc/dir/web", web)
            assert web.wait() == [Address("127.0.0.1", 80, 1.0)]
            (root / "dir" / "web").unlink()
            (root / "dir").rmdir()
            os.symlink(outside, root / "dir")  # the watched path now leads out of the root
            os.rename(outside / "secret", outside / "web")
            for i in range(3):  # three rounds of looks at every file
                (root / f"p{i}").write_text("127.0.0.1 82\n")
                interpreter.watch(f"/svc/p{i}", probe)
                probe.wait(i + 1)
        assert all(update != [Address("127.0.0.1", 81, 1.0)] for update in web.updates)
        assert not any("secret" in r.getMessage() for r in caplog.records)
    finally:
        interpreter.close()


def test_links_are_followed_when_read_like_a_kubernetes_configmap_update(fs, tmp_path):
    """Links were resolved once, when a name was first watched: a ConfigMap update emptied the name for good."""
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "default").write_text("127.0.0.1 80\n")
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/default", tmp_path / "default")
    web = Deliveries()
    fs.watch("/svc/default", web)
    assert web.wait() == [Address("127.0.0.1", 80, 1.0)]
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "default").write_text("127.0.0.1 81 7\n")
    os.symlink("..v2", tmp_path / "..tmp")
    os.rename(tmp_path / "..tmp", tmp_path / "..data")  # the atomic swap kubelet makes
    (tmp_path / "..v1" / "default").unlink()
    (tmp_path / "..v1").rmdir()
    assert web.wait(2) == [Address("127.0.0.1", 81, 7.0)]


def test_a_link_leading_out_fails_fast_until_it_is_fixed(fs, tmp_path, caplog):
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (outside / "web").write_text("127.0.0.1 81\n")
    root = tmp_path
    os.symlink(outside, root / "out")
    web = Deliveries()
    with caplog.at_level(logging.WARNING, logger="ltcp"):
        fs.watch("/svc/out/web", web)
        assert web.wait() is None  # refused, as a name that cannot resolve
    assert any("leads outside" in r.getMessage() for r in caplog.records)
    (root / "out").unlink()
    (root / "out").mkdir()
    (root / "out" / "web").write_text("127.0.0.1 82\n")
    assert web.wait(2) == [Address("127.0.0.1", 82, 1.0)]


def test_a_file_of_junk_costs_one_short_warning():
    """1 MiB of bad lines once logged 524,001 warnings and held discovery for 15 s."""
    addresses, problems = parse_addresses("x\n" * 500_000 + "127.0.0.1 80\n", "junk")
    assert addresses == [Address("127.0.0.1", 80, 1.0)]
    assert len(problems) == 11 and problems[-1] == "junk: 499990 more bad lines"
