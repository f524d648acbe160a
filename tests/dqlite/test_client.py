"""The asyncio client against real dqlite-demo nodes, and against peers that misbehave.

Live tests share one 3-node cluster per module and run in file order; the ones that move
leadership or membership come last and leave three voters behind.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from coordinator.dqlite import (
    Busy,
    ConnectionClosed,
    FailureError,
    NoLeader,
    NotLeader,
    OutcomeUnknown,
    RemoteProtocolError,
    Role,
    Timeout,
    connect,
    connect_leader,
    wire,
)

from .conftest import BOOTSTRAP_ID, ask, converse

T = TypeVar("T")
live = pytest.mark.dqlite


async def retry_busy(call: Callable[[], Awaitable[T]], within: float = 10.0) -> T:
    """Membership changes are refused with Busy while another one (maybe the demo app's) is pending."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except Busy:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


# Live: discovery and views. -------------------------------------------------------------------


def current_leader(addresses: list[str]) -> str:
    answer = ask(addresses[0], wire.Leader())
    assert isinstance(answer, wire.Server) and answer.address in addresses
    return answer.address


@live
async def test_discovery_from_a_follower_follows_the_redirect(addresses: list[str]) -> None:
    leader = current_leader(addresses)
    follower = next(address for address in addresses if address != leader)
    assert ask(follower, wire.Leader()) == ask(leader, wire.Leader())
    async with await connect_leader([follower], timeout=5) as conn:
        assert conn.address == leader
        assert (await conn.leader()).address == leader


@live
async def test_cluster_on_leader_and_follower(addresses: list[str]) -> None:
    leader = current_leader(addresses)
    follower = next(address for address in addresses if address != leader)
    async with (
        await connect(leader, timeout=2) as on_leader,
        await connect(follower, timeout=2) as on_follower,
    ):
        leader_view = await on_leader.cluster()
        follower_view = await on_follower.cluster()
    assert {node.address for node in leader_view} == set(addresses)
    assert all(node.role is Role.VOTER for node in leader_view)
    assert len({node.id for node in leader_view}) == 3
    # The bootstrapping node (the first started) always gets go-dqlite's fixed id.
    assert next(node.id for node in leader_view if node.address == addresses[0]) == BOOTSTRAP_ID
    assert sorted(follower_view, key=lambda n: n.id) == sorted(leader_view, key=lambda n: n.id)


@live
async def test_describe_on_any_node(addresses: list[str]) -> None:
    for address in addresses:
        async with await connect(address, timeout=2) as conn:
            assert await conn.describe() == wire.Metadata(failure_domain=0, weight=0)


# Live: SQL. ----------------------------------------------------------------------------------


@live
async def test_every_value_type_round_trips(addresses: list[str]) -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    async with await connect_leader(addresses, timeout=5) as conn:
        assert await conn.open("types") == 0
        await conn.exec(
            "CREATE TABLE v (i INTEGER, f REAL, t TEXT, b BLOB, n, iso DATETIME, unix TIMESTAMP, flag BOOLEAN)"
        )
        values = (-(1 << 63), 3.25, "héllo wörld", b"\x00\x01\xff" * 3, None, when, 1700000000, True)
        result = await conn.exec("INSERT INTO v VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)
        assert result == wire.Result(last_insert_id=1, rows_affected=1)
        await conn.exec("INSERT INTO v VALUES (1, 0.0, '', x'', NULL, NULL, NULL, NULL)")
        rows = await conn.query("SELECT * FROM v ORDER BY rowid")
    assert rows.columns == ("i", "f", "t", "b", "n", "iso", "unix", "flag")
    unix = dt.datetime.fromtimestamp(1700000000, dt.UTC)
    assert rows[0] == (-(1 << 63), 3.25, "héllo wörld", b"\x00\x01\xff" * 3, None, when, unix, True)
    # The engine sends NULL in a DATETIME column as "" (read back as None) and in a BOOLEAN one as 0.
    assert rows[1] == (1, 0.0, "", b"", None, None, None, False)


@live
async def test_paging_through_a_large_result(addresses: list[str]) -> None:
    async with await connect_leader(addresses, timeout=5) as conn:
        await conn.open("paging")
        await conn.exec("CREATE TABLE big (n INTEGER, label TEXT)")
        await conn.exec(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000) "
            "INSERT INTO big SELECT x, 'row ' || x FROM c"
        )
        await conn.exec("CREATE TABLE blob (b BLOB)")
        await conn.exec("INSERT INTO blob VALUES (?)", (bytes(range(256)) * 400,))
        rows = await conn.query("SELECT n, label FROM big ORDER BY n")
        assert rows.columns == ("n", "label")
        assert rows == [(n, f"row {n}") for n in range(1, 2001)]
        assert await conn.query("SELECT count(*) FROM big WHERE n > ?", (1990,)) == [(10,)]
        leader = conn.address
    # The same queries message by message: ~4 KiB batches, each repeating the columns; a row
    # larger than a page comes alone with PART, followed by an empty DONE batch.
    _, _, small, large = converse(
        leader,
        wire.Open("paging"),
        wire.Leader(),
        wire.QuerySql(0, "SELECT n, label FROM big"),
        wire.QuerySql(0, "SELECT b FROM blob"),
    )
    assert len(small) > 5 and all(isinstance(m, wire.Rows) and m.columns == ("n", "label") for m in small)
    assert [isinstance(m, wire.Rows) and m.done for m in small] == [False] * (len(small) - 1) + [True]
    assert [(len(m.rows), m.done) for m in large if isinstance(m, wire.Rows)] == [(1, False), (0, True)]


@live
async def test_failures_keep_the_connection_usable(addresses: list[str]) -> None:
    async with await connect_leader(addresses, timeout=5) as conn:
        await conn.open("failures")
        await conn.exec("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        await conn.exec("INSERT INTO u VALUES (1)")
        with pytest.raises(FailureError) as missing:
            await conn.query("SELECT * FROM nowhere")
        assert (missing.value.code, missing.value.message) == (1, "no such table: nowhere")
        with pytest.raises(FailureError) as duplicate:
            await conn.exec("INSERT INTO u VALUES (1)")
        assert duplicate.value.code == 1555  # SQLITE_CONSTRAINT_PRIMARYKEY; nothing applied
        with pytest.raises(FailureError, match="not an error"):
            await conn.query("CREATE TABLE never (a)")  # QUERY_SQL on DDL: refused and not run
        with pytest.raises(Busy):
            await conn.open("other")  # one database per connection
        assert await conn.query("SELECT name FROM sqlite_master WHERE name = 'never'") == []
        assert await conn.query("SELECT k FROM u") == [(1,)]
        assert not conn.closed


@live
async def test_follower_refuses_writes_and_reads_with_not_leader(addresses: list[str]) -> None:
    follower = next(address for address in addresses if address != current_leader(addresses))
    async with await connect(follower, timeout=2) as conn:
        await conn.open("demo")
        with pytest.raises(NotLeader) as refused:
            await conn.exec("CREATE TABLE t (a)")
        assert refused.value.code == 10250
        with pytest.raises(NotLeader):
            await conn.query("SELECT 1")
        with pytest.raises(NotLeader):
            await conn.remove(12345)
        assert len(await conn.cluster()) == 3  # still in step


# Live: leadership and membership (these change the cluster; keep them last). ------------------


@live
async def test_transfer_then_not_leader_and_rediscovery(addresses: list[str]) -> None:
    old = await connect_leader(addresses, timeout=5)
    async with old:
        await old.open("demo")
        target = next(node for node in await old.cluster() if node.address != old.address)
        await old.transfer(target.id)
        with pytest.raises(NotLeader):
            await old.exec("CREATE TABLE IF NOT EXISTS t (a)")
        async with await connect_leader(addresses, timeout=5) as new:
            assert new.address == target.address
            await new.open("demo")
            await new.exec("CREATE TABLE IF NOT EXISTS t (a)")


@live
async def test_remove_and_add_an_existing_follower(addresses: list[str]) -> None:
    async with await connect_leader(addresses, timeout=5) as conn:
        follower = next(node for node in await conn.cluster() if node.address != conn.address)
        await retry_busy(lambda: conn.remove(follower.id))
        assert follower.id not in {node.id for node in await conn.cluster()}
        await retry_busy(lambda: conn.add(follower.id, follower.address))
        back = {node.id: node for node in await conn.cluster()}[follower.id]
        assert back == wire.NodeInfo(follower.id, follower.address, Role.SPARE)
        # The node kept its data and Raft identity; the leader catches it up before it votes.
        await retry_busy(lambda: conn.assign(follower.id, Role.VOTER), within=15)

        async def three_voters() -> bool:
            return sum(node.role is Role.VOTER for node in await conn.cluster()) == 3

        await eventually(three_voters)


# Misbehaving peers. ---------------------------------------------------------------------------

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> int:
    header = await reader.readexactly(8)
    await reader.readexactly(int.from_bytes(header[:4], "little") * 8)
    return header[4]


async def closes_after_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(8)


async def answers_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(8)
    await _read_request(reader)
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    await reader.read()


async def sends_a_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
    await reader.read()


async def stalls_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(8)
    await _read_request(reader)
    writer.write(wire_header(words=3, kind=1) + bytes(8))  # a SERVER response, cut short
    await reader.read()  # until the client gives up


async def closes_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(8)
    await _read_request(reader)
    writer.write(wire_header(words=1, kind=8) + bytes(4))


def wire_header(words: int, kind: int) -> bytes:
    return words.to_bytes(4, "little") + bytes([kind, 0, 0, 0])


async def serve(behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def peer(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    server, address = await serve(request.param)
    async with server:
        yield address


TIMEOUT = 0.5


@pytest.mark.parametrize(
    ("peer", "error"),
    [
        (closes_after_handshake, ConnectionClosed),
        (closes_mid_response, ConnectionClosed),
        (answers_garbage, RemoteProtocolError),
        (sends_a_banner, RemoteProtocolError),
        (stalls_mid_response, Timeout),
    ],
    indirect=["peer"],
)
async def test_bad_peers_give_a_typed_error_in_time(peer: str, error: type[Exception]) -> None:
    conn = await connect(peer, timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(error):
        await conn.cluster()
    assert time.monotonic() - started < TIMEOUT + 0.3
    assert conn.closed  # out of step: never reused
    with pytest.raises(ConnectionClosed):
        await conn.leader()


@pytest.mark.parametrize("peer", [stalls_mid_response, closes_mid_response], indirect=True)
async def test_a_write_without_a_definite_answer_is_outcome_unknown(peer: str) -> None:
    async with await connect(peer, timeout=TIMEOUT) as conn:
        with pytest.raises(OutcomeUnknown) as unknown:
            await conn.remove(7)
    assert isinstance(unknown.value.__cause__, Timeout | ConnectionClosed)


@pytest.mark.parametrize("peer", [stalls_mid_response], indirect=True)
async def test_cancellation_mid_response_closes_the_connection(peer: str) -> None:
    conn = await connect(peer, timeout=5)
    call = asyncio.create_task(conn.leader())
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert conn.closed


@pytest.mark.parametrize("peer", [stalls_mid_response], indirect=True)
async def test_waiting_for_the_lock_times_out_without_closing(peer: str) -> None:
    conn = await connect(peer, timeout=5)
    first = asyncio.create_task(conn.leader(timeout=0.6))
    await asyncio.sleep(0.1)
    with pytest.raises(Timeout, match="waited"):
        await conn.leader(timeout=0.1)
    assert not conn.closed  # nothing was sent, so it is still in step
    with pytest.raises(Timeout):
        await first
    assert conn.closed


async def test_unreachable_nodes_give_no_leader_in_time() -> None:
    server, silent = await serve(closes_after_handshake)
    async with server:
        with pytest.raises(ConnectionClosed):
            await connect("127.0.0.1:1", timeout=TIMEOUT)
        spent = time.monotonic()
        with pytest.raises(NoLeader) as none:
            await connect_leader(["127.0.0.1:1", silent], timeout=TIMEOUT)
        assert time.monotonic() - spent < TIMEOUT + 0.3
        assert set(none.value.attempts) == {"127.0.0.1:1", silent}


# TLS: a fake node that answers LEADER (naming itself) and CLIENT, behind mutual TLS. -----------


async def answers_as_leader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(8)
    address = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
    while True:
        kind = await _read_request(reader)
        text = address.encode() + b"\0"
        text += bytes(-len(text) % 8)
        body = {0: (7).to_bytes(8, "little") + text, 1: (15000).to_bytes(8, "little")}[kind]
        writer.write(wire_header(len(body) // 8, {0: 1, 1: 2}[kind]) + body)


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    options = (
        "-x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -addext subjectAltName=IP:127.0.0.1"
    )
    subprocess.run(
        ["openssl", "req", *options.split(), "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    server_cert, server_key = make_certificate(tmp_path, "node")
    client_cert, client_key = make_certificate(tmp_path, "coordinator")
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(server_cert, server_key)
    server_side.verify_mode = ssl.CERT_REQUIRED
    server_side.load_verify_locations(client_cert)
    client_side = ssl.create_default_context(cafile=str(server_cert))
    client_side.load_cert_chain(client_cert, client_key)
    server, address = await serve(answers_as_leader, tls=server_side)
    async with server:
        async with await connect_leader([address], timeout=2, ssl=client_side) as conn:
            assert (await conn.leader()) == wire.Server(7, address)
        anonymous = ssl.create_default_context(cafile=str(server_cert))
        with pytest.raises(NoLeader):  # the node refuses a client without a certificate
            await connect_leader([address], timeout=0.5, ssl=anonymous)
