"""The `dqlite` backend's readers against real 3-node TLS clusters of the project's Go test node.

One cluster serves the module's read-only tests (the leadership transfer leaves three voters behind); the
tests that kill nodes start their own. Everything runs in one module-scoped event loop, so that the module's
cluster can be prepared with the asyncio client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from coordinator import pki
from coordinator.agent.dqlite_sources import close_readers, dqlite_backend
from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.sources import SourceReader
from coordinator.core.model import MemberRecord, Role, Source, SourceReport
from coordinator.dqlite import connect_leader
from coordinator.lab.dqlite_nodes import node_binary
from tests.dqlite_cluster import (
    DATABASE,
    Cluster,
    Member,
    eventually,
    hang,
    kill,
    prepare,
    resume,
    start_cluster,
)

Test = TypeVar("Test", bound=Callable[..., Any])


def live(test: Test) -> Test:
    """A test on real nodes, run in the module's event loop (where the module's cluster was prepared)."""
    marked: Test = pytest.mark.dqlite(pytest.mark.asyncio(loop_scope="module")(test))
    return marked


TIMEOUT = 1.0
# A read may overrun its timeout by the time the event loop takes to notice it.
SLACK = 0.15

Readers = dict[Source, SourceReader]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("dqlite"))
    try:
        await prepare(running)
        yield running
    finally:
        running.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def own_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A cluster of the test's own, for tests that kill nodes."""
    running = start_cluster(tmp_path)
    try:
        await prepare(running)
        yield running
    finally:
        running.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def agent() -> AsyncIterator[Callable[..., Readers]]:
    """Makes a member's agent readers (Member.readers' arguments) and closes their connections afterwards."""
    made: list[Readers] = []

    def make(member: Member, **options: Any) -> Readers:
        made.append(member.readers(**options))
        return made[-1]

    yield make
    for readers in made:
        await close_readers(readers.values())


async def read(reader: SourceReader, *, include_certificates: bool = False) -> tuple[SourceReport, float]:
    """The report and how long the read took."""
    start = time.monotonic()
    report = await reader.read(include_certificates=include_certificates)
    return report, time.monotonic() - start


async def leader_of(cluster: Cluster, member: Member) -> Member:
    async with await connect_leader(cluster.addresses, timeout=5, ssl=member.tls_context()) as connection:
        return cluster.by_address(connection.address)


def table_records(cluster: Cluster) -> tuple[MemberRecord, ...]:
    return tuple(
        MemberRecord(
            name=member.name,
            address=member.address,
            certificate_fingerprint=member.identity.fingerprint,
            role=Role.VOTER,
            role_text="voter",
            entry=f"row {row}",
        )
        for row, member in enumerate(cluster.members.values(), start=1)
    )


def raft_facts(report: SourceReport) -> set[tuple[int, str, Role | None]]:
    assert not report.error, report.error
    return {(record.node_id, record.address, record.role) for record in report.records}


def all_voters(cluster: Cluster) -> set[tuple[int, str, Role | None]]:
    return {(member.node_id, member.address, Role.VOTER) for member in cluster.members.values()}


@pytest.mark.dqlite
def test_the_test_node_is_built() -> None:
    """Fails, rather than skips, where the Go node is missing: every claim about real dqlite rests on it."""
    assert node_binary().name == "memberguard-dqlite-node"


@live
async def test_every_source_on_every_node(cluster: Cluster, agent: Callable[..., Readers]) -> None:
    leader = await leader_of(cluster, cluster.members["n1"])
    for member in cluster.members.values():
        readers = agent(member)

        table, took = await read(readers[Source.MEMBERS_TABLE], include_certificates=True)
        assert not table.error and not table.invalid_entries
        assert table.records == table_records(cluster)
        assert [r.certificate_pem for r in table.records] == [
            m.identity.certificate_pem.decode() for m in cluster.members.values()
        ]
        assert took < TIMEOUT

        config, took = await read(readers[Source.RAFT_CONFIG])
        assert raft_facts(config) == all_voters(cluster)  # the IDs are the ready lines'
        assert config.leader_address == leader.address
        assert took < TIMEOUT

        view, took = await read(readers[Source.RAFT_NODE_VIEW])
        assert raft_facts(view) == all_voters(cluster)  # a voter's own copy: in step
        assert not view.leader_address and took < TIMEOUT

        info, _ = await read(readers[Source.NODE_INFO])
        assert raft_facts(info) == {(member.node_id, member.address, Role.VOTER)}

        trust, _ = await read(readers[Source.TRUSTSTORE])
        assert not trust.error and not trust.invalid_entries
        assert {(r.name, r.address, r.certificate_fingerprint) for r in trust.records} == {
            (m.name, m.address, m.identity.fingerprint) for m in cluster.members.values()
        }

        # cluster.yaml is rewritten from the leader's answer on each role-adjustment tick (1 s here); right
        # after a join it may still hold the joiner as the spare it joined as.
        async def cached(reader: SourceReader = readers[Source.RAFT_CACHE]) -> bool:
            report = await reader.read(include_certificates=False)
            return raft_facts(report) == all_voters(cluster)

        await eventually(cached, within=5)


