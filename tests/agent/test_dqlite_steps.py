"""The `dqlite` backend's steps against a real dqlite lab, applied in-process with the applier n1's agent is built
with (its agent.json): each applied twice (the repeat changes nothing), read back on the leader; and what they refuse.
The join's engine step and the removal's hand-over run end to end in tests/test_dqlite_operations.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from memberguard.v1 import agent_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator import pki
from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.engine import PID_FILE
from coordinator.agent.service import AgentConfig
from coordinator.agent.steps import StepApplier
from coordinator.dqlite import NodeInfo, connect_leader
from coordinator.errors import AlreadyExists, ConfigurationMoved, InvalidRequest
from coordinator.lab import lab as labs
from coordinator.lab.dqlite_cluster import DATABASE

pytestmark = pytest.mark.dqlite


@pytest.fixture(scope="module")
def dqlite_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path_factory.mktemp("dqlite-steps") / "lab", 3, backend="dqlite")
    yield running
    labs.down(running.dir)


def _steps(lab: labs.Lab, name: str) -> StepApplier:
    return AgentConfig.load(Path(lab.node(name)["state_dir"]) / "agent.json").steps


def _step(**fields: Any) -> agent_pb2.ApplyStepRequest:
    return agent_pb2.ApplyStepRequest(operation_id="op-1", step_index=0, epoch=1, **fields)


async def _twice(steps: StepApplier, request: agent_pb2.ApplyStepRequest) -> str:
    changed, detail, _ = await steps.apply(request)
    assert changed, detail
    again, repeated, _ = await steps.apply(request)
    assert not again, repeated
    return detail


async def _leader_state(lab: labs.Lab) -> tuple[list[NodeInfo], dict[str, tuple[str, str]]]:
    """The leader's configuration, and the members table as {name: (address, role)}."""
    state = Path(lab.node("n1")["state_dir"])
    context = client_ssl_context(state / "server.crt", state / "server.key", state / "truststore")
    addresses = [n["address"] for n in lab.document["nodes"]]
    async with await connect_leader(addresses, timeout=10, ssl=context) as leader:
        nodes = await leader.cluster()
        await leader.open(DATABASE)
        rows = await leader.query("SELECT name, address, role FROM core_cluster_members")
        return nodes, {str(name): (str(address), str(role)) for name, address, role in rows}


async def test_a_row_is_written_once_then_updated_then_deleted_once(dqlite_lab: labs.Lab) -> None:
    steps = _steps(dqlite_lab, "n1")
    pem = pki.make_identity("n9").certificate_pem.decode()
    row = agent_pb2.MemberRow(name="n9", address="127.0.0.1:9", certificate_pem=pem, role="PENDING")
    assert "wrote n9's row (PENDING)" in await _twice(steps, _step(ensure_member_row=row))
    assert (await _leader_state(dqlite_lab))[1]["n9"] == ("127.0.0.1:9", "PENDING")
    row.role = "voter"
    await _twice(steps, _step(ensure_member_row=row))
    assert (await _leader_state(dqlite_lab))[1]["n9"] == ("127.0.0.1:9", "voter")
    await _twice(steps, _step(remove_member_row="n9"))
    assert "n9" not in (await _leader_state(dqlite_lab))[1]


async def test_a_row_with_another_members_certificate_is_already_exists(dqlite_lab: labs.Lab) -> None:
    n2_pem = (Path(dqlite_lab.node("n2")["state_dir"]) / "server.crt").read_text()
    row = agent_pb2.MemberRow(name="n9", address="127.0.0.1:9", certificate_pem=n2_pem, role="PENDING")
    with pytest.raises(AlreadyExists):
        await _steps(dqlite_lab, "n1").apply(_step(ensure_member_row=row))
    assert "n9" not in (await _leader_state(dqlite_lab))[1]


async def test_a_removal_whose_member_changed_its_vote_is_refused_and_removes_nothing(dqlite_lab: labs.Lab) -> None:
    nodes, _ = await _leader_state(dqlite_lab)
    n3 = next(node for node in nodes if node.address == dqlite_lab.node("n3")["address"])
    # The guard decided on a spare; the leader holds a voter: the quorum rule was checked against the wrong vote.
    entry = agent_pb2.RaftEntry(node_id=n3.id, address=n3.address, role=pb.ROLE_SPARE)
    with pytest.raises(ConfigurationMoved, match="is a voter now, not the spare"):
        await _steps(dqlite_lab, "n1").apply(_step(remove_raft_entry=entry))
    assert n3 in (await _leader_state(dqlite_lab))[0]


async def test_removing_an_entry_the_leader_does_not_hold_changes_nothing(dqlite_lab: labs.Lab) -> None:
    entry = agent_pb2.RaftEntry(node_id=12345, address="127.0.0.1:9")
    changed, detail, _ = await _steps(dqlite_lab, "n1").apply(_step(remove_raft_entry=entry))
    assert not changed and "holds no node 12345" in detail


async def test_an_engine_step_for_another_nodes_identity_is_refused(dqlite_lab: labs.Lab) -> None:
    entry = agent_pb2.RaftEntry(node_id=12345, address=dqlite_lab.node("n2")["address"])
    with pytest.raises(InvalidRequest) as refused:
        await _steps(dqlite_lab, "n2").apply(_step(ensure_raft_entry=entry))
    [(field, why)] = [(v.field, v.description) for v in refused.value.violations]
    assert field == "ensure_raft_entry" and "info.yaml holds node" in why


async def test_fencing_kills_the_engine_and_empties_its_data_once(dqlite_lab: labs.Lab) -> None:
    # Last in this module: n3 stays fenced.
    state = Path(dqlite_lab.node("n3")["state_dir"])
    pid = int((state / PID_FILE).read_text())
    detail = await _twice(_steps(dqlite_lab, "n3"), _step(fence_node=True))
    assert "stopped its engine" in detail and "info.yaml" in detail
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    assert list((state / "database").iterdir()) == []
    assert len((await _leader_state(dqlite_lab))[0]) == 3
