"""Repair on every scenario the tests make (issue 11), on the `local` and `dqlite` labs: make the divergence, plan a
repair (a dry run through the Python client), check the plan against the rules, apply it, check again. What is
left must be exactly what the scenario leaves to a human or to the engine's own catching up, and the plan must say
why for each of those.

The local cases are tests/test_scenarios.py's SCENARIOS, made on one lab; the dqlite cases are those that can be made
for real on a dqlite lab (SQL on the leader, truststore files, a fourth engine joining through the leader). Each
module's coordinator runs with a grace period of GRACE seconds, so that orphans become eligible within the test: the
first plan says when, and the case waits for it. Each case prints one line (visible with -s): scenario | backend |
plan | state after apply; docs/repair-scenarios.md is the table of one run.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from memberguard import Client
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2, repair_pb2

from coordinator.agent.raft_files import write_raft_config
from coordinator.core.model import Role
from coordinator.files import write_atomically
from coordinator.lab import lab as labs
from coordinator.lab.dqlite_cluster import DATABASE, MemberSpec, lay_out_members, start_members
from coordinator.lab.dqlite_nodes import DqliteNode, NodeTls, stop_node
from coordinator.lab.ports import loopback_addresses
from tests import divergence as d
from tests.restarts import start_coordinator
from tests.test_dqlite_lab import _leader, _leader_address, _sql
from tests.test_scenarios import SCENARIOS

Fact = tuple[str, str, str, str]  # (kind, severity, source, node) with the enum prefixes dropped
RaftIds = set[tuple[int, str]]  # (node ID, address) of every entry of the leader's Raft configuration

GRACE = 1.0
SAFE, CONFIRM = pb.REMEDY_SAFETY_SAFE, pb.REMEDY_SAFETY_NEEDS_CONFIRMATION
ROLES_INTERVAL = 2.0  # the dqlite lab's: its engines rewrite a stale cluster.yaml within a tick or two
SETTLE = 2 * ROLES_INTERVAL + 8.0  # how long a dqlite diff may take to show a change, or to catch up after one


@dataclass(frozen=True)
class Outcome:
    """What a repair leaves: `left` after an apply that confirms nothing; `confirmed` after the plan's
    NEEDS_CONFIRMATION actions are confirmed too (None: the plan must have none). Above INFO, exactly."""

    left: list[Fact]
    confirmed: list[Fact] | None = None


CLEAN = Outcome([])
# S4's joiner has no agent: a member memberguard cannot see, which a human adopts; nothing repairs it.
UNWATCHED_J1: Fact = ("UNWATCHED_MEMBER", "WARNING", "AGENT", "j1")
MISSING_ROW: Fact = ("MISSING", "BLOCKING", "MEMBERS_TABLE", "")
DUPLICATE: Fact = ("DUPLICATE_ADDRESS", "BLOCKING", "MEMBERS_TABLE", "")
STALE_CACHE: Fact = ("VIEW_DIFFERS", "WARNING", "RAFT_CACHE", "n2")
DISPUTED = [
    *(("CERTIFICATE_MISMATCH", "BLOCKING", "TRUSTSTORE", node) for node in ("n1", "n2", "n3")),
    ("AGENT_CERTIFICATE_MISMATCH", "BLOCKING", "AGENT", "n2"),
]

LOCAL: dict[str, Outcome] = {
    # Removed from the shared configuration by n1's agent; the other nodes' caches catch up only with a step of theirs.
    "S1 ghost Raft member": Outcome([MISSING_ROW], confirmed=[(*STALE_CACHE[:3], "n2"), (*STALE_CACHE[:3], "n3")]),
    "S2 PENDING row only": CLEAN,
    "S3 PENDING row and leader trust": CLEAN,
    "S4 partial truststore fan-out": Outcome([UNWATCHED_J1]),
    "S6 row deleted, still in Raft": CLEAN,
    "S7 removal crashed after Raft remove": CLEAN,
    "S9 truststore record deleted on a follower": CLEAN,
    "S10 truststore record deleted on the leader": CLEAN,
    "S12 duplicate address": Outcome([DUPLICATE]),
    "S15 ghost row": CLEAN,
    # Nothing on the local backend rewrites a cache that no step touched: it is waited for, as on a real node.
    "stale cluster.yaml": Outcome([STALE_CACHE]),
    "row with another certificate": Outcome(DISPUTED),
    # The misnamed record is rewritten where it belongs; a stray file and a broken one are a human's.
    "junk in a truststore": Outcome([("INVALID_ENTRY", "WARNING", "TRUSTSTORE", "n1")] * 2),
    "truststore unreadable": Outcome([("SOURCE_UNREADABLE", "BLOCKING", "TRUSTSTORE", "n3")]),
}


# --- what every case checks -------------------------------------------------------------------------------------


def _fact(x: pb.Discrepancy) -> Fact:
    return (
        pb.DiscrepancyKind.Name(x.kind).removeprefix("DISCREPANCY_KIND_"),
        pb.Severity.Name(x.severity).removeprefix("SEVERITY_"),
        pb.Source.Name(x.source).removeprefix("SOURCE_"),
        x.node,
    )


def _loud(diff: pb.MembershipDiff) -> list[pb.Discrepancy]:
    # INFO is lag the engine catches up with on its own (a cache a tick behind, a role being adjusted).
    return [x for x in diff.discrepancies if x.severity != pb.SEVERITY_INFO]


def _settles_on(client: Client, expected: list[Fact], within: float) -> pb.MembershipDiff:
    """The diff once its discrepancies above INFO are exactly `expected`; fails with the last ones seen."""
    deadline = time.monotonic() + within
    while True:
        diff = client.check_membership(timeout=10).diff
        seen = Counter(_fact(x) for x in _loud(diff))
        if seen == Counter(expected):
            return diff
        assert time.monotonic() < deadline, f"after {within:g} s the diff has {sorted(seen)}, not {sorted(expected)}"
        time.sleep(0.2)


def _eligible_plan(client: Client, diff: pb.MembershipDiff) -> repair_pb2.RepairPlan:
    """The dry run's plan once every orphan in it is past the grace period: the first plan says when that is."""
    plan = client.plan_repair(expected_fingerprint=diff.fingerprint)
    waiting = [u.eligible_at.ToNanoseconds() / 1e9 for u in plan.unplanned if u.HasField("eligible_at")]
    if not waiting:
        return plan
    assert max(waiting) <= time.time() + GRACE, "an orphan is eligible at most a grace period from now"
    time.sleep(max(0.0, max(waiting) - time.time()) + 0.05)
    plan = client.plan_repair(expected_fingerprint=diff.fingerprint)
    assert not any(u.HasField("eligible_at") for u in plan.unplanned), "the orphans are eligible when it said"
    return plan


