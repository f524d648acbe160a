"""Sans-I/O codec for the dqlite client protocol, version 1, schema 0 (as libdqlite 1.11 speaks it).

Bytes in, frozen messages out; messages in, bytes out. No sockets, no asyncio: the caller moves
the bytes (see client.py). Everything that decides what is legal lives here:

* ``encode_handshake()`` / ``encode(request)`` build what the client sends;
* ``Decoder`` frames and decodes the server's responses from any split of the byte stream;
* ``Exchange`` knows which responses may answer a request and when the answer is complete
  (QUERY_SQL is answered by ROWS batches until one ends with DONE).

Framing: every message is an 8-byte header ``<IBBH`` (body size in 8-byte words, type, schema,
unused) and a body that is a whole number of words; integers are little-endian. Reference:
https://canonical.com/dqlite/docs/reference/wire-protocol, checked against libdqlite 1.11.1
(src/gateway.c, src/tuple.c, src/query.c) and real dqlite-demo nodes (tests/dqlite).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

# Re-exported: the codec's own errors, split h11-style by who broke the rules.
from coordinator.dqlite.errors import LocalProtocolError as LocalProtocolError
from coordinator.dqlite.errors import RemoteProtocolError as RemoteProtocolError

PROTOCOL_VERSION = 1
WORD = 8
# 1.11.1 ignores the schema byte, so only schema 0 exists there: 8-bit parameter counts.
MAX_PARAMS = 255
# A response body larger than this is taken as garbage rather than buffered. Real ROWS batches
# are about one 4 KiB page, or one row when a row is larger than that.
MAX_BODY = 64 * 1024 * 1024

_HEADER = struct.Struct("<IBBH")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_DONE = b"\xff" * WORD
_PART = b"\xee" * WORD


class Role(enum.IntEnum):
    """A node's Raft role, as numbered on the wire."""

    VOTER = 0
    STANDBY = 1
    SPARE = 2


class ValueType(enum.IntEnum):
    """Type codes of tuple values (SQLite's, plus dqlite's time and boolean tags)."""

    INTEGER = 1
    FLOAT = 2
    TEXT = 3
    BLOB = 4
    NULL = 5
    UNIXTIME = 9
    ISO8601 = 10
    BOOLEAN = 11


Value = int | float | str | bytes | bool | datetime | None
Row = tuple[Value, ...]


# Requests. ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leader:
    """Ask who the leader is. Any node answers, with ``Server(0, "")`` when it does not know the
    leader or its own configuration does not list it as a voter. That configuration can be stale:
    a removed (or removed and re-added) node still lists itself as a voter and named the leader."""


@dataclass(frozen=True)
class Client:
    """Register a client id. Informational only on 1.11 (answered by Welcome)."""

    id: int


@dataclass(frozen=True)
class Open:
    """Open a database. The server allows one per connection; its id is always 0."""

    name: str
    flags: int = 0
    vfs: str = ""


@dataclass(frozen=True)
class ExecSql:
    """Run statements without a result set. Params bind to the first statement only."""

    db_id: int
    sql: str
    params: tuple[Value, ...] = ()


@dataclass(frozen=True)
class QuerySql:
    """Run one statement that has result columns (DDL here fails with "not an error")."""

    db_id: int
    sql: str
    params: tuple[Value, ...] = ()


@dataclass(frozen=True)
class Interrupt:
    """Meant to abandon a running query. 1.11 reads no request while it streams ROWS (seen: all
    12 batches of 2000 rows came first), so it is answered by the remaining ROWS, then EMPTY.
    To really abandon a query, close the connection."""

    db_id: int


@dataclass(frozen=True)
class Add:
    """Add a node to the Raft configuration; it joins as spare."""

    id: int
    address: str


@dataclass(frozen=True)
class Assign:
    id: int
    role: Role


@dataclass(frozen=True)
class Remove:
    id: int


@dataclass(frozen=True)
class Cluster:
    """Ask a node for its own view of the Raft configuration.

    format: 1 includes roles. Format 0 omits them and cannot be told apart on the way back, so
    it is refused.
    """

    format: int = 1


@dataclass(frozen=True)
class Transfer:
    """Hand leadership to the voter ``id`` (0: let Raft pick)."""

    id: int


@dataclass(frozen=True)
class Describe:
    """Ask for a node's metadata. format: 0, the only one. Others are refused here: 1.11.1 answers
    them with FAILURE and then also tries to send METADATA, which aborts the node (assertion in
    transport__write, seen on dqlite-demo)."""

    format: int = 0


