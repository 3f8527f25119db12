"""TLS: contexts for terminating and originating, and a ClientHello reader for SNI routing.

``parse_client_hello`` is a pure function over the bytes a client has sent so
far.  It reassembles the first handshake message across TLS records (and so
across TCP segments), stops at ``MAX_HELLO_BYTES``, and reports one of:

* ``NEED_MORE``  — a valid prefix; wait for more bytes
* ``NOT_TLS``    — the first byte is not a TLS handshake record
* ``MALFORMED``  — looks like TLS but breaks the format (or is too large, or
  split into more than ``MAX_HELLO_RECORDS`` records)
* ``HELLO``      — a complete ClientHello; ``server_name`` is its SNI or None
"""

import base64
import contextlib
import datetime
import errno
import ipaddress
import os
import ssl
import types
import weakref
from typing import NamedTuple, Optional

from ..names import is_dns_name

__all__ = ["ClientHello", "client_identity", "describe_error", "parse_client_hello",
           "normalize_server_name", "routing_identity", "routing_name", "server_context", "client_context",
           "client_contexts", "attempt", "expiry_warnings", "material_problems", "read_material", "TlsMaterial",
           "TlsMaterialError", "NEED_MORE", "NOT_TLS", "MALFORMED", "HELLO"]

NEED_MORE, NOT_TLS, MALFORMED, HELLO = "need_more", "not_tls", "malformed", "hello"
MAX_HELLO_BYTES = 16 * 1024  # the whole ClientHello handshake message, across records
MAX_HELLO_RECORDS = 16  # real hellos take one; many tiny records only cost the parser
MAX_RECORD = 16 * 1024
HELLO_WINDOW = MAX_HELLO_BYTES + 4 + 5 * MAX_HELLO_RECORDS  # the most bytes a hello can take on the wire
_HANDSHAKE, _CLIENT_HELLO, _SERVER_NAME, _HOST_NAME = 0x16, 0x01, 0x0000, 0x00


class ClientHello(NamedTuple):
    status: str
    server_name: Optional[str] = None
    reason: str = ""


def parse_client_hello(data, limit=MAX_HELLO_BYTES):
    """Read the SNI out of the start of a TLS stream (see the module docstring)."""
    if not data:
        return ClientHello(NEED_MORE)
    if data[0] != _HANDSHAKE:
        return ClientHello(NOT_TLS, reason="not a TLS handshake record")
    message = bytearray()
    offset = 0
    for _ in range(MAX_HELLO_RECORDS):
        if len(data) - offset < 5:
            return ClientHello(NEED_MORE)
        kind, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3:offset + 5], "big")
        if kind != _HANDSHAKE or major != 3:
            return ClientHello(MALFORMED, reason="expected a TLS handshake record")
        if not 0 < length <= MAX_RECORD:
            return ClientHello(MALFORMED, reason=f"record length {length}")
        if len(data) - offset - 5 < length:
            return ClientHello(NEED_MORE)
        message += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return ClientHello(MALFORMED, reason="the first handshake message is not a ClientHello")
            size = int.from_bytes(message[1:4], "big")
            if size > limit:
                return ClientHello(MALFORMED, reason=f"ClientHello of {size} bytes is too large")
            if len(message) >= 4 + size:
                return _read_hello(memoryview(message)[4:4 + size])
    return ClientHello(MALFORMED, reason=f"ClientHello split into more than {MAX_HELLO_RECORDS} records")


class _Reader:
    """Bounds-checked big-endian reads over a memoryview."""

    __slots__ = ("data", "at")

    def __init__(self, data):
        self.data = data
        self.at = 0

    def take(self, n):
        if self.at + n > len(self.data):
            raise ValueError("truncated")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def number(self, n):
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes):
        return self.take(self.number(length_bytes))

    @property
    def left(self):
        return len(self.data) - self.at


