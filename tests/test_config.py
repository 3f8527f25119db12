"""Configuration: linkerd-tcp's example, our keys, and every kind of bad input."""

import json
import pathlib
import time

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import given, settings

from ltcp.config import Address, ConfigError, FailFastConfig, load, loads, parse_address, prefix_matches

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"

MINIMAL = {
    "routers": [{
        "label": "r",
        "interpreter": {"kind": "io.l5d.static", "names": {"/svc/a": ["127.0.0.1:8080"]}},
        "servers": [{"port": 7000, "dstName": "/svc/a"}],
        "client": {},
    }]
}


def with_changes(*edits):
    """MINIMAL, deep-copied, with each (path, value) set; value None deletes."""
    doc = json.loads(json.dumps(MINIMAL))
    for path, value in edits:
        node = doc
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
        if value is None:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return doc


def errors_of(doc, base_dir="."):
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    with pytest.raises(ConfigError) as info:
        loads(text, "cfg.yaml", base_dir)
    return info.value.errors


def test_linkerd_tcp_example_loads_unchanged():
    config = load(str(FIXTURES / "linkerd-tcp-example.yml"))
    assert config.admin.port == 9989 and config.admin.ip == "127.0.0.1"
    router = config.routers[0]
    assert router.interpreter.base_url == "http://localhost:4180"
    assert router.interpreter.watch is True and router.interpreter.period_secs == 20
    server = router.servers[0]
    assert (server.ip, server.port, server.dst_name) == ("127.0.0.1", 7474, "/svc/default")
    assert server.connect_timeout_ms == 500 and server.connection_lifetime_secs == 60
    settings_ = router.client.settings_for("/svc/default")
    assert settings_.min_connections == 3 and settings_.connect_timeout_ms == 500


def test_quickstart_example_loads_with_paths_relative_to_the_file():
    config = load(str(EXAMPLES / "quickstart.yaml"))
    assert config.routers[0].interpreter.root_dir == str(EXAMPLES / "disco")


def test_defaults():
    config = loads(yaml.safe_dump(MINIMAL))
    assert config.buffer_size_bytes == 16384
    assert (config.admin.ip, config.admin.port, config.admin.grace_secs) == ("127.0.0.1", 9989, 10)
    server = config.routers[0].servers[0]
    assert server.ip == "127.0.0.1" and server.tls is None and server.idle_timeout_ms is None
    client = config.routers[0].client
    assert client.kind == "io.l5d.global" and client.fail_fast == FailFastConfig(5, 60)
    assert config.routers[0].interpreter.names["/svc/a"] == (Address("127.0.0.1", 8080, 1.0),)


def test_json_is_accepted():
    config = loads(json.dumps(MINIMAL))
    assert config.routers[0].label == "r"


def test_static_names_with_weights_and_ipv6():
    doc = with_changes((["routers", 0, "interpreter", "names", "/svc/a"],
                        ["127.0.0.1:1", {"addr": "[::1]:2", "weight": 2.5}]))
    names = loads(yaml.safe_dump(doc)).routers[0].interpreter.names
    assert names["/svc/a"] == (Address("127.0.0.1", 1, 1.0), Address("::1", 2, 2.5))