def _assert_obeys_the_rules(plan: repair_pb2.RepairPlan, diff: pb.MembershipDiff) -> None:
    assert plan.fingerprint == diff.fingerprint
    # Every discrepancy is cleared by exactly one action, or left with why. (INFO lag may differ from one gather to
    # the next on a real engine: the plan was made from a gather of its own.)
    covered = Counter(
        [i for action in plan.actions for i in action.clears] + [u.discrepancy_id for u in plan.unplanned]
    )
    assert set(covered.values()) <= {1}
    assert {x.id for x in _loud(diff)} <= set(covered)
    assert all(u.reason for u in plan.unplanned)
    for action in plan.actions:
        assert action.clears and action.steps and action.reason
        assert action.safety in (SAFE, CONFIRM)
        if action.safety == CONFIRM:
            assert action.reason.startswith("Confirm that"), "a non-safe action says what a human must confirm"
        for step in action.steps:
            # Nothing is ever added to Raft: a step on the configuration removes the entry its evidence shows held.
            if step.source == pb.SOURCE_RAFT_CONFIG:
                assert step.name.startswith("remove ") and step.evidence.source == pb.SOURCE_RAFT_CONFIG
    removed = {
        (record.address, record.node_id)
        for action in plan.actions
        for step in action.steps
        if step.source == pb.SOURCE_RAFT_CONFIG
        for record in step.evidence.records
    }
    voters = [m for m in diff.members if m.role == pb.ROLE_VOTER]
    kept = [m for m in voters if (m.address, m.node_id) not in removed]
    if len(kept) < len(voters):
        silent = {x.node for x in diff.discrepancies if x.kind == pb.DISCREPANCY_KIND_AGENT_UNREACHABLE}
        answering = [m for m in kept if m.name and m.name not in silent]
        assert len(answering) > len(kept) // 2, "no voter is removed so that the answering voters lose quorum"


