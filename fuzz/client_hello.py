"""Fuzz the ClientHello reader: any bytes give a verdict, never an exception."""

import harness

with harness.instrumented():
    from ltcp.protocol.tls import HELLO, MALFORMED, NEED_MORE, NOT_TLS, normalize_server_name, parse_client_hello


def test_one_input(data):
    result = parse_client_hello(data)
    assert result.status in (NEED_MORE, NOT_TLS, MALFORMED, HELLO), result
    if result.status == HELLO and result.server_name is not None:
        name = normalize_server_name(result.server_name)
        assert name is None or ("/" not in name and ".." not in name and name == name.lower())
    # More bytes never turn a finished verdict back into "need more".
    if result.status != NEED_MORE:
        assert parse_client_hello(data + b"\x00" * 8).status != NEED_MORE


if __name__ == "__main__":
    harness.main(test_one_input)
