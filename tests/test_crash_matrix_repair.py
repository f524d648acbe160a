"""Crash matrix for repairs (issue 11): a three-action repair with the coordinator killed at every step boundary and at
random moments, restarted, ending clean; and repairs racing joins.

The repair: a follower's members-table row deleted (restored from its own agent's report, through n1), and another
follower's record lost by the leader's truststore and by the first follower's (each restored from the table): three
SAFE actions of one step each, on three sources of two nodes, the row's step first (the planner restores rows before
truststores). On the dqlite lab the row goes through the leader's SQL and the leader is the engine's.

The matrix: one lab per backend (local, and dqlite marked `dqlite`), reused case after case, the divergence made again
each time. For every boundary of the plan's three steps (before-step:N, applied-step:N, after-step:N; the fault hook,
coordinator/faults.py) the coordinator is started armed, asked to apply, exits at the boundary, and is checked to have
stopped there (the sources show exactly the steps before it applied); then it is started again and its reconciler
decides. Only before-step:0 is before the commit point (the first step) with nothing sent: the repair is ROLLED_BACK,
sending nothing, and the diff is the one from before, which a second repair clears. Every later boundary has its first
step applied (recorded, or SENT and shown by the sources): the repair rolls forward to SUCCEEDED. Either way the lab
then settles with nothing left (tests/settling.py), and the same request id gets the same operation back. Every
boundary is covered on local; on dqlite, a spread of four (DQLITE_SPREAD) in `make test` and all nine with
MEMBERGUARD_CRASH_MATRIX=full (`make crash-matrix`): a case takes a few seconds (two coordinator starts).

Random moments: the coordinator killed with SIGKILL at a delay drawn uniformly over an undisturbed apply's measured
duration on that lab, then started again: the repair was never journaled (the diff is as before), ROLLED_BACK (as
before) or SUCCEEDED (clean); a second repair clears what is left. MEMBERGUARD_CRASH_TRIALS trials per backend
(default 3), the delays from MEMBERGUARD_CRASH_SEED (default today's date), as tests/test_crash_anywhere.py draws them;
the seed is printed with every trial and in a failure.

Races, on the same labs, each joiner removed again at its end. (a) A join held in flight (the coordinator stopped
before the join's commit step, the joiner's agent then frozen so that the step hangs on it, the coordinator continued)
while a repair is planned and applied, with a grace period short enough that the joiner's reserved row and records
would be eligible orphans: the plan leaves everything about the joiner to its join, the apply queues on the membership
lock behind it, and both succeed. (b) A repair and a join started together in two threads: the join succeeds, the
repair succeeds (before it, on the lock) or is ABORTED with the diff the join left, and a second repair clears what is
left. Started together the repair mostly wins the lock (a join is verified first), so a second case starts the join
first (the coordinator stopped before its first step, holding the lock, while the repair is asked): the repair is
ABORTED.

Run with -s to see each case's outcome.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from memberguard import Client, MemberguardError, StaleFingerprint
from memberguard.v1 import coordinator_pb2, repair_pb2
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests import divergence as d
from tests import matrix
from tests.restarts import start_coordinator, wait_until_stopped
from tests.settling import settled
from tests.test_crash_anywhere import _at, _kill_coordinator, _seed, _trials
from tests.test_crash_matrix_agents import JOIN_STEPS
from tests.test_dqlite_lab import _leader_address, _sql
from tests.test_repair_scenarios import _rows

STEPS = 3  # the repair's: a row, two truststore records
BOUNDARIES = [f"{when}-step:{index}" for index in range(STEPS) for when in ("before", "applied", "after")]
# On dqlite `make test` takes a spread, one boundary of each kind and each step; MEMBERGUARD_CRASH_MATRIX=full
# (`make crash-matrix`) every one, as on local, where a case costs a third of the time.
DQLITE_SPREAD = ("before-step:0", "applied-step:0", "after-step:1", "applied-step:2")
ROLES_INTERVAL = 0.5
SETTLE = 20.0  # seconds for the lab to settle once the restarted coordinator's reconciler has decided
JOIN_COMMIT = next(index for index, step in enumerate(JOIN_STEPS) if step.commit_point)
# Short enough that a joiner's reserved row and records, if they were anybody's to repair, would be eligible orphans
# by the time the race plans; the planner leaves them to the join all the same.
RACE_GRACE = 0.1
BACKENDS = ["local", pytest.param("dqlite", marks=pytest.mark.dqlite)]


# --- a lab and its coordinator ------------------------------------------------------------------------------------


@dataclass
class RepairLab:
    lab: labs.Lab
    coordinator: subprocess.Popen[bytes] | None = None  # the coordinator this module started last

    @property
    def backend(self) -> str:
        return str(self.lab.document["backend"])

    def restart(self, env: dict[str, str], settings: dict[str, Any] | None = None) -> None:
        self.coordinator, _ = start_coordinator(self.lab, env, settings)

    def leader(self) -> str:
        """The engine's leader on dqlite; on local, whose Raft configuration is a file, n1."""
        if self.backend == "local":
            return "n1"
        address = _leader_address(self.lab)
        return str(next(n["name"] for n in self.lab.document["nodes"] if n["dqlite"]["address"] == address))

    def delete_row(self, name: str) -> None:
        if self.backend == "local":
            d.delete_row(self.lab, name)
        else:
            _sql(self.lab, "DELETE FROM core_cluster_members WHERE name = ?", name)

    def has_row(self, name: str) -> bool:
        if self.backend != "local":
            return any(row[0] == name for row in _rows(self.lab))
        with sqlite3.connect(d.members_table(self.lab)) as connection:
            found = connection.execute("SELECT 1 FROM core_cluster_members WHERE name = ?", (name,)).fetchall()
        connection.close()
        return bool(found)