@live
async def test_concurrent_reads_of_one_agent(cluster: Cluster, agent: Callable[..., Readers]) -> None:
    """Reads that share the leader connection take turns on it: no answer is taken for another's."""
    readers = agent(cluster.members["n2"])
    for _ in range(20):
        reports = await asyncio.gather(*(reader.read(include_certificates=False) for reader in readers.values()))
        assert [report.error for report in reports] == [""] * len(reports)
        by_source = {report.source: report for report in reports}
        assert by_source[Source.MEMBERS_TABLE].records == table_records(cluster)
        assert raft_facts(by_source[Source.RAFT_CONFIG]) == all_voters(cluster)


@live
async def test_a_plain_tcp_agent_against_tls_nodes_gets_typed_errors(
    cluster: Cluster, agent: Callable[..., Readers], tmp_path: Path
) -> None:
    stranger = pki.make_identity("stranger")
    cert, key = pki.write_identity(tmp_path, stranger)
    untrusted = partial(client_ssl_context, cert, key, cluster.members["n1"].tls.truststore)
    timeout = 0.5  # leader discovery goes on trying until its time is up: an election may be under way
    for options in ({"tls": False}, {"context": untrusted}):
        readers = agent(cluster.members["n1"], timeout=timeout, **options)
        for source in (Source.MEMBERS_TABLE, Source.RAFT_CONFIG, Source.RAFT_NODE_VIEW):
            report, took = await read(readers[source])
            assert not report.records and took < timeout + SLACK
            # The node's TLS proxy drops the connection; which typed error names it depends on when it does.
            assert any(name in report.error for name in ("Unreachable", "ConnectionClosed", "RemoteProtocolError")), (
                report.error
            )
            if source is not Source.RAFT_NODE_VIEW:
                assert report.error.startswith("no leader"), report.error


@live
async def test_the_leader_connection_follows_a_leadership_transfer(
    cluster: Cluster, agent: Callable[..., Readers]
) -> None:
    member = cluster.members["n3"]
    readers = agent(member)
    before, _ = await read(readers[Source.RAFT_CONFIG])
    old = cluster.by_address(before.leader_address)
    new = next(m for m in cluster.members.values() if m is not old)
    async with await connect_leader(cluster.addresses, timeout=5, ssl=member.tls_context()) as connection:
        await connection.transfer(new.node_id)

    # The kept connection now gets "not leader": dropped, the leader found again, within the same read.
    table, took = await read(readers[Source.MEMBERS_TABLE])
    assert not table.error and table.records == table_records(cluster) and took < TIMEOUT
    config, _ = await read(readers[Source.RAFT_CONFIG])
    assert config.leader_address == new.address
    assert raft_facts(config) == all_voters(cluster)


async def test_a_silent_peer_is_a_timeout_report(tmp_path: Path) -> None:
    """A peer that accepts and never answers (nor completes a TLS handshake) costs one timeout, no more."""
    timeout = 0.3
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    cert, key = pki.write_identity(tmp_path, pki.make_identity("n1"))
    (tmp_path / "database").mkdir()
    async with server:
        for context in (None, partial(client_ssl_context, cert, key, tmp_path / "truststore")):
            readers = dqlite_backend(
                state_dir=tmp_path,
                data_dir=tmp_path / "database",
                address=address,
                database=DATABASE,
                ssl=context,
                timeout=timeout,
            )
            try:
                for reader in readers:
                    if reader.source in (Source.MEMBERS_TABLE, Source.RAFT_CONFIG, Source.RAFT_NODE_VIEW):
                        report, took = await read(reader)
                        assert "timeout" in report.error.lower() and not report.records, report.error
                        assert timeout * 0.5 < took < timeout + SLACK
            finally:
                await close_readers(readers)
        for writer in accepted:
            writer.close()
            await writer.wait_closed()