@pytest.mark.parametrize("edit, expected", [
    ((["bogus"], 1), "bogus: unknown key"),
    ((["admin"], {"prot": 1}), "admin.prot: unknown key (did you mean port?)"),
    ((["routers", 0, "servers", 0, "dstname"], "/x"), "routers[0].servers[0].dstname: unknown key (did you mean dstName?)"),
    ((["routers", 0, "servers", 0, "port"], 70000), "routers[0].servers[0].port: must be an integer 0..65535"),
    ((["routers", 0, "servers", 0, "port"], "7000"), "routers[0].servers[0].port: must be an integer"),
    ((["routers", 0, "servers", 0, "port"], True), "routers[0].servers[0].port: must be an integer"),
    ((["routers", 0, "servers", 0, "dstName"], None), "routers[0].servers[0].dstName: is required"),
    ((["routers", 0, "label"], None), "routers[0].label: is required"),
    ((["routers", 0, "servers", 0, "dstName"], "svc/a"), "routers[0].servers[0].dstName: must be a name path starting with '/'"),
    ((["routers", 0, "servers", 0, "dstName"], "/svc/{host}"), "unknown placeholder {host}"),
    ((["routers", 0, "servers", 0, "ip"], "localhost"), "routers[0].servers[0].ip: must be an IP address literal"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "ftp://x"}), "baseUrl: must be an http:// or https:// URL"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "http://x", "periodSecs": 0}), "periodSecs: must be a number >= 0.05"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.fs", "rootDir": "/no/such/dir", "periodSecs": -1}), "periodSecs: must be a number >= 0.05"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.nope"}), "routers[0].interpreter.kind: must be one of"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], [{"addr": "127.0.0.1:1", "weight": 0}]), "weight: must be a number > 0"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], [{"addr": "127.0.0.1:1", "weight": -2}]), "weight: must be a number > 0"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], ["example.com:80"]), "is not an IP address literal"),
    ((["routers", 0, "client"], {"kind": "io.l5d.global", "prefix": "/svc"}), "routers[0].client.prefix: io.l5d.global applies to every name"),
    ((["routers", 0, "client"], {"kind": "io.l5d.static", "configs": [{"connectTimeoutMs": 1}]}), "routers[0].client.configs[0].prefix: is required"),
    ((["routers", 0, "client", "failFast"], {"maxConsecutiveFailures": 0}), "maxConsecutiveFailures: must be an integer 1..10000000"),
    ((["routers", 0, "client", "proxyProtocol"], "v3"), "proxyProtocol: must be one of v1, v2"),
    ((["routers", 0, "servers", 0, "tls"], {"defaultIdentity": {"privateKey": "/no/key.pem", "certs": ["/no/cert.pem"]}}), "privateKey: file not found: /no/key.pem"),
    ((["routers", 0, "servers", 0, "tls"], {"alpnProtocols": ["h2"]}), "tls: needs a defaultIdentity or at least one entry"),
    ((["routers", 0, "client", "tls"], {"dnsName": "x.example", "trustCerts": ["/no/ca.pem"]}), "trustCerts[0]: file not found"),
    ((["routers"], []), "routers: must not be empty"),
    ((["bufferSizeBytes"], 10), "bufferSizeBytes: must be an integer 1024.."),
])
def test_each_bad_input_is_named(edit, expected):
    errors = errors_of(with_changes(edit))
    assert any(expected in e for e in errors), errors


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("edit, expected", [
    # Each of these once made a running ltcp fail: overflow in the timer wheel,
    # a stream stuck for its whole deadline, a silent thread death, a misrouting sum.
    ((["routers", 0, "servers", 0, "connectionLifetimeSecs"], INF), "connectionLifetimeSecs: must be a number > 0 and <= 31536000, not inf"),
    ((["routers", 0, "servers", 0, "connectionLifetimeSecs"], NAN), "connectionLifetimeSecs: must be a number"),
    ((["routers", 0, "client", "failFast"], {"failurePenaltySecs": INF}), "failurePenaltySecs: must be a number > 0 and <= 86400"),
    ((["admin"], {"graceSecs": INF}), "admin.graceSecs: must be a number >= 0 and <= 86400"),
    ((["admin"], {"metricsIntervalSecs": 1e9}), "admin.metricsIntervalSecs: must be a number > 0 and <= 86400"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.fs", "rootDir": ".", "periodSecs": INF}), "periodSecs: must be a number >= 0.05 and <= 86400"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.fs", "rootDir": ".", "periodSecs": 1e-9}), "periodSecs: must be a number >= 0.05"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], [{"addr": "127.0.0.1:1", "weight": 1e308}]), "weight: must be a number > 0 and <= 1000000"),
    ((["routers", 0, "servers", 0, "connectTimeoutMs"], 10 ** 30), "connectTimeoutMs: must be an integer 1..86400000"),
    ((["routers", 0, "servers", 0, "idleTimeoutMs"], 10 ** 12), "idleTimeoutMs: must be an integer 1..31536000000"),
    ((["routers", 0, "servers", 0, "maxConcurrency"], 10 ** 9), "maxConcurrency: must be an integer 1..10000000"),
    ((["routers", 0, "client", "maxWaiters"], 10 ** 9), "maxWaiters: must be an integer 0..10000000"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], ["::1:25601"]), "write an IPv6 address in brackets, as '[::1]:25601'"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], ["[127.0.0.1]:80"]), "brackets are for IPv6 addresses only"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], ["127.0.0.1:\u00b2"]), "port must be 1..65535"),
    ((["routers", 0, "interpreter", "names", "/svc/a"], ["127.0.0.1:" + "9" * 40]), "port must be 1..65535"),
])
def test_every_number_has_a_finite_range(edit, expected):
    errors = errors_of(with_changes(edit))
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("edit, expected", [
    # Each of these passed --check and then failed in serve: a traceback, or every stream a bug.
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "http://127.0.0.1:99999"}),
     "baseUrl: is not a usable URL (Port out of range 0-65535)"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "http://[::1"}), "baseUrl: is not a usable URL"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "http://x y"}), "baseUrl: must be an http"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "http://127.0.0.1:abc"}), "baseUrl: is not a usable URL"),
    ((["routers", 0, "interpreter"], {"kind": "io.l5d.namerd.http", "baseUrl": "http://u:p@h/"}), "baseUrl: must be an http"),
    ((["routers", 0, "client", "tls"], {"dnsName": "a..b"}), "client.tls.dnsName: must be a DNS name"),
    ((["routers", 0, "client", "tls"], {"dnsName": "x" * 64 + ".example"}), "client.tls.dnsName: must be a DNS name"),
    ((["routers", 0, "client", "tls"], {"dnsName": "*.example.com"}), "client.tls.dnsName: must be a DNS name"),
    ((["routers", 0, "servers", 0, "tls"], {"identities": {"a..b": {"privateKey": "k", "certs": ["c"]}}}),
     "tls.identities[a..b]: must be a DNS name"),
    ((["routers", 0, "servers", 0, "tls"], {"alpnProtocols": ["h\u00e9"]}), "alpnProtocols[0]: must be an ALPN protocol name"),
    ((["routers", 0, "servers", 0, "tls"], {"alpnProtocols": ["h" * 300]}), "alpnProtocols[0]: must be an ALPN protocol name"),
])
def test_values_that_serve_would_refuse_are_refused_by_check(edit, expected):
    errors = errors_of(with_changes(edit))
    assert any(expected in e for e in errors), errors