def _up(directory: Path, backend: str) -> RepairLab:
    return RepairLab(labs.up(directory, 3, backend=backend, roles_interval=ROLES_INTERVAL))


def _down(lab: RepairLab) -> None:
    labs.down(lab.lab.dir)
    if lab.coordinator is not None:
        lab.coordinator.wait(10)
    for pid, child in list(labs._children.items()):  # engines an agent fenced: reaped here
        if child.poll() is not None:
            del labs._children[pid]


@pytest.fixture(scope="module", params=BACKENDS)
def repair_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RepairLab]:
    """The backend's lab for the whole module: each case leaves it consistent, with its three members."""
    lab = _up(tmp_path_factory.mktemp(f"repair-{request.param}") / "lab", request.param)
    try:
        yield lab
    finally:
        _down(lab)


# --- the divergence and what a repair does about it ---------------------------------------------------------------


def _loud(diff: pb.MembershipDiff) -> set[str]:
    """The ids of its discrepancies above INFO (INFO is the engine's own lag, which comes and goes)."""
    return {x.id for x in diff.discrepancies if x.severity != pb.SEVERITY_INFO}


def _read_whole(
    client: Client, before: pb.MembershipDiff, within: float = 10.0
) -> tuple[list[tuple[int, int, str, str]], str]:
    """The facts of the diff once every agent answers (a coordinator just started may not reach them all in its first
    check, and what it did not see is no change to the sources), less what the divergence itself makes come and go:
    the untrusted member's agent reads the table and the configuration over a connection to the leader opened before
    the leader stopped trusting it. A call the kill cuts short closes it, the leader refuses a new one, and those two
    sources are unreadable on that node until a repair restores its record; the name of that node when they are. Fails
    after within seconds."""
    [untrusted] = {x.member.name for x in before.discrepancies if x.source == pb.SOURCE_TRUSTSTORE}
    deadline = time.monotonic() + within
    while True:
        diff = client.check_membership(timeout=10).diff
        if not any(x.kind == pb.DISCREPANCY_KIND_AGENT_UNREACHABLE for x in diff.discrepancies):
            cut_off = (pb.DISCREPANCY_KIND_SOURCE_UNREADABLE, untrusted)
            facts = [fact for fact in _facts(diff) if (fact[0], fact[2]) != cut_off]
            return facts, untrusted if len(facts) < len(_facts(diff)) else ""
        assert time.monotonic() < deadline, f"an agent did not answer within {within:g} s: {_facts(diff)}"
        time.sleep(0.1)


