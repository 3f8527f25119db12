"""Configuration: YAML or JSON text in, frozen dataclasses out.

The schema lives in the dataclasses below.  Each field's YAML key is its name
in camelCase (``dst_name`` is ``dstName``) and its ``parse`` metadata checks a
value and says what is wrong with it.  Every problem in a file is collected,
each prefixed with the place it was found, e.g.
``routers[0].servers[1].port: must be an integer 0..65535``, and raised
together as one ``ConfigError``.  The parsers themselves (and the way a
mapping is read into a dataclass) live in ``ltcp.config.parse``.
"""

import dataclasses
import ipaddress
import json
import os
import stat
import sys
import types
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from ..names import canonical_ip, parse_port
from .parse import (
    DAY_SECS, INVALID, Context, alpn_protocol, boolean, brief, build, camel, choice, directory, dns_name,
    dst_template, existing_file, http_url, identity_name, integer, ip_literal, key_path, kind_name, list_of,
    log_path, map_of, milliseconds, name_path, number, section, seconds, spec, text, worker_count,
)

__all__ = [
    "AccessLogConfig", "Address", "AdminConfig", "ClientAuthConfig", "ClientConfig", "ClientSettings",
    "ClientTlsConfig", "Config", "ConfigError", "DnsConfig", "FailFastConfig", "FsConfig", "HealthCheckConfig",
    "IdentityConfig", "LoadBalancerConfig", "NamerdConfig", "PrefixClientConfig", "RouterConfig", "ServerConfig",
    "ServerTlsConfig", "StaticConfig", "load", "loads", "missing_timeouts", "parse_address", "prefix_matches",
]

# Limits on the document itself, so that no file can make loading slow or huge.
MAX_CONFIG_BYTES = 4 << 20
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 1_000_000  # values after expanding YAML aliases
MAX_NUMBER_CHARS = 100

# Ranges shared by many keys; every number in a configuration is finite and bounded.
YEAR_SECS = 365 * DAY_SECS
MAX_WEIGHT = 1_000_000.0
MAX_COUNT = 10_000_000
MIN_PERIOD_SECS = 0.05  # discovery periods: shorter would be busy polling


class ConfigError(Exception):
    """One or more configuration problems, each naming its place."""

    def __init__(self, errors, source=None):
        super().__init__("\n".join(errors))
        self.errors = list(errors)
        self.source = source


# -- addresses ---------------------------------------------------------------