def _read_hello(body):
    try:
        hello = _Reader(body)
        hello.take(2 + 32)  # legacy_version, random
        if len(hello.vector(1)) > 32:
            raise ValueError("session id longer than 32 bytes")
        suites = hello.vector(2)
        if not suites or len(suites) % 2:
            raise ValueError("bad cipher suite list")
        if not hello.vector(1):
            raise ValueError("no compression methods")
        if not hello.left:
            return ClientHello(HELLO)  # an old hello without extensions
        extensions = _Reader(hello.vector(2))
        if hello.left:
            raise ValueError("bytes after the extensions")
        name = None
        while extensions.left:
            kind = extensions.number(2)
            content = extensions.vector(2)
            if kind == _SERVER_NAME:
                name = _server_name(_Reader(content))
        return ClientHello(HELLO, name)
    except ValueError as exc:
        return ClientHello(MALFORMED, reason=str(exc))


def _server_name(extension):
    names = _Reader(extension.vector(2))
    if extension.left:
        raise ValueError("bytes after the server name list")
    while names.left:
        kind = names.number(1)
        value = names.vector(2)
        if kind == _HOST_NAME:
            try:
                return bytes(value).decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("server name is not ASCII") from None
    return None


def routing_name(server_name):
    """``(name, None)`` for a server name usable in a destination, else ``(None, cause)``.

    An IP literal is no name at all (RFC 6066 forbids it, yet some clients
    send one): ``no_sni``, like a hello without one.  Anything else that is
    not a valid DNS name is ``malformed``.
    """
    if not server_name:
        return None, "no_sni"
    name = normalize_server_name(server_name)
    candidate = name if name is not None else server_name.strip("[]")
    try:  # (after normalising: "169.254.169.254." must not pass as a name)
        ipaddress.ip_address(candidate)
        return None, "no_sni"
    except ValueError:
        pass
    return (name, None) if name is not None else (None, "malformed")


def client_identity(ssl_socket):
    """(identity, certified): a verified client certificate's identity, and whether there was one.

    The identity is the first DNS or URI subject-alternative name; the
    subject's CN only when the certificate has no alternative names at all
    (as RFC 6125 has it: a certificate with, say, only an email name has no
    identity here, whatever its CN says); else None.  Only a certificate the
    handshake verified is read (``getpeercert`` gives nothing else), so the
    identity is as good as ``clientAuth.trustCerts``.
    """
    cert = ssl_socket.getpeercert()
    if not cert:
        return None, False
    names = cert.get("subjectAltName", ())
    for kind, value in names:
        if kind in ("DNS", "URI"):
            return value, True
    if names:
        return None, True
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value, True
    return None, True


MAX_IDENTITY = 253


def routing_identity(identity):
    """``(segment, None)`` for a client identity usable in a destination name, else ``(None, cause)``.

    It becomes one path segment: no ``/``, not ``.`` or ``..``, no braces,
    whitespace or control characters, at most ``MAX_IDENTITY`` characters.
    A certificate without one is ``no_client``; one that breaks these rules,
    ``bad_client`` (a URI SAN such as ``spiffe://a/b`` does: route by its CN or a
    DNS SAN instead).
    """
    if not identity:
        return None, "no_client"
    if (len(identity) > MAX_IDENTITY or identity in (".", "..") or
            any(c in "/{}" or c.isspace() or not c.isprintable() for c in identity)):
        return None, "bad_client"
    return identity, None


def normalize_server_name(name):
    """A lowercase DNS name safe to put in a destination path, or None."""
    if not name:
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    return name if is_dns_name(name) else None


def describe_error(exc):
    """A short name for what failed: a TLS reason (``CERTIFICATE_VERIFY_FAILED``) or an errno name."""
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return errno.errorcode.get(exc.errno or 0) or str(exc)


# -- contexts ------------------------------------------------------------------------

class TlsMaterialError(ValueError):
    """A key or certificate file ltcp cannot use; the message names the file and why."""