def _facts(diff: pb.MembershipDiff) -> list[tuple[int, int, str, str]]:
    return sorted(
        (x.kind, x.source, x.node, x.member.name) for x in diff.discrepancies if x.severity != pb.SEVERITY_INFO
    )


def _diverged(lab: RepairLab, client: Client) -> tuple[pb.MembershipDiff, repair_pb2.RepairPlan]:
    """From a settled lab: a follower's row deleted, another follower's record lost by the leader and by the first
    follower; returns the diff once it shows exactly that, and its plan, checked."""
    settled(client, SETTLE)
    leader = lab.leader()
    rowless, untrusted = sorted(n["name"] for n in lab.lab.document["nodes"] if n["name"] != leader)
    lab.delete_row(rowless)
    for node in (leader, rowless):
        d.distrust(lab.lab, node, untrusted)
    expected = sorted(
        [
            (pb.DISCREPANCY_KIND_MISSING, pb.SOURCE_MEMBERS_TABLE, "", rowless),
            *((pb.DISCREPANCY_KIND_MISSING, pb.SOURCE_TRUSTSTORE, node, untrusted) for node in (leader, rowless)),
        ]
    )
    deadline = time.monotonic() + SETTLE
    while _facts(diff := client.check_membership(timeout=10).diff) != expected:
        assert time.monotonic() < deadline, f"the divergence shows {_facts(diff)}, not {expected}"
        time.sleep(0.1)
    plan = client.plan_repair(expected_fingerprint=diff.fingerprint)
    assert not plan.unplanned and len(plan.actions) == STEPS, plan
    assert all(a.safety == pb.REMEDY_SAFETY_SAFE and len(a.steps) == 1 for a in plan.actions)
    assert [a.steps[0].source for a in plan.actions] == [pb.SOURCE_MEMBERS_TABLE] + [pb.SOURCE_TRUSTSTORE] * 2
    return diff, plan


def _applied(lab: RepairLab, plan: repair_pb2.RepairPlan) -> list[bool]:
    """For each step of the plan, whether the sources show its effect (read from the files and the engine, not
    through a coordinator)."""
    seen = []
    for action in plan.actions:
        [step] = action.steps
        if step.source == pb.SOURCE_MEMBERS_TABLE:
            seen.append(lab.has_row(action.member.name))
        else:
            seen.append((d.truststore(lab.lab, step.node) / f"{action.member.name}.yaml").exists())
    return seen


def _operation(client: Client, request_id: str) -> o.Operation | None:
    """The repair the request id started, once the reconciler is done with it; None if it was never journaled."""
    found = [op for op in client.list_operations().operations if op.audit.request_id == request_id]
    if not found:
        return None
    [operation] = found
    assert operation.kind == o.OPERATION_KIND_REPAIR
    return client.wait_operation(operation.id, wait=SETTLE)


def _state(operation: o.Operation | None) -> str:
    if operation is None:
        return "never journaled"
    return o.OperationState.Name(operation.state).removeprefix("OPERATION_STATE_").lower().replace("_", " ")


def _ends_clean(client: Client, before: pb.MembershipDiff, operation: o.Operation | None) -> str:
    """What the restarted coordinator left, checked: a repair rolled back (or never journaled) left the diff as it
    was, and a second repair clears it; one that succeeded left it clean. Then the lab settles; the outcome in words."""
    outcome = [_state(operation)]
    if operation is None or operation.state == o.OPERATION_STATE_ROLLED_BACK:
        if operation is not None:
            assert operation.error, "a rollback says why"
            assert not [s.name for s in operation.steps if s.state == o.STEP_STATE_DONE], "rolled back: no step done"
        facts, cut_off = _read_whole(client, before)
        assert facts == _facts(before), "the diff is as before"
        if cut_off:
            outcome.append(f"{cut_off} cut off from the leader")
        now = client.check_membership(timeout=10).diff
        again = client.apply_repair(expected_fingerprint=now.fingerprint).operation
        assert again.state == o.OPERATION_STATE_SUCCEEDED, again
        outcome.append("repaired again: succeeded")
    else:
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        assert all(s.state == o.STEP_STATE_DONE for s in operation.steps), operation
    diff = settled(client, SETTLE)
    assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3"]
    return "; ".join(outcome)


