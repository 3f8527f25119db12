"""The ClientHello reader: real hellos, re-fragmented records, prefixes, names, garbage."""


import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from ltcp.protocol.tls import HELLO, MALFORMED, NEED_MORE, NOT_TLS, normalize_server_name, parse_client_hello
from netutil import client_hello

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
# A name that parses as an IP address is never sent as SNI (RFC 6066), so end on letters.
hostnames = st.tuples(st.lists(labels, min_size=1, max_size=3), st.from_regex(r"[a-z]{2,6}", fullmatch=True)).map(
    lambda parts: ".".join([*parts[0], parts[1]]))


def refragment(hello, sizes):
    """The same handshake message carried in records of the given sizes."""
    message = hello[5:5 + int.from_bytes(hello[3:5], "big")]
    records, at = [], 0
    for size in sizes:
        if at >= len(message):
            break
        records.append(message[at:at + size])
        at += size
    if at < len(message):
        records.append(message[at:])
    return b"".join(b"\x16\x03\x01" + len(r).to_bytes(2, "big") + r for r in records)


@settings(max_examples=60, deadline=None)
@given(hostnames, st.lists(st.integers(1, 300), max_size=8))
def test_real_hellos_in_any_records(name, sizes):
    data = refragment(client_hello(name, ["h2"]), sizes)
    assert parse_client_hello(data) == (HELLO, name, "")
    assert parse_client_hello(data + b"trailing application bytes").server_name == name


@settings(max_examples=20, deadline=None)
@given(hostnames)
def test_every_prefix_asks_for_more(name):
    data = client_hello(name)
    for end in range(0, len(data), 7):
        assert parse_client_hello(data[:end]).status == NEED_MORE


def test_hello_without_sni():
    assert parse_client_hello(client_hello(None)) == (HELLO, None, "")


def test_not_tls_and_malformed():
    assert parse_client_hello(b"GET / HTTP/1.1\r\n").status == NOT_TLS
    assert parse_client_hello(b"\x16\x03\x01\x00\x00").status == MALFORMED  # empty record
    assert parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00").status == MALFORMED  # ServerHello
    assert parse_client_hello(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff").status == MALFORMED  # too large
    hello = client_hello("a.example")
    broken = bytearray(hello)
    broken[5 + 4 + 2 + 32] = 200  # session id length past the end
    assert parse_client_hello(bytes(broken)).status == MALFORMED


@given(st.binary(max_size=400))
def test_garbage_never_raises(data):
    result = parse_client_hello(data)
    assert result.status in (NEED_MORE, NOT_TLS, MALFORMED, HELLO)


@pytest.mark.parametrize("name, expected", [
    ("API.Example.COM", "api.example.com"),
    ("example.com.", "example.com"),
    ("a_b.example", "a_b.example"),
    ("../etc/passwd", None),
    ("a/b.example", None),
    ("a..b", None),
    ("a\x00b", None),
    ("-a.example", None),
    ("x" * 64 + ".example", None),
    ("", None),
    ("a b", None),
])
def test_server_names_are_normalized_or_refused(name, expected):
    assert normalize_server_name(name) == expected


def test_a_hello_in_too_many_records_is_malformed_at_once():
    """A hello cut into 1-byte records once cost 5 ms to parse, again at every look."""
    hello = client_hello("a.example")
    assert parse_client_hello(refragment(hello, [1] * 16)).status == MALFORMED
    assert parse_client_hello(refragment(hello, [1] * 14)).status == HELLO  # 15 records still parse
    header = b"\x16\x03\x01\x00\x01\x01"  # records of one byte each, never finishing
    assert parse_client_hello(header * 3000).status == MALFORMED
