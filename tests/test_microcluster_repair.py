"""Repair on a microcluster lab goes through microcluster where it has a flow (docs/design.md, "Repair"): divergences
made for real on real microd daemons, planned and applied through the Python client (`memberguard repair --apply`),
then checked by memberguard's diff and by `microctl cluster list`, the two printed side by side.

- A live member's row deleted with `microctl sql`: microcluster has no flow that writes a Raft member's row back, so
  one of memberguard's agents restores it through dqlite, and the heartbeat puts the member back into the truststores.
- A truststore record removed on one node: the heartbeat rewrites it, so the plan writes nothing and says to wait.
- An orphan row (a PENDING row of a joiner that never reached Raft): microcluster's own removal, forced.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from memberguard import Client, MemberguardError
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o
from memberguard.v1 import repair_pb2

from coordinator import pki
from coordinator.agent.microcluster_dial import MemberDial
from coordinator.dqlite import connect_leader
from coordinator.lab import lab as labs
from coordinator.lab import microcluster
from coordinator.lab.ports import loopback_addresses
from tests.microcluster_members import heartbeat_after
from tests.restarts import start_coordinator

pytestmark = pytest.mark.microcluster

GRACE = 1.0  # seconds an orphan must have been one before a repair removes it
SETTLE = 30.0  # seconds for the heartbeats (2 s in the lab) to carry a repair to every truststore


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path_factory.mktemp("lab"), 3, backend="microcluster")
    try:
        start_coordinator(running, {}, {"repair_grace": GRACE})
        yield running
    finally:
        labs.down(running.dir)


@pytest.fixture
def client(lab: labs.Lab) -> Iterator[Client]:
    with Client(lab.endpoint) as connected:
        _settled(connected)
        yield connected


def _microctl(lab: labs.Lab, via: str, *args: str) -> str:
    node = lab.node(via)
    done = microcluster.microctl(node["state_dir"], *args, timeout=60, leader_within=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _listed(lab: labs.Lab, via: str) -> list[str]:
    """The members `microctl cluster list` shows on node via."""
    return sorted(row["name"] for row in json.loads(_microctl(lab, via, "cluster", "list", "--format", "json")))


def _loud(diff: pb.MembershipDiff) -> list[tuple[str, str, str, str]]:
    return [
        (pb.DiscrepancyKind.Name(d.kind), pb.Source.Name(d.source), d.node, d.member.name or d.member.address)
        for d in diff.discrepancies
        if d.severity != pb.SEVERITY_INFO
    ]


def _settled(client: Client) -> pb.MembershipDiff:
    """The diff once nothing in it is above INFO (a spare's own view of Raft lags for as long as it is a spare)."""
    deadline = time.monotonic() + SETTLE
    while True:
        diff = client.check_membership(timeout=10).diff
        if not _loud(diff):
            return diff
        assert time.monotonic() < deadline, _loud(diff)
        time.sleep(0.3)


def _steady(client: Client, wanted: tuple[str, ...]) -> pb.MembershipDiff:
    """The diff once a discrepancy in it starts with `wanted` and two checks in a row agree: a divergence made on
    microcluster is followed by its heartbeat (the truststores follow the table), and a plan is made on the diff it
    leaves."""
    deadline = time.monotonic() + SETTLE
    last = ""
    while True:
        diff = client.check_membership(timeout=10).diff
        if any(found[: len(wanted)] == wanted for found in _loud(diff)) and diff.fingerprint == last:
            return diff
        assert time.monotonic() < deadline, _loud(diff)
        last = diff.fingerprint
        time.sleep(microcluster.HEARTBEAT)


def _wait_until_eligible(client: Client, diff: pb.MembershipDiff) -> None:
    """Returns once every orphan of the diff is past the grace period: a dry run says when that is."""
    plan = client.plan_repair(expected_fingerprint=diff.fingerprint)
    waiting = [u for u in plan.unplanned if u.HasField("eligible_at")]
    assert waiting and all("less than the grace period" in u.reason for u in waiting), _shown(plan)
    time.sleep(max(0.0, max(u.eligible_at.ToNanoseconds() / 1e9 for u in waiting) - time.time()) + 0.1)


def _side_by_side(what: str, client: Client, lab: labs.Lab) -> tuple[list[str], list[str]]:
    ours = sorted(m.name for m in _settled(client).members)
    theirs = _listed(lab, "n1")
    print(f"\n{what}: memberguard's members {ours}, microctl cluster list {theirs}")
    return ours, theirs


def _shown(plan: repair_pb2.RepairPlan) -> str:
    actions = [
        f"{'safe' if a.safety == pb.REMEDY_SAFETY_SAFE else 'confirm'} {a.member.name}: "
        + ", ".join(f"{step.name} ({step.node})" for step in a.steps)
        for a in plan.actions
    ]
    return "; ".join(actions + [f"unplanned: {u.reason}" for u in plan.unplanned])


def _raft(lab: labs.Lab) -> tuple[str, list[str]]:
    """The name of the member whose daemon leads dqlite, and the addresses in its configuration, read as n1's daemon
    reads them."""
    nodes = {name: lab.node(name) for name in ("n1", "n2", "n3")}

    async def read() -> tuple[str, list[str]]:
        dial = MemberDial(Path(nodes["n1"]["state_dir"]))
        addresses = [node["microcluster"]["address"] for node in nodes.values()]
        connection = await connect_leader(addresses, timeout=10, dial=dial.dial)
        async with connection:
            return connection.address, sorted(node.address for node in await connection.cluster())

    leader, configuration = asyncio.run(read())
    return next(name for name, node in nodes.items() if node["microcluster"]["address"] == leader), configuration


def _leader(lab: labs.Lab) -> str:
    return _raft(lab)[0]


def _member(lab: labs.Lab, name: str) -> microcluster.Member:
    node = lab.node(name)
    return microcluster.Member(name, node["microcluster"]["address"], Path(node["state_dir"]), lab.dir / "logs")


def test_a_deleted_row_of_a_live_member_is_restored_through_dqlite(lab: labs.Lab, client: Client) -> None:
    leader = _leader(lab)
    victim = next(name for name in ("n1", "n2", "n3") if name != leader)
    _microctl(lab, leader, "sql", f"DELETE FROM core_cluster_members WHERE name = '{victim}'")
    assert victim not in _listed(lab, leader)
    diff = _steady(client, ("DISCREPANCY_KIND_MISSING", "SOURCE_MEMBERS_TABLE", "", victim))
    print(f"\n{victim}'s row deleted with microctl sql: {_loud(diff)}")
    applied = client.apply_repair(expected_fingerprint=diff.fingerprint)
    print(f"plan: {_shown(applied.plan)}")
    (action,) = [a for a in applied.plan.actions if a.member.name == victim]
    assert action.safety == pb.REMEDY_SAFETY_SAFE and "through dqlite" in action.reason
    (step,) = action.steps
    assert step.name == f"restore {victim}'s members-table row" and step.node != victim
    assert (step.evidence.source, step.evidence.node) == (pb.SOURCE_AGENT, victim)
    assert applied.operation.state == o.OPERATION_STATE_SUCCEEDED, applied.operation
    assert victim in _listed(lab, leader)
    ours, theirs = _side_by_side(f"{victim}'s row restored", client, lab)
    assert ours == theirs == ["n1", "n2", "n3"]
    # The row is microcluster's own again: its heartbeat gave it its Raft role, and it issues tokens again.
    rows = json.loads(_microctl(lab, leader, "cluster", "list", "--format", "json"))
    assert {row["name"]: row["role"] for row in rows}[victim] in ("voter", "stand-by", "spare")
    _microctl(lab, leader, "tokens", "add", "t1")
    _microctl(lab, leader, "tokens", "remove", "t1")


def test_a_removed_truststore_record_is_left_to_the_heartbeat(lab: labs.Lab, client: Client) -> None:
    holder, gone = _member(lab, "n2"), "n3"
    record = holder.state_dir / "truststore" / f"{gone}.yaml"
    # The heartbeat rewrites the truststore every 2 s: on a loaded machine the plan may come after it. Try again then.
    for _ in range(5):
        heartbeat_after(holder)
        record.unlink()
        diff = client.check_membership(timeout=10).diff
        try:
            applied = client.apply_repair(expected_fingerprint=diff.fingerprint)
        except MemberguardError:
            continue  # the diff changed under the apply: the heartbeat was first
        if not record.exists() and ("DISCREPANCY_KIND_MISSING", "SOURCE_TRUSTSTORE", "n2", gone) in _loud(diff):
            break
    else:
        pytest.fail("the heartbeat restored the record before the repair was planned, five times")
    print(f"\n{gone}.yaml removed on n2: {_loud(diff)}\nplan: {_shown(applied.plan)}")
    assert applied.plan.actions == [] and not applied.HasField("operation"), "nothing is written"
    (left,) = applied.plan.unplanned
    assert left.reason.startswith("Wait for microcluster's heartbeat, which rewrites n2's truststore")
    assert "every 2 s" in left.reason
    deadline = time.monotonic() + SETTLE
    while not record.exists():
        assert time.monotonic() < deadline, "the heartbeat never restored the record"
        time.sleep(0.1)
    ours, theirs = _side_by_side(f"{gone}.yaml restored on n2 by the heartbeat", client, lab)
    assert ours == theirs == ["n1", "n2", "n3"]


def test_an_orphan_row_is_removed_through_microclusters_own_removal(lab: labs.Lab, client: Client) -> None:
    """A PENDING row of a joiner that never reached Raft, as a leader that died in the middle of microcluster's join
    leaves it; its schema versions are a live row's, as microcluster's join writes them."""
    [address] = loopback_addresses(1)
    certificate = pki.make_identity("x1").certificate_pem.decode()
    leader = _leader(lab)
    _microctl(
        lab,
        leader,
        "sql",
        "INSERT INTO core_cluster_members"
        " (name, address, certificate, schema_internal, schema_external, api_extensions, heartbeat, role)"
        f" SELECT 'x1', '{address}', '{certificate}', schema_internal, schema_external, api_extensions,"
        " '0001-01-01T00:00:00Z', 'PENDING' FROM core_cluster_members WHERE name = 'n1'",
    )
    diff = _steady(client, ("DISCREPANCY_KIND_MISSING", "SOURCE_RAFT_CONFIG", "", "x1"))
    print(f"\nx1's orphan row: {_loud(diff)}; microctl cluster list {_listed(lab, leader)}")
    _wait_until_eligible(client, diff)
    applied = client.apply_repair(expected_fingerprint=diff.fingerprint)
    print(f"plan: {_shown(applied.plan)}")
    (action,) = applied.plan.actions
    assert action.safety == pb.REMEDY_SAFETY_SAFE
    assert f"microctl cluster remove x1 --force --address {address}" in action.reason
    assert [step.name for step in action.steps] == [
        "remove x1 through microcluster",
        "forget x1's certificate and tokens",
    ]
    assert applied.operation.state == o.OPERATION_STATE_SUCCEEDED, applied.operation
    ours, theirs = _side_by_side("x1's orphan row removed by microcluster", client, lab)
    assert ours == theirs == ["n1", "n2", "n3"]
    assert all(not (_member(lab, n).state_dir / "truststore" / "x1.yaml").exists() for n in ("n1", "n2", "n3"))


def test_a_ghost_raft_member_is_removed_through_dqlite_once_confirmed(lab: labs.Lab, client: Client) -> None:
    """A Raft member no row names and no agent speaks for: its row deleted, its agent killed (its daemon runs on,
    which memberguard cannot see). Last in the module: the lab keeps two members."""
    leader = _leader(lab)
    ghost = next(name for name in ("n3", "n2") if name != leader)
    address = lab.node(ghost)["microcluster"]["address"]
    os.kill(lab.node(ghost)["pid"], signal.SIGKILL)
    _microctl(lab, leader, "sql", f"DELETE FROM core_cluster_members WHERE name = '{ghost}'")
    diff = _steady(client, ("DISCREPANCY_KIND_MISSING", "SOURCE_MEMBERS_TABLE"))
    print(f"\n{ghost}'s row deleted and its agent killed: {_loud(diff)}")
    _wait_until_eligible(client, diff)
    unconfirmed = client.apply_repair(expected_fingerprint=diff.fingerprint)
    print(f"plan: {_shown(unconfirmed.plan)}")
    assert not unconfirmed.HasField("operation"), "a ghost's removal waits for a human"
    (action,) = [a for a in unconfirmed.plan.actions if a.safety == pb.REMEDY_SAFETY_NEEDS_CONFIRMATION]
    assert action.reason.startswith("Confirm that") and "removed through dqlite" in action.reason
    assert action.steps[0].source == pb.SOURCE_RAFT_CONFIG and action.steps[0].node != ghost
    assert address in _raft(lab)[1]
    confirmed = client.apply_repair(expected_fingerprint=diff.fingerprint, confirmed_action_ids=[action.id])
    assert confirmed.operation.state == o.OPERATION_STATE_SUCCEEDED, confirmed.operation
    assert address not in _raft(lab)[1]
    # microcluster's own consistency check agrees: it issues a token again.
    _microctl(lab, leader, "tokens", "add", "t2")
    _microctl(lab, leader, "tokens", "remove", "t2")
    survivors = sorted({"n1", "n2", "n3"} - {ghost})
    theirs = _listed(lab, leader)
    deadline = time.monotonic() + SETTLE
    while True:
        left = _loud(client.check_membership(timeout=10).diff)
        # A nameless ghost stays in the registry, its agent dead; a named one the repair forgot.
        if set(left) <= {("DISCREPANCY_KIND_AGENT_UNREACHABLE", "SOURCE_AGENT", ghost, "")}:
            break
        assert time.monotonic() < deadline, left
        time.sleep(0.3)
    print(f"{ghost} removed from Raft: memberguard's diff {left}, microctl cluster list {theirs}")
    assert theirs == survivors
