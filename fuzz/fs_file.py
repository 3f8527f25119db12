"""Fuzz io.l5d.fs address files: bad lines are reported, never raised."""

import harness

with harness.instrumented():
    from ltcp.interpreter.fs import parse_addresses


def test_one_input(data):
    addresses, problems = parse_addresses(data.decode("utf-8", "replace"), "fuzz")
    assert len({(a.ip, a.port) for a in addresses}) == len(addresses)
    assert all(a.weight > 0 and 0 < a.port <= 65535 for a in addresses)
    assert all(p.startswith("fuzz:") for p in problems)


if __name__ == "__main__":
    harness.main(test_one_input)
