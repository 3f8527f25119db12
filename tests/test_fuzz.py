"""A short, deterministic run of every fuzz target, and the inputs that once broke them."""

import pathlib
import shutil
import subprocess
import sys

import pytest

FUZZ = pathlib.Path(__file__).parent.parent / "fuzz"
TARGETS = sorted(p.stem for p in FUZZ.glob("*.py") if p.stem != "harness")
RUNS = {"config": 3000}  # YAML parsing is slow; the rest get 20,000 inputs


def test_there_are_targets():
    assert set(TARGETS) == {"admin_request", "client_hello", "config", "fs_file", "namerd_answer", "proxy_header"}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.timeout(180)
def test_short_fuzz_run(target, tmp_path):
    corpus = tmp_path / "corpus"  # atheris adds what it finds; keep that out of the tree
    seeds = FUZZ / "corpus" / target
    if seeds.is_dir():
        shutil.copytree(seeds, corpus)
    else:
        corpus.mkdir()
    runs = RUNS.get(target, 20000)
    result = subprocess.run([sys.executable, f"{target}.py", f"-runs={runs}", "-seed=1", str(corpus)],
                            cwd=FUZZ, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_and_regressions(target):
    """The seed corpus and fuzz/regressions/TARGET/ (inputs that once broke a target) pass."""
    sys.path.insert(0, str(FUZZ))
    try:
        module = __import__(target)
    finally:
        sys.path.remove(str(FUZZ))
    cases = sorted((FUZZ / "corpus" / target).glob("*")) + sorted((FUZZ / "regressions" / target).glob("*"))
    assert cases, f"no seed inputs for {target}"
    for case in cases:
        module.test_one_input(case.read_bytes())