def test_yaml_infinities_are_refused():
    text = yaml.safe_dump(MINIMAL).replace("dstName: /svc/a", "dstName: /svc/a\n    connectionLifetimeSecs: .inf")
    assert "connectionLifetimeSecs: must be a number > 0 and <= 31536000, not inf" in errors_of(text)[0]


@pytest.mark.parametrize("text, expected", [
    ("[" * 20_000, "cfg.yaml:1:65: refused: nested more than 64 levels deep"),
    ('{"a":' + "[" * 100_000, "cfg.yaml: nested more than 64 levels deep"),
    ('{"a":' + "[" * 70 + "]" * 70 + "}", "cfg.yaml: nested more than 64 levels deep"),
    ("routers: " + "9" * 5000, "cfg.yaml:1:10: refused: a number longer than 100 characters"),
    ('{"routers": ' + "9" * 5000 + "}", "cfg.yaml: a number longer than 100 characters"),
])
def test_parser_limits_give_one_clear_line(text, expected):
    errors = errors_of(text)
    assert expected in errors[0], errors


def test_an_alias_bomb_is_refused_quickly():
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    lines.append("routers: [{label: *g}]")
    text = "\n".join(lines)
    assert len(text) < 500
    started = time.monotonic()
    errors = errors_of(text)
    assert time.monotonic() - started < 2
    assert errors == ["cfg.yaml:8:1: refused: expands to more than 1000000 values (YAML aliases)"]


