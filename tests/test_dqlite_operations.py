"""Guarded joins and removals on the real engine: a dqlite lab (real dqlite nodes over TLS trusting their
truststores, agents on the `dqlite` backend, the coordinator), changed through the coordinator only.

The engine moves on its own (the role adjuster promotes a joiner and rewrites every cluster.yaml each tick), so a
test waits, within two role-adjustment intervals, until the BLOCKING and WARNING discrepancies are gone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from memberguard import Client, DirtyMembership
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o

from coordinator.dqlite import NodeInfo
from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests.engines import engine_pid, leader_view
from tests.restarts import start_coordinator
from tests.settling import settled

pytestmark = pytest.mark.dqlite

ROLES_INTERVAL = 0.5
CONCURRENT = 10


@pytest.fixture
def dqlite_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3, backend="dqlite", roles_interval=ROLES_INTERVAL)
    yield running
    labs.down(running.dir)


def _state_dir(lab: labs.Lab, name: str) -> Path:
    return Path(labs.Lab.load(lab.dir).node(name)["state_dir"])  # as lab.json is now: add-node appends to it


def _engine_pid(lab: labs.Lab, name: str) -> int | None:
    return engine_pid(_state_dir(lab, name))


def _leader_view(lab: labs.Lab, via: str = "n1") -> tuple[str, list[NodeInfo], list[str]]:
    """(the leader's address, its configuration, the members table's names), read with a member's certificate."""
    view = leader_view([n["address"] for n in labs.Lab.load(lab.dir).document["nodes"]], _state_dir(lab, via))
    return view.address, view.nodes, view.rows


def _settled(client: Client) -> pb.MembershipDiff:
    return settled(client, 4 * ROLES_INTERVAL + 5)


def test_a_node_joins_the_real_engine_through_its_token(dqlite_lab: labs.Lab) -> None:
    entry = labs.add_node(dqlite_lab.dir)
    assert entry["name"] == "n4" and _engine_pid(dqlite_lab, "n4") == entry["dqlite"]["pid"]
    with Client(dqlite_lab.endpoint) as client:
        diff = _settled(client)
        assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3", "n4"]
        [operation] = [op for op in client.list_operations(timeout=10).operations if op.kind == o.OPERATION_KIND_JOIN]
        assert operation.state == o.OPERATION_STATE_SUCCEEDED
    _, nodes, rows = _leader_view(dqlite_lab)
    info = (Path(entry["state_dir"]) / "database" / "info.yaml").read_text()
    [joined] = [node for node in nodes if node.address == entry["address"]]
    assert f"ID: {joined.id}" in info, "the engine joined with the ID the coordinator was told"
    assert rows == ["n1", "n2", "n3", "n4"]


def test_a_removal_commits_on_the_leader_and_fences_the_member(dqlite_lab: labs.Lab) -> None:
    leader, _, _ = _leader_view(dqlite_lab)
    follower = next(n for n in dqlite_lab.document["nodes"] if n["address"] != leader)
    with Client(dqlite_lab.endpoint) as client:
        operation = client.remove_member(follower["name"], timeout=30)
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        diff = _settled(client)
        assert follower["name"] not in [m.name for m in diff.members]
    _, nodes, rows = _leader_view(dqlite_lab)
    assert follower["address"] not in [node.address for node in nodes]
    assert follower["name"] not in rows
    assert _engine_pid(dqlite_lab, follower["name"]) is None, "fenced: its engine stopped"
    assert list((Path(follower["state_dir"]) / "database").iterdir()) == [], "fenced: its engine's data cleared"


def test_removing_the_leader_hands_leadership_over_first(dqlite_lab: labs.Lab) -> None:
    labs.add_node(dqlite_lab.dir)  # four members: three voters remain after the leader goes
    leader, _, _ = _leader_view(dqlite_lab)
    name = next(n["name"] for n in labs.Lab.load(dqlite_lab.dir).document["nodes"] if n["address"] == leader)
    with Client(dqlite_lab.endpoint) as client:
        _settled(client)
        operation = client.remove_member(name, timeout=30)
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        assert name not in [m.name for m in _settled(client).members]
    # A removed member's certificate is trusted nowhere any more: read as one that stays.
    new_leader, nodes, _ = _leader_view(dqlite_lab, via="n4" if name == "n1" else "n1")
    assert new_leader != leader and leader not in [node.address for node in nodes]
    via = "n2" if name == "n1" else "n1"  # the removal's cluster-wide steps go to the first other member
    assert "it led: handed leadership to node" in (dqlite_lab.dir / "logs" / f"agents-{via}.log").read_text()


