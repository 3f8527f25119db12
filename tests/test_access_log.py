"""The access log: a line per stream with exact byte counts, never blocking the data plane."""

import collections
import json
import os
import re
import signal
import socket
import ssl
import threading

import hypothesis.strategies as st
import pytest
import trustme
from hypothesis import given
from netutil import (LtcpProcess, closed_without_data, echo, recv_exactly, refused_port, static_config,
                     wait_for)

from ltcp.dataplane import accesslog

pytestmark = pytest.mark.timeout(60)

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def read_lines(path, count, timeout=10):
    """The first ``count`` JSON lines of ``path``, once there are that many."""
    def text():
        with open(path) as f:
            return f.read()
    wait_for(lambda: os.path.exists(path) and len(text().splitlines()) >= count, timeout=timeout,
             message=f"{count} access log lines")
    return [json.loads(line) for line in text().splitlines()]


def logged(document, path, fmt="json"):
    document["accessLog"] = {"path": str(path), "format": fmt}
    return document


def exchange(proxy, send, expect):
    """Send ``send`` bytes, half-close, read everything back; (client address, bytes received)."""
    with proxy.connect() as conn:
        address = conn.getsockname()
        conn.sendall(b"x" * send)
        conn.shutdown(socket.SHUT_WR)
        received = 0
        while chunk := conn.recv(1 << 16):
            received += len(chunk)
    assert received == expect
    return address, received


def test_a_line_per_stream_with_exact_bytes_both_ways(proxies, backends, tmp_path):
    backend = backends(echo)
    path = tmp_path / "access.log"
    proxy = proxies(logged(static_config({"/svc/a": [backend.addr]}), path))
    sizes = [5, 70_000, 3_000_000]  # small, a few buffers, and enough to switch to splicing
    clients = [exchange(proxy, size, size)[0] for size in sizes]
    lines = read_lines(path, 3)
    for line, size, client in zip(lines, sizes, clients):
        assert RFC3339.fullmatch(line["start"]) and line["duration_ms"] >= 0
        assert line["router"] == "test" and line["server"] == f"127.0.0.1:{proxy.port()}"
        assert line["client"] == f"{client[0]}:{client[1]}"
        assert line["dst"] == "/svc/a" and line["endpoint"] == backend.addr
        assert (line["bytes_from_client"], line["bytes_to_client"]) == (size, size)
        assert line["end"] == "done" and line["sni"] is None and line["tls"] is None
    listener_sent = proxy.call(lambda: proxy.listener.sent.value)
    assert sum(line["bytes_to_client"] for line in lines) == listener_sent


def test_a_failed_stream_is_logged_with_the_cause_the_metrics_count(proxies, tmp_path):
    holder, port = refused_port()
    path = tmp_path / "access.log"
    proxy = proxies(logged(static_config({"/svc/a": [f"127.0.0.1:{port}"]}, connectTimeoutMs=300), path))
    try:
        with proxy.connect() as conn:
            assert closed_without_data(conn)
        line, = read_lines(path, 1)
        causes = proxy.call(lambda: dict(proxy.listener.failures))
        assert list(causes) == [line["end"]] and line["end"] in ("unreachable", "timeout")
        assert line["endpoint"] == f"127.0.0.1:{port}"  # the last one it tried
        assert (line["bytes_from_client"], line["bytes_to_client"]) == (0, 0)
    finally:
        holder.close()


