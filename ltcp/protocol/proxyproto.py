"""The PROXY protocol (versions 1 and 2): read a header from the bytes a load
balancer sent first, and write one for an endpoint.  Pure functions.

``parse_header(data)`` answers ``ProxyHeader(status, length, source, destination)``:

* ``NEED_MORE`` — a valid prefix of a header; wait for more bytes
* ``INVALID``   — not a PROXY header, or a broken one (``reason`` says why)
* ``PARSED``    — ``length`` bytes form the header; ``source`` and ``destination``
  are ``(ip, port)``, or None for ``LOCAL`` / ``UNKNOWN`` (use the real peer)
"""

import ipaddress
import socket
from typing import NamedTuple, Optional, Tuple

from ..names import canonical_ip

__all__ = ["ProxyHeader", "parse_header", "build_v1", "build_v2", "NEED_MORE", "INVALID", "PARSED"]

NEED_MORE, INVALID, PARSED = "need_more", "invalid", "parsed"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD = 4096  # addresses plus TLVs; far more than any balancer sends
PEEK_BYTES = max(V1_MAX, 16 + V2_MAX_PAYLOAD)

Address = Optional[Tuple[str, int]]


class ProxyHeader(NamedTuple):
    status: str
    length: int = 0
    source: Address = None
    destination: Address = None
    reason: str = ""


def _invalid(reason):
    return ProxyHeader(INVALID, reason=reason)


def parse_header(data):
    data = bytes(data)
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)] and data:
        return _parse_v1(data)
    if not data:
        return ProxyHeader(NEED_MORE)
    return _invalid("no PROXY protocol header")


def _parse_v1(data):
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            return _invalid("v1 header without CRLF within 107 bytes")
        return ProxyHeader(NEED_MORE)
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        return _invalid("v1 header is not ASCII")
    if not line.isprintable():  # a lone LF, an escape: nothing a balancer sends, and never passed on
        return _invalid("v1 header holds control characters")
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(PARSED, end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        return _invalid(f"malformed v1 header {line!r}")
    version = 4 if parts[1] == "TCP4" else 6
    try:
        source = _endpoint(parts[2], parts[4], version)
        destination = _endpoint(parts[3], parts[5], version)
    except ValueError as exc:
        return _invalid(f"v1 header: {exc}")
    return ProxyHeader(PARSED, end + 2, source, destination)


def _endpoint(ip_text, port_text, version):
    ip = canonical_ip(ip_text)  # no zone ids: "fe80::1%anything" is not an address to pass on
    if (":" in ip) != (version == 6):
        raise ValueError(f"{ip_text} is not IPv{version}")
    if not port_text.isdigit() or (len(port_text) > 1 and port_text[0] == "0") or int(port_text) > 65535:
        raise ValueError(f"bad port {port_text!r}")
    return ip, int(port_text)


def _parse_v2(data):
    if len(data) < 16:
        return ProxyHeader(NEED_MORE)
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command not in (0, 1):
        return _invalid(f"v2 version {version} command {command}")
    family, length = data[13], int.from_bytes(data[14:16], "big")
    if length > V2_MAX_PAYLOAD:
        return _invalid(f"v2 payload of {length} bytes")
    if len(data) < 16 + length:
        return ProxyHeader(NEED_MORE)
    payload = data[16:16 + length]
    if command == 0:  # LOCAL: a health check from the balancer itself
        return ProxyHeader(PARSED, 16 + length)
    if family == 0x11:  # TCP over IPv4
        size, width, inet = 12, 4, socket.AF_INET
    elif family == 0x21:  # TCP over IPv6
        size, width, inet = 36, 16, socket.AF_INET6
    else:
        return ProxyHeader(PARSED, 16 + length)  # UNSPEC, UDP or UNIX: keep the real peer
    if length < size:
        return _invalid(f"v2 payload of {length} bytes is too short for its addresses")
    src = socket.inet_ntop(inet, payload[:width])  # the same canonical text as canonical_ip's
    dst = socket.inet_ntop(inet, payload[width:2 * width])
    sport = int.from_bytes(payload[2 * width:2 * width + 2], "big")
    dport = int.from_bytes(payload[2 * width + 2:2 * width + 4], "big")
    return ProxyHeader(PARSED, 16 + length, (src, sport), (dst, dport))


def build_v1(source, destination, tls=None):
    """A v1 header for a TCP stream from ``source`` to ``destination`` ((ip, port) each); v1 has no room for ``tls``."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(source, destination, tls=None):
    """A v2 PROXY-command header for a TCP stream (UNSPEC if the families differ).

    ``tls``, for a stream whose TLS ltcp terminated, is ``(version, certified,
    client_identity, server_name)`` (the last two may be None); it is passed on
    as the specification's TLVs: ``PP2_TYPE_AUTHORITY`` (0x02) with the SNI, and
    ``PP2_TYPE_SSL`` (0x20) with ``PP2_SUBTYPE_SSL_VERSION`` (0x21) and, for a
    verified client certificate, ``PP2_SUBTYPE_SSL_CN`` (0x22) holding the
    identity ltcp routes by (first DNS or URI name, else the subject's CN).
    """
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    tlvs = _tls_tlvs(*tls) if tls else b""
    if src.version != dst.version:
        return V2_SIGNATURE + bytes([0x21, 0x00]) + len(tlvs).to_bytes(2, "big") + tlvs
    family = 0x11 if src.version == 4 else 0x21
    payload = (src.packed + dst.packed + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big") + tlvs)
    return V2_SIGNATURE + bytes([0x21, family]) + len(payload).to_bytes(2, "big") + payload


PP2_TYPE_AUTHORITY, PP2_TYPE_SSL, PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN = 0x02, 0x20, 0x21, 0x22
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN = 0x01, 0x02


def _tlv(kind, value):
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def _tls_tlvs(version, certified, identity, server_name):
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN if certified else 0)
    ssl = bytes([client]) + (0 if certified else 1).to_bytes(4, "big")  # verify: 0 = a certificate, verified
    ssl += _tlv(PP2_SUBTYPE_SSL_VERSION, (version or "").encode("ascii", "replace"))
    if identity:
        ssl += _tlv(PP2_SUBTYPE_SSL_CN, identity.encode("utf-8", "replace")[:1024])
    authority = _tlv(PP2_TYPE_AUTHORITY, server_name.encode("ascii", "replace")) if server_name else b""
    return authority + _tlv(PP2_TYPE_SSL, ssl)