# --- the matrix ---------------------------------------------------------------------------------------------------


# Steps 1 and 2, truststore records on two nodes past the commit point, are sent together (next_steps in
# core/operation.py): every boundary of either finds both sent, or neither.
TOGETHER = ((0,), (1, 2))


def _sources_at(boundary: str) -> list[bool]:
    """Which steps the sources show applied when the coordinator exits at boundary: those before it, and at
    applied-step:N and after-step:N step N itself, with the steps sent together with it."""
    when, _, index = boundary.partition("-step:")
    together = next(steps for steps in TOGETHER if int(index) in steps)
    done = together[0] if when == "before" else together[-1] + 1
    return [i < done for i in range(STEPS)]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_repair_killed_at_a_step_boundary_ends_clean(repair_lab: RepairLab, boundary: str) -> None:
    if repair_lab.backend == "dqlite" and boundary not in DQLITE_SPREAD and not matrix.full():
        pytest.skip(f"on dqlite `make test` kills at {', '.join(DQLITE_SPREAD)}; {matrix.ENVIRONMENT}=full at all")
    lab, request_id = repair_lab, f"repair-{boundary}"
    with Client(lab.lab.endpoint) as client:
        before, plan = _diverged(lab, client)
    lab.restart({FAULT_ENV: boundary})
    with Client(lab.lab.endpoint) as client:
        seen = client.check_membership(timeout=10).diff  # the engine's INFO lag may have moved the fingerprint
        assert _loud(seen) == _loud(before), "an armed coordinator changes nothing before it is asked"
        with pytest.raises(MemberguardError):
            client.apply_repair(expected_fingerprint=seen.fingerprint, request_id=request_id)
    assert lab.coordinator is not None and lab.coordinator.wait(30) == 137, "the armed fault did not fire"
    assert _applied(lab, plan) == _sources_at(boundary), "the coordinator stopped where it was armed"
    lab.restart({})
    with Client(lab.lab.endpoint) as client:
        operation = _operation(client, request_id)
        assert operation is not None, "a repair that reached a step boundary was journaled"
        assert [s.name for s in operation.steps] == [a.steps[0].name for a in plan.actions]
        # The first step is the commit point: only a crash before it was sent rolls back.
        expected = o.OPERATION_STATE_ROLLED_BACK if boundary == "before-step:0" else o.OPERATION_STATE_SUCCEEDED
        assert operation.state == expected, operation
        outcome = _ends_clean(client, before, operation)
        assert client.apply_repair(request_id=request_id).operation.id == operation.id, "the retry gets it back"
    print(f"\nREPAIR MATRIX {lab.backend} {boundary}: {outcome}", end="")


def _measure(lab: RepairLab) -> float:
    """How long an undisturbed apply of the repair takes on this lab, from the call to its answer."""
    with Client(lab.lab.endpoint) as client:
        before, _ = _diverged(lab, client)
        started = time.monotonic()
        applied = client.apply_repair(expected_fingerprint=before.fingerprint)
        duration = time.monotonic() - started
        assert applied.operation.state == o.OPERATION_STATE_SUCCEEDED, applied.operation
    return duration


def _killed_at(lab: RepairLab, delay: float, request_id: str) -> str:
    with Client(lab.lab.endpoint) as client:
        before, _ = _diverged(lab, client)
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            running = pool.submit(client.apply_repair, expected_fingerprint=before.fingerprint, request_id=request_id)
            _at(delay, started, lambda: _kill_coordinator(lab.lab))
            try:
                first = f"answered {_state(running.result(timeout=60).operation)}"
            except MemberguardError as error:
                first = f"cut short ({type(error).__name__})"
    if lab.coordinator is not None:
        lab.coordinator.wait(10)
    lab.restart({})
    with Client(lab.lab.endpoint) as client:
        return f"{first}; {_ends_clean(client, before, _operation(client, request_id))}"