class Address(NamedTuple):
    """One weighted endpoint address (a tuple: discovery makes tens of thousands at a time)."""

    ip: str
    port: int
    weight: float = 1.0

    def __str__(self):
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def parse_address(text_value):
    """``"ip:port"`` or ``"[v6]:port"`` -> (ip, port); ValueError says why not."""
    if not isinstance(text_value, str):
        raise ValueError(f"must be a string 'ip:port', not {brief(text_value)}")
    host, sep, port_text = text_value.rpartition(":")
    if not sep:
        raise ValueError(f"must be 'ip:port', not {brief(text_value)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ValueError(f"brackets are for IPv6 addresses only, in {brief(text_value)}")
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, as '[{host}]:{port_text}', not {brief(text_value)}")
    ip = canonical_ip(host)
    port = parse_port(port_text)
    if port is None:
        raise ValueError(f"port must be 1..65535 in {brief(text_value)}")
    return ip, port


@dataclass(frozen=True)
class _AddressEntry:
    addr: str = spec(text)
    weight: float = spec(number(MAX_WEIGHT, above=0), 1.0)


def weighted_address(value, path, ctx):
    """``"ip:port"`` or ``{addr: "ip:port", weight: w}``."""
    weight = 1.0
    if isinstance(value, dict):
        entry = build(_AddressEntry, value, path, ctx)
        if entry is INVALID:
            return INVALID
        path, value, weight = key_path(path, "addr"), entry.addr, entry.weight
    try:
        ip, port = parse_address(value)
    except ValueError as exc:
        return ctx.error(path, str(exc))
    return Address(ip, port, float(weight))


# -- the schema --------------------------------------------------------------

@dataclass(frozen=True)
class AdminConfig:
    ip: str = spec(ip_literal, "127.0.0.1")
    port: int = spec(integer(0, 65535), 9989)
    metrics_interval_secs: float = spec(seconds(above=0), 10)
    grace_secs: float = spec(seconds(at_least=0), 10)


@dataclass(frozen=True)
class IdentityConfig:
    private_key: str = spec(existing_file)
    certs: Tuple[str, ...] = spec(list_of(existing_file, nonempty=True))


@dataclass(frozen=True)
class ClientAuthConfig:
    """Client certificates (mTLS): those chaining to ``trust_certs`` are accepted."""

    trust_certs: Tuple[str, ...] = spec(list_of(existing_file, nonempty=True))
    required: bool = spec(boolean, True)  # False: ask for one, accept clients without


@dataclass(frozen=True)
class ServerTlsConfig:
    default_identity: Optional[IdentityConfig] = spec(section(IdentityConfig), None)
    identities: Mapping[str, IdentityConfig] = spec(map_of(identity_name, section(IdentityConfig)), factory=dict)
    alpn_protocols: Tuple[str, ...] = spec(list_of(alpn_protocol), ())
    client_auth: Optional[ClientAuthConfig] = spec(section(ClientAuthConfig), None)


def server_tls(value, path, ctx):
    tls = build(ServerTlsConfig, value, path, ctx)
    if tls is not INVALID and tls.default_identity is None and not tls.identities:
        return ctx.error(path, "needs a defaultIdentity or at least one entry in identities")
    return tls


@dataclass(frozen=True)
class ServerConfig:
    port: int = spec(integer(0, 65535))
    dst_name: str = spec(dst_template)
    ip: str = spec(ip_literal, "127.0.0.1")
    default_dst_name: Optional[str] = spec(name_path, None)
    proxy_protocol: Optional[str] = spec(choice("accept"), None)
    connect_timeout_ms: int = spec(milliseconds(), 10_000)
    connection_lifetime_secs: Optional[float] = spec(seconds(above=0, hi=YEAR_SECS), None)
    idle_timeout_ms: Optional[int] = spec(milliseconds(YEAR_SECS * 1000), None)
    max_concurrency: int = spec(integer(1, MAX_COUNT), 100_000)
    tls: Optional[ServerTlsConfig] = spec(server_tls, None)

    @property
    def address(self):
        return str(Address(self.ip, self.port))


def server(value, path, ctx):
    built = build(ServerConfig, value, path, ctx)
    if built is not INVALID and "{client}" in built.dst_name and not (built.tls and built.tls.client_auth):
        return ctx.error(key_path(path, "dstName"), "uses {client}, which needs tls.clientAuth (a verified client "
                                                 "certificate to take the name from)")
    return built


@dataclass(frozen=True)
class NamerdConfig:
    kind: str = spec(text)
    base_url: str = spec(http_url)
    namespace: str = spec(text, "default")
    period_secs: float = spec(seconds(at_least=MIN_PERIOD_SECS), 20)
    watch: bool = spec(boolean, True)
    max_answer_bytes: int = spec(integer(1024, 64 << 20), 4 << 20)


@dataclass(frozen=True)
class StaticConfig:
    kind: str = spec(text)
    names: Mapping[str, Tuple[Address, ...]] = spec(map_of(name_path, list_of(weighted_address)))


@dataclass(frozen=True)
class FsConfig:
    kind: str = spec(text)
    root_dir: str = spec(directory)
    period_secs: float = spec(seconds(at_least=MIN_PERIOD_SECS), 1)


def nameserver(value, path, ctx):
    """``ip`` or ``ip:port`` (``[v6]:port``) -> (ip, port), port 53 by default."""
    if isinstance(value, str):
        try:
            return canonical_ip(value), 53
        except ValueError:
            pass
        try:
            return parse_address(value)
        except ValueError:
            pass
    return ctx.error(path, f"must be 'ip' or 'ip:port' of a DNS server, not {brief(value)}")


def domain_suffix(value, path, ctx):
    return dns_name(value.strip(".") if isinstance(value, str) else value, path, ctx)


@dataclass(frozen=True)
class DnsConfig:
    kind: str = spec(text)
    nameservers: Tuple[Tuple[str, int], ...] = spec(list_of(nameserver), ())  # () = /etc/resolv.conf's
    period_secs: float = spec(seconds(at_least=1), 30)
    domains: Tuple[str, ...] = spec(list_of(domain_suffix), ())  # () = any name


INTERPRETERS = {
    "io.l5d.namerd.http": NamerdConfig,
    "io.l5d.static": StaticConfig,
    "io.l5d.fs": FsConfig,
    "io.l5d.dns": DnsConfig,
}


def interpreter(value, path, ctx):
    if not isinstance(value, dict):
        return ctx.error(path, f"must be a mapping, not {type(value).__name__}")
    kind = value.get("kind")
    if kind not in INTERPRETERS:
        return ctx.error(key_path(path, "kind"), f"must be one of {', '.join(INTERPRETERS)}, not {brief(kind)}")
    return build(INTERPRETERS[kind], value, path, ctx)


@dataclass(frozen=True)
class FailFastConfig:
    max_consecutive_failures: int = spec(integer(1, MAX_COUNT), 5)
    failure_penalty_secs: float = spec(seconds(above=0), 60)


@dataclass(frozen=True)
class ClientTlsConfig:
    dns_name: str = spec(dns_name)
    trust_certs: Tuple[str, ...] = spec(list_of(existing_file), ())


MAX_CHECK_BYTES = 4096


def check_bytes(value, path, ctx):
    """Text sent or expected by a health check, as UTF-8 bytes (YAML escapes such as \\r\\n work)."""
    if isinstance(value, str) and value:
        data = value.encode("utf-8", "surrogateescape")
        if len(data) <= MAX_CHECK_BYTES:
            return data
    return ctx.error(path, f"must be non-empty text of at most {MAX_CHECK_BYTES} bytes, not {brief(value)}")


@dataclass(frozen=True)
class HealthCheckConfig:
    """Active checks: a connect (and optionally a request and the start of its answer) per endpoint."""

    interval_ms: int = spec(integer(10, DAY_SECS * 1000), 5000)
    timeout_ms: int = spec(integer(1, DAY_SECS * 1000), 1000)
    unhealthy_threshold: int = spec(integer(1, 1000), 2)
    healthy_threshold: int = spec(integer(1, 1000), 2)
    send: Optional[bytes] = spec(check_bytes, None)
    expect: Optional[bytes] = spec(check_bytes, None)


@dataclass(frozen=True)
class LoadBalancerConfig:
    """linkerd's ``client.loadBalancer``: how a destination's streams are spread (``ltcp.balancer.load``)."""

    kind: str = spec(choice("p2c", "ewma", "roundRobin"), "p2c")
    decay_time_ms: int = spec(integer(1, DAY_SECS * 1000), 10_000)


@dataclass(frozen=True)
class ClientSettings:
    """How a router connects to the endpoints of one destination."""

    connect_timeout_ms: int = spec(milliseconds(), 500)
    min_connections: int = spec(integer(0, 10_000), 0)
    max_waiters: int = spec(integer(0, MAX_COUNT), 1_000_000)
    fail_fast: FailFastConfig = spec(section(FailFastConfig), FailFastConfig())
    tls: Optional[ClientTlsConfig] = spec(section(ClientTlsConfig), None)
    proxy_protocol: Optional[str] = spec(choice("v1", "v2"), None)
    health_check: Optional[HealthCheckConfig] = spec(section(HealthCheckConfig), None)
    load_balancer: LoadBalancerConfig = spec(section(LoadBalancerConfig), LoadBalancerConfig())
    slow_start_secs: float = spec(seconds(at_least=0), 0)
    max_connections_per_endpoint: int = spec(integer(0, MAX_COUNT), 0)


def prefix_matches(prefix, name):
    """True if ``name`` lies under ``prefix`` segment by segment; ``*`` matches any segment."""
    want = [s for s in prefix.split("/") if s]
    have = [s for s in name.split("/") if s]
    return len(have) >= len(want) and all(w in ("*", h) for w, h in zip(want, have))


@dataclass(frozen=True)
class PrefixClientConfig:
    """Settings for the names under ``prefix``; only the keys it sets override."""

    prefix: str
    overrides: Mapping[str, Any]


def prefix_client(value, path, ctx):
    if not isinstance(value, dict):
        return ctx.error(path, f"must be a mapping, not {type(value).__name__}")
    if value.get("prefix") is None:
        return ctx.error(key_path(path, "prefix"), "is required for io.l5d.static client configs")
    prefix = name_path(value["prefix"], key_path(path, "prefix"), ctx)
    given = {k: v for k, v in value.items() if k != "prefix"}
    settings = build(ClientSettings, given, path, ctx)
    if prefix is INVALID or settings is INVALID:
        return INVALID
    overrides = {f.name: getattr(settings, f.name) for f in dataclasses.fields(ClientSettings)
                 if camel(f.name) in given and given[camel(f.name)] is not None}
    return PrefixClientConfig(prefix, types.MappingProxyType(overrides))


@dataclass(frozen=True)
class ClientConfig(ClientSettings):
    """``io.l5d.global``: one setting for every name.  ``io.l5d.static``: the
    top-level values, overridden in order by each config whose prefix matches."""

    kind: str = spec(choice("io.l5d.global", "io.l5d.static"), "io.l5d.global")
    configs: Tuple[PrefixClientConfig, ...] = spec(list_of(prefix_client), ())

    @property
    def proxy_protocols(self):
        """Every PROXY protocol version sent to some endpoint."""
        return {self.proxy_protocol, *(c.overrides.get("proxy_protocol") for c in self.configs)} - {None}

    @property
    def health_checks(self):
        """Every healthCheck setting and the prefix it applies under: equal when the checks are."""
        return (self.health_check, tuple((c.prefix, c.overrides["health_check"]) for c in self.configs
                                         if c.overrides.get("health_check")))

    def settings_for(self, name):
        base = ClientSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ClientSettings)})
        for config in self.configs:
            if prefix_matches(config.prefix, name):
                base = dataclasses.replace(base, **config.overrides)
        return base