MAX_PEM_BYTES = 1 << 20


class TlsMaterial:
    """The bytes of every TLS file a configuration names, read once by ``read_material``.

    ``--check``, the supervisor's start and every reload check one of these,
    and the generation's workers (restarted ones too) build their contexts
    from it, never from the disk: every worker serves what was checked.  A
    file that could not be read holds the reason instead, raised on use.
    """

    __slots__ = ("_files",)

    def __init__(self, files):
        self._files = types.MappingProxyType(dict(files))  # path -> bytes, or why they could not be read

    @property
    def paths(self):
        return tuple(self._files)

    def pem(self, path):
        """The bytes read from ``path``; TlsMaterialError if there are none."""
        data = self._files.get(path, f"{path}: not read with the configuration")
        if isinstance(data, str):
            raise TlsMaterialError(data)
        return data

    def __reduce__(self):  # (it crosses to the workers; a mapping proxy does not pickle)
        return TlsMaterial, (dict(self._files),)

    def __repr__(self):  # (never the bytes: they hold private keys)
        return f"<TlsMaterial of {len(self._files)} files>"


def read_material(config):
    """Read every key, certificate and CA file ``config`` names, each once."""
    return TlsMaterial({path: _read(path) for path in _files(config)})


def _read(path):
    """A file's bytes, or one line saying why they cannot be had."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    if len(data) > MAX_PEM_BYTES:
        return f"{path}: larger than {MAX_PEM_BYTES >> 20} MiB; not a PEM file"
    return data


def _files(config):
    """Every TLS file ``config`` names, each once, in order."""
    paths = []
    for router in config.routers:
        for server in router.servers:
            if server.tls is not None:
                paths += _server_files(server.tls)
        for _, client_tls in _client_settings(router.client):
            paths += client_tls.trust_certs
    return dict.fromkeys(paths)


def _server_files(tls):
    """The files a terminating server's settings name: keys and chains, then the client CAs."""
    paths = [path for _, identity in _identities(tls) for path in (identity.private_key, *identity.certs)]
    return paths + list(tls.client_auth.trust_certs if tls.client_auth else ())


def _identities(tls):
    """(place, identity) of each identity of a terminating server, the default first."""
    named = [(f"identities[{name}]", identity) for name, identity in tls.identities.items()]
    return [("defaultIdentity", tls.default_identity)] + named if tls.default_identity else named


def _client_settings(client):
    """(place, setting) of each TLS setting of a router's client: its own, then its prefixes'."""
    settings = [("client.tls", client.tls)]
    settings += [(f"client.configs[{k}].tls", prefixed.overrides.get("tls"))
                 for k, prefixed in enumerate(client.configs)]
    return [(place, setting) for place, setting in settings if setting is not None]


def _pem_blocks(data):
    """[(label, body lines)] of the PEM blocks in ``data``, read line by line (linear in any input)."""
    blocks, label, body = [], None, []
    for line in data.splitlines():
        line = line.strip()
        if label is None:
            if line.startswith(b"-----BEGIN ") and line.endswith(b"-----"):
                label, body = line[11:-5], []
        elif line == b"-----END " + label + b"-----":
            blocks.append((label.decode("ascii", "replace"), body))
            label = None
        else:
            body.append(line)
    return blocks


def _certificate_bodies(data):
    """The base64 lines of each PEM certificate block in ``data``."""
    return [body for label, body in _pem_blocks(data) if label == "CERTIFICATE"]


def _certificates(path, material):
    """The DER of each certificate in a file, which must hold only well-formed ones (at least one)."""
    bodies = _certificate_bodies(material.pem(path))
    if not bodies:
        raise TlsMaterialError(f"{path}: holds no PEM certificate")
    certificates = []
    for index, body in enumerate(bodies):
        try:
            der = base64.b64decode(b"".join(body), validate=False)
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)
        except (ValueError, ssl.SSLError):
            raise TlsMaterialError(f"{path}: certificate {index + 1} is not a valid X.509 certificate") from None
        certificates.append(der)
    return certificates