def _checked_again(
    client: Client, expected: list[Fact], within: float
) -> tuple[pb.MembershipDiff, repair_pb2.RepairPlan]:
    """The diff once it shows `expected`, and a new plan: nothing safe is left to do, and each discrepancy left is
    unplanned with why, or put to a human to confirm."""
    diff = _settles_on(client, expected, within)
    plan = client.plan_repair()
    assert not [a.id for a in plan.actions if a.safety == SAFE], "an apply leaves nothing safe undone"
    explained = {u.discrepancy_id for u in plan.unplanned if u.reason}
    explained |= {i for action in plan.actions for i in action.clears}
    assert {x.id for x in _loud(diff)} <= explained
    return diff, plan


def _apply(client: Client, plan: repair_pb2.RepairPlan, confirmed: list[str]) -> None:
    applied = client.apply_repair(expected_fingerprint=plan.fingerprint, confirmed_action_ids=confirmed)
    assert [a.id for a in applied.plan.actions] == [a.id for a in plan.actions], "planned again, the same"
    if any(a.safety == SAFE or a.id in confirmed for a in plan.actions):
        operation = applied.operation
        steps = [(step.name, operation_pb2.StepState.Name(step.state)) for step in operation.steps]
        assert operation.state == operation_pb2.OPERATION_STATE_SUCCEEDED, (operation.error, steps)
    else:
        assert not applied.HasField("operation")


def _shown(plan: repair_pb2.RepairPlan, diff: pb.MembershipDiff) -> str:
    actions = [
        f"{a.id[:8]} {'safe' if a.safety == SAFE else 'confirm'} {a.member.name or a.member.address}: "
        + ", ".join(step.name for step in a.steps)
        for a in plan.actions
    ]
    loud = {x.id: _fact(x) for x in _loud(diff)}
    left = Counter(" ".join(loud[u.discrepancy_id][:2]) for u in plan.unplanned if u.discrepancy_id in loud)
    unplanned = [f"unplanned: {', '.join(f'{n}x {fact}' for fact, n in sorted(left.items()))}"] if left else []
    return "; ".join(actions + unplanned) or "nothing"


def _state(diff: pb.MembershipDiff) -> str:
    return ", ".join(" ".join(filter(None, fact)) for fact in sorted(_fact(x) for x in _loud(diff))) or "clean"


def _repair(client: Client, scenario: str, backend: str, outcome: Outcome, raft: Callable[[], RaftIds]) -> None:
    """Plans, checks the plan, applies it (confirming nothing), checks the remainder; then, when the outcome says
    so, confirms what needs it, applies again and checks again. Prints the case's line."""
    within = SETTLE if backend == "dqlite" else 0.0
    diff = client.check_membership(timeout=10).diff
    plan = _eligible_plan(client, diff)
    _assert_obeys_the_rules(plan, diff)
    to_confirm = {a.id for a in plan.actions if a.safety == CONFIRM}
    assert bool(to_confirm) is (outcome.confirmed is not None)
    before = raft()
    _apply(client, plan, [])
    after, again = _checked_again(client, outcome.left, within)
    assert {a.id for a in again.actions} == to_confirm, "what needs a human is planned again, by the same ids"
    state = _state(after)
    if outcome.confirmed is not None:
        _apply(client, again, sorted(to_confirm))
        confirmed, _ = _checked_again(client, outcome.confirmed, within)
        state += f"; confirmed: {_state(confirmed)}"
    assert raft() <= before, "nothing was added to the Raft configuration"
    print(f"{scenario} | {backend} | {_shown(plan, diff)} | {state}")


# --- local ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    """The module's lab (conftest's `pristine` restores it), its coordinator with a short grace period."""
    running = labs.up(tmp_path_factory.mktemp("lab"), 3)
    try:
        start_coordinator(running, {}, {"repair_grace": GRACE})
        yield running
    finally:
        labs.down(running.dir)


def _registry(lab: labs.Lab) -> Path:
    return Path(json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())["registry"])


@pytest.fixture
def untouched(lab: labs.Lab) -> Iterator[None]:
    """The coordinator's registry as it was: a removal's last step forgets its member there."""
    registry = _registry(lab)
    saved = registry.read_bytes()
    yield
    write_atomically(registry, saved)


