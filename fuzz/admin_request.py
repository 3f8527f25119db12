"""Fuzz the admin server's request reader: a request, "not yet", or an HttpError, and prefixes agree."""

import harness

with harness.instrumented():
    from ltcp.admin.httpd import HttpError, parse_request


def test_one_input(data):
    try:
        request, used = parse_request(data)
    except HttpError as exc:
        assert exc.status in (400, 411, 413, 431, 505), exc.status
        return
    if request is None:
        assert used == 0
        return
    assert 0 < used <= len(data)
    assert parse_request(data[:used])[1] == used  # what it took is a whole request on its own
    assert request.path.startswith("/")


if __name__ == "__main__":
    harness.main(test_one_input)