def _trusted(paths, material):
    """Every certificate of the CA files ``paths``, as one DER string for ``load_verify_locations(cadata=)``."""
    return b"".join(der for path in paths for der in _certificates(path, material))


def _private_key(path, material):
    """A file's bytes, refused unless they hold a usable private key (saying what they hold instead)."""
    data = material.pem(path)
    blocks = _pem_blocks(data)
    labels = {label for label, _ in blocks}
    if "ENCRYPTED PRIVATE KEY" in labels or any(line.startswith(b"Proc-Type:") and b"ENCRYPTED" in line
                                                for label, body in blocks if label.endswith("PRIVATE KEY")
                                                for line in body):
        raise TlsMaterialError(f"{path}: the private key is encrypted; ltcp needs it unencrypted "
                               "(protect the file with permissions instead)")
    if not any(label.endswith("PRIVATE KEY") for label in labels):
        if "CERTIFICATE" in labels:
            raise TlsMaterialError(f"{path}: holds a certificate, not a private key")
        raise TlsMaterialError(f"{path}: holds no PEM private key")
    return data


@contextlib.contextmanager
def _in_memory(name, data):
    """A path to ``data`` that exists only in memory (a memfd): OpenSSL loads keys from paths, and no key
    may be written to disk."""
    fd = os.memfd_create(name)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _no_password():
    raise TlsMaterialError("the private key is encrypted")


def _harden(context):
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION


def _load_identity(context, identity, material):
    """Load a key and its certificate chain (one or more PEM files) from ``material``.

    Each file is checked first, so that a mistake is reported with its file
    and reason rather than as OpenSSL's "PEM lib".
    """
    chain = "".join(ssl.DER_cert_to_PEM_cert(der) for path in identity.certs for der in _certificates(path, material))
    key = _private_key(identity.private_key, material)
    with _in_memory("ltcp-chain", chain.encode("ascii")) as chain_path, _in_memory("ltcp-key", key) as key_path:
        try:
            context.load_cert_chain(chain_path, key_path, password=_no_password)
        except TlsMaterialError as exc:
            raise TlsMaterialError(f"{identity.private_key}: {exc}") from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise TlsMaterialError(f"{identity.private_key}: does not match the certificate in "
                                       f"{identity.certs[0]}") from None
            raise TlsMaterialError(f"{identity.private_key} with {identity.certs[0]}: "
                                   f"{exc.reason or exc}") from None


def _server_side(identity, tls, material):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    _load_identity(context, identity, material)
    if tls.alpn_protocols:
        context.set_alpn_protocols(list(tls.alpn_protocols))
    if tls.client_auth is not None:  # (every identity's context alike: SNI may switch between them)
        context.load_verify_locations(cadata=_trusted(tls.client_auth.trust_certs, material))
        context.verify_mode = ssl.CERT_REQUIRED if tls.client_auth.required else ssl.CERT_OPTIONAL
    return context


class ServerContexts:
    """The context a terminating server starts with, switching identity by SNI.

    The server name the client asked for is remembered per connection in
    ``names``, keyed weakly by its ``ssl.SSLObject``, so a handshake that never finishes
    leaves nothing behind.  With one identity and no ``{sni}`` routing
    (``names_wanted`` false) nobody asks, and no handshake calls back into
    Python for it.
    """

    def __init__(self, tls, material, names_wanted=True):
        self.by_name = {name: _server_side(identity, tls, material) for name, identity in tls.identities.items()}
        if tls.default_identity is not None:
            self.default = _server_side(tls.default_identity, tls, material)
        else:
            self.default = next(iter(self.by_name.values()))
        self.require_match = tls.default_identity is None
        self.names = weakref.WeakKeyDictionary()
        if names_wanted or self.by_name:
            self.default.sni_callback = self._choose
            for context in self.by_name.values():
                context.sni_callback = self._choose

    def _lookup(self, name):
        context = self.by_name.get(name)
        if context is None and "." in name:
            context = self.by_name.get("*." + name.split(".", 1)[1])
        return context

    def _choose(self, ssl_object, server_name, initial_context):
        self.names[ssl_object] = server_name
        name, _ = routing_name(server_name)
        context = self._lookup(name) if name else None
        if context is not None:
            ssl_object.context = context
        elif self.require_match:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    def server_name(self, tls_socket):
        """The server name the client sent in its hello, or None (given the ``tlssocket.TlsSocket``)."""
        return self.names.pop(tls_socket.session_object, None)


