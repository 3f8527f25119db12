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
import os
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

import yaml

__all__ = [
    "Address", "Admin", "Client", "ClientSettings", "ClientTls", "Config",
    "ConfigError", "FailFast", "FsInterpreter", "Identity", "NamerdInterpreter",
    "PrefixClient", "Router", "Server", "ServerTls", "StaticInterpreter",
    "load", "loads", "parse_address", "prefix_matches",
]

INVALID = object()  # a parser's answer for a value it has already reported
PLACEHOLDERS = ("sni",)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


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
        self.errors = []

    def error(self, path, message):
        self.errors.append(f"{path}: {message}" if path else message)
        return INVALID


def _join(path, key):
    return f"{path}.{key}" if path else key


def _camel(name):
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _spec(parse, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    return field(default=default, default_factory=factory, metadata={"parse": parse})


# -- value parsers: (value, path, ctx) -> parsed value or INVALID -------------

def integer(lo, hi=None):
    def parse(value, path, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            if value >= lo and (hi is None or value <= hi):
                return value
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        return ctx.error(path, f"must be an integer {bound}, not {value!r}")
    return parse


def number(above=None, at_least=None):
    def parse(value, path, ctx):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            if (above is None or value > above) and (at_least is None or value >= at_least):
                return value
        bound = f"> {above}" if above is not None else f">= {at_least}"
        return ctx.error(path, f"must be a number {bound}, not {value!r}")
    return parse


def boolean(value, path, ctx):
    if isinstance(value, bool):
        return value
    return ctx.error(path, f"must be true or false, not {value!r}")


def text(value, path, ctx):
    if isinstance(value, str) and value:
        return value
    return ctx.error(path, f"must be a non-empty string, not {value!r}")


def choice(*options):
    def parse(value, path, ctx):
        if value in options:
            return value
        return ctx.error(path, f"must be one of {', '.join(options)}, not {value!r}")
    return parse


def ip_literal(value, path, ctx):
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return ctx.error(path, f"must be an IP address literal, not {value!r}")


def http_url(value, path, ctx):
    if isinstance(value, str) and re.match(r"https?://[^/\s]+", value):
        return value.rstrip("/")
    return ctx.error(path, f"must be an http:// or https:// URL, not {value!r}")


def name_path(value, path, ctx):
    if isinstance(value, str) and value.startswith("/") and "{" not in value and "}" not in value:
        return value
    return ctx.error(path, f"must be a name path starting with '/', not {value!r}")


def dst_template(value, path, ctx):
    if not isinstance(value, str) or not value.startswith("/"):
        return ctx.error(path, f"must be a name path starting with '/', not {value!r}")
    unknown = [p for p in _PLACEHOLDER.findall(value) if p not in PLACEHOLDERS]
    if unknown:
        return ctx.error(path, f"unknown placeholder {{{unknown[0]}}}; only {{sni}} is supported")
    if _PLACEHOLDER.sub("", value).count("{") or _PLACEHOLDER.sub("", value).count("}"):
        return ctx.error(path, f"unbalanced braces in {value!r}")
    return value


def dns_name(value, path, ctx):
    if isinstance(value, str) and re.fullmatch(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", value):
        return value.lower()
    return ctx.error(path, f"must be a DNS name, not {value!r}")


def existing(kind):
    """A path to an existing file or directory, resolved against the config's directory."""
    is_kind = os.path.isfile if kind == "file" else os.path.isdir

    def parse(value, path, ctx):
        if not isinstance(value, str) or not value:
            return ctx.error(path, f"must be a {kind} path, not {value!r}")
        resolved = os.path.join(ctx.base_dir, os.path.expanduser(value))
        if not is_kind(resolved):
            return ctx.error(path, f"{kind} not found: {resolved}")
        if not os.access(resolved, os.R_OK):
            return ctx.error(path, f"{kind} not readable: {resolved}")
        return resolved
    return parse


existing_file = existing("file")
directory = existing("directory")


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
            place = f"{path}[{k}]"
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
    before = len(ctx.errors)
    for key in node:
        if key not in known:
            ctx.error(_join(path, str(key)), "unknown key" + _suggest(str(key), known))
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
    if len(ctx.errors) > before:
        return INVALID
    return cls(**values)


def _suggest(key, known):
    by_case = [k for k in known if k.lower() == key.lower()]
    close = by_case or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f"; expected one of: {', '.join(known)}"


# -- addresses ---------------------------------------------------------------

@dataclass(frozen=True)
class Address:
    """One weighted endpoint address."""

    ip: str
    port: int
    weight: float = 1.0

    def __str__(self):
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def parse_address(text_value):
    """``"ip:port"`` or ``"[v6]:port"`` -> (ip, port); ValueError says why not."""
    if not isinstance(text_value, str):
        raise ValueError(f"must be a string 'ip:port', not {text_value!r}")
    host, sep, port = text_value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"must be 'ip:port', not {text_value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address literal") from None
    if not 0 < int(port) <= 65535:
        raise ValueError(f"port must be 1..65535 in {text_value!r}")
    return ip, int(port)


@dataclass(frozen=True)
class _AddressEntry:
    addr: str = _spec(text)
    weight: float = _spec(number(above=0), 1.0)


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
class Admin:
    ip: str = _spec(ip_literal, "127.0.0.1")
    port: int = _spec(integer(0, 65535), 9989)
    metrics_interval_secs: float = _spec(number(above=0), 10)
    grace_secs: float = _spec(number(at_least=0), 10)


@dataclass(frozen=True)
class Identity:
    private_key: str = _spec(existing_file)
    certs: Tuple[str, ...] = _spec(list_of(existing_file, nonempty=True))


@dataclass(frozen=True)
class ServerTls:
    default_identity: Optional[Identity] = _spec(section(Identity), None)
    identities: Mapping[str, Identity] = _spec(map_of(dns_name, section(Identity)), factory=dict)
    alpn_protocols: Tuple[str, ...] = _spec(list_of(text), ())


def server_tls(value, path, ctx):
    tls = _build(ServerTls, value, path, ctx)
    if tls is not INVALID and tls.default_identity is None and not tls.identities:
        return ctx.error(path, "needs a defaultIdentity or at least one entry in identities")
    return tls


@dataclass(frozen=True)
class Server:
    port: int = _spec(integer(0, 65535))
    dst_name: str = _spec(dst_template)
    ip: str = _spec(ip_literal, "127.0.0.1")
    default_dst_name: Optional[str] = _spec(name_path, None)
    proxy_protocol: Optional[str] = _spec(choice("accept"), None)
    connect_timeout_ms: int = _spec(integer(1), 10_000)
    connection_lifetime_secs: Optional[float] = _spec(number(above=0), None)
    idle_timeout_ms: Optional[int] = _spec(integer(1), None)
    max_concurrency: int = _spec(integer(1), 100_000)
    tls: Optional[ServerTls] = _spec(server_tls, None)

    @property
    def address(self):
        return str(Address(self.ip, self.port))


@dataclass(frozen=True)
class NamerdInterpreter:
    kind: str = _spec(text)
    base_url: str = _spec(http_url)
    namespace: str = _spec(text, "default")
    period_secs: float = _spec(number(above=0), 20)
    watch: bool = _spec(boolean, True)


@dataclass(frozen=True)
class StaticInterpreter:
    kind: str = _spec(text)
    names: Mapping[str, Tuple[Address, ...]] = _spec(map_of(name_path, list_of(weighted_address)))


@dataclass(frozen=True)
class FsInterpreter:
    kind: str = _spec(text)
    root_dir: str = _spec(directory)
    period_secs: float = _spec(number(above=0), 1)


INTERPRETERS = {
    "io.l5d.namerd.http": NamerdInterpreter,
    "io.l5d.static": StaticInterpreter,
    "io.l5d.fs": FsInterpreter,
}


def interpreter(value, path, ctx):
    if not isinstance(value, dict):
        return ctx.error(path, f"must be a mapping, not {type(value).__name__}")
    kind = value.get("kind")
    if kind not in INTERPRETERS:
        return ctx.error(_join(path, "kind"), f"must be one of {', '.join(INTERPRETERS)}, not {kind!r}")
    return _build(INTERPRETERS[kind], value, path, ctx)


@dataclass(frozen=True)
class FailFast:
    max_consecutive_failures: int = _spec(integer(1), 5)
    failure_penalty_secs: float = _spec(number(above=0), 60)


@dataclass(frozen=True)
class ClientTls:
    dns_name: str = _spec(dns_name)
    trust_certs: Tuple[str, ...] = _spec(list_of(existing_file), ())


@dataclass(frozen=True)
class ClientSettings:
    """How a router connects to the endpoints of one destination."""

    connect_timeout_ms: int = _spec(integer(1), 500)
    min_connections: int = _spec(integer(0, 10_000), 0)
    max_waiters: int = _spec(integer(0), 1_000_000)
    fail_fast: FailFast = _spec(section(FailFast), FailFast())
    tls: Optional[ClientTls] = _spec(section(ClientTls), None)
    proxy_protocol: Optional[str] = _spec(choice("v1", "v2"), None)


def prefix_matches(prefix, name):
    """True if ``name`` lies under ``prefix`` segment by segment; ``*`` matches any segment."""
    want = [s for s in prefix.split("/") if s]
    have = [s for s in name.split("/") if s]
    return len(have) >= len(want) and all(w in ("*", h) for w, h in zip(want, have))


@dataclass(frozen=True)
class PrefixClient:
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
    return PrefixClient(prefix, types.MappingProxyType(overrides))


@dataclass(frozen=True)
class Client(ClientSettings):
    """``io.l5d.global``: one setting for every name.  ``io.l5d.static``: the
    top-level values, overridden in order by each config whose prefix matches."""

    kind: str = _spec(choice("io.l5d.global", "io.l5d.static"), "io.l5d.global")
    configs: Tuple[PrefixClient, ...] = _spec(list_of(prefix_client), ())

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
        return _build(Client, value, path, ctx, skip=("prefix", "configs"))
    if "prefix" in value:
        ctx.error(_join(path, "prefix"), "belongs inside an entry of configs")
    return _build(Client, value, path, ctx, skip=("prefix",))


@dataclass(frozen=True)
class Router:
    label: str = _spec(text)
    interpreter: Any = _spec(interpreter)
    servers: Tuple[Server, ...] = _spec(list_of(section(Server), nonempty=True))
    client: Client = _spec(client, Client())


@dataclass(frozen=True)
class Config:
    routers: Tuple[Router, ...] = _spec(list_of(section(Router), nonempty=True))
    admin: Admin = _spec(section(Admin), Admin())
    buffer_size_bytes: int = _spec(integer(1024, 64 * 1024 * 1024), 16384)


# -- whole-document checks -----------------------------------------------------

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
    """Two binds to one port collide if the addresses match or one is a wildcard of the same family."""
    if a == b:
        return True
    ip_a, ip_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return ip_a.version == ip_b.version and (ip_a.is_unspecified or ip_b.is_unspecified)


# -- loading -------------------------------------------------------------------

def loads(source_text, source="<config>", base_dir="."):
    """Parse configuration text (JSON if it starts with ``{``, else YAML)."""
    try:
        if source_text.lstrip().startswith("{"):
            document = json.loads(source_text)
        else:
            document = yaml.safe_load(source_text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{source}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_message(source, exc)], source) from None
    if document is None:
        raise ConfigError([f"{source}: the configuration is empty"], source)
    ctx = _Context(base_dir)
    config = _build(Config, document, "", ctx)
    if config is not INVALID:
        _check_unique(config, ctx)
    if ctx.errors:
        raise ConfigError(ctx.errors, source)
    return config


def load(path):
    """Read and parse a configuration file; ``-`` reads standard input."""
    source = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
        source_text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read configuration: {exc.strerror or exc}"], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text (byte {exc.start})"], source) from None
    base_dir = os.getcwd() if path == "-" else os.path.dirname(os.path.abspath(path))
    return loads(source_text, source, base_dir)


def _yaml_message(source, exc):
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}: YAML syntax error: {problem}"
