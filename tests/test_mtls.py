"""Client certificates (mTLS) and routing by the client's verified identity."""

import datetime
import socket
import ssl

import pytest
import trustme
from netutil import closed_without_data, named, recv_exactly, static_config, wait_for

from ltcp.config import ConfigError, loads
from ltcp.protocol.proxyproto import PARSED, build_v2, parse_header
from ltcp.protocol.tls import routing_identity

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server certificate, a CA whose clients ltcp trusts, and one whose clients it does not."""
    root = tmp_path_factory.mktemp("mtls")
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()

    def write(name, cert):
        key, crt = root / f"{name}.key", root / f"{name}.crt"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(crt))
        return str(crt), str(key)

    files = {"server": write("server", server_ca.issue_cert("localhost")), "server_ca": str(root / "server-ca.pem"),
             "client_ca": str(root / "client-ca.pem")}
    server_ca.cert_pem.write_to_path(files["server_ca"])
    client_ca.cert_pem.write_to_path(files["client_ca"])
    files["alice"] = write("alice", client_ca.issue_cert("alice.example"))
    files["bob"] = write("bob", client_ca.issue_cert("bob.example"))
    files["mallory"] = write("mallory", other_ca.issue_cert("alice.example"))  # the right name, the wrong CA
    yesterday = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    files["expired"] = write("expired", client_ca.issue_cert(
        "alice.example", not_before=yesterday - datetime.timedelta(days=30), not_after=yesterday))
    # No alternative names at all: the identity is the subject's CN, here one that would climb out of its
    # segment.  With an email name only, the CN is not an identity (RFC 6125).
    files["hostile"] = write("hostile", _cn_only(client_ca, "../admin"))
    files["cn_only"] = write("cn_only", _cn_only(client_ca, "carol"))
    files["email_only"] = write("email_only", client_ca.issue_cert("carol@example.com", common_name="carol"))
    return files


class _Leaf:
    """A certificate and key as trustme gives them (``write_to_path``), made by hand: trustme always adds names."""

    def __init__(self, cert, key):
        from cryptography.hazmat.primitives import serialization
        self.cert_chain_pems = [trustme.Blob(cert.public_bytes(serialization.Encoding.PEM))]
        self.private_key_pem = trustme.Blob(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _cn_only(ca, common_name):
    """A client certificate from ``ca`` with a subject CN and no subject-alternative names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    issuer_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return _Leaf(cert, key)


def mtls_config(pki, names, dst_name="/tenant/{client}", required=True, **server):
    crt, key = pki["server"]
    tls = {"defaultIdentity": {"privateKey": key, "certs": [crt]},
           "clientAuth": {"trustCerts": [pki["client_ca"]], "required": required}}
    return static_config(names, dstName=dst_name, tls=tls, **server)