Request = (
    Leader | Client | Open | ExecSql | QuerySql | Interrupt | Add | Assign | Remove | Cluster | Transfer | Describe
)

# Responses. -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    code: int
    message: str


@dataclass(frozen=True)
class Server:
    """The leader as a node sees it; ``address == ""`` means unknown."""

    id: int
    address: str


@dataclass(frozen=True)
class Welcome:
    heartbeat_timeout: int


@dataclass(frozen=True)
class Db:
    id: int


@dataclass(frozen=True)
class Result:
    last_insert_id: int
    rows_affected: int


@dataclass(frozen=True)
class Rows:
    """One ROWS batch; ``done`` is False when more batches follow."""

    columns: tuple[str, ...]
    rows: tuple[Row, ...]
    done: bool


@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class NodeInfo:
    id: int
    address: str
    role: Role


@dataclass(frozen=True)
class Servers:
    nodes: tuple[NodeInfo, ...]


@dataclass(frozen=True)
class Metadata:
    failure_domain: int
    weight: int


Response = Failure | Server | Welcome | Db | Result | Rows | Empty | Servers | Metadata


class _Sentinel(enum.Enum):
    NEED_DATA = enum.auto()


NEED_DATA = _Sentinel.NEED_DATA
"""Returned by ``Decoder.next_message`` when the buffer does not hold a whole message yet."""


# Encoding. ------------------------------------------------------------------------------------


def encode_handshake() -> bytes:
    """The word a client sends first. No reply comes; a wrong version gets a silent close."""
    return _U64.pack(PROTOCOL_VERSION)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % WORD)


def _u64(value: int) -> bytes:
    if not 0 <= value < 1 << 64:
        raise LocalProtocolError(f"{value} does not fit in uint64")
    return _U64.pack(value)


def _text(value: str) -> bytes:
    if "\0" in value:
        raise LocalProtocolError("text is NUL-terminated on the wire and cannot contain NUL")
    return _pad(value.encode() + b"\0")


def _param(value: object) -> tuple[ValueType, bytes]:
    # bool before int: bool is an int subclass, and the server binds BOOLEAN as 0/1 anyway.
    if isinstance(value, bool):
        return ValueType.BOOLEAN, _U64.pack(int(value))
    if isinstance(value, int):
        if not -(1 << 63) <= value < 1 << 63:
            raise LocalProtocolError(f"{value} does not fit in int64")
        return ValueType.INTEGER, _I64.pack(value)
    if isinstance(value, float):
        return ValueType.FLOAT, _F64.pack(value)
    if isinstance(value, str):
        return ValueType.TEXT, _text(value)
    if isinstance(value, bytes):
        return ValueType.BLOB, _U64.pack(len(value)) + _pad(value)
    if value is None:
        return ValueType.NULL, bytes(WORD)
    if isinstance(value, datetime):
        # 1.11 cannot take UNIXTIME as a parameter (its tuple decoder rejects type 9), so times go
        # as ISO 8601 text, as go-dqlite sends them. A naive time would be read back as UTC.
        if value.utcoffset() is None:
            raise LocalProtocolError("datetime parameters need a timezone")
        return ValueType.ISO8601, _text(value.isoformat(sep=" "))
    raise LocalProtocolError(f"cannot send a {type(value).__name__} as a parameter")


def _params(params: tuple[Value, ...]) -> bytes:
    # No tuple at all means "no parameters" (the server checks for an exhausted body).
    if not params:
        return b""
    if len(params) > MAX_PARAMS:
        raise LocalProtocolError(f"{len(params)} parameters; schema 0 allows at most {MAX_PARAMS}")
    encoded = [_param(value) for value in params]
    # The count byte is part of the header that is padded to a word.
    header = bytes([len(params), *(kind for kind, _ in encoded)])
    return _pad(header) + b"".join(data for _, data in encoded)


def _body(request: Request) -> tuple[int, bytes]:
    """The request type code and body."""
    match request:
        case Leader():
            return 0, _u64(0)
        case Client(id=client_id):
            return 1, _u64(client_id)
        case Open(name=name, flags=flags, vfs=vfs):
            return 3, _text(name) + _u64(flags) + _text(vfs)
        case ExecSql(db_id=db_id, sql=sql, params=params):
            return 8, _u64(db_id) + _text(sql) + _params(params)
        case QuerySql(db_id=db_id, sql=sql, params=params):
            return 9, _u64(db_id) + _text(sql) + _params(params)
        case Interrupt(db_id=db_id):
            return 10, _u64(db_id)
        case Add(id=node_id, address=address):
            return 12, _u64(node_id) + _text(address)
        case Assign(id=node_id, role=role):
            if role not in set(Role):
                raise LocalProtocolError(f"unknown role {role}")
            return 13, _u64(node_id) + _u64(role)
        case Remove(id=node_id):
            return 14, _u64(node_id)
        case Cluster(format=fmt):
            if fmt != 1:
                raise LocalProtocolError("only CLUSTER format 1 (with roles) can be decoded")
            return 16, _u64(fmt)
        case Transfer(id=node_id):
            return 17, _u64(node_id)
        case Describe(format=fmt):
            if fmt != 0:
                raise LocalProtocolError("DESCRIBE has only format 0")
            return 18, _u64(fmt)
    raise LocalProtocolError(f"not a request: {request!r}")


