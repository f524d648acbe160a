"""Scenarios on the real engine: a dqlite lab (real dqlite nodes over TLS, agents on the `dqlite` backend, the
coordinator), made to diverge for real, checked through the coordinator.

The engine moves on its own (go-dqlite's role adjuster, cache rewrites every tick), so each test waits until
the BLOCKING and WARNING discrepancies are exactly the expected ones; INFO-level lag may come and go.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from memberguard import Client
from memberguard.v1 import membership_pb2 as pb

from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.dqlite import Connection, Role, connect_leader
from coordinator.lab import lab as labs
from coordinator.lab.dqlite_cluster import DATABASE, MemberSpec, start_members
from coordinator.lab.dqlite_nodes import NodeTls, stop_node
from coordinator.lab.ports import loopback_addresses

pytestmark = pytest.mark.dqlite

Fact = tuple[str, str, str, str]  # (kind, severity, source, node) with the enum prefixes dropped


@pytest.fixture
def dqlite_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3, backend="dqlite")
    yield running
    labs.down(running.dir)
    assert [pid for pid in running.pids() if _alive(pid)] == [], "lab down left processes running"


async def _leader(lab: labs.Lab, *, timeout: float = 10.0) -> Connection:
    state = Path(lab.node("n1")["state_dir"])
    context = client_ssl_context(state / "server.crt", state / "server.key", state / "truststore")
    live = [n["dqlite"]["address"] for n in lab.document["nodes"] if _alive(n["dqlite"]["pid"])]
    return await connect_leader(live, timeout=timeout, ssl=context)


def _sql(lab: labs.Lab, sql: str, *params: Any) -> None:
    async def run() -> None:
        async with await _leader(lab) as connection:
            await connection.open(DATABASE)
            await connection.exec(sql, params)

    asyncio.run(run())


def _leader_address(lab: labs.Lab) -> str:
    async def run() -> str:
        async with await _leader(lab) as connection:
            return (await connection.leader()).address

    return asyncio.run(run())


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _serious(diff: pb.MembershipDiff) -> list[Fact]:
    return sorted(
        (
            pb.DiscrepancyKind.Name(x.kind).removeprefix("DISCREPANCY_KIND_"),
            pb.Severity.Name(x.severity).removeprefix("SEVERITY_"),
            pb.Source.Name(x.source).removeprefix("SOURCE_"),
            x.node,
        )
        for x in diff.discrepancies
        if x.severity != pb.SEVERITY_INFO
    )


def _settles_on(
    client: Client, expected: list[Fact], *, within: float = 15.0, maybe: frozenset[Fact] = frozenset()
) -> pb.MembershipDiff:
    """Checks until the non-INFO discrepancies are exactly `expected`, give or take those in `maybe`; fails with
    the last ones seen."""
    deadline = time.monotonic() + within
    while True:
        diff = client.check_membership(timeout=10).diff
        if [fact for fact in _serious(diff) if fact not in maybe] == sorted(expected):
            return diff
        if time.monotonic() > deadline:
            pytest.fail(f"after {within:g} s the diff still has {_serious(diff)}, not {sorted(expected)}")
        time.sleep(0.2)


def _dead_engines_cache(node: str) -> frozenset[Fact]:
    # A dead engine rewrites its cluster.yaml no more: if it died before its first role-adjustment tick, the file
    # still holds the join list and is, rightly, a stale cache.
    return frozenset({("VIEW_DIFFERS", "WARNING", "RAFT_CACHE", node)})


def test_a_dqlite_lab_is_consistent_and_reads_the_engine(dqlite_lab: labs.Lab) -> None:
    with Client(dqlite_lab.endpoint) as client:
        diff = _settles_on(client, [])
    assert dqlite_lab.document["dqlite_database"] == DATABASE
    members = {m.name: m for m in diff.members}
    assert sorted(members) == ["n1", "n2", "n3"]
    assert members["n1"].node_id == labs.BOOTSTRAP_ID, "the bootstrap node has dqlite's fixed bootstrap ID"
    assert len({m.node_id for m in diff.members}) == 3
    for node in dqlite_lab.document["nodes"]:
        assert members[node["name"]].address == node["dqlite"]["address"]
        assert (Path(node["dqlite"]["data_dir"]) / "info.yaml").exists()


def test_s6_a_deleted_row_of_a_raft_member(dqlite_lab: labs.Lab) -> None:
    _sql(dqlite_lab, "DELETE FROM core_cluster_members WHERE name = ?", "n2")
    with Client(dqlite_lab.endpoint) as client:
        diff = _settles_on(client, [("MISSING", "BLOCKING", "MEMBERS_TABLE", "")])
    missing = next(x for x in diff.discrepancies if x.kind == pb.DISCREPANCY_KIND_MISSING)
    assert missing.member.name == "n2", "the Raft-only member is named by its own agent"
    assert missing.member.address == dqlite_lab.node("n2")["dqlite"]["address"]


def test_s1_a_ghost_raft_member_added_then_wiped(dqlite_lab: labs.Lab, tmp_path: Path) -> None:
    """A fourth node joins the engine (it adds itself, as go-dqlite's joiners do), then dies and is wiped: Raft
    keeps it, and no members-table row or truststore record ever named it."""
    spec = MemberSpec("ghost", loopback_addresses(1)[0], tmp_path / "ghost")
    # The engine only needs a certificate its peers trust; which member's it is does not matter to Raft.
    n1 = Path(dqlite_lab.node("n1")["state_dir"])
    tls = NodeTls(n1 / "server.crt", n1 / "server.key", n1 / "truststore")
    ghost = start_members([spec], {"ghost": tls}, join=[dqlite_lab.node("n1")["dqlite"]["address"]])[0]
    with Client(dqlite_lab.endpoint) as client:
        _settles_on(client, [("MISSING", "BLOCKING", "MEMBERS_TABLE", "")])
        ghost.process.kill()
        stop_node(ghost)
        shutil.rmtree(spec.state_dir)
        diff = _settles_on(client, [("MISSING", "BLOCKING", "MEMBERS_TABLE", "")])
    missing = next(x for x in diff.discrepancies if x.kind == pb.DISCREPANCY_KIND_MISSING)
    assert (missing.member.address, missing.member.node_id) == (spec.address, ghost.node_id)
    assert missing.member.name == "", "nothing that carries names knows the ghost"


def test_s7_a_node_removed_from_raft_that_still_lists_itself(dqlite_lab: labs.Lab) -> None:
    n3 = dqlite_lab.node("n3")

    async def remove_n3() -> None:
        async with await _leader(dqlite_lab) as connection:
            node_id = next(n.id for n in await connection.cluster() if n.address == n3["dqlite"]["address"])
            await connection.remove(node_id)

    asyncio.run(remove_n3())
    _sql(dqlite_lab, "DELETE FROM core_cluster_members WHERE name = ?", "n3")
    expected = [
        ("ORPHAN", "BLOCKING", "TRUSTSTORE", "n1"),
        ("ORPHAN", "BLOCKING", "TRUSTSTORE", "n2"),
        ("ORPHAN", "BLOCKING", "TRUSTSTORE", "n3"),
        ("NODE_INFO_MISMATCH", "BLOCKING", "NODE_INFO", "n3"),
        ("VIEW_DIFFERS", "WARNING", "RAFT_NODE_VIEW", "n3"),
    ]
    with Client(dqlite_lab.endpoint) as client:
        diff = _settles_on(client, expected, within=20.0)
    stale = next(x for x in diff.discrepancies if x.source == pb.SOURCE_RAFT_NODE_VIEW and x.node == "n3")
    assert "still holds" in stale.summary, "n3's own configuration still lists n3"


def test_a_killed_follower_is_a_dead_engine_not_a_missing_member(dqlite_lab: labs.Lab) -> None:
    leader = _leader_address(dqlite_lab)
    follower = next(n for n in dqlite_lab.document["nodes"] if n["dqlite"]["address"] != leader)
    os.kill(follower["dqlite"]["pid"], signal.SIGKILL)
    with Client(dqlite_lab.endpoint) as client:
        _settles_on(
            client,
            [("SOURCE_UNREADABLE", "WARNING", "RAFT_NODE_VIEW", follower["name"])],
            maybe=_dead_engines_cache(follower["name"]),
        )


def test_a_killed_leader_gives_no_leader_or_the_new_leaders_view_within_the_deadline(dqlite_lab: labs.Lab) -> None:
    leader = _leader_address(dqlite_lab)
    node = next(n for n in dqlite_lab.document["nodes"] if n["dqlite"]["address"] == leader)
    os.kill(node["dqlite"]["pid"], signal.SIGKILL)
    no_leader: list[Fact] = [("NO_LEADER", "BLOCKING", "RAFT_CONFIG", "")]
    with Client(dqlite_lab.endpoint) as client:
        started = time.monotonic()
        diff = client.check_membership(agent_timeout=1.0, timeout=5).diff
        assert time.monotonic() - started < 3.0, "the check outlived its agents' deadline"
        seen = _serious(diff)
        # Right after the kill, nobody may lead yet; any answer must be one of the two truths.
        dead_engine: list[Fact] = [("SOURCE_UNREADABLE", "WARNING", "RAFT_NODE_VIEW", node["name"])]
        assert all(fact in no_leader + dead_engine or fact[0] == "SOURCE_UNREADABLE" for fact in seen), seen
        _settles_on(client, dead_engine, maybe=_dead_engines_cache(node["name"]))


def test_a_frozen_engine_leaves_its_agent_answering_within_a_short_deadline(dqlite_lab: labs.Lab) -> None:
    """The leader's engine is SIGSTOPped: its kernel still accepts connections and nothing answers on them, so its
    agent's read of the engine's own view hangs until the reader's timeout (1 s). Asked with a deadline shorter than
    that, every agent still answers in time, that source unreadable: a silent agent would hold back every operation
    that needs it for as long as one source of its node is slow."""
    leader = _leader_address(dqlite_lab)
    node = next(n for n in dqlite_lab.document["nodes"] if n["dqlite"]["address"] == leader)
    os.kill(node["dqlite"]["pid"], signal.SIGSTOP)
    try:
        with Client(dqlite_lab.endpoint) as client:
            started = time.monotonic()
            diff = client.check_membership(agent_timeout=0.5, timeout=5).diff
            took = time.monotonic() - started
    finally:
        os.kill(node["dqlite"]["pid"], signal.SIGCONT)
    silent = [x.node for x in diff.discrepancies if x.kind == pb.DISCREPANCY_KIND_AGENT_UNREACHABLE]
    assert silent == [], _serious(diff)
    assert ("SOURCE_UNREADABLE", "WARNING", "RAFT_NODE_VIEW", node["name"]) in _serious(diff)
    assert took < 2.0, f"the check took {took:.2f} s"


def test_a_spares_stale_view_is_expected_lag_not_a_warning(tmp_path: Path) -> None:
    """Spares get no log: after n3 leaves Raft, spare n4's own configuration still holds n3, and that is INFO.
    A long role-adjustment interval keeps go-dqlite's adjuster from promoting n4 while the test looks."""
    lab = labs.up(tmp_path / "lab", 4, backend="dqlite", roles_interval=30.0)
    try:
        n3, n4 = lab.node("n3")["dqlite"]["address"], lab.node("n4")["dqlite"]["address"]

        async def demote_n4_then_remove_n3() -> None:
            async with await _leader(lab) as connection:
                ids = {n.address: n.id for n in await connection.cluster()}
                await connection.assign(ids[n4], Role.SPARE)
                await connection.remove(ids[n3])

        asyncio.run(demote_n4_then_remove_n3())
        _sql(lab, "DELETE FROM core_cluster_members WHERE name = ?", "n3")
        expected = [("ORPHAN", "BLOCKING", "TRUSTSTORE", node) for node in ("n1", "n2", "n3", "n4")] + [
            ("NODE_INFO_MISMATCH", "BLOCKING", "NODE_INFO", "n3"),
            ("VIEW_DIFFERS", "WARNING", "RAFT_NODE_VIEW", "n3"),
        ]
        with Client(lab.endpoint) as client:
            diff = _settles_on(client, expected, within=10.0)
        spare = [x for x in diff.discrepancies if x.source == pb.SOURCE_RAFT_NODE_VIEW and x.node == "n4"]
        assert [(x.severity, "still holds" in x.summary) for x in spare] == [(pb.SEVERITY_INFO, True)]
    finally:
        labs.down(lab.dir)
    assert [pid for pid in lab.pids() if _alive(pid)] == [], "lab down left processes running"


def test_a_peer_that_is_not_dqlite_is_a_discrepancy_naming_the_node(dqlite_lab: labs.Lab) -> None:
    """n2's agent is pointed at a server that answers every connection with an HTTP error: its own engine's view
    becomes an unreadable source on n2, with the typed error, and nothing else changes."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer_garbage() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                peer, _ = server.accept()
            except TimeoutError:
                continue
            with peer:
                peer.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    node = dqlite_lab.node("n2")
    config_path = Path(node["state_dir"]) / "agent.json"
    config = json.loads(config_path.read_text())
    config["dqlite"]["address"] = f"127.0.0.1:{server.getsockname()[1]}"
    config["listen"] = node["agent_address"]
    os.kill(node["pid"], signal.SIGKILL)
    config_path.write_text(json.dumps(config))
    agent = subprocess.Popen(
        [sys.executable, "-m", "coordinator.agent", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(dqlite_lab.endpoint) as client:
            diff = _settles_on(client, [("SOURCE_UNREADABLE", "WARNING", "RAFT_NODE_VIEW", "n2")])
        unreadable = next(x for x in diff.discrepancies if x.kind == pb.DISCREPANCY_KIND_SOURCE_UNREADABLE)
        assert "n2" in unreadable.summary
        assert any(
            word in unreadable.evidence[0].detail for word in ("RemoteProtocolError", "ConnectionClosed", "Unreachable")
        )
    finally:
        agent.terminate()
        agent.wait(10)
        stop.set()
        thread.join()
        server.close()
