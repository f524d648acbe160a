"""The sans-I/O codec against bytes written out by hand from the protocol description."""

from __future__ import annotations

import itertools
import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.dqlite import wire
from coordinator.dqlite.errors import LocalProtocolError, RemoteProtocolError


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def text(value: str) -> bytes:
    raw = value.encode() + b"\0"
    return raw + b"\0" * (-len(raw) % 8)


def frame(kind: int, body: bytes) -> bytes:
    assert len(body) % 8 == 0
    return struct.pack("<IBBH", len(body) // 8, kind, 0, 0) + body


def decode_all(data: bytes) -> list[wire.Response]:
    decoder = wire.Decoder()
    decoder.receive(data)
    messages = []
    while (message := decoder.next_message()) is not wire.NEED_DATA:
        messages.append(message)
    assert decoder.buffered == 0
    return messages


# ROWS for `SELECT 7, 'ab', NULL, x'0102', 1.5` as captured from libdqlite 1.11.1 (dqlite.md §1),
# including the blob padding the server does not zero.
SELECT_ROWS = frame(
    7,
    bytes.fromhex("0500000000000000")
    + b"7\0\0\0\0\0\0\0"
    + b"'ab'\0\0\0\0"
    + b"NULL\0\0\0\0"
    + b"x'0102'\0"
    + b"1.5\0\0\0\0\0"
    + bytes.fromhex("3145020000000000")
    + bytes.fromhex("0700000000000000")
    + bytes.fromhex("6162000000000000")
    + bytes.fromhex("0000000000000000")
    + bytes.fromhex("0200000000000000")
    + bytes.fromhex("010204b8187f0000")
    + bytes.fromhex("000000000000f83f")
    + bytes.fromhex("ffffffffffffffff"),
)
SELECT_MESSAGE = wire.Rows(("7", "'ab'", "NULL", "x'0102'", "1.5"), ((7, "ab", None, b"\x01\x02", 1.5),), True)

FAILURE = frame(0, u64(10250) + text("not leader"))
SERVERS = frame(
    3,
    u64(3)
    + u64(0x2DC171858C3155BE)
    + text("127.0.0.1:9101")
    + u64(0)
    + u64(7)
    + text("127.0.0.1:9102")
    + u64(1)
    + u64(8)
    + text("10.0.0.3:9103")
    + u64(2),
)
SERVERS_MESSAGE = wire.Servers(
    (
        wire.NodeInfo(0x2DC171858C3155BE, "127.0.0.1:9101", wire.Role.VOTER),
        wire.NodeInfo(7, "127.0.0.1:9102", wire.Role.STANDBY),
        wire.NodeInfo(8, "10.0.0.3:9103", wire.Role.SPARE),
    )
)
# Each response type once, with the message it decodes to.
RESPONSES: list[tuple[bytes, wire.Response]] = [
    (FAILURE, wire.Failure(10250, "not leader")),
    (frame(1, u64(5) + text("127.0.0.1:9101")), wire.Server(5, "127.0.0.1:9101")),
    (frame(1, u64(0) + text("")), wire.Server(0, "")),
    (frame(2, u64(15000)), wire.Welcome(15000)),
    (SERVERS, SERVERS_MESSAGE),
    (frame(4, bytes(8)), wire.Db(0)),
    (frame(6, u64(3) + u64(2)), wire.Result(3, 2)),
    (SELECT_ROWS, SELECT_MESSAGE),
    (frame(8, bytes(8)), wire.Empty()),
    (frame(10, u64(1) + u64(42)), wire.Metadata(1, 42)),
]


def test_handshake_is_version_one() -> None:
    assert wire.encode_handshake() == bytes.fromhex("0100000000000000")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (wire.Leader(), frame(0, u64(0))),
        (wire.Client(9), frame(1, u64(9))),
        (wire.Open("demo"), frame(3, b"demo\0\0\0\0" + u64(0) + bytes(8))),
        (wire.ExecSql(0, "SELECT 1"), frame(8, u64(0) + b"SELECT 1\0" + bytes(7))),
        (wire.QuerySql(0, "SELECT 1"), frame(9, u64(0) + b"SELECT 1\0" + bytes(7))),
        (wire.Interrupt(0), frame(10, u64(0))),
        (wire.Add(7, "1.2.3.4:5"), frame(12, u64(7) + b"1.2.3.4:5\0" + bytes(6))),
        (wire.Assign(7, wire.Role.STANDBY), frame(13, u64(7) + u64(1))),
        (wire.Remove(7), frame(14, u64(7))),
        (wire.Cluster(), frame(16, u64(1))),
        (wire.Transfer(7), frame(17, u64(7))),
        (wire.Describe(), frame(18, u64(0))),
    ],
)
def test_request_golden_bytes(request_: wire.Request, expected: bytes) -> None:
    assert wire.encode(request_) == expected


