"""Configuration: YAML or JSON text in, frozen dataclasses out.

The schema lives in the dataclasses below.  Each field's YAML key is its name
in camelCase (``dst_name`` is ``dstName``) and its ``parse`` metadata checks a
value and says what is wrong with it.  Every problem in a file is collected,
each prefixed with the place it was found, e.g.
``routers[0].servers[1].port: must be an integer 0..65535``, and raised
together as one ``ConfigError``.
"""

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import reprlib
import stat
import sys
import types
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from ..names import canonical_ip, is_dns_name, parse_port

__all__ = [
    "AccessLogConfig", "Address", "AdminConfig", "ClientAuthConfig", "ClientConfig", "ClientSettings",
    "ClientTlsConfig", "Config", "ConfigError", "DnsConfig", "FailFastConfig", "FsConfig", "HealthCheckConfig",
    "IdentityConfig", "NamerdConfig", "PrefixClientConfig", "RouterConfig", "ServerConfig", "ServerTlsConfig",
    "StaticConfig", "load", "loads", "missing_timeouts", "parse_address", "prefix_matches",
]

INVALID = object()  # a parser's answer for a value it has already reported
PLACEHOLDERS = ("sni", "client")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

# Limits on the document itself, so that no file can make loading slow or huge.
MAX_CONFIG_BYTES = 4 << 20
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 1_000_000  # values after expanding YAML aliases
MAX_NUMBER_CHARS = 100
MAX_ERRORS = 100  # errors reported from one file

# Ranges shared by many keys; every number in a configuration is finite and bounded.
DAY_SECS = 86_400
YEAR_SECS = 365 * DAY_SECS
MAX_WEIGHT = 1_000_000.0
MAX_COUNT = 10_000_000
MIN_PERIOD_SECS = 0.05  # discovery periods: shorter would be busy polling

_brief_repr = reprlib.Repr()
_brief_repr.maxlevel = 2
_brief_repr.maxlist = _brief_repr.maxtuple = _brief_repr.maxdict = 3
BRIEF_CHARS = 80


def brief(value):
    """A short repr for error messages: never the whole of a large (or alias-bombed) value."""
    return _shorten(_brief_repr.repr(value))


def _shorten(text):
    return text if len(text) <= BRIEF_CHARS else text[:BRIEF_CHARS - 3] + "..."


class ConfigError(Exception):
    """One or more configuration problems, each naming its place."""

    def __init__(self, errors, source=None):
        super().__init__("\n".join(errors))
        self.errors = list(errors)
        self.source = source


class _Context:
    """What parsers share while reading one document: its errors and its directory."""

    def __init__(self, base_dir):
        self.base_dir = base_dir
        self.errors = []  # what is reported: the first MAX_ERRORS
        self.count = 0  # every problem found, reported or not

    def error(self, path, message):
        self.count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"{path}: {message}" if path else message)
        elif len(self.errors) == MAX_ERRORS:
            self.errors.append(f"... more errors; showing the first {MAX_ERRORS}")
        return INVALID


def _join(path, key):
    return f"{path}.{key}" if path else key