def test_the_proxy_protocol_address_sni_tls_version_and_client_identity_are_logged(proxies, backends, tmp_path):
    ca, clients = trustme.CA(), trustme.CA()
    server, alice = ca.issue_cert("localhost"), clients.issue_cert("alice.example")
    files = {}
    for name, pem in (("crt", server.cert_chain_pems[0]), ("key", server.private_key_pem),
                      ("clients", clients.cert_pem)):
        files[name] = str(tmp_path / name)
        pem.write_to_path(files[name])
    backend = backends(echo)
    path = tmp_path / "access.log"
    tls = {"defaultIdentity": {"privateKey": files["key"], "certs": [files["crt"]]},
           "clientAuth": {"trustCerts": [files["clients"]]}}
    proxy = proxies(logged(static_config({"/t/alice.example": [backend.addr]}, dstName="/t/{client}", tls=tls,
                                         proxyProtocol="accept"), path, "text"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    alice.configure_cert(context)
    raw = proxy.connect()
    raw.sendall(b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n")
    with context.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(b"hello")
        assert recv_exactly(conn, 5) == b"hello"
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), message="the line")
    line = path.read_text()
    assert re.fullmatch(
        r"\S+Z \d+(\.\d+)?ms test 127\.0\.0\.1:\d+ <- 203\.0\.113\.7:40000 sni=localhost tls=TLSv1\.[23] "
        rf"identity=alice\.example /t/alice\.example -> {re.escape(backend.addr)} in=5 out=5 done\n", line), line


def test_a_stalled_disk_drops_lines_counts_them_and_streams_keep_flowing(proxies, backends, tmp_path, monkeypatch):
    monkeypatch.setattr(accesslog, "MAX_QUEUED", 2)
    monkeypatch.setattr(accesslog, "CHUNK_BYTES", 512)  # a chunk every couple of lines
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read: a pipe's 64 KiB, then writes block
    backend = backends(echo)
    proxy = proxies(logged(static_config({"/svc/a": [backend.addr]}), fifo))
    drained = threading.Thread(target=lambda: collections.deque(iter(lambda: os.read(reader, 1 << 16), b""), 0))
    try:
        for _ in range(600):  # about 180 KB of lines, three times what the pipe holds; each within 10 s
            exchange(proxy, 10, 10)
        stream_log = proxy.app.access_log
        writer = proxy.app.log_writer
        wait_for(lambda: stream_log.lines == 600, message="every stream ended")
        wait_for(lambda: writer.counts()[1] > 0, message="lines dropped")
        os.set_blocking(reader, True)
        drained.start()  # reads until ltcp closes the file, at its stop
        proxy.call(stream_log.flush)
        wait_for(lambda: sum(writer.counts()) == 600, message="every line written or counted as dropped")
    finally:
        proxy.stop()
        if drained.is_alive():
            drained.join(10)
        os.close(reader)


def test_workers_share_one_file_whole_lines_and_sigusr1_reopens_it(backends, tmp_path):
    backend = backends(echo)
    path = tmp_path / "access.log"
    document = logged(static_config({"/svc/a": [backend.addr]}), path)
    document["workers"] = 2
    ltcp = LtcpProcess(document)
    try:
        def burst(count):
            threads = [threading.Thread(target=lambda: [one_stream() for _ in range(count // 8)]) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        def one_stream():
            with ltcp.connect() as conn:
                conn.sendall(b"y" * 1000)
                conn.shutdown(socket.SHUT_WR)
                assert recv_exactly(conn, 1000) == b"y" * 1000

        burst(400)
        lines = read_lines(path, 400)
        assert len(lines) == 400 and all(line["bytes_to_client"] == 1000 for line in lines)
        rotated = tmp_path / "access.log.1"
        os.rename(path, rotated)  # what logrotate does, then it signals
        ltcp.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "reopened" in ltcp.log, message="the log reopened")
        burst(80)
        assert len(read_lines(path, 80)) == 80
        assert len(rotated.read_text().splitlines()) == 400
    finally:
        ltcp.stop()


class _Envelope:
    def __init__(self, server_name, tls_version, client_identity, dst_name):
        self.server_name, self.tls_version, self.client_identity, self.dst_name = (
            server_name, tls_version, client_identity, dst_name)


@given(st.one_of(st.none(), st.text()), st.one_of(st.none(), st.text()), st.text(min_size=1), st.text())
def test_json_lines_stay_one_valid_object_whatever_the_names(sni, identity, dst, router):
    envelope = _Envelope(sni, "TLSv1.3", identity, dst)
    line = accesslog._json_line("2026-11-28T09:00:00.000Z", 1.5, (router, "127.0.0.1:1"), "[::1]:2", envelope,
                                None, 3, 4, "done")
    assert line.endswith("\n") and line.count("\n") == 1
    fields = json.loads(line)
    assert (fields["sni"], fields["client_identity"], fields["dst"], fields["router"]) == (sni, identity, dst, router)
    text = accesslog._text_line("t", 1.5, (router, "s"), "c", envelope, None, 3, 4, "done")
    if "\n" not in router:  # (the router's label comes from the configuration, the rest may not)
        assert text.count("\n") == 1  # no name breaks a line


@pytest.mark.timeout(120)
def test_no_line_is_lost_across_an_upgrade(backends, tmp_path):
    backend = backends(echo)
    log_path = tmp_path / "access.log"
    document = logged(static_config({"/svc/a": [backend.addr]}), log_path)
    document["workers"] = 2
    ltcp = LtcpProcess(document, path=tmp_path / "ltcp.yaml")
    made, stop, errors = [0], threading.Event(), []

    def load():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", ltcp.port), timeout=10) as conn:
                    conn.sendall(b"z" * 100)
                    conn.shutdown(socket.SHUT_WR)
                    assert recv_exactly(conn, 100) == b"z" * 100
                made[0] += 1
            except (OSError, AssertionError) as exc:
                errors.append(exc)

    try:
        held = ltcp.connect()  # open across the upgrade: it ends on an old worker, while it drains
        held.sendall(b"held")
        assert recv_exactly(held, 4) == b"held"
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: made[0] > 50, message="load")
        ltcp.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "upgrade: generation 2 serving" in ltcp.log, timeout=60, message="the upgrade")
        count = made[0]
        wait_for(lambda: made[0] > count + 50, message="load on the new workers")
        stop.set()
        for thread in threads:
            thread.join()
        held.shutdown(socket.SHUT_WR)
        assert held.recv(10) == b""  # its old worker passed the end on: the stream is over
        held.close()
        assert errors == []
        lines = read_lines(log_path, made[0] + 1, timeout=20)
        assert len(lines) == made[0] + 1
        assert sorted(line["bytes_to_client"] for line in lines)[:1] == [4]  # the held stream's line is there
    finally:
        stop.set()
        ltcp.stop()