def test_params_of_every_type() -> None:
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    request = wire.QuerySql(0, "?", (-1, 1.5, "ab", b"\x01\x02\x03", None, True, when))
    body = (
        u64(0)
        + b"?\0" + bytes(6)
        # count 7, then the type codes: the 8 header bytes are exactly one word
        + bytes([7, 1, 2, 3, 4, 5, 11, 10])
        + struct.pack("<q", -1)
        + struct.pack("<d", 1.5)
        + text("ab")
        + u64(3) + b"\x01\x02\x03" + bytes(5)
        + bytes(8)
        + u64(1)
        + text("2024-01-02 03:04:05+00:00")
    )  # fmt: skip
    assert wire.encode(request) == frame(9, body)


@pytest.mark.parametrize(("count", "header_words"), [(1, 1), (7, 1), (8, 2), (15, 2), (255, 32)])
def test_params_header_counts_the_count_byte(count: int, header_words: int) -> None:
    encoded = wire.encode(wire.ExecSql(0, "x", (None,) * count))
    assert len(encoded) == 8 + 8 + 8 + header_words * 8 + count * 8
    assert encoded[24] == count


@pytest.mark.parametrize(
    "request_",
    [
        wire.ExecSql(0, "x", (None,) * 256),
        wire.ExecSql(0, "x", (1 << 63,)),
        wire.ExecSql(0, "x", (object(),)),  # type: ignore[arg-type]
        wire.ExecSql(0, "x", (datetime(2024, 1, 2),)),  # naive: ambiguous
        wire.ExecSql(0, "a\0b"),
        wire.Remove(-1),
        wire.Client(1 << 64),
        wire.Assign(1, 7),  # type: ignore[arg-type]
        wire.Cluster(format=0),
        wire.Describe(format=1),
    ],
)
def test_requests_the_protocol_cannot_express(request_: wire.Request) -> None:
    with pytest.raises(LocalProtocolError):
        wire.encode(request_)


@pytest.mark.parametrize(("data", "message"), RESPONSES)
def test_response_golden_bytes(data: bytes, message: wire.Response) -> None:
    assert decode_all(data) == [message]


def row_frame(types: list[int], values: bytes, marker: bytes = b"\xff" * 8) -> bytes:
    """A ROWS message holding one row of ``types`` with the encoded ``values`` (none: no row)."""
    names = b"".join(text(f"c{i}") for i in range(len(types)))
    header = bytearray(-(-len(types) // 16) * 8)
    for i, kind in enumerate(types):
        header[i // 2] |= kind << (4 * (i % 2))
    row = bytes(header) + values if values else b""
    return frame(7, u64(len(types)) + names + row + marker)


def test_row_values_of_every_type() -> None:
    data = row_frame(
        [1, 2, 3, 4, 5, 9, 10, 11, 11, 10, 10],
        struct.pack("<q", -42)
        + struct.pack("<d", -0.25)
        + text("héllo")
        + u64(9) + b"123456789" + b"\xaa" * 7  # garbage padding is not checked
        + bytes(8)
        + struct.pack("<q", 1700000000)
        + text("2024-01-02 03:04:05")
        + u64(1)
        + u64(0)
        + text("")  # NULL in a DATETIME column
        + text("not a time"),
    )  # fmt: skip
    [rows] = decode_all(data)
    assert isinstance(rows, wire.Rows)
    assert rows.rows == (
        (
            -42,
            -0.25,
            "héllo",
            b"123456789",
            None,
            datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
            datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
            True,
            False,
            None,
            "not a time",
        ),
    )


def test_iso8601_keeps_its_offset() -> None:
    [rows] = decode_all(row_frame([10], text("2024-01-02T03:04:05+02:00")))
    assert isinstance(rows, wire.Rows)
    assert rows.rows[0][0] == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))


def test_rows_paging_merges_batches_including_an_empty_one() -> None:
    second_row = u64(1) + u64(2)  # row header (column 0: INTEGER), value
    part = row_frame([1], u64(1) + second_row, marker=b"\xee" * 8)
    empty_part = row_frame([1], b"", marker=b"\xee" * 8)
    done = row_frame([1], u64(3))
    first, second, third = decode_all(part + empty_part + done)
    assert first == wire.Rows(("c0",), ((1,), (2,)), done=False)
    assert second == wire.Rows(("c0",), (), done=False)
    exchange = wire.Exchange(wire.QuerySql(0, "SELECT"))
    for message in (first, second):
        exchange.receive(message)
        assert not exchange.complete
    exchange.receive(third)
    assert exchange.response == wire.Rows(("c0",), ((1,), (2,), (3,)), done=True)


def test_failure_ends_a_query_after_batches() -> None:
    exchange = wire.Exchange(wire.QuerySql(0, "SELECT"))
    exchange.receive(wire.Rows(("a",), ((1,),), done=False))
    exchange.receive(wire.Failure(1, "interrupted"))
    assert exchange.response == wire.Failure(1, "interrupted")


def test_interrupt_drains_rows_until_empty() -> None:
    exchange = wire.Exchange(wire.Interrupt(0))
    exchange.receive(wire.Rows(("a",), ((1,),), done=True))
    assert not exchange.complete
    exchange.receive(wire.Empty())
    assert exchange.response == wire.Empty()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (wire.Leader(), wire.Empty()),
        (wire.Cluster(), wire.Server(1, "x")),
        (wire.QuerySql(0, "x"), wire.Result(0, 0)),
    ],
)
def test_unexpected_answers_are_the_peers_fault(request_: wire.Request, message: wire.Response) -> None:
    with pytest.raises(RemoteProtocolError):
        wire.Exchange(request_).receive(message)


