"""Fuzz namerd answers, whole and cut into chunks: only NamerdError may come out."""

import harness

with harness.instrumented():
    from ltcp.interpreter.namerd import NamerdError, ObjectStream, parse_answer


def test_one_input(data):
    # The first byte chooses where the stream is cut, as a watch stream may be.
    step = data[0] % 17 + 1 if data else 1
    stream = ObjectStream(limit=4096)
    try:
        answers = []
        for at in range(1, len(data), step):
            answers += stream.feed(data[at:at + step])
        answers += stream.finish()
        for answer in answers:
            state, addresses, problems = parse_answer(answer)
            assert state in ("bound", "neg", "pending")
            assert (addresses is not None) == (state == "bound")
            for address in addresses or ():
                assert address.weight > 0 and 0 < address.port <= 65535
    except NamerdError:
        pass


if __name__ == "__main__":
    harness.main(test_one_input)
