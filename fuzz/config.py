"""Fuzz configuration loading: any text gives a Config or a ConfigError, nothing else."""

import harness

with harness.instrumented():
    from ltcp.config import Config, ConfigError, loads


def test_one_input(data):
    text = data.decode("utf-8", "replace")
    try:
        config = loads(text, "fuzz.yaml", "/nonexistent")
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and e for e in exc.errors)
        assert all(len(e) < 4096 for e in exc.errors), "an error message repeats a huge value"
        return
    assert isinstance(config, Config)


if __name__ == "__main__":
    harness.main(test_one_input)
