"""The parser kit the configuration schema is written in.

A parser is a function ``(value, path, ctx) -> parsed value or INVALID``: it
checks one YAML value, and for a bad one it reports what is wrong, with the
place it was found, to ``ctx`` and answers ``INVALID``.  ``spec`` attaches a
parser to a dataclass field; ``build`` reads a mapping into such a dataclass,
reporting unknown keys (with a suggestion) and missing required ones.  Nothing
here knows the schema; ``ltcp.config`` holds it.
"""

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import reprlib
import stat
import types
import urllib.parse
from dataclasses import field

from ..names import is_dns_name

INVALID = object()  # a parser's answer for a value it has already reported
PLACEHOLDERS = ("sni", "client")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

MAX_ERRORS = 100  # errors reported from one file
DAY_SECS = 86_400

_brief_repr = reprlib.Repr()
_brief_repr.maxlevel = 2
_brief_repr.maxlist = _brief_repr.maxtuple = _brief_repr.maxdict = 3
BRIEF_CHARS = 80


def brief(value):
    """A short repr for error messages: never the whole of a large (or alias-bombed) value."""
    return _shorten(_brief_repr.repr(value))


def _shorten(text):
    return text if len(text) <= BRIEF_CHARS else text[:BRIEF_CHARS - 3] + "..."


class Context:
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


def key_path(path, key):
    return f"{path}.{key}" if path else key


def camel(name):
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def spec(parse, default=dataclasses.MISSING, factory=dataclasses.MISSING):
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
            other = kind_of(resolved)
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
        return build(cls, value, path, ctx)
    return parse


def build(cls, node, path, ctx, skip=()):
    if not isinstance(node, dict):
        return ctx.error(path, f"must be a mapping, not {type(node).__name__}")
    fields = {camel(f.name): f for f in dataclasses.fields(cls) if "parse" in f.metadata}
    known = [*fields, *skip]
    before = ctx.count
    for key in node:
        if key not in known:
            ctx.error(key_path(path, _shorten(str(key))), "unknown key" + _suggest(str(key), known))
    values = {}
    for key, f in fields.items():
        value = node.get(key)
        if value is None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                ctx.error(key_path(path, key), "is required")
            continue
        parsed = f.metadata["parse"](value, key_path(path, key), ctx)
        if parsed is not INVALID:
            values[f.name] = parsed
    if ctx.count > before:
        return INVALID
    return cls(**values)


def _suggest(key, known):
    by_case = [k for k in known if k.lower() == key.lower()]
    close = by_case or (len(key) <= BRIEF_CHARS and difflib.get_close_matches(key, known, n=1, cutoff=0.6))
    return f" (did you mean {close[0]}?)" if close else f"; expected one of: {', '.join(known)}"


FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
              stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}


def kind_name(mode):
    return FILE_KINDS.get(stat.S_IFMT(mode), "of another kind")


def kind_of(path):
    """What kind of file ``path`` is, in words (None: nothing there)."""
    try:
        return kind_name(os.stat(path).st_mode)
    except OSError:
        return None


