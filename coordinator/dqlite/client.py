"""A thin asyncio transport under the sans-I/O codec in wire.py, plus leader discovery.

This module only moves bytes and maps outcomes to typed errors; what is a legal answer and when
an answer is complete is decided by ``wire.Exchange``.

Rules it keeps:
* one request in flight per connection (the protocol has no request ids), under a lock;
* every call has a deadline; if it expires or the call is cancelled after the request was
  written, the connection is closed, because unread response bytes would be taken for the
  answer to the next request;
* a write (EXEC, ADD, ASSIGN, REMOVE, TRANSFER) that may have reached the server but has no
  definite answer raises OutcomeUnknown, never a retryable error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from coordinator.dqlite import wire
from coordinator.dqlite.errors import (
    ConnectionClosed,
    DqliteError,
    LeadershipLost,
    NoLeader,
    OutcomeUnknown,
    RemoteProtocolError,
    Timeout,
    Unreachable,
    failure_error,
)

_READ_SIZE = 64 * 1024
# Leader discovery: rounds over all addresses back off like go-dqlite's connector.
_BACKOFF_START = 0.05
_BACKOFF_CAP = 1.0

_R = TypeVar("_R", bound=wire.Response)
_T = TypeVar("_T")

# How leader discovery opens a connection to an address, within a timeout: `connect` by default.
Dial = Callable[[str, float], Awaitable["Connection"]]


class Rowset(list[wire.Row]):
    """The rows of a query, with the column names."""

    def __init__(self, columns: tuple[str, ...], rows: Iterable[wire.Row]) -> None:
        super().__init__(rows)
        self.columns = columns


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionClosed(f"cannot connect to {address!r}: not a host:port address")
    return host.removeprefix("[").removesuffix("]"), int(port)


class Stream:
    """A non-blocking socket, plain or TLS, driven by the event loop's readiness callbacks.

    Not asyncio's streams: over TLS their SSL protocol (Python code between two memory buffers) costs ~0.25 ms a
    round trip, which put a kept connection's CLUSTER at 2.5x go-dqlite's; the ssl module's own socket does not.
    A caller that must talk on the stream before dqlite does (an HTTP upgrade) uses send and recv itself, then
    hands the stream to ``connect_stream``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, host: str, port: int, ssl: _ssl.SSLContext | None) -> Stream:
        loop = asyncio.get_running_loop()
        try:
            # Cluster addresses are IPs: skip getaddrinfo, which asyncio runs in a thread.
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            target: tuple[Any, ...] = (host, port)
        except ValueError:
            family, _, _, _, target = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
        raw = sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(raw, target)
            sock = raw if ssl is None else ssl.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
            opened = cls(sock)
            if isinstance(sock, _ssl.SSLSocket):
                await opened._retry(sock.do_handshake)
        except BaseException:
            sock.close()  # an SSLSocket takes the descriptor over from the plain one it wraps
            raise
        return opened

    async def _retry(self, operation: Callable[[], _T]) -> _T:
        """Runs operation until the socket is ready for it; TLS may need to read in order to write, or back."""
        while True:
            try:
                return operation()
            except (BlockingIOError, _ssl.SSLWantReadError):
                await self._ready(self._loop.add_reader, self._loop.remove_reader)
            except _ssl.SSLWantWriteError:
                await self._ready(self._loop.add_writer, self._loop.remove_writer)

    async def _ready(self, add: Callable[..., object], remove: Callable[[int], object]) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = self._sock.fileno()
        add(fd, wake)
        try:
            await ready
        finally:
            remove(fd)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._retry(lambda chunk=view: self._sock.send(chunk))  # type: ignore[misc]
            view = view[sent:]

    async def recv(self) -> bytes:
        """What has arrived, at least one byte; b"" once the peer has closed the stream."""
        try:
            return await self._retry(lambda: self._sock.recv(_READ_SIZE))
        except (_ssl.SSLZeroReturnError, _ssl.SSLEOFError):
            return b""

    def close(self) -> None:
        self._sock.close()


async def open_stream(address: str, *, timeout: float, ssl: _ssl.SSLContext | None = None) -> Stream:
    """Dial ``address`` ("host:port"), with the TLS handshake done when ``ssl`` is given, within ``timeout``."""
    host, port = _split_address(address)
    try:
        async with asyncio.timeout(timeout):
            return await Stream.open(host, port, ssl)
    except TimeoutError:
        raise Timeout(f"connecting to {address} took more than {timeout}s") from None
    except OSError as exc:
        raise Unreachable(f"cannot connect to {address}: {exc}") from exc


