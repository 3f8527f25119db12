"""A stream's record as it crosses from one worker to another, and the hand-over's messages (``handover``).

Each message is one JSON object: ``{"hello": secret}`` first, then
``{"streams": [record, ...]}`` with two descriptors per record (client,
then upstream), answered by ``{"adopted": [id, ...], "refused": [id, ...]}``.
Every field of a record is checked on the way in: a message that is not one
raises ``HandOverError``, never anything else.
"""

import json
from typing import NamedTuple, Optional, Tuple

__all__ = ["BATCH", "HandOverError", "StreamRecord", "answer_of", "decode", "encode", "streams_of"]

BATCH = 100  # streams per message: 200 descriptors, below the kernel's 253
MAX_TEXT = 4096  # characters of a name or address in a record


class HandOverError(ValueError):
    """A hand-over message that is not one."""


Address = Tuple[str, int]


class StreamRecord(NamedTuple):
    """What a stream needs to go on in another process; times are CLOCK_MONOTONIC, which every process shares."""

    id: int
    router: str  # the router's label
    listener: Address  # where the stream was accepted (the listening socket's address)
    dst_name: str
    endpoint: Address
    source: Address  # the client (from a PROXY header, if one was read)
    destination: Optional[Address]  # the address a PROXY header said the client connected to
    accepted_at: float
    started: float  # when the upstream connection was established: the lifetime counts from it
    last_active: float
    lifetime: Optional[float]
    idle_timeout: Optional[float]
    from_client: int  # bytes read so far from each side
    from_upstream: int
    client_ended: bool  # that side has finished sending (its end was passed on)
    upstream_ended: bool
    client_shut: bool  # ltcp has finished sending to that side
    upstream_shut: bool


def _address(value):
    if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and len(value[0]) <= MAX_TEXT
            and type(value[1]) is int and 0 <= value[1] <= 65535):
        return (value[0], value[1])
    raise HandOverError(f"not an address: {value!r:.80}")


def _text(value):
    if isinstance(value, str) and 0 < len(value) <= MAX_TEXT:
        return value
    raise HandOverError(f"not a name: {value!r:.80}")


def _count(value):
    if type(value) is int and 0 <= value < 1 << 63:
        return value
    raise HandOverError(f"not a count: {value!r:.80}")


def _time(value):
    if type(value) in (int, float) and 0 <= value < 1e12:
        return float(value)
    raise HandOverError(f"not a time: {value!r:.80}")


def _flag(value):
    if type(value) is bool:
        return value
    raise HandOverError(f"not true or false: {value!r:.80}")


def _optional(check):
    return lambda value: None if value is None else check(value)


_FIELDS = (_count, _text, _address, _text, _address, _address, _optional(_address), _time, _time, _time,
           _optional(_time), _optional(_time), _count, _count, _flag, _flag, _flag, _flag)


def record_from(value):
    """A StreamRecord from its JSON form, every field checked."""
    if not isinstance(value, list) or len(value) != len(_FIELDS):
        raise HandOverError(f"a record of {len(value) if isinstance(value, list) else type(value).__name__}")
    return StreamRecord(*(check(item) for check, item in zip(_FIELDS, value)))


def encode(message):
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data):
    """A message's JSON object; HandOverError for anything else."""
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandOverError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or len(message) not in (1, 2):
        raise HandOverError("not a hand-over message")
    return message


def streams_of(message, fds):
    """The (record, client fd, upstream fd) of a ``streams`` message and its descriptors."""
    records = message.get("streams")
    if not isinstance(records, list) or not 0 < len(records) <= BATCH:
        raise HandOverError("not a batch of streams")
    if len(fds) != 2 * len(records):
        raise HandOverError(f"{len(fds)} descriptors for {len(records)} streams")
    return [(record_from(record), fds[2 * i], fds[2 * i + 1]) for i, record in enumerate(records)]


def answer_of(message):
    """The (adopted ids, refused ids) of an answer."""
    adopted, refused = message.get("adopted", []), message.get("refused", [])
    if not (isinstance(adopted, list) and isinstance(refused, list)
            and all(type(i) is int for i in adopted + refused)):
        raise HandOverError("not an answer")
    return adopted, refused
