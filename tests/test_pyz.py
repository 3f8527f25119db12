"""The single-file build: ltcp.pyz runs on an interpreter that sees nothing outside it."""

import os
import subprocess
import sys

import pytest
from netutil import Backend, LtcpProcess, recv_exactly, static_config

pytestmark = pytest.mark.timeout(120)

BUILD = os.path.join(os.path.dirname(__file__), "..", "scripts", "build_pyz.py")
BARE = [sys.executable, "-I", "-S"]  # no site-packages, no user site, no environment


@pytest.fixture(scope="module")
def pyz(tmp_path_factory):
    path = tmp_path_factory.mktemp("pyz") / "ltcp.pyz"
    subprocess.run([sys.executable, BUILD, "--output", str(path)], check=True, capture_output=True, timeout=60)
    return str(path)


def test_check_runs_on_a_bare_interpreter(pyz, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("routers: [{label: a, interpreter: {kind: io.l5d.dns}, servers: [{port: 0, dstName: /inet/x/1}]}]")
    result = subprocess.run([*BARE, pyz, "--check", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 router")
    broken = subprocess.run([*BARE, pyz, "--check", "-"], input="routers: 7", capture_output=True, text=True,
                            timeout=60)
    assert broken.returncode == 2 and "routers" in broken.stderr


def test_the_pyz_serves_with_workers_that_import_only_from_it(pyz, tmp_path):
    backend = Backend()
    document = static_config({"/svc/a": [backend.addr]})
    document["workers"] = 2
    # Started from a directory holding another "ltcp": nothing may import it.
    impostor = tmp_path / "ltcp"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise SystemExit('imported the ltcp in the current directory')\n")
    ltcp = LtcpProcess(document, command=[*BARE, pyz], cwd=tmp_path)
    try:
        for _ in range(4):
            with ltcp.connect() as conn:
                conn.sendall(b"through the zip")
                assert recv_exactly(conn, 15) == b"through the zip"
        for pid in ltcp.workers:  # forks of the supervisor's template: the supervisor's command line
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
            assert argv[1:len(BARE) + 1] == [*BARE[1:], str(pyz)], argv
    finally:
        ltcp.stop()
        backend.close()
