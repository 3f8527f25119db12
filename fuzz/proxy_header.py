"""Fuzz the PROXY protocol reader; parsed headers must round-trip through the writers."""

import harness

with harness.instrumented():
    from ltcp.protocol.proxyproto import INVALID, NEED_MORE, PARSED, build_v1, build_v2, parse_header


def test_one_input(data):
    header = parse_header(data)
    assert header.status in (NEED_MORE, INVALID, PARSED), header
    if header.status == PARSED:
        assert 0 < header.length <= len(data)
        if header.source is not None:
            for build in (build_v1, build_v2):
                again = parse_header(build(header.source, header.destination))
                assert (again.source, again.destination) == (header.source, header.destination)


if __name__ == "__main__":
    harness.main(test_one_input)