def client(value, path, ctx):
    if not isinstance(value, dict):
        return ctx.error(path, f"must be a mapping, not {type(value).__name__}")
    kind = value.get("kind", "io.l5d.global")
    if kind == "io.l5d.global":
        if "prefix" in value:
            ctx.error(key_path(path, "prefix"),
                      "io.l5d.global applies to every name; use kind io.l5d.static for prefixes")
        if "configs" in value:
            ctx.error(key_path(path, "configs"), "only kind io.l5d.static has per-prefix configs")
        return build(ClientConfig, value, path, ctx, skip=("prefix", "configs"))
    if "prefix" in value:
        ctx.error(key_path(path, "prefix"), "belongs inside an entry of configs")
    return build(ClientConfig, value, path, ctx, skip=("prefix",))


@dataclass(frozen=True)
class RouterConfig:
    label: str = spec(text)
    interpreter: Any = spec(interpreter)
    servers: Tuple[ServerConfig, ...] = spec(list_of(server, nonempty=True))
    client: ClientConfig = spec(client, ClientConfig())


@dataclass(frozen=True)
class AccessLogConfig:
    path: str = spec(log_path)
    format: str = spec(choice("json", "text"), "json")


@dataclass(frozen=True)
class Config:
    routers: Tuple[RouterConfig, ...] = spec(list_of(section(RouterConfig), nonempty=True))
    admin: AdminConfig = spec(section(AdminConfig), AdminConfig())
    buffer_size_bytes: int = spec(integer(1024, 64 * 1024 * 1024), 16384)
    workers: int = spec(worker_count, 1)
    hand_over: bool = spec(boolean, True)  # reloads and upgrades move open plain-TCP streams to the new workers
    access_log: Optional[AccessLogConfig] = spec(section(AccessLogConfig), None)


