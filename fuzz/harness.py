"""Run a fuzz target with atheris when it is installed, else with hypothesis.

    python fuzz/TARGET.py [-runs=N] [-seed=S] [corpus dirs or libFuzzer flags]

A target module defines ``test_one_input(data: bytes)``, which raises only
when it finds a bug, imports the code under test inside ``instrumented()``,
and ends with ``harness.main(test_one_input)``.
"""

import contextlib
import sys

try:
    import atheris
except ImportError:  # fall back to hypothesis (no coverage guidance)
    atheris = None


def instrumented():
    """Import the code under test inside this, so atheris can trace its coverage."""
    return atheris.instrument_imports() if atheris else contextlib.nullcontext()


def _flag(argv, name, default):
    for arg in argv:
        if arg.startswith(f"-{name}="):
            return int(arg.split("=", 1)[1])
    return default


def main(test_one_input):
    if atheris is not None:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
        return
    from hypothesis import given, settings, strategies as st
    from hypothesis import seed as fixed_seed

    runs = _flag(sys.argv, "runs", 10_000)

    @fixed_seed(_flag(sys.argv, "seed", 0))
    @settings(max_examples=runs, deadline=None, database=None)
    @given(st.binary(max_size=4096))
    def run(data):
        test_one_input(data)

    run()
    print(f"hypothesis: {runs} inputs, no failure")