def test_a_join_that_fails_at_its_commit_point_fences_the_joiner_and_rolls_back(dqlite_lab: labs.Lab) -> None:
    labs._stop([dqlite_lab.document["coordinator"]["pid"]])
    # The join's commit step is its ninth (row, three members' trust, the joiner's four records, then its engine).
    process, endpoint = start_coordinator(dqlite_lab, {FAULT_ENV: "fail-step:8"})
    try:
        joiner = labs.start_joining_node(dqlite_lab, "n4")
        try:
            with Client(endpoint) as client:
                operation = joiner.join(client.issue_token("n4", timeout=10).token)
                assert operation.state == o.OPERATION_STATE_ROLLED_BACK, operation
                assert "fail" in operation.error
                diff = _settled(client)
                assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3"]
                # Fenced: no engine, and nothing left that could start one joining.
                assert engine_pid(joiner.state_dir) is None
                assert list((joiner.state_dir / "database").iterdir()) == []
        finally:
            joiner.stop()
        _, nodes, rows = _leader_view(dqlite_lab)
        assert len(nodes) == 3 and rows == ["n1", "n2", "n3"]
    finally:
        process.terminate()
        process.wait()


def test_ten_joins_at_once_all_succeed_on_the_real_engine(dqlite_lab: labs.Lab) -> None:
    with ThreadPoolExecutor(CONCURRENT) as pool:
        entries = list(pool.map(lambda _: labs.add_node(dqlite_lab.dir), range(CONCURRENT)))
    names = sorted(entry["name"] for entry in entries)
    assert len(set(names)) == CONCURRENT
    with Client(dqlite_lab.endpoint) as client:
        diff = _settled(client)
        assert sorted(m.name for m in diff.members) == sorted(["n1", "n2", "n3", *names])
    _, nodes, rows = _leader_view(dqlite_lab)
    assert len(nodes) == 3 + CONCURRENT and len(rows) == 3 + CONCURRENT


def _kill_node(lab: labs.Lab, name: str) -> None:
    """kill -9 of a node's agent and engine: the member is dead, its records stay."""
    node = labs.Lab.load(lab.dir).node(name)
    for pid in (node["pid"], _engine_pid(lab, name)):
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def test_a_dead_member_is_removed_by_force_with_its_discrepancies_acknowledged(dqlite_lab: labs.Lab) -> None:
    leader, _, _ = _leader_view(dqlite_lab)
    dead = next(n["name"] for n in dqlite_lab.document["nodes"] if n["address"] != leader)
    _kill_node(dqlite_lab, dead)
    with Client(dqlite_lab.endpoint) as client:
        with pytest.raises(DirtyMembership) as refused:
            client.remove_member(dead, timeout=30)
        assert refused.value.diff is not None
        about = [d.id for d in refused.value.diff.discrepancies if d.severity != pb.SEVERITY_INFO]
        assert about, "the dead member's agent and engine are reported"
        operation = client.remove_member(dead, force=True, acknowledged=about, timeout=30)
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        assert "fenced when it does" in operation.plan, "the remainder says the dead node is fenced when it answers"
        [fence] = [s for s in operation.steps if s.deferred]
        assert fence.name == f"fence {dead} when it answers" and fence.state == o.STEP_STATE_PENDING
        assert sorted(m.name for m in _settled(client).members) == sorted(
            n["name"] for n in dqlite_lab.document["nodes"] if n["name"] != dead
        )
    _, nodes, rows = _leader_view(dqlite_lab, via="n1" if dead != "n1" else "n2")
    assert len(nodes) == 2 and dead not in rows


def test_no_leader_refuses_every_change_and_says_how_to_recover(dqlite_lab: labs.Lab) -> None:
    for name in ("n2", "n3"):  # two of three voters gone: no quorum, no leader
        pid = _engine_pid(dqlite_lab, name)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    with Client(dqlite_lab.endpoint) as client:
        deadline = time.monotonic() + 10  # the old leader steps down once it misses its quorum's heartbeats
        while not any(
            d.kind == pb.DISCREPANCY_KIND_NO_LEADER for d in client.check_membership(timeout=10).diff.discrepancies
        ):
            assert time.monotonic() < deadline, "the coordinator never saw the leader go"
            time.sleep(0.1)
        with pytest.raises(DirtyMembership) as refused:
            client.issue_token("n4", timeout=30)
        [advice] = [description for kind, _, description in refused.value.violations if kind == "NO_LEADER"]
        assert ".reconfigure" in advice and "cluster edit" in advice
        assert client.list_tokens() == [], "nothing was issued"