def test_every_local_scenario_has_its_expected_repair() -> None:
    assert set(LOCAL) == set(SCENARIOS)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_local_scenario_is_repaired(name: str, untouched: None, pristine: labs.Lab, client: Client) -> None:
    make, expected = SCENARIOS[name]
    make(pristine)
    _settles_on(client, expected, 0.0)
    _repair(client, name, "local", LOCAL[name], lambda: {(i, a) for i, a, _ in d.raft_entries(pristine)})


# --- dqlite -----------------------------------------------------------------------------------------------------


@dataclass
class DqliteLab:
    lab: labs.Lab
    scratch: Path  # where a scenario lays out the engines it starts
    engines: list[DqliteNode] = field(default_factory=list)  # engines a scenario started, stopped after it

    @property
    def leader(self) -> str:
        address = _leader_address(self.lab)
        return next(n["name"] for n in self.lab.document["nodes"] if n["dqlite"]["address"] == address)

    def followers(self) -> list[str]:
        leader = self.leader
        return [n["name"] for n in self.lab.document["nodes"] if n["name"] != leader]


def _insert_row(lab: labs.Lab, name: str, address: str, certificate: str, role: str) -> None:
    _sql(
        lab,
        "INSERT INTO core_cluster_members (name, address, certificate, schema_internal, schema_external, heartbeat,"
        " role) VALUES (?, ?, ?, 0, 0, CURRENT_TIMESTAMP, ?)",
        name,
        address,
        certificate,
        role,
    )


def _rows(lab: labs.Lab) -> list[tuple[str, str, str, str]]:
    async def read() -> list[tuple[str, str, str, str]]:
        async with await _leader(lab) as connection:
            await connection.open(DATABASE)
            rows = await connection.query("SELECT name, address, certificate, role FROM core_cluster_members")
            return [(str(n), str(a), str(c), str(r)) for n, a, c, r in rows]

    return asyncio.run(read())


def _raft(lab: labs.Lab) -> RaftIds:
    async def read() -> RaftIds:
        async with await _leader(lab) as connection:
            return {(node.id, node.address) for node in await connection.cluster()}

    return asyncio.run(read())


def _remove_from_raft(lab: labs.Lab, entries: RaftIds) -> None:
    async def remove() -> None:
        async with await _leader(lab) as connection:
            for node_id, _ in entries:
                await connection.remove(node_id)

    asyncio.run(remove())


def _join_engine(lab: DqliteLab, name: str, address: str, tls: NodeTls) -> DqliteNode:
    """A fourth engine that adds itself to the Raft configuration through the leader, as go-dqlite's joiners do."""
    spec = MemberSpec(name, address, lab.scratch / name)
    [engine] = start_members([spec], {name: tls}, join=[_leader_address(lab.lab)], roles_interval=ROLES_INTERVAL)
    lab.engines.append(engine)
    return engine


def _dq_ghost_raft_member(lab: DqliteLab) -> None:
    """S1: the engine needs only a certificate its peers trust (n1's); then it is killed and wiped."""
    n1 = d.state_dir(lab.lab, "n1")
    tls = NodeTls(n1 / "server.crt", n1 / "server.key", n1 / "truststore")
    ghost = _join_engine(lab, "ghost", loopback_addresses(1)[0], tls)
    ghost.process.kill()
    stop_node(ghost)
    shutil.rmtree(ghost.data_dir)


def _dq_pending_row(lab: DqliteLab, *, trusted_by_leader: bool) -> None:
    """S2, and S3 with the leader's trust."""
    name, address, certificate = d.new_member("j1", "127.0.0.1:2")
    _insert_row(lab.lab, name, address, certificate, "PENDING")
    if trusted_by_leader:
        d.trust(lab.lab, lab.leader, name, address, certificate)


def _dq_partial_fan_out(lab: DqliteLab) -> None:
    """S4: j1, trusted by the leader only, joins the engine, and its row is written."""
    address = loopback_addresses(1)[0]
    tls = lay_out_members([MemberSpec("j1", address, lab.scratch / "j1")])["j1"]
    for record in d.truststore(lab.lab, "n1").glob("*.yaml"):
        shutil.copy2(record, tls.truststore)  # j1 trusts the members it dials
    certificate = tls.cert.read_text()
    d.trust(lab.lab, lab.leader, "j1", address, certificate)
    _join_engine(lab, "j1", address, tls)
    _insert_row(lab.lab, "j1", address, certificate, "spare")