# -- whole-document checks -----------------------------------------------------

def missing_timeouts(config):
    """A warning for each server that never ends a stream on its own.

    Without idleTimeoutMs or connectionLifetimeSecs, a stream whose peer
    stops reading holds its kernel buffers for ever (100 such streams held
    about 950 MB); valid, as in HAProxy, and warned about, as HAProxy does.
    """
    return [f"routers[{i}].servers[{j}] (router {router.label}, {server.address}): neither idleTimeoutMs nor "
            "connectionLifetimeSecs is set, so a stream whose peer stops reading is held for ever"
            for i, router in enumerate(config.routers) for j, server in enumerate(router.servers)
            if not server.idle_timeout_ms and not server.connection_lifetime_secs]


def _check_unique(config, ctx):
    seen_labels = {}
    for i, router in enumerate(config.routers):
        first = seen_labels.setdefault(router.label, i)
        if first != i:
            ctx.error(f"routers[{i}].label", f"duplicate label {router.label!r} (also routers[{first}])")
    listeners = []
    if config.admin.port:
        listeners.append(("admin", config.admin.ip, config.admin.port))
    for i, router in enumerate(config.routers):
        for j, server in enumerate(router.servers):
            place = f"routers[{i}].servers[{j}]"
            if server.port:
                for other, ip, port in listeners:
                    if port == server.port and _overlaps(ip, server.ip):
                        ctx.error(place, f"{server.address} is already used by {other}")
                        break
                listeners.append((place, server.ip, server.port))


