"""io.l5d.fs: the address file parser and the mapping of names to files."""

import logging
import os
import threading

import hypothesis.strategies as st
from hypothesis import given

from ltcp.config import Address
from ltcp.interpreter.fs import FsInterpreter, name_to_path, parse_addresses


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


def test_names_map_under_the_root_and_never_escape(tmp_path):
    root = str(tmp_path)
    assert name_to_path(root, "/svc/web") == os.path.join(os.path.realpath(root), "web")
    assert name_to_path(root, "/svc/a/b") == os.path.join(os.path.realpath(root), "a", "b")
    os.symlink("/etc", tmp_path / "outside")
    for bad in ["/svc/../etc/passwd", "/svc/..", "/svc/", "/svc", "svc/web", "/svc/a//b",
                "/svc/./x", "/svc/a\0b", "/svc/outside/passwd"]:
        assert name_to_path(root, bad) is None, bad


@given(st.lists(st.text(st.characters(blacklist_categories=["Cs"]), max_size=8), min_size=1, max_size=4))
def test_no_name_resolves_outside_the_root(segments):
    root = "/tmp/ltcp-root-that-need-not-exist"
    path = name_to_path(root, "/" + "/".join(segments))
    if path is not None:
        assert path.startswith(os.path.realpath(root) + os.sep)


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