def _dq_ghost_row(lab: DqliteLab) -> None:
    """S15: a row Raft does not hold, role "", trusted everywhere."""
    name, address, certificate = d.new_member("x1", "127.0.0.1:3")
    _insert_row(lab.lab, name, address, certificate, "")
    for node in ("n1", "n2", "n3"):
        d.trust(lab.lab, node, name, address, certificate)


def _dq_duplicate_address(lab: DqliteLab) -> None:
    """S12: n2-new at n2's engine address, with a row and a record everywhere."""
    name, _, certificate = d.new_member("n2-new", "")
    address = lab.lab.node("n2")["dqlite"]["address"]
    _insert_row(lab.lab, name, address, certificate, "voter")
    for node in ("n1", "n2", "n3"):
        d.trust(lab.lab, node, name, address, certificate)


def _dq_stale_cluster_cache(lab: DqliteLab) -> None:
    """n2's cluster.yaml lacks n3 and looks an hour old; the engine rewrites it at its next tick."""
    cache = d.state_dir(lab.lab, "n2") / "database" / "cluster.yaml"
    written, deadline = cache.stat().st_mtime_ns, time.monotonic() + 2 * ROLES_INTERVAL + 1
    while cache.stat().st_mtime_ns == written:  # right after a tick, a whole interval is left to see it stale
        assert time.monotonic() < deadline, "the engine did not rewrite its cluster.yaml"
        time.sleep(0.01)
    n3 = lab.lab.node("n3")["dqlite"]["address"]
    entries = [(e["ID"], e["Address"], Role((e["Role"] or 0) + 1)) for e in yaml.safe_load(cache.read_text())]
    write_raft_config(cache, [entry for entry in entries if entry[1] != n3])
    d.age(cache, 3600)


def _dq_row_with_another_certificate(lab: DqliteLab) -> None:
    _, _, certificate = d.new_member("n2", "")
    _sql(lab.lab, "UPDATE core_cluster_members SET certificate = ? WHERE name = ?", certificate, "n2")


def _dq_record_deleted(on_leader: bool) -> Callable[[DqliteLab], None]:
    """S9 and S10: a follower's record of another member, or the leader's, deleted."""

    def scenario(lab: DqliteLab) -> None:
        followers = lab.followers()
        node = lab.leader if on_leader else followers[0]
        d.distrust(lab.lab, node, followers[-1])

    return scenario


def _follower_trust(lab: DqliteLab) -> list[Fact]:
    return [("MISSING", "BLOCKING", "TRUSTSTORE", node) for node in lab.followers()]


# (make it, what the diff then holds above INFO, what a repair leaves)
DqliteScenario = tuple[Callable[[DqliteLab], None], Callable[[DqliteLab], list[Fact]], Outcome]
DQLITE: dict[str, DqliteScenario] = {
    "S1 ghost Raft member": (_dq_ghost_raft_member, lambda _: [MISSING_ROW], Outcome([MISSING_ROW], confirmed=[])),
    "S2 PENDING row only": (
        lambda lab: _dq_pending_row(lab, trusted_by_leader=False),
        lambda _: [("MISSING", "BLOCKING", "RAFT_CONFIG", "")],
        CLEAN,
    ),
    "S3 PENDING row and leader trust": (
        lambda lab: _dq_pending_row(lab, trusted_by_leader=True),
        lambda _: [("MISSING", "BLOCKING", "RAFT_CONFIG", "")],
        CLEAN,
    ),
    "S4 partial truststore fan-out": (
        _dq_partial_fan_out,
        lambda lab: [*_follower_trust(lab), UNWATCHED_J1],
        Outcome([UNWATCHED_J1]),
    ),
    "S6 row deleted, still in Raft": (
        lambda lab: _sql(lab.lab, "DELETE FROM core_cluster_members WHERE name = ?", "n2"),
        lambda _: [MISSING_ROW],
        CLEAN,
    ),
    "S9 truststore record deleted on a follower": (
        _dq_record_deleted(on_leader=False),
        lambda lab: [("MISSING", "BLOCKING", "TRUSTSTORE", lab.followers()[0])],
        CLEAN,
    ),
    "S10 truststore record deleted on the leader": (
        _dq_record_deleted(on_leader=True),
        lambda lab: [("MISSING", "BLOCKING", "TRUSTSTORE", lab.leader)],
        CLEAN,
    ),
    "S12 duplicate address": (_dq_duplicate_address, lambda _: [DUPLICATE], Outcome([DUPLICATE])),
    "S15 ghost row": (_dq_ghost_row, lambda _: [("MISSING", "BLOCKING", "RAFT_CONFIG", "")], CLEAN),
    # Waited for, never repaired: the engine's next tick rewrites it.
    "stale cluster.yaml": (_dq_stale_cluster_cache, lambda _: [STALE_CACHE], CLEAN),
    "row with another certificate": (_dq_row_with_another_certificate, lambda _: DISPUTED, Outcome(DISPUTED)),
}