def connect(proxy, pki, who=None):
    """A TLS client to ``proxy``, presenting ``who``'s certificate (or none)."""
    context = ssl.create_default_context(cafile=pki["server_ca"])
    if who is not None:
        context.load_cert_chain(*pki[who])
    raw = socket.create_connection(("127.0.0.1", proxy.port()), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def refused(proxy, pki, who):
    """Whether the stream of a client presenting ``who`` ends without data (TLS 1.3 may let the handshake finish
    on the client's side before the server's verdict arrives)."""
    try:
        conn = connect(proxy, pki, who)
    except (ssl.SSLError, OSError):
        return True
    with conn:
        try:
            conn.sendall(b"hello")
            return conn.recv(100) == b""
        except (ssl.SSLError, OSError):
            return True


def test_two_client_certificates_reach_two_backends_through_one_listener(proxies, backends, pki):
    alice, bob = backends(named("alice")), backends(named("bob"))
    proxy = proxies(mtls_config(pki, {"/tenant/alice.example": [alice.addr], "/tenant/bob.example": [bob.addr]}))
    for who in ("alice", "bob", "alice"):
        with connect(proxy, pki, who) as conn:
            assert recv_exactly(conn, len(who) + 1) == f"{who}\n".encode()


@pytest.mark.parametrize("who", [None, "mallory", "expired"])
def test_a_missing_foreign_or_expired_certificate_fails_the_handshake(proxies, backends, pki, who, caplog):
    alice = backends(named("alice"))
    proxy = proxies(mtls_config(pki, {"/tenant/alice.example": [alice.addr]}))
    caplog.set_level("DEBUG", logger="ltcp")
    assert refused(proxy, pki, who)
    wait_for(lambda: proxy.call(lambda: dict(proxy.listener.failures)) == {"tls": 1}, message="counted as tls")
    assert alice.accepted == 0
    assert any("stream from" in r.getMessage() and "tls" in r.getMessage() for r in caplog.records)


def test_a_hostile_identity_is_refused_and_counted(proxies, backends, pki):
    admin = backends(named("admin"))
    proxy = proxies(mtls_config(pki, {"/admin": [admin.addr], "/tenant/carol": [admin.addr]},
                                dst_name="/tenant/{client}"))
    with connect(proxy, pki, "hostile") as conn:
        assert closed_without_data(conn)
    assert proxy.call(lambda: dict(proxy.listener.failures)) == {"bad_client": 1}
    assert admin.accepted == 0
    with connect(proxy, pki, "cn_only") as conn:  # the CN is the identity when the certificate has no names
        assert recv_exactly(conn, 6) == b"admin\n"
    with connect(proxy, pki, "email_only") as conn:  # an email name only: no identity, whatever the CN says
        assert closed_without_data(conn)
    assert proxy.call(lambda: dict(proxy.listener.failures)) == {"bad_client": 1, "no_client": 1}


def test_without_required_a_client_with_no_certificate_goes_to_the_default(proxies, backends, pki):
    alice, guest = backends(named("alice")), backends(named("guest"))
    proxy = proxies(mtls_config(pki, {"/tenant/alice.example": [alice.addr], "/guest": [guest.addr]},
                                required=False, defaultDstName="/guest"))
    with connect(proxy, pki) as conn:
        assert recv_exactly(conn, 6) == b"guest\n"
    with connect(proxy, pki, "alice") as conn:
        assert recv_exactly(conn, 6) == b"alice\n"
    assert proxy.call(lambda: dict(proxy.listener.fallbacks)) == {"no_client": 1}


def parse_tlvs(data):
    """Type -> value of a sequence of PROXY v2 TLVs."""
    tlvs, at = {}, 0
    while at < len(data):
        kind, size = data[at], int.from_bytes(data[at + 1:at + 3], "big")
        tlvs[kind] = data[at + 3:at + 3 + size]
        at += 3 + size
    return tlvs


def read_tlvs(header):
    """Type -> value of a PROXY v2 header's TLVs (after its addresses)."""
    body = header[16:16 + int.from_bytes(header[14:16], "big")]
    return parse_tlvs(body[{0x11: 12, 0x21: 36}[header[13]]:])


def test_the_identity_is_passed_on_in_a_proxy_v2_tlv(proxies, backends, pki):
    headers = []

    def keep_header(conn):
        data = b""
        while len(data) < 16 or len(data) < 16 + int.from_bytes(data[14:16], "big"):
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        headers.append(data)
        conn.sendall(b"ok")

    backend = backends(keep_header)
    proxy = proxies(mtls_config(pki, {"/tenant/alice.example": [backend.addr]},
                                client={"proxyProtocol": "v2"}))
    with connect(proxy, pki, "alice") as conn:
        assert recv_exactly(conn, 2) == b"ok"
    tlvs = read_tlvs(headers[0])
    assert tlvs[0x02] == b"localhost"  # PP2_TYPE_AUTHORITY: the SNI
    ssl_tlv = tlvs[0x20]
    assert ssl_tlv[0] == 0x03 and ssl_tlv[1:5] == b"\0\0\0\0"  # client SSL + certificate, verified
    subs = parse_tlvs(ssl_tlv[5:])
    assert subs[0x21].startswith(b"TLSv1.") and subs[0x22] == b"alice.example"


@pytest.mark.parametrize("identity, cause", [
    (None, "no_client"), ("", "no_client"), ("a/b", "bad_client"), ("..", "bad_client"), (".", "bad_client"),
    ("a b", "bad_client"), ("a\x00b", "bad_client"), ("{sni}", "bad_client"), ("x" * 254, "bad_client"),
])
def test_identities_that_cannot_be_a_path_segment_are_refused(identity, cause):
    assert routing_identity(identity) == (None, cause)


@pytest.mark.parametrize("identity", ["alice.example", "carol", "spiffe:tenant-7", "Ünicode-name"])
def test_usable_identities_pass_unchanged(identity):
    assert routing_identity(identity) == (identity, None)


def test_client_in_dst_name_needs_client_auth():
    with pytest.raises(ConfigError, match=r"dstName: uses \{client\}, which needs tls.clientAuth"):
        loads("routers: [{label: a, interpreter: {kind: io.l5d.static, names: {}}, "
              "servers: [{port: 0, dstName: '/t/{client}'}]}]")


@pytest.mark.parametrize("source, destination", [(("10.0.0.1", 1000), ("10.0.0.2", 443)),
                                                 (("::1", 1000), ("::2", 443)),
                                                 (("10.0.0.1", 1000), ("::2", 443))])
def test_a_header_with_tls_tlvs_reads_back_whole(source, destination):
    header = build_v2(source, destination, ("TLSv1.3", True, "alice.example", "api.example"))
    parsed = parse_header(header + b"payload")
    assert parsed.status == PARSED and parsed.length == len(header)
    if parsed.source is not None:
        assert (parsed.source, parsed.destination) == (source, destination)