def test_a_repair_killed_at_random_moments_ends_clean(repair_lab: RepairLab) -> None:
    lab, seed, count = repair_lab, _seed(), _trials()
    rng = random.Random(f"{seed}/{lab.backend}/repair")
    duration = _measure(lab)
    for number in range(1, count + 1):
        delay = rng.uniform(0.0, duration)
        label = f"REPAIR CRASH {lab.backend} trial {number}/{count} seed {seed}: delay {delay * 1000:.1f} ms of "
        label += f"{duration * 1000:.1f} ms"
        try:
            outcome = _killed_at(lab, delay, f"repair-random-{number}")
        except (AssertionError, MemberguardError, labs.LabError) as failed:
            pytest.fail(f"{label}: {failed} (replay with MEMBERGUARD_CRASH_SEED={seed})", pytrace=False)
        print(f"\n{label}: {outcome}", end="")


# --- races with joins ---------------------------------------------------------------------------------------------


def _names_anyone(plan: repair_pb2.RepairPlan, name: str) -> list[str]:
    """The ids of the plan's actions that are about name, or touch its node, or take it as evidence."""
    return [
        action.id
        for action in plan.actions
        if action.member.name == name
        or any(
            step.node == name or any(record.name == name for record in step.evidence.records) for step in action.steps
        )
    ]


def _joined_then_removed(client: Client, joiner: labs.JoiningNode) -> None:
    """The joiner is wholly in once the lab settles; then it is removed again, for the next case to find the lab as
    this one did."""
    diff = settled(client, SETTLE)
    assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3", joiner.name]
    assert joiner.name in diff.nodes, "the joiner's agent is gathered: it is registered"
    removed = client.remove_member(joiner.name)
    assert removed.state == o.OPERATION_STATE_SUCCEEDED, removed
    assert sorted(m.name for m in settled(client, SETTLE).members) == ["n1", "n2", "n3"]


def test_a_repair_planned_while_a_join_is_in_flight_leaves_the_joiner_alone(repair_lab: RepairLab) -> None:
    lab = repair_lab
    lab.restart({FAULT_ENV: f"stop-before-step:{JOIN_COMMIT}"}, {"repair_grace": RACE_GRACE})
    coordinator = lab.coordinator
    assert coordinator is not None
    joiner = labs.start_joining_node(lab.lab)
    frozen = False
    try:
        with Client(lab.lab.endpoint) as client, ThreadPoolExecutor(2) as pool:
            token = client.issue_token(joiner.name).token
            joining = pool.submit(joiner.join, token)
            wait_until_stopped(coordinator)
            # The join holds the lock with everything but its commit step done on the members: the joiner's row is
            # reserved (PENDING) and every member trusts it. A divergence of its own for the repair, on another node.
            d.distrust(lab.lab, "n2", "n3")
            os.kill(joiner.agent_pid, signal.SIGSTOP)
            frozen = True
            os.kill(coordinator.pid, signal.SIGCONT)
            time.sleep(2 * RACE_GRACE)
            diff = client.check_membership(timeout=10).diff
            about = {x.id for x in diff.discrepancies if x.member.name == joiner.name}
            assert about, "the join in flight shows in the diff"
            plan = client.plan_repair()
            assert not _names_anyone(plan, joiner.name), plan
            [join_id] = [
                op.id
                for op in client.list_operations().operations
                if op.kind == o.OPERATION_KIND_JOIN and op.member.name == joiner.name
            ]
            left = {u.discrepancy_id: u.reason for u in plan.unplanned}
            assert about <= set(left) and all(join_id in left[i] for i in about), "left to the join, which says so"
            [trust] = plan.actions
            assert [(s.node, s.name) for s in trust.steps] == [("n2", "restore n3 in n2's truststore")]
            repairing: Future[coordinator_pb2.RepairResponse] = pool.submit(client.apply_repair)
            time.sleep(1.0)
            assert not repairing.done(), "the repair waits for the join's lock"
            os.kill(joiner.agent_pid, signal.SIGCONT)
            frozen = False
            join = joining.result(timeout=60)
            assert join.state == o.OPERATION_STATE_SUCCEEDED, join
            repaired = repairing.result(timeout=60)
            assert not _names_anyone(repaired.plan, joiner.name), repaired.plan
            assert repaired.operation.state == o.OPERATION_STATE_SUCCEEDED, repaired.operation
            assert repaired.operation.created_at.ToNanoseconds() >= join.updated_at.ToNanoseconds(), "queued"
            _joined_then_removed(client, joiner)
        print(f"\nREPAIR RACE {lab.backend} in flight: join succeeded, then the repair: {trust.steps[0].name}", end="")
    finally:
        if frozen:
            os.kill(joiner.agent_pid, signal.SIGCONT)
        if coordinator.poll() is None:
            os.kill(coordinator.pid, signal.SIGCONT)
        joiner.stop()