# The server contexts this process has built, by what they were built from.  OpenSSL draws a context's
# session ticket keys when it makes the context, and Python's ssl cannot set them: so the worker template
# builds a generation's contexts before it forks the workers (``keep_server_contexts``), each worker finds
# them here, and all share the keys; a client resumes its session on whichever worker it reaches.
_server_contexts = {}


def server_context(tls, material, names_wanted=True):
    """A terminating server's contexts, built from ``material`` alone (once per process for the same inputs)."""
    try:
        key = _server_key(tls, material, names_wanted)
    except TlsMaterialError:  # (building says which file is missing, in the order it needs them)
        return ServerContexts(tls, material, names_wanted)
    contexts = _server_contexts.get(key)
    if contexts is None:
        contexts = _server_contexts[key] = ServerContexts(tls, material, names_wanted)
    return contexts


def keep_server_contexts(wanted, material):
    """Build the contexts for each ``(tls, names_wanted)`` in ``wanted`` and forget every other; the number built.

    Contexts already built from the same settings and bytes are kept, with
    their ticket keys: a reload that leaves the material alone does not end
    the sessions clients hold.  One that cannot be built is left to the
    workers, which say why.
    """
    kept = {}
    for tls, names_wanted in wanted:
        key, why = attempt(_server_key, tls, material, names_wanted)
        if why is None and key not in kept:
            kept[key] = _server_contexts.get(key) or attempt(ServerContexts, tls, material, names_wanted)[0]
    built = sum(key not in _server_contexts for key in kept)
    _server_contexts.clear()
    _server_contexts.update((key, contexts) for key, contexts in kept.items() if contexts is not None)
    return built


def _server_key(tls, material, names_wanted):
    return repr(tls), names_wanted, tuple(material.pem(path) for path in _server_files(tls))


def client_context(client_tls, material):
    """A verifying client context for ``client_tls``, trusting its ``trustCerts`` from ``material`` (else the
    system store)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    if client_tls.trust_certs:
        context.load_verify_locations(cadata=_trusted(client_tls.trust_certs, material))
    else:
        context.load_default_certs()
    return context


def client_contexts(client, material):
    """A context for each distinct TLS setting of a router's client, by setting (built once per process)."""
    settings = dict.fromkeys(setting for _, setting in _client_settings(client))
    return {setting: client_context(setting, material) for setting in settings}


def expiry_warnings(material, now):
    """A line for each certificate in ``material`` that is not valid at ``now`` (an aware datetime).

    Such certificates are loaded all the same, as HAProxy and nginx do: a
    renewal late by minutes should not take a listener down, but it must not
    go unnoticed either.
    """
    return [f"{path}: certificate {index} {why}; loaded all the same" for path in material.paths
            for index, body in enumerate(_certificate_bodies(material.pem(path)), 1)
            if (why := _out_of_date(body, now))]


def _out_of_date(body, now):
    """Why a certificate is not valid at ``now``, or None (also when its dates cannot be read: OpenSSL could)."""
    validity = _validity(body)
    if validity is None:
        return None
    subject, not_before, not_after = validity
    if now > not_after:
        return f"({subject}) expired on {not_after:%Y-%m-%d %H:%M:%S} UTC (notAfter)"
    if now < not_before:
        return f"({subject}) is not valid before {not_before:%Y-%m-%d %H:%M:%S} UTC (notBefore)"
    return None