async def connect(address: str, *, timeout: float, ssl: _ssl.SSLContext | None = None) -> Connection:
    """Dial ``address`` ("host:port") and send the handshake.

    ``timeout`` bounds the dial and is the default for every later call on the connection. The
    server does not answer the handshake; a peer that is not dqlite shows up on the first call.
    """
    return await connect_stream(await open_stream(address, timeout=timeout, ssl=ssl), address, timeout=timeout)


async def connect_stream(stream: Stream, address: str, *, timeout: float) -> Connection:
    """A connection on an open ``stream`` to the node at ``address``: sends the handshake. The connection owns the
    stream from here on, and closes it if the handshake cannot be sent. ``timeout`` is as for ``connect``."""
    connection = Connection(stream, address, timeout)
    try:
        async with asyncio.timeout(timeout):
            await connection._send(wire.encode_handshake())
    except TimeoutError:
        connection._abort()
        raise Timeout(f"sending the handshake to {address} took more than {timeout}s") from None
    except ConnectionClosed:
        connection._abort()
        raise
    return connection


class Connection:
    """A client connection to one dqlite node. Use ``connect``, ``connect_leader`` or ``connect_stream``.

    Every method takes ``timeout`` in seconds; None means the connection's ``timeout``.
    """

    def __init__(self, sock: Stream, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self.db_id = 0  # the server has one database per connection, and its id is always 0
        self._sock = sock
        self._decoder = wire.Decoder()
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # No TLS close_notify: the server needs none, and a broken peer would never answer one.
        self._sock.close()

    def _abort(self) -> None:
        """Drop the connection at once: it is out of step with the server."""
        self._closed = True
        self._sock.close()

    async def _send(self, data: bytes) -> None:
        try:
            await self._sock.send(data)
        except OSError as exc:
            raise ConnectionClosed(f"{self.address}: {exc}") from exc

    async def _next_message(self) -> wire.Response:
        while (message := self._decoder.next_message()) is wire.NEED_DATA:
            try:
                data = await self._sock.recv()
            except OSError as exc:
                raise ConnectionClosed(f"{self.address}: {exc}") from exc
            if not data:
                where = " in the middle of a response" if self._decoder.buffered else ""
                raise ConnectionClosed(f"{self.address} closed the connection{where}")
            self._decoder.receive(data)
        return message

    async def _call(
        self, request: wire.Request, expected: type[_R], timeout: float | None, *, write: bool = False
    ) -> _R:
        data = wire.encode(request)  # a LocalProtocolError is raised before anything is sent
        limit = self.timeout if timeout is None else timeout
        name = type(request).__name__.upper()
        exchange = wire.Exchange(request)
        sent = False
        try:
            async with asyncio.timeout(limit), self._lock:
                if self._closed:
                    raise ConnectionClosed(f"connection to {self.address} is closed")
                sent = True
                await self._send(data)
                while not exchange.complete:
                    exchange.receive(await self._next_message())
                if self._decoder.buffered:
                    raise RemoteProtocolError(f"unsolicited bytes after the {name} response")
        except asyncio.CancelledError:
            if sent:
                self._abort()
            raise
        except (TimeoutError, DqliteError) as exc:
            if not sent:  # nothing written: the connection is still in step
                if isinstance(exc, TimeoutError):
                    raise Timeout(f"{name} waited more than {limit}s for the connection") from None
                raise
            self._abort()
            error = exc if isinstance(exc, DqliteError) else Timeout(f"{name} got no complete answer in {limit}s")
            if write:
                raise OutcomeUnknown(f"{name} to {self.address} may or may not have been applied") from error
            if error is exc:
                raise
            raise error from None
        response = exchange.response
        if isinstance(response, wire.Failure):
            failure = failure_error(response.code, response.message)
            if write and isinstance(failure, LeadershipLost):
                # The entry may be in the log and be committed by the next leader.
                raise OutcomeUnknown(f"{name} to {self.address}: leadership lost") from failure
            raise failure
        assert isinstance(response, expected)  # Exchange admits only this or a Failure
        return response

    async def leader(self, *, timeout: float | None = None) -> wire.Server:
        """Who this node thinks leads; ``address == ""`` if it does not know or is not a voter."""
        return await self._call(wire.Leader(), wire.Server, timeout)

    async def client(self, client_id: int, *, timeout: float | None = None) -> int:
        """Register as client ``client_id``; returns the server's heartbeat timeout (ms)."""
        welcome = await self._call(wire.Client(client_id), wire.Welcome, timeout)
        return welcome.heartbeat_timeout

    async def open(self, name: str, *, timeout: float | None = None) -> int:
        """Open database ``name``; one per connection (a second OPEN fails with Busy)."""
        db = await self._call(wire.Open(name), wire.Db, timeout)
        self.db_id = db.id
        return db.id

    async def exec(self, sql: str, params: Sequence[wire.Value] = (), *, timeout: float | None = None) -> wire.Result:
        """Run statements with no result set on the leader. Params bind to the first statement."""
        request = wire.ExecSql(self.db_id, sql, tuple(params))
        return await self._call(request, wire.Result, timeout, write=True)

    async def query(self, sql: str, params: Sequence[wire.Value] = (), *, timeout: float | None = None) -> Rowset:
        """Run one statement with result columns on the leader and read every batch."""
        request = wire.QuerySql(self.db_id, sql, tuple(params))
        rows = await self._call(request, wire.Rows, timeout)
        return Rowset(rows.columns, rows.rows)

    async def cluster(self, *, timeout: float | None = None) -> list[wire.NodeInfo]:
        """This node's own view of the Raft configuration (only the leader's is authoritative)."""
        servers = await self._call(wire.Cluster(), wire.Servers, timeout)
        return list(servers.nodes)

    async def describe(self, *, timeout: float | None = None) -> wire.Metadata:
        return await self._call(wire.Describe(), wire.Metadata, timeout)

    async def add(self, node_id: int, address: str, *, timeout: float | None = None) -> None:
        """Add a node to the configuration; it joins as spare."""
        await self._call(wire.Add(node_id, address), wire.Empty, timeout, write=True)

    async def assign(self, node_id: int, role: wire.Role, *, timeout: float | None = None) -> None:
        """Change a node's role. To voter, the leader first catches the node up (can take seconds)."""
        await self._call(wire.Assign(node_id, role), wire.Empty, timeout, write=True)

    async def remove(self, node_id: int, *, timeout: float | None = None) -> None:
        await self._call(wire.Remove(node_id), wire.Empty, timeout, write=True)

    async def transfer(self, node_id: int, *, timeout: float | None = None) -> None:
        """Hand leadership to voter ``node_id``; afterwards this connection gets NotLeader."""
        await self._call(wire.Transfer(node_id), wire.Empty, timeout, write=True)


def _connecting(ssl: _ssl.SSLContext | None) -> Dial:
    async def dial(address: str, timeout: float) -> Connection:
        return await connect(address, timeout=timeout, ssl=ssl)

    return dial


async def _probe(address: str, timeout: float, dial: Dial, client_id: int) -> Connection | str:
    """One go-dqlite style attempt: the connection if ``address`` leads, else the leader it names."""
    conn = await dial(address, timeout)
    try:
        leader = await conn.leader()
        if leader.address != address:
            await conn.close()
            return leader.address
        await conn.client(client_id)
    except BaseException:
        await conn.close()
        raise
    return conn


async def connect_leader(
    addresses: Sequence[str],
    *,
    timeout: float,
    ssl: _ssl.SSLContext | None = None,
    client_id: int = 0,
    max_redirects: int = 2,
    dial: Dial | None = None,
) -> Connection:
    """Find the leader among ``addresses`` and return a connection to it.

    Like go-dqlite's connector: ask each node for the leader; "" means ask the next one; the
    dialled address itself means this is the leader (an exact string match, so list addresses
    as the nodes spell them); any other address is dialled in turn, at most ``max_redirects``
    hops. Rounds repeat with backoff (an election may be under way) until ``timeout`` seconds
    have passed, then NoLeader; but a round in which no address could be reached at all ends the
    search at once: nothing listens, so no election is under way (a node that has not started its
    engine yet would otherwise wait out its whole timeout on every read). The returned connection's
    default call timeout is ``timeout``. ``dial(address, timeout)`` opens each connection, for nodes reached
    otherwise than by ``connect`` (``ssl`` is then unused); an Unreachable from it counts as nothing listening.
    """
    opener = dial if dial is not None else _connecting(ssl)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    attempts: dict[str, str] = {}
    backoff = _BACKOFF_START
    while True:
        reached = False
        for start in addresses:
            target, hops = start, 0
            while (remaining := deadline - loop.time()) > 0:
                try:
                    found = await _probe(target, remaining, opener, client_id)
                except DqliteError as exc:
                    attempts[target] = f"{type(exc).__name__}: {exc}"
                    reached = reached or not isinstance(exc, Unreachable)
                    break
                reached = True
                if isinstance(found, Connection):
                    found.timeout = timeout
                    return found
                if not found:
                    attempts[target] = "does not know the leader"
                    break
                attempts[target] = f"named {found} as leader"
                if hops == max_redirects:
                    break
                target, hops = found, hops + 1
        remaining = deadline - loop.time()
        if not reached:
            raise NoLeader(f"none of {list(addresses)} could be reached", attempts)
        if remaining <= 0:
            raise NoLeader(f"no leader found among {list(addresses)} within {timeout}s", attempts)
        await asyncio.sleep(min(backoff, remaining))
        backoff = min(backoff * 2, _BACKOFF_CAP)
