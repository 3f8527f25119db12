"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from ltcp import __version__

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def ltcp(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ltcp", *args], input=stdin,
                          capture_output=True, text=True, timeout=30)


def test_check_prints_a_summary():
    result = ltcp("--check", str(FIXTURES / "linkerd-tcp-example.yml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok: 1 router, 1 server, interpreters: io.l5d.namerd.http"


def test_check_reads_stdin():
    result = ltcp("--check", "-", stdin=(EXAMPLES / "quickstart.yaml").read_text().replace("disco", "."))
    assert result.returncode == 0, result.stderr
    assert "io.l5d.fs" in result.stdout


def test_check_reports_every_error_and_exits_2():
    result = ltcp("--check", "-", stdin="routers:\n  - label: a\n    servers: [{port: -1}]\nadmn: {}\n")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "<stdin>: admn: unknown key (did you mean admin?)" in lines
    assert "<stdin>: routers[0].interpreter: is required" in lines
    assert any(line.startswith("<stdin>: routers[0].servers[0].port: must be an integer") for line in lines)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, stdin, expected", [
    (["/definitely/missing.yaml"], None, "/definitely/missing.yaml: cannot read configuration: No such file or directory"),
    (["-"], "routers: [\n", "<stdin>:2:1: YAML syntax error"),
])
def test_bad_files_give_one_line_and_exit_2(args, stdin, expected):
    result = ltcp(*args, stdin=stdin)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    result = ltcp(str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"{path}: not UTF-8 text (byte 0)"
    piped = subprocess.run([sys.executable, "-m", "ltcp", "-"], input=b"\xc3\x28", capture_output=True, timeout=30)
    assert piped.returncode == 2 and piped.stderr.decode().strip() == "<stdin>: not UTF-8 text (byte 0)"


def test_version():
    result = ltcp("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ltcp {__version__}"


def test_bad_log_level_from_environment():
    result = subprocess.run([sys.executable, "-m", "ltcp", "--check", str(FIXTURES / "linkerd-tcp-example.yml")],
                            capture_output=True, text=True, timeout=30, env={"LTCP_LOG": "loud", "PATH": ""})
    assert result.returncode == 2 and "LTCP_LOG" in result.stderr


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Good and broken TLS files: each broken one once passed --check and crashed serve."""
    import trustme

    root = tmp_path_factory.mktemp("material")
    ca, other_ca = trustme.CA(), trustme.CA()
    good, other = ca.issue_cert("a.example"), other_ca.issue_cert("b.example")
    good.private_key_pem.write_to_path(str(root / "key.pem"))
    good.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    other.private_key_pem.write_to_path(str(root / "other-key.pem"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    subprocess.run(["openssl", "pkey", "-in", str(root / "key.pem"), "-aes256", "-passout", "pass:secret",
                    "-out", str(root / "encrypted-key.pem")], check=True, capture_output=True)
    (root / "junk.pem").write_text("this is not PEM at all\n")
    (root / "bad-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    os.mkfifo(root / "fifo.pem")  # with no writer: once reported as "file not found"
    return root


def tls_document(root, key="key.pem", certs=("cert.pem",), trust=None):
    server = {"port": 0, "dstName": "/svc/a",
              "tls": {"defaultIdentity": {"privateKey": str(root / key), "certs": [str(root / c) for c in certs]}}}
    router = {"label": "r", "interpreter": {"kind": "io.l5d.static", "names": {}}, "servers": [server]}
    if trust:
        router["client"] = {"tls": {"dnsName": "a.example", "trustCerts": [str(root / trust)]}}
    return yaml.safe_dump({"admin": {"port": 0}, "routers": [router]})


@pytest.mark.parametrize("files, expected", [
    ({"key": "other-key.pem"}, "defaultIdentity: {root}/other-key.pem: does not match the certificate in {root}/cert.pem"),
    ({"key": "encrypted-key.pem"}, "defaultIdentity: {root}/encrypted-key.pem: the private key is encrypted"),
    ({"key": "cert.pem"}, "defaultIdentity: {root}/cert.pem: holds a certificate, not a private key"),
    ({"key": "junk.pem"}, "defaultIdentity: {root}/junk.pem: holds no PEM private key"),
    ({"certs": ("junk.pem",)}, "defaultIdentity: {root}/junk.pem: holds no PEM certificate"),
    ({"certs": ("cert.pem", "junk.pem")}, "defaultIdentity: {root}/junk.pem: holds no PEM certificate"),
    ({"certs": ("bad-cert.pem",)}, "defaultIdentity: {root}/bad-cert.pem: certificate 1 is not a valid X.509"),
    ({"trust": "junk.pem"}, "routers[0].client.tls: {root}/junk.pem: holds no PEM certificate"),
    ({"certs": ("fifo.pem",)}, "defaultIdentity.certs[0]: not a regular file (a FIFO): {root}/fifo.pem"),
    ({"key": "fifo.pem"}, "defaultIdentity.privateKey: not a regular file (a FIFO): {root}/fifo.pem"),
])
@pytest.mark.parametrize("command", [["--check"], []])
def test_bad_tls_material_is_one_line_naming_the_file(material, files, expected, command):
    result = ltcp(*command, "-", stdin=tls_document(material, **files))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected.format(root=material) in lines[0], lines


def test_good_tls_material_passes_check(material):
    result = ltcp("--check", "-", stdin=tls_document(material, certs=("cert.pem", "ca.pem"), trust="ca.pem"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [["--check"], []])
def test_a_namerd_url_serve_cannot_use_fails_check_too(command):
    document = yaml.safe_dump({"routers": [{"label": "r", "interpreter": {
        "kind": "io.l5d.namerd.http", "baseUrl": "http://127.0.0.1:99999"},
        "servers": [{"port": 0, "dstName": "/svc/a"}]}]})
    result = ltcp(*command, "-", stdin=document)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "routers[0].interpreter.baseUrl: is not a usable URL" in result.stderr