def _dq_removal_crashed_after_raft_remove(lab: DqliteLab) -> None:
    """S7/S8: a follower left Raft and the table; the truststores still hold it, and it still believes it is one."""
    gone = lab.followers()[-1]
    address = lab.lab.node(gone)["dqlite"]["address"]
    _remove_from_raft(lab.lab, {entry for entry in _raft(lab.lab) if entry[1] == address})
    _sql(lab.lab, "DELETE FROM core_cluster_members WHERE name = ?", gone)


def _removed_follower(lab: DqliteLab) -> list[Fact]:
    gone = lab.followers()[-1]
    return [
        *(("ORPHAN", "BLOCKING", "TRUSTSTORE", node) for node in ("n1", "n2", "n3")),
        ("NODE_INFO_MISMATCH", "BLOCKING", "NODE_INFO", gone),
        ("VIEW_DIFFERS", "WARNING", "RAFT_NODE_VIEW", gone),
    ]


@contextmanager
def _dqlite_lab(directory: Path) -> Iterator[DqliteLab]:
    running = labs.up(directory / "lab", 3, backend="dqlite", roles_interval=ROLES_INTERVAL)
    try:
        start_coordinator(running, {}, {"repair_grace": GRACE})
        yield DqliteLab(running, directory / "engines")
    finally:
        labs.down(running.dir)


def _dqlite_case(lab: DqliteLab, name: str, scenario: DqliteScenario) -> None:
    make, expected, outcome = scenario
    with Client(lab.lab.endpoint) as client:
        _settles_on(client, [], SETTLE)
        facts = expected(lab)  # named before the change: a scenario may move the leader
        make(lab)
        _settles_on(client, facts, SETTLE)
        _repair(client, name, "dqlite", outcome, lambda: _raft(lab.lab))


@pytest.fixture(scope="module")
def dqlite_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DqliteLab]:
    with _dqlite_lab(tmp_path_factory.mktemp("dqlite")) as running:
        yield running


@pytest.fixture
def dqlite_pristine(dqlite_lab: DqliteLab, tmp_path: Path) -> Iterator[DqliteLab]:
    """The dqlite lab restored after the test: its rows, truststores and registry, no Raft entry a scenario added,
    no engine it started; then it waits until the diff is clean again."""
    lab = dqlite_lab.lab
    rows, raft, registry = _rows(lab), _raft(lab), _registry(lab).read_bytes()
    for node in ("n1", "n2", "n3"):
        shutil.copytree(d.truststore(lab, node), tmp_path / node)
    yield dqlite_lab
    for engine in dqlite_lab.engines:
        stop_node(engine)
    dqlite_lab.engines.clear()
    _remove_from_raft(lab, _raft(lab) - raft)
    _sql(lab, "DELETE FROM core_cluster_members")
    for row in rows:
        _insert_row(lab, *row)
    for node in ("n1", "n2", "n3"):
        shutil.rmtree(d.truststore(lab, node))
        shutil.copytree(tmp_path / node, d.truststore(lab, node))
    write_atomically(_registry(lab), registry)
    with Client(lab.endpoint) as client:
        _settles_on(client, [], SETTLE)


@pytest.mark.dqlite
@pytest.mark.parametrize("name", list(DQLITE))
def test_a_dqlite_scenario_is_repaired(name: str, dqlite_pristine: DqliteLab) -> None:
    _dqlite_case(dqlite_pristine, name, DQLITE[name])


@pytest.mark.dqlite
def test_s7_on_dqlite_the_removed_node_is_fenced_and_forgotten(tmp_path: Path) -> None:
    """On a lab of its own: fencing kills the node's engine and empties its data, which no restore undoes."""
    with _dqlite_lab(tmp_path) as lab:
        scenario = (_dq_removal_crashed_after_raft_remove, _removed_follower, CLEAN)
        _dqlite_case(lab, "S7 removal crashed after Raft remove", scenario)