def _overlaps(a, b):
    """Whether binds to one port on ``a`` and ``b`` collide, as Linux decides it.

    An IPv4-mapped IPv6 address is its IPv4 address, a wildcard takes every
    address of its family, and the IPv6 wildcard (dual-stack) takes IPv4 too.
    """
    ip_a, ip_b = _bind_address(a), _bind_address(b)
    if ip_a == ip_b:
        return True
    for wildcard, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if wildcard.is_unspecified and (wildcard.version == other.version or wildcard.version == 6):
            return True
    return False


def _bind_address(text_value):
    address = ipaddress.ip_address(text_value)
    return getattr(address, "ipv4_mapped", None) or address


# -- loading -------------------------------------------------------------------

def _json_number(text_value):
    if len(text_value) > MAX_NUMBER_CHARS:
        raise ValueError(f"a number longer than {MAX_NUMBER_CHARS} characters")
    return int(text_value) if text_value.lstrip("-").isdigit() else float(text_value)


def _json_object(pairs):
    document = dict(pairs)
    if len(document) != len(pairs):
        duplicate = next(key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i]))
        raise ValueError(f"duplicate key {brief(duplicate)}")
    return document


def _json_depth_ok(document):
    """Whether a decoded JSON document nests at most ``MAX_DEPTH`` levels (no recursion)."""
    level = [document]
    for _ in range(MAX_DEPTH):
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return True
    return not any(isinstance(node, (dict, list)) for node in level)


def loads(source_text, source="<config>", base_dir="."):
    """Parse configuration text (JSON if it starts with ``{``, else YAML)."""
    if len(source_text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES >> 20} MiB"], source)
    try:
        if source_text.lstrip().startswith("{"):
            document = json.loads(source_text, parse_int=_json_number, parse_float=_json_number,
                                  object_pairs_hook=_json_object)
            if not _json_depth_ok(document):
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        else:
            from . import yamlsafe  # here, not at the top: workers never parse YAML
            document = yamlsafe.parse(source_text, source, MAX_DEPTH, MAX_NODES, MAX_NUMBER_CHARS)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"], source) from None
    except RecursionError:
        raise ConfigError([f"{source}: nested more than {MAX_DEPTH} levels deep"], source) from None
    except ValueError as exc:  # YamlProblem, a JSON number too long, or YAML's own conversion refusing one
        raise ConfigError([getattr(exc, "message", None) or f"{source}: {exc}"], source) from None
    if document is None:
        raise ConfigError([f"{source}: the configuration is empty"], source)
    ctx = Context(base_dir)
    config = build(Config, document, "", ctx)
    if config is not INVALID:
        _check_unique(config, ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors, source)
    return config


def _read_regular(path):
    """Up to MAX_CONFIG_BYTES + 1 bytes of the regular file at ``path``: opening a FIFO or a device could block
    the reader for ever (or never end), so anything else is refused before a byte is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(0, f"not a regular file ({kind_name(mode)})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)


def load(path):
    """Read and parse a configuration file; ``-`` reads standard input."""
    source = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1) if path == "-" else _read_regular(path)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES >> 20} MiB"], source)
        source_text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read configuration: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start})"], source) from None
    base_dir = os.getcwd() if path == "-" else os.path.dirname(os.path.abspath(path))
    return loads(source_text, source, base_dir)