def _repair_and_join(
    pool: ThreadPoolExecutor, lab: RepairLab, repair: Callable[[], Any], join: Callable[[], o.Operation], start: str
) -> tuple[Future[Any], Future[o.Operation]]:
    """Starts both: together (a barrier releases the two threads at once: whichever reaches the lock first runs
    first), or the join first (the coordinator stops itself before the join's first step, holding the lock, and the
    repair is asked while it is stopped)."""
    if start == "join first":
        assert lab.coordinator is not None
        joining = pool.submit(join)
        wait_until_stopped(lab.coordinator)
        repairing = pool.submit(repair)
        time.sleep(0.5)  # the request reaches the stopped coordinator's socket
        os.kill(lab.coordinator.pid, signal.SIGCONT)
        return repairing, joining
    barrier = threading.Barrier(2)

    def released(call: Callable[[], Any]) -> Any:
        barrier.wait()
        return call()

    return pool.submit(released, repair), pool.submit(released, join)


@pytest.mark.parametrize("start", ["together", "join first"])
def test_a_repair_and_a_join_started_together_both_end_correct(repair_lab: RepairLab, start: str) -> None:
    lab = repair_lab
    if start == "join first":
        lab.restart({FAULT_ENV: "stop-before-step:0"})
    joiner = labs.start_joining_node(lab.lab)
    try:
        with Client(lab.lab.endpoint) as client, ThreadPoolExecutor(2) as pool:
            token = client.issue_token(joiner.name).token
            # A misnamed record: a WARNING no join is refused for, which the repair moves where it belongs.
            store = d.truststore(lab.lab, "n1")
            (store / "n2.yaml").rename(store / "old-n2.yaml")
            before = client.check_membership(timeout=10).diff
            assert [(x.kind, x.node) for x in before.discrepancies if x.severity != pb.SEVERITY_INFO] == [
                (pb.DISCREPANCY_KIND_INVALID_ENTRY, "n1")
            ]
            repairing, joining = _repair_and_join(
                pool,
                lab,
                lambda: client.apply_repair(expected_fingerprint=before.fingerprint),
                lambda: joiner.join(token),
                start,
            )
            join = joining.result(timeout=60)
            assert join.state == o.OPERATION_STATE_SUCCEEDED, join
            try:
                repair = repairing.result(timeout=60).operation
            except StaleFingerprint as stale:
                assert stale.diff is not None and stale.diff.fingerprint != before.fingerprint
                outcome = "the join first, the repair aborted with the new diff, repaired again"
                again = client.apply_repair().operation
                assert again.state == o.OPERATION_STATE_SUCCEEDED, again
            else:
                assert start == "together", "a repair queued behind a join is planned on a diff that moved"
                assert repair.state == o.OPERATION_STATE_SUCCEEDED, repair
                # One after the other on the lock, whichever came first.
                first, second = sorted((repair, join), key=lambda op: op.created_at.ToNanoseconds())
                assert first.updated_at.ToNanoseconds() <= second.created_at.ToNanoseconds(), "queued on the lock"
                outcome = f"both succeeded, the {'repair' if first is repair else 'join'} first"
                assert not client.apply_repair().HasField("operation"), "nothing is left to repair"
            _joined_then_removed(client, joiner)
            assert (store / "n2.yaml").exists() and not (store / "old-n2.yaml").exists()
        print(f"\nREPAIR RACE {lab.backend} {start}: {outcome}", end="")
    finally:
        if lab.coordinator is not None and lab.coordinator.poll() is None:
            os.kill(lab.coordinator.pid, signal.SIGCONT)
        joiner.stop()