@pytest.mark.parametrize("text, expected", [
    ("routers:\n  - label: a\n    label: b\n", "cfg.yaml:3:5: refused: duplicate key 'label'"),
    ('{"routers": [], "routers": []}', "cfg.yaml: duplicate key 'routers'"),
])
def test_duplicate_keys_are_refused(text, expected):
    assert errors_of(text) == [expected]


def test_a_yaml_merge_key_may_still_be_overridden():
    config = loads("admin: {<<: {port: 9000, graceSecs: 3}, port: 9001}\n" + yaml.safe_dump(MINIMAL))
    assert (config.admin.port, config.admin.grace_secs) == (9001, 3)


def test_an_alias_inside_its_own_anchor_is_refused():
    """Such an alias once slipped past the expansion limit: a 2.9 KB file, 4 million errors, 1.8 GB."""
    keys = "\n".join(f"  k{i}: 1" for i in range(100))
    text = (f"defs:\n- &s\n{keys}\n- &r\n  label: x\n  interpreter: {{kind: io.l5d.static, names: {{}}}}\n"
            f"  servers: &sv [*sv, {', '.join(['*s'] * 100)}]\nrouters: &rl [*rl, {', '.join(['*r'] * 100)}]\n")
    started = time.monotonic()
    errors = errors_of(text)
    assert time.monotonic() - started < 2
    assert errors == ["cfg.yaml:106:17: refused: an alias refers to a value that contains it"]


def test_at_most_a_hundred_errors_are_reported():
    names = {f"/svc/n{i}": ["not an address"] for i in range(300)}
    errors = errors_of(with_changes((["routers", 0, "interpreter", "names"], names)))
    assert len(errors) == 101 and errors[-1] == "... more errors; showing the first 100"


def test_errors_never_repeat_a_huge_value():
    errors = errors_of(with_changes((["routers", 0, "label"], [["x" * 1000] * 1000] * 10)))
    assert len(errors[0]) < 300, errors[0]


def test_anchors_for_shared_settings_still_work():
    text = yaml.safe_dump(MINIMAL) + "admin: &admin {port: 9000}\n"
    assert loads(text).admin.port == 9000


def test_oversized_files_are_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# padding\n" * 500_000)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.errors == [f"{path}: larger than 4 MiB"]


@pytest.mark.parametrize("first, second", [
    ("0.0.0.0", "::"),
    ("127.0.0.1", "::"),
    ("127.0.0.1", "::ffff:127.0.0.1"),
    ("::1", "::"),
    ("0.0.0.0", "10.1.2.3"),
])
def test_listener_clashes_that_linux_would_refuse(first, second):
    doc = with_changes((["routers", 0, "servers"], [{"port": 7000, "ip": first, "dstName": "/a"},
                                                    {"port": 7000, "ip": second, "dstName": "/b"}]))
    assert any("is already used by routers[0].servers[0]" in e for e in errors_of(doc))


@pytest.mark.parametrize("first, second", [("127.0.0.1", "127.0.0.2"), ("::1", "127.0.0.1"), ("0.0.0.0", "::1")])
def test_listeners_that_can_share_a_port(first, second):
    doc = with_changes((["routers", 0, "servers"], [{"port": 7000, "ip": first, "dstName": "/a"},
                                                    {"port": 7000, "ip": second, "dstName": "/b"}]))
    assert len(loads(yaml.safe_dump(doc)).routers[0].servers) == 2


def test_duplicate_labels_and_listeners():
    doc = with_changes()
    second = json.loads(json.dumps(doc["routers"][0]))
    second["servers"].append({"port": 7001, "ip": "0.0.0.0", "dstName": "/svc/b"})
    doc["routers"].append(second)
    doc["admin"] = {"port": 7001}
    errors = errors_of(doc)
    assert "routers[1].label: duplicate label 'r' (also routers[0])" in errors
    assert "routers[1].servers[0]: 127.0.0.1:7000 is already used by routers[0].servers[0]" in errors
    assert "routers[1].servers[1]: 0.0.0.0:7001 is already used by admin" in errors


def test_port_zero_never_collides():
    doc = with_changes((["routers", 0, "servers"], [{"port": 0, "dstName": "/a"}, {"port": 0, "dstName": "/b"}]),
                       (["admin"], {"port": 0}))
    assert len(loads(yaml.safe_dump(doc)).routers[0].servers) == 2