@live
async def test_a_killed_follower_then_a_lost_quorum(own_cluster: Cluster, agent: Callable[..., Readers]) -> None:
    cluster = own_cluster
    leader = await leader_of(cluster, cluster.members["n1"])
    follower, survivor = (m for m in cluster.members.values() if m is not leader)
    mine, theirs = agent(follower), agent(survivor)
    for readers in (mine, theirs):  # every connection is kept from here on
        for reader in readers.values():
            assert not (await read(reader))[0].error

    kill(follower)
    # Its own node is gone: its view is an error, at once.
    view, took = await read(mine[Source.RAFT_NODE_VIEW])
    assert view.error.startswith("Unreachable") and not view.records and took < TIMEOUT + SLACK
    # Its agent still reads the leader: over the kept connection, and from scratch through the addresses in
    # its cluster.yaml. The leader keeps the dead node as a voter (there is no spare to replace it with).
    for readers in (mine, agent(follower), theirs):
        table, took = await read(readers[Source.MEMBERS_TABLE])
        assert not table.error and table.records == table_records(cluster) and took < TIMEOUT
        config, _ = await read(readers[Source.RAFT_CONFIG])
        assert raft_facts(config) == all_voters(cluster) and config.leader_address == leader.address

    kill(leader)
    # One voter of three: no quorum, no leader. Every read is an error within its timeout, never a hang.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for source in (Source.MEMBERS_TABLE, Source.RAFT_CONFIG):
            report, took = await read(theirs[source])
            assert report.error and not report.records, report
            assert took < TIMEOUT + SLACK
    view, _ = await read(theirs[Source.RAFT_NODE_VIEW])
    assert raft_facts(view) == all_voters(cluster)  # its own copy does not change without a leader


@live
async def test_a_new_leader_after_the_leader_is_killed(own_cluster: Cluster, agent: Callable[..., Readers]) -> None:
    cluster = own_cluster
    leader = await leader_of(cluster, cluster.members["n1"])
    survivor = next(m for m in cluster.members.values() if m is not leader)
    readers = agent(survivor)
    assert (await read(readers[Source.RAFT_CONFIG]))[0].leader_address == leader.address

    kill(leader)
    took = await eventually(lambda: names_a_new_leader(readers[Source.RAFT_CONFIG], leader), within=10)
    print(f"a new leader read {took:.2f}s after the leader was killed")
    table, _ = await read(readers[Source.MEMBERS_TABLE])
    assert table.records == table_records(cluster)


@live
async def test_a_hung_leader(own_cluster: Cluster, agent: Callable[..., Readers]) -> None:
    """A stopped process keeps its sockets: connecting works, answers never come. Its own agent's view times
    out; the others' kept leader connections time out, and discovery does not wait on the hung node."""
    cluster = own_cluster
    leader = await leader_of(cluster, cluster.members["n1"])
    other = next(m for m in cluster.members.values() if m is not leader)
    own, theirs = agent(leader), agent(other)
    for readers in (own, theirs):
        for reader in readers.values():
            assert not (await read(reader))[0].error

    hang(leader)
    try:
        view, took = await read(own[Source.RAFT_NODE_VIEW])
        assert "timeout" in view.error and took < TIMEOUT + SLACK
        took = await eventually(lambda: names_a_new_leader(theirs[Source.RAFT_CONFIG], leader), within=10)
        print(f"a new leader read {took:.2f}s after the leader hung")
        config, _ = await read(theirs[Source.RAFT_CONFIG])
        assert raft_facts(config) == all_voters(cluster)  # the hung node is still a voter
        # A fresh agent's discovery also asks the hung node (its cluster.yaml lists it), without waiting for it.
        table, took = await read(agent(other)[Source.MEMBERS_TABLE])
        assert table.records == table_records(cluster) and took < TIMEOUT / 2
    finally:
        resume(leader)


async def names_a_new_leader(reader: SourceReader, old: Member) -> bool:
    report, took = await read(reader)
    assert took < TIMEOUT + SLACK
    return report.leader_address not in ("", old.address)