# The standard library reads a certificate's dates only through a private function
# (ssl._ssl._test_decode_cert), so they are read here: a short walk of the DER, RFC 5280 4.1.
_VERSION, _UTC_TIME, _GENERALIZED_TIME = 0xA0, 0x17, 0x18
_SUBJECT_LABELS = {b"\x55\x04\x06": "C", b"\x55\x04\x0a": "O", b"\x55\x04\x0b": "OU", b"\x55\x04\x03": "CN"}


def _validity(body):
    """(subject, notBefore, notAfter) of a PEM certificate's base64 lines; None if they cannot be read."""
    try:
        ((_, certificate),) = _der_elements(memoryview(base64.b64decode(b"".join(body))))
        _, tbs = _der_elements(certificate)[0]
        fields = _der_elements(tbs)
        if fields[0][0] == _VERSION:
            fields = fields[1:]
        (_, validity), (_, subject) = fields[3:5]  # after serialNumber, signature and issuer
        not_before, not_after = (_der_time(tag, value) for tag, value in _der_elements(validity))
        return _subject(subject), not_before, not_after
    except (ValueError, IndexError):
        return None


def _der_elements(data):
    """[(tag, contents)] of the DER elements one after another in ``data`` (one level deep)."""
    reader, elements = _Reader(data), []
    while reader.left:
        tag, size = reader.number(1), reader.number(1)
        if size & 0x80:  # the long form: the length is in the next (size & 0x7f) bytes
            if not 0 < size & 0x7F <= 4:
                raise ValueError("unsupported DER length")
            size = reader.number(size & 0x7F)
        elements.append((tag, reader.take(size)))
    return elements


def _der_time(tag, value):
    """A UTCTime (two-digit years: 1950..2049) or a GeneralizedTime, as an aware datetime."""
    text = bytes(value).decode("ascii")
    if tag == _UTC_TIME:
        text = ("19" if text[:2] >= "50" else "20") + text
    elif tag != _GENERALIZED_TIME:
        raise ValueError("not a time")
    return datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.timezone.utc)


def _subject(name):
    """A subject's country, organisation, unit and common name, as text for a log line."""
    parts = []
    for _, rdn in _der_elements(name):
        for _, attribute in _der_elements(rdn):
            (_, oid), (_, value) = _der_elements(attribute)[:2]
            label = _SUBJECT_LABELS.get(bytes(oid))
            if label:
                text = bytes(value).decode("utf-8", "replace")
                parts.append(label + "=" + "".join(c if c.isprintable() else "?" for c in text))
    return ", ".join(parts) or "no subject"


def attempt(build, *args):
    """``(build(*args), None)``, or ``(None, why)`` in one line when no context can be built so."""
    try:
        return build(*args), None
    except TlsMaterialError as exc:
        return None, str(exc)
    except (ssl.SSLError, ValueError, OSError) as exc:  # what the checks did not foresee, still one line
        return None, getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def material_problems(config, material):
    """Build every TLS context ``config`` names from ``material``; one line per failure, naming its place and file.

    What passes here is what the workers will build: the same functions over the same bytes.
    """
    problems = []
    for i, router in enumerate(config.routers):
        for j, server in enumerate(router.servers):
            if server.tls is not None:
                for place, identity in _identities(server.tls):
                    problems += _problem(f"routers[{i}].servers[{j}].tls.{place}", _server_side, identity, server.tls,
                                         material)
        for place, client_tls in _client_settings(router.client):
            problems += _problem(f"routers[{i}].{place}", client_context, client_tls, material)
    return problems


def _problem(where, build, *args):
    _, why = attempt(build, *args)
    return [f"{where}: {why}"] if why else []