def test_all_errors_are_reported_together():
    doc = with_changes((["routers", 0, "servers", 0, "port"], -1), (["admin"], {"port": "x"}),
                       (["routers", 0, "interpreter", "names", "/svc/a"], ["nope"]))
    assert len(errors_of(doc)) == 3


def test_tls_files_resolve_relative_to_the_config(tmp_path):
    (tmp_path / "key.pem").write_text("k")
    (tmp_path / "cert.pem").write_text("c")
    doc = with_changes((["routers", 0, "servers", 0, "tls"], {
        "defaultIdentity": {"privateKey": "key.pem", "certs": ["cert.pem"]},
        "identities": {"API.example.com": {"privateKey": "key.pem", "certs": ["cert.pem"]}},
        "alpnProtocols": ["h2", "http/1.1"]}))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    tls = load(str(tmp_path / "cfg.yaml")).routers[0].servers[0].tls
    assert tls.default_identity.private_key == str(tmp_path / "key.pem")
    assert list(tls.identities) == ["api.example.com"]
    assert tls.alpn_protocols == ("h2", "http/1.1")


def test_static_client_configs_merge_in_order():
    doc = with_changes((["routers", 0, "client"], {
        "kind": "io.l5d.static",
        "connectTimeoutMs": 100,
        "configs": [
            {"prefix": "/svc", "connectTimeoutMs": 200, "minConnections": 1},
            {"prefix": "/svc/*/admin", "connectTimeoutMs": 300},
            {"prefix": "/other", "maxWaiters": 5},
        ]}))
    client = loads(yaml.safe_dump(doc)).routers[0].client
    assert client.settings_for("/elsewhere").connect_timeout_ms == 100
    s = client.settings_for("/svc/users")
    assert (s.connect_timeout_ms, s.min_connections, s.max_waiters) == (200, 1, 1_000_000)
    s = client.settings_for("/svc/users/admin/x")
    assert (s.connect_timeout_ms, s.min_connections) == (300, 1)


def test_syntax_errors_name_line_and_column():
    errors = errors_of("routers:\n  - label: [oops\n")
    assert len(errors) == 1 and errors[0].startswith("cfg.yaml:3:1: YAML syntax error")
    assert errors_of('{"routers": [}')[0].startswith("cfg.yaml:1:14: invalid JSON")
    assert errors_of("") == ["cfg.yaml: the configuration is empty"]
    assert errors_of("- 1\n- 2\n") == ["must be a mapping, not list"]


def test_yaml_tags_are_refused():
    errors = errors_of("!!python/object/apply:os.system ['true']\n")
    assert "YAML syntax error" in errors[0]


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "missing.yaml"))
    assert info.value.errors == [f"{tmp_path / 'missing.yaml'}: cannot read configuration: No such file or directory"]


@given(st.sampled_from(["127.0.0.1", "10.1.2.3", "::1", "fe80::1"]), st.integers(1, 65535))
def test_parse_address_round_trips(ip, port):
    assert parse_address(str(Address(ip, port))) == (ip, port)


@given(st.lists(st.sampled_from(["a", "b", "*"]), max_size=4), st.lists(st.sampled_from(["a", "b"]), max_size=5))
def test_prefix_matching_is_segment_wise(prefix, name):
    expected = len(name) >= len(prefix) and all(p in ("*", n) for p, n in zip(prefix, name))
    assert prefix_matches("/" + "/".join(prefix), "/" + "/".join(name)) == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["/svc/a", "127.0.0.1:80", "io.l5d.static", "io.l5d.fs", "io.l5d.namerd.http", "http://x"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["routers", "label", "interpreter", "kind", "servers", "port", "dstName", "names",
                         "client", "configs", "prefix", "tls", "admin", "ip", "weight", "addr", "x"]),
        children, max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_document_gives_a_config_or_a_config_error(document):
    try:
        loads(json.dumps(document) if isinstance(document, dict) else yaml.safe_dump(document))
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