def encode(request: Request) -> bytes:
    """Header plus body of one request. Raises LocalProtocolError before anything is sent."""
    kind, body = _body(request)
    return _HEADER.pack(len(body) // WORD, kind, 0, 0) + body


# Decoding. ------------------------------------------------------------------------------------


class _Reader:
    """Reads fields from one message body; running short is the peer's fault."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._at = 0

    @property
    def remaining(self) -> int:
        return len(self._body) - self._at

    def take(self, size: int) -> bytes:
        if size > self.remaining:
            raise RemoteProtocolError("message body ends inside a field")
        chunk = self._body[self._at : self._at + size]
        self._at += size
        return chunk

    def peek_word(self) -> bytes:
        return self._body[self._at : self._at + WORD]

    def u64(self) -> int:
        value: int = _U64.unpack(self.take(WORD))[0]
        return value

    def i64(self) -> int:
        value: int = _I64.unpack(self.take(WORD))[0]
        return value

    def f64(self) -> float:
        value: float = _F64.unpack(self.take(WORD))[0]
        return value

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def text(self, errors: str = "strict") -> str:
        end = self._body.find(b"\0", self._at)
        if end < 0:
            raise RemoteProtocolError("text without its NUL terminator")
        raw = self.take(end + 1 - self._at)[:-1]
        self.take(-len(raw) - 1 & (WORD - 1))  # padding
        try:
            return raw.decode(errors=errors)
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"text is not UTF-8: {exc}") from None

    def blob(self) -> bytes:
        size = self.u64()
        data = self.take(size)
        # The padding is not zeroed by the server (it is whatever was in its buffer): skip it.
        self.take(-size % WORD)
        return data


def _unixtime(seconds: int) -> datetime | int:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return seconds  # outside datetime's range: keep the number rather than fail the row


def _iso8601(text: str) -> datetime | str | None:
    # The server sends NULL in a DATETIME column as "" (go-dqlite reads it as NULL, and so do we).
    if text == "":
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return text  # SQLite stores any text in a DATETIME column; keep what cannot be parsed
    # go-dqlite reads a time without an offset as UTC; the same here so times compare.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _value(kind: int, reader: _Reader) -> Value:
    if kind == ValueType.INTEGER:
        return reader.i64()
    if kind == ValueType.FLOAT:
        return reader.f64()
    if kind == ValueType.TEXT:
        return reader.text()
    if kind == ValueType.BLOB:
        return reader.blob()
    if kind == ValueType.NULL:
        reader.u64()
        return None
    if kind == ValueType.UNIXTIME:
        return _unixtime(reader.i64())
    if kind == ValueType.ISO8601:
        return _iso8601(reader.text())
    if kind == ValueType.BOOLEAN:
        return reader.u64() != 0
    raise RemoteProtocolError(f"unknown value type {kind}")


def _row(reader: _Reader, n: int) -> Row:
    # Row header: 4-bit type codes, even column in the low nibble, padded to a word.
    size = (n + 1) // 2
    header = reader.take(size + -size % WORD)
    kinds = [header[i // 2] >> 4 * (i % 2) & 0x0F for i in range(n)]
    return tuple(_value(kind, reader) for kind in kinds)


def _rows(reader: _Reader) -> Rows:
    count = reader.u64()
    # Each name takes at least a word; this bounds the loop before allocating anything.
    if count * WORD > reader.remaining:
        raise RemoteProtocolError(f"ROWS claims {count} columns in a {reader.remaining}-byte body")
    columns = tuple(reader.text() for _ in range(count))
    rows: list[Row] = []
    while True:
        word = reader.peek_word()
        if word in (_DONE, _PART):
            reader.u64()
            break
        if len(word) < WORD:
            raise RemoteProtocolError("ROWS without an end marker")
        if count == 0:
            raise RemoteProtocolError("ROWS without columns holds a row")  # also: no progress
        rows.append(_row(reader, count))
    if reader.remaining:
        raise RemoteProtocolError("bytes after the ROWS end marker")
    return Rows(columns, tuple(rows), done=word == _DONE)


def _servers(reader: _Reader) -> Servers:
    count = reader.u64()
    if count * 3 * WORD > reader.remaining:
        raise RemoteProtocolError(f"SERVERS claims {count} nodes in a {reader.remaining}-byte body")
    nodes = []
    for _ in range(count):
        node_id, address, role = reader.u64(), reader.text(), reader.u64()
        try:
            nodes.append(NodeInfo(node_id, address, Role(role)))
        except ValueError:
            raise RemoteProtocolError(f"unknown role {role}") from None
    return Servers(tuple(nodes))


def _db(reader: _Reader) -> Db:
    db_id = reader.u32()
    reader.u32()  # padding to the word
    return Db(db_id)


def _empty(reader: _Reader) -> Empty:
    reader.u64()  # the body is one unused word
    return Empty()


# Response type code -> body decoder. Fields a later protocol version might append after the known
# ones are ignored (the header's size keeps the framing right); ROWS must end at its marker.
_DECODERS: dict[int, Callable[[_Reader], Response]] = {
    0: lambda r: Failure(r.u64(), r.text(errors="replace")),
    1: lambda r: Server(r.u64(), r.text()),
    2: lambda r: Welcome(r.u64()),
    3: _servers,
    4: _db,
    6: lambda r: Result(r.u64(), r.u64()),
    7: _rows,
    8: _empty,
    10: lambda r: Metadata(r.u64(), r.u64()),
}


class Decoder:
    """Turns the server's byte stream into responses.

    Feed bytes with ``receive``; call ``next_message`` until it returns NEED_DATA. Each call
    either consumes a whole message or none. After a RemoteProtocolError the stream cannot be
    resynchronised, so every later call raises again.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._buffer = bytearray()
        self._max_body = max_body
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buffer)

    def receive(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> Response | _Sentinel:
        if self._error is not None:
            raise RemoteProtocolError(f"stream already failed: {self._error}")
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> Response | _Sentinel:
        if len(self._buffer) < _HEADER.size:
            return NEED_DATA
        words, kind, _schema, _unused = _HEADER.unpack_from(self._buffer)
        size = words * WORD
        if size > self._max_body:
            raise RemoteProtocolError(f"response body of {size} bytes exceeds {self._max_body}")
        decode = _DECODERS.get(kind)
        if decode is None:
            raise RemoteProtocolError(f"unknown response type {kind}")
        end = _HEADER.size + size
        if len(self._buffer) < end:
            return NEED_DATA
        body = bytes(self._buffer[_HEADER.size : end])
        del self._buffer[:end]
        message: Response = decode(_Reader(body))
        return message


# The conversation. ----------------------------------------------------------------------------

# Which success response answers each request; FAILURE may answer any of them.
_ANSWERS: dict[type[Request], type[Response]] = {
    Leader: Server,
    Client: Welcome,
    Open: Db,
    ExecSql: Result,
    QuerySql: Rows,
    Interrupt: Empty,
    Add: Empty,
    Assign: Empty,
    Remove: Empty,
    Cluster: Servers,
    Transfer: Empty,
    Describe: Metadata,
}


class Exchange:
    """One request and the response(s) to it.

    Feed each decoded message to ``receive`` until ``complete``; ``response`` is then the answer:
    a Failure, or the expected response. ROWS batches of a query are merged into one Rows.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.response: Response | None = None
        self._columns: tuple[str, ...] | None = None
        self._rows: list[Row] = []

    @property
    def complete(self) -> bool:
        return self.response is not None

    def receive(self, message: Response) -> None:
        if self.complete:
            raise RemoteProtocolError(f"{type(message).__name__} after the response was complete")
        # A query may fail after some batches were sent; the partial rows are dropped.
        if isinstance(message, Failure):
            self.response = message
            return
        expected = _ANSWERS[type(self.request)]
        if isinstance(message, Rows) and isinstance(self.request, Interrupt):
            return  # batches of the abandoned query still arrive before EMPTY
        if not isinstance(message, expected):
            raise RemoteProtocolError(
                f"{type(self.request).__name__} answered by {type(message).__name__}, expected {expected.__name__}"
            )
        if not isinstance(message, Rows):
            self.response = message
            return
        if self._columns is not None and message.columns != self._columns:
            raise RemoteProtocolError("ROWS batches of one query disagree on the columns")
        self._columns = message.columns
        self._rows.extend(message.rows)
        if message.done:
            self.response = Rows(message.columns, tuple(self._rows), done=True)