def test_batches_that_disagree_on_columns() -> None:
    exchange = wire.Exchange(wire.QuerySql(0, "x"))
    exchange.receive(wire.Rows(("a",), (), done=False))
    with pytest.raises(RemoteProtocolError):
        exchange.receive(wire.Rows(("b",), (), done=True))


@pytest.mark.parametrize(
    "data",
    [
        frame(99, bytes(8)),  # unknown type
        frame(5, bytes(8)),  # STMT: never an answer to what we send
        struct.pack("<IBBH", (64 << 20) // 8 + 1, 7, 0, 0),  # oversized; rejected from the header
        b"HTTP/1.1 400 Bad Request\r\n\r\n",  # someone else's protocol
        frame(1, u64(1) + b"no terminator"[:8]),  # text without NUL
        frame(0, u64(1)),  # body ends inside a field
        frame(3, u64(1) + u64(1) + text("a") + u64(9)),  # unknown role
        row_frame([6], bytes(8)),  # unknown value type
        row_frame([3], b"\xff\xfe\0\0\0\0\0\0"),  # text that is not UTF-8
        row_frame([1], u64(1), marker=b""),  # ROWS without end marker
        row_frame([1], u64(1), marker=b"\xff" * 8 + bytes(8)),  # more after the marker
        frame(7, u64(0) + u64(5) + b"\xff" * 8),  # zero columns yet a row
        frame(7, u64(1 << 40) + b"\xff" * 8),  # absurd column count
        frame(4, b""),  # DB with an empty body
    ],
)
def test_garbage_is_a_remote_protocol_error(data: bytes) -> None:
    decoder = wire.Decoder()
    decoder.receive(data)
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError):  # and the stream stays failed
        decoder.next_message()


def test_text_padding_is_not_checked_either() -> None:
    assert decode_all(frame(1, u64(1) + b"ab\0\x99\x99\x99\x99\x99")) == [wire.Server(1, "ab")]


def test_unknown_trailing_fields_are_ignored() -> None:
    assert decode_all(frame(2, u64(15000) + u64(1))) == [wire.Welcome(15000)]


@settings(max_examples=200)
@given(
    messages=st.lists(st.sampled_from(RESPONSES), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_split_decodes_to_the_same_messages(messages: list[tuple[bytes, wire.Response]], cuts: list[int]) -> None:
    stream = b"".join(data for data, _ in messages)
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    decoder = wire.Decoder()
    decoded = []
    for start, end in itertools.pairwise(bounds):
        decoder.receive(stream[start:end])
        while (message := decoder.next_message()) is not wire.NEED_DATA:
            decoded.append(message)
    assert decoded == [message for _, message in messages]
    assert decoder.buffered == 0


def drain(data: bytes) -> None:
    """Decode until NEED_DATA; only RemoteProtocolError may escape. Each message eats >= 8 bytes."""
    decoder = wire.Decoder()
    decoder.receive(data)
    for _ in range(len(data) // 8 + 1):
        if decoder.next_message() is wire.NEED_DATA:
            return
    raise AssertionError("decoder did not make progress")


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_remote_protocol_error(data: bytes) -> None:
    try:
        drain(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=500)
@given(kind=st.sampled_from([0, 1, 2, 3, 4, 6, 7, 8, 10]), words=st.binary(max_size=256))
def test_random_bodies_of_known_types_only_raise_remote_protocol_error(kind: int, words: bytes) -> None:
    try:
        drain(frame(kind, words[: len(words) // 8 * 8]))
    except RemoteProtocolError:
        pass


@settings(max_examples=300)
@given(
    sample=st.sampled_from(RESPONSES),
    flips=st.lists(st.tuples(st.integers(min_value=8), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_corrupted_responses_only_raise_remote_protocol_error(
    sample: tuple[bytes, wire.Response], flips: list[tuple[int, int]]
) -> None:
    data = bytearray(sample[0])
    for at, value in flips:
        data[at % len(data)] = value
    try:
        drain(bytes(data))
    except RemoteProtocolError:
        pass