def _camel(name):
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _spec(parse, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    return field(default=default, default_factory=factory, metadata={"parse": parse})


# -- value parsers: (value, path, ctx) -> parsed value or INVALID -------------

def integer(lo, hi):
    def parse(value, path, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        return ctx.error(path, f"must be an integer {lo}..{hi}, not {brief(value)}")
    return parse


def number(hi, above=None, at_least=None):
    """A finite number up to ``hi``, and either ``> above`` or ``>= at_least``."""
    def parse(value, path, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if (above is None or value > above) and (at_least is None or value >= at_least) and value <= hi:
                return value
        low = f"> {_plain(above)}" if above is not None else f">= {_plain(at_least)}"
        return ctx.error(path, f"must be a number {low} and <= {_plain(hi)}, not {brief(value)}")
    return parse


def _plain(bound):
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def seconds(at_least=None, above=None, hi=DAY_SECS):
    return number(hi, above=above, at_least=at_least)


def milliseconds(hi=DAY_SECS * 1000):
    return integer(1, hi)


MAX_WORKERS = 1024


def worker_count(value, path, ctx):
    """``workers``: a count, or ``auto`` for one per CPU this process may run on."""
    if value == "auto":
        return len(os.sched_getaffinity(0))
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    return ctx.error(path, f"must be an integer 1..{MAX_WORKERS} or auto, not {brief(value)}")


def boolean(value, path, ctx):
    if isinstance(value, bool):
        return value
    return ctx.error(path, f"must be true or false, not {brief(value)}")


def text(value, path, ctx):
    if isinstance(value, str) and value:
        return value
    return ctx.error(path, f"must be a non-empty string, not {brief(value)}")


def choice(*options):
    def parse(value, path, ctx):
        if value in options:
            return value
        return ctx.error(path, f"must be one of {', '.join(options)}, not {brief(value)}")
    return parse


def ip_literal(value, path, ctx):
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return ctx.error(path, f"must be an IP address literal, not {brief(value)}")


def http_url(value, path, ctx):
    """An http:// or https:// URL with a host, a valid port if any, and no query or credentials."""
    problem = "must be an http:// or https:// URL"
    if isinstance(value, str) and not any(c.isspace() for c in value):
        try:
            url = urllib.parse.urlsplit(value)
            port = url.port  # ValueError for a port that is not one
        except ValueError as exc:
            problem = f"is not a usable URL ({exc})"
        else:
            if (url.scheme in ("http", "https") and url.hostname and port != 0
                    and not (url.query or url.fragment or url.username)):
                return value.rstrip("/")
    return ctx.error(path, f"{problem}, not {brief(value)}")


def name_path(value, path, ctx):
    if isinstance(value, str) and value.startswith("/") and "{" not in value and "}" not in value:
        return value
    return ctx.error(path, f"must be a name path starting with '/', not {brief(value)}")


def dst_template(value, path, ctx):
    if not isinstance(value, str) or not value.startswith("/"):
        return ctx.error(path, f"must be a name path starting with '/', not {brief(value)}")
    unknown = [p for p in _PLACEHOLDER.findall(value) if p not in PLACEHOLDERS]
    if unknown:
        return ctx.error(path, f"unknown placeholder {{{unknown[0]}}}; only {{sni}} and {{client}} are supported")
    if _PLACEHOLDER.sub("", value).count("{") or _PLACEHOLDER.sub("", value).count("}"):
        return ctx.error(path, f"unbalanced braces in {brief(value)}")
    return value


def dns_name(value, path, ctx):
    if isinstance(value, str) and value.isascii() and is_dns_name(value.lower()):
        return value.lower()
    return ctx.error(path, f"must be a DNS name, not {brief(value)}")


def identity_name(value, path, ctx):
    """A DNS name, or ``*.`` and a DNS name (one label of any name)."""
    if isinstance(value, str) and value.startswith("*."):
        parsed = dns_name(value[2:], path, ctx)
        return parsed if parsed is INVALID else "*." + parsed
    return dns_name(value, path, ctx)


def alpn_protocol(value, path, ctx):
    if isinstance(value, str) and 0 < len(value) <= 255 and value.isascii() and value.isprintable():
        return value
    return ctx.error(path, f"must be an ALPN protocol name (1..255 printable ASCII characters), not {brief(value)}")


def existing(kind):
    """A path to an existing file or directory, resolved against the config's directory."""
    is_kind = os.path.isfile if kind == "file" else os.path.isdir

    def parse(value, path, ctx):
        if not isinstance(value, str) or not value:
            return ctx.error(path, f"must be a {kind} path, not {brief(value)}")
        resolved = os.path.join(ctx.base_dir, os.path.expanduser(value))
        if not is_kind(resolved):
            other = _kind_of(resolved)
            if other is None or kind != "file":
                return ctx.error(path, f"{kind} not found: {resolved}")
            return ctx.error(path, f"not a regular file ({other}): {resolved}")
        if not os.access(resolved, os.R_OK):
            return ctx.error(path, f"{kind} not readable: {resolved}")
        return resolved
    return parse


existing_file = existing("file")
directory = existing("directory")


def log_path(value, path, ctx):
    """``-`` (standard error), or a file to append to in an existing, writable directory."""
    if value == "-":
        return value
    if not isinstance(value, str) or not value or value.endswith("/"):
        return ctx.error(path, f"must be a file path or '-', not {brief(value)}")
    resolved = os.path.join(ctx.base_dir, os.path.expanduser(value))
    parent = os.path.dirname(resolved) or "."
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return ctx.error(path, f"directory not found or not writable: {parent}")
    if os.path.isdir(resolved):
        return ctx.error(path, f"is a directory: {resolved}")
    return resolved


def list_of(item, nonempty=False):
    def parse(value, path, ctx):
        if not isinstance(value, list):
            return ctx.error(path, f"must be a list, not {type(value).__name__}")
        if nonempty and not value:
            return ctx.error(path, "must not be empty")
        items = [item(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        return INVALID if INVALID in items else tuple(items)
    return parse


def map_of(key, item):
    def parse(value, path, ctx):
        if not isinstance(value, dict):
            return ctx.error(path, f"must be a mapping, not {type(value).__name__}")
        result = {}
        for k, v in value.items():
            place = f"{path}[{_shorten(str(k))}]"
            parsed_key = key(k, place, ctx)
            parsed = item(v, place, ctx)
            if parsed_key is not INVALID and parsed is not INVALID:
                result[parsed_key] = parsed
        return types.MappingProxyType(result)
    return parse


def section(cls):
    """Parse a mapping into dataclass ``cls`` using its fields' metadata."""
    def parse(value, path, ctx):
        return _build(cls, value, path, ctx)
    return parse


def _build(cls, node, path, ctx, skip=()):
    if not isinstance(node, dict):
        return ctx.error(path, f"must be a mapping, not {type(node).__name__}")
    fields = {_camel(f.name): f for f in dataclasses.fields(cls) if "parse" in f.metadata}
    known = [*fields, *skip]
    before = ctx.count
    for key in node:
        if key not in known:
            ctx.error(_join(path, _shorten(str(key))), "unknown key" + _suggest(str(key), known))
    values = {}
    for key, f in fields.items():
        value = node.get(key)
        if value is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                ctx.error(_join(path, key), "is required")
            continue
        parsed = f.metadata["parse"](value, _join(path, key), ctx)
        if parsed is not INVALID:
            values[f.name] = parsed
    if ctx.count > before:
        return INVALID
    return cls(**values)


def _suggest(key, known):
    by_case = [k for k in known if k.lower() == key.lower()]
    close = by_case or (len(key) <= BRIEF_CHARS and difflib.get_close_matches(key, known, n=1, cutoff=0.6))
    return f" (did you mean {close[0]}?)" if close else f"; expected one of: {', '.join(known)}"


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
    addr: str = _spec(text)
    weight: float = _spec(number(MAX_WEIGHT, above=0), 1.0)


def weighted_address(value, path, ctx):
    """``"ip:port"`` or ``{addr: "ip:port", weight: w}``."""
    weight = 1.0
    if isinstance(value, dict):
        entry = _build(_AddressEntry, value, path, ctx)
        if entry is INVALID:
            return INVALID
        path, value, weight = _join(path, "addr"), entry.addr, entry.weight
    try:
        ip, port = parse_address(value)
    except ValueError as exc:
        return ctx.error(path, str(exc))
    return Address(ip, port, float(weight))


# -- the schema --------------------------------------------------------------

@dataclass(frozen=True)
class AdminConfig:
    ip: str = _spec(ip_literal, "127.0.0.1")
    port: int = _spec(integer(0, 65535), 9989)
    metrics_interval_secs: float = _spec(seconds(above=0), 10)
    grace_secs: float = _spec(seconds(at_least=0), 10)


@dataclass(frozen=True)
class IdentityConfig:
    private_key: str = _spec(existing_file)
    certs: Tuple[str, ...] = _spec(list_of(existing_file, nonempty=True))


@dataclass(frozen=True)
class ClientAuthConfig:
    """Client certificates (mTLS): those chaining to ``trust_certs`` are accepted."""

    trust_certs: Tuple[str, ...] = _spec(list_of(existing_file, nonempty=True))
    required: bool = _spec(boolean, True)  # False: ask for one, accept clients without


@dataclass(frozen=True)
class ServerTlsConfig:
    default_identity: Optional[IdentityConfig] = _spec(section(IdentityConfig), None)
    identities: Mapping[str, IdentityConfig] = _spec(map_of(identity_name, section(IdentityConfig)), factory=dict)
    alpn_protocols: Tuple[str, ...] = _spec(list_of(alpn_protocol), ())
    client_auth: Optional[ClientAuthConfig] = _spec(section(ClientAuthConfig), None)


def server_tls(value, path, ctx):
    tls = _build(ServerTlsConfig, value, path, ctx)
    if tls is not INVALID and tls.default_identity is None and not tls.identities:
        return ctx.error(path, "needs a defaultIdentity or at least one entry in identities")
    return tls


@dataclass(frozen=True)
class ServerConfig:
    port: int = _spec(integer(0, 65535))
    dst_name: str = _spec(dst_template)
    ip: str = _spec(ip_literal, "127.0.0.1")
    default_dst_name: Optional[str] = _spec(name_path, None)
    proxy_protocol: Optional[str] = _spec(choice("accept"), None)
    connect_timeout_ms: int = _spec(milliseconds(), 10_000)
    connection_lifetime_secs: Optional[float] = _spec(seconds(above=0, hi=YEAR_SECS), None)
    idle_timeout_ms: Optional[int] = _spec(milliseconds(YEAR_SECS * 1000), None)
    max_concurrency: int = _spec(integer(1, MAX_COUNT), 100_000)
    tls: Optional[ServerTlsConfig] = _spec(server_tls, None)

    @property
    def address(self):
        return str(Address(self.ip, self.port))


def server(value, path, ctx):
    built = _build(ServerConfig, value, path, ctx)
    if built is not INVALID and "{client}" in built.dst_name and not (built.tls and built.tls.client_auth):
        return ctx.error(_join(path, "dstName"), "uses {client}, which needs tls.clientAuth (a verified client "
                                                 "certificate to take the name from)")
    return built


@dataclass(frozen=True)
class NamerdConfig:
    kind: str = _spec(text)
    base_url: str = _spec(http_url)
    namespace: str = _spec(text, "default")
    period_secs: float = _spec(seconds(at_least=MIN_PERIOD_SECS), 20)
    watch: bool = _spec(boolean, True)
    max_answer_bytes: int = _spec(integer(1024, 64 << 20), 4 << 20)


@dataclass(frozen=True)
class StaticConfig:
    kind: str = _spec(text)
    names: Mapping[str, Tuple[Address, ...]] = _spec(map_of(name_path, list_of(weighted_address)))


@dataclass(frozen=True)
class FsConfig:
    kind: str = _spec(text)
    root_dir: str = _spec(directory)
    period_secs: float = _spec(seconds(at_least=MIN_PERIOD_SECS), 1)


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
    kind: str = _spec(text)
    nameservers: Tuple[Tuple[str, int], ...] = _spec(list_of(nameserver), ())  # () = /etc/resolv.conf's
    period_secs: float = _spec(seconds(at_least=1), 30)
    domains: Tuple[str, ...] = _spec(list_of(domain_suffix), ())  # () = any name


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
        return ctx.error(_join(path, "kind"), f"must be one of {', '.join(INTERPRETERS)}, not {brief(kind)}")
    return _build(INTERPRETERS[kind], value, path, ctx)


@dataclass(frozen=True)
class FailFastConfig:
    max_consecutive_failures: int = _spec(integer(1, MAX_COUNT), 5)
    failure_penalty_secs: float = _spec(seconds(above=0), 60)


@dataclass(frozen=True)
class ClientTlsConfig:
    dns_name: str = _spec(dns_name)
    trust_certs: Tuple[str, ...] = _spec(list_of(existing_file), ())


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

    interval_ms: int = _spec(integer(10, DAY_SECS * 1000), 5000)
    timeout_ms: int = _spec(integer(1, DAY_SECS * 1000), 1000)
    unhealthy_threshold: int = _spec(integer(1, 1000), 2)
    healthy_threshold: int = _spec(integer(1, 1000), 2)
    send: Optional[bytes] = _spec(check_bytes, None)
    expect: Optional[bytes] = _spec(check_bytes, None)


@dataclass(frozen=True)
class ClientSettings:
    """How a router connects to the endpoints of one destination."""

    connect_timeout_ms: int = _spec(milliseconds(), 500)
    min_connections: int = _spec(integer(0, 10_000), 0)
    max_waiters: int = _spec(integer(0, MAX_COUNT), 1_000_000)
    fail_fast: FailFastConfig = _spec(section(FailFastConfig), FailFastConfig())
    tls: Optional[ClientTlsConfig] = _spec(section(ClientTlsConfig), None)
    proxy_protocol: Optional[str] = _spec(choice("v1", "v2"), None)
    health_check: Optional[HealthCheckConfig] = _spec(section(HealthCheckConfig), None)


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
        return ctx.error(_join(path, "prefix"), "is required for io.l5d.static client configs")
    prefix = name_path(value["prefix"], _join(path, "prefix"), ctx)
    given = {k: v for k, v in value.items() if k != "prefix"}
    settings = _build(ClientSettings, given, path, ctx)
    if prefix is INVALID or settings is INVALID:
        return INVALID
    overrides = {f.name: getattr(settings, f.name) for f in dataclasses.fields(ClientSettings)
                 if _camel(f.name) in given and given[_camel(f.name)] is not None}
    return PrefixClientConfig(prefix, types.MappingProxyType(overrides))


@dataclass(frozen=True)
class ClientConfig(ClientSettings):
    """``io.l5d.global``: one setting for every name.  ``io.l5d.static``: the
    top-level values, overridden in order by each config whose prefix matches."""

    kind: str = _spec(choice("io.l5d.global", "io.l5d.static"), "io.l5d.global")
    configs: Tuple[PrefixClientConfig, ...] = _spec(list_of(prefix_client), ())

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
            ctx.error(_join(path, "prefix"), "io.l5d.global applies to every name; use kind io.l5d.static for prefixes")
        if "configs" in value:
            ctx.error(_join(path, "configs"), "only kind io.l5d.static has per-prefix configs")
        return _build(ClientConfig, value, path, ctx, skip=("prefix", "configs"))
    if "prefix" in value:
        ctx.error(_join(path, "prefix"), "belongs inside an entry of configs")
    return _build(ClientConfig, value, path, ctx, skip=("prefix",))


@dataclass(frozen=True)
class RouterConfig:
    label: str = _spec(text)
    interpreter: Any = _spec(interpreter)
    servers: Tuple[ServerConfig, ...] = _spec(list_of(server, nonempty=True))
    client: ClientConfig = _spec(client, ClientConfig())


@dataclass(frozen=True)
class AccessLogConfig:
    path: str = _spec(log_path)
    format: str = _spec(choice("json", "text"), "json")


@dataclass(frozen=True)
class Config:
    routers: Tuple[RouterConfig, ...] = _spec(list_of(section(RouterConfig), nonempty=True))
    admin: AdminConfig = _spec(section(AdminConfig), AdminConfig())
    buffer_size_bytes: int = _spec(integer(1024, 64 * 1024 * 1024), 16384)
    workers: int = _spec(worker_count, 1)
    access_log: Optional[AccessLogConfig] = _spec(section(AccessLogConfig), None)


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
    ctx = _Context(base_dir)
    config = _build(Config, document, "", ctx)
    if config is not INVALID:
        _check_unique(config, ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors, source)
    return config


FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def _kind_name(mode):
    return FILE_KINDS.get(stat.S_IFMT(mode), "of another kind")


def _kind_of(path):
    """What kind of file ``path`` is, in words (None: nothing there)."""
    try:
        return _kind_name(os.stat(path).st_mode)
    except OSError:
        return None


def _read_regular(path):
    """Up to MAX_CONFIG_BYTES + 1 bytes of the regular file at ``path``: opening a FIFO or a device could block
    the reader for ever (or never end), so anything else is refused before a byte is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(0, f"not a regular file ({_kind_name(mode)})")
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
