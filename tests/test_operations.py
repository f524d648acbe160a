"""GuardedOperation on the local backend, end to end: real lab processes, the guard, the journal, agent steps.

Includes microcluster's own integration tests from PR #515 (docs/scenarios.md), ported: membership
consistency and truststore force-removal, plus the crash matrix of a removal (the coordinator killed at every step
boundary, then restarted: the reconciler finishes the removal).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from memberguard import (
    AlreadyExists,
    Client,
    DirtyMembership,
    InvalidArgument,
    MemberguardError,
    NotFound,
    OperationParked,
    StaleFingerprint,
)
from memberguard.v1 import operation_pb2 as o

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests import divergence as d
from tests import matrix
from tests.restarts import start_coordinator

SUCCEEDED, ROLLED_BACK = o.OPERATION_STATE_SUCCEEDED, o.OPERATION_STATE_ROLLED_BACK


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3)
    yield running
    for pid in running.pids():
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    labs.down(running.dir)


def _remove(
    client: Client, name: str, request_id: str, *, force: bool = False, acks: list[str] | None = None
) -> o.Operation:
    return client.remove_member(name, force=force, acknowledged=acks or [], request_id=request_id)


def _issue(client: Client, name: str, request_id: str) -> o.Operation:
    return client.issue_token(name, request_id=request_id)


def _members(client: Client) -> list[str]:
    return sorted(m.name for m in client.check_membership(timeout=10).diff.members)


def test_a_removal_runs_its_journaled_steps_and_leaves_a_consistent_cluster(own_lab: labs.Lab) -> None:
    with Client(own_lab.endpoint) as client:
        before = client.check_membership(timeout=10).diff.fingerprint
        operation = _remove(client, "n3", "remove-n3")
        assert operation.state == SUCCEEDED and operation.kind == o.OPERATION_KIND_REMOVE
        assert [s.state for s in operation.steps] == [o.STEP_STATE_DONE] * len(operation.steps)
        assert operation.steps[0].commit_point
        assert operation.audit.requested_by == "operator" and operation.audit.fingerprint == before
        diff = client.check_membership(timeout=10).diff
        assert list(diff.discrepancies) == [] and sorted(m.name for m in diff.members) == ["n1", "n2"]
        assert list(diff.nodes) == ["n1", "n2"], "the coordinator forgot n3's agent"
        assert not (Path(own_lab.node("n3")["state_dir"]) / "database" / "info.yaml").exists(), "n3 is fenced"
        # A retry with the same request id returns the recorded outcome instead of running again.
        assert _remove(client, "n3", "remove-n3").id == operation.id
        assert client.get_operation(operation.id).state == SUCCEEDED
        assert client.wait_operation(operation.id, wait=1).state == SUCCEEDED
        assert [op.id for op in client.list_operations().operations] == [operation.id]


def test_the_guard_refuses_with_the_diff_and_changes_nothing(own_lab: labs.Lab) -> None:
    d.distrust(own_lab, "n2", "n3")  # S9
    with Client(own_lab.endpoint) as client:
        before = client.check_membership(timeout=10).diff
        with pytest.raises(DirtyMembership) as refused:
            _remove(client, "n1", "remove-n1")
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
        assert [v[1] for v in refused.value.violations] == [x.id for x in before.discrepancies]
        assert refused.value.diff is not None and refused.value.diff.fingerprint == before.fingerprint
        assert client.check_membership(timeout=10).diff.fingerprint == before.fingerprint
        with pytest.raises(DirtyMembership):
            _issue(client, "n4", "token-n4")


def test_a_stale_fingerprint_is_aborted_with_the_new_diff(own_lab: labs.Lab) -> None:
    with Client(own_lab.endpoint) as client:
        current = client.check_membership(timeout=10).diff.fingerprint
        with pytest.raises(StaleFingerprint) as aborted:
            client.remove_member("n3", expected_fingerprint="0" * 64)
        assert aborted.value.code is grpc.StatusCode.ABORTED and aborted.value.diff.fingerprint == current
        assert _members(client) == ["n1", "n2", "n3"]


def test_tokens_are_issued_listed_and_revoked_without_their_secret(own_lab: labs.Lab) -> None:
    with Client(own_lab.endpoint) as client:
        issued = _issue(client, "n4", "token-n4")
        assert issued.state == SUCCEEDED and issued.token.startswith("mgt1.")
        listed = client.list_tokens()
        assert [t.name for t in listed] == ["n4"]
        assert issued.token not in str(listed)
        assert client.get_operation(issued.id).token == "", "the token is in the answer that issued it and no other"
        with pytest.raises(AlreadyExists):
            _issue(client, "n2", "token-n2")
        with pytest.raises(InvalidArgument) as invalid:
            _issue(client, "Not A Name", "token-bad")
        assert [f for f, _ in invalid.value.field_violations] == ["issue_token.name"]
        assert client.revoke_token("n4").name == "n4"
        assert client.list_tokens() == []
        with pytest.raises(NotFound):
            client.revoke_token("n4")


def test_microcluster_membership_consistency(own_lab: labs.Lab) -> None:
    """PR #515's test_membership_consistency: c2's row deleted → remove, join token refused; a forced removal with the
    discrepancy about c2 acknowledged succeeds, and a token can be issued again."""
    d.delete_row(own_lab, "n2")
    with Client(own_lab.endpoint) as client:
        with pytest.raises(DirtyMembership):
            _remove(client, "n2", "remove-n2")
        with pytest.raises(DirtyMembership):
            _issue(client, "n5", "token-n5")
        about_n2 = [x.id for x in client.check_membership(timeout=10).diff.discrepancies]
        with pytest.raises(DirtyMembership):
            _remove(client, "n2", "force-n2-unacknowledged", force=True)
        operation = _remove(client, "n2", "force-n2", force=True, acks=about_n2)
        assert operation.state == SUCCEEDED and operation.kind == o.OPERATION_KIND_FORCE_REMOVE
        assert list(operation.audit.acknowledged_discrepancy_ids) == about_n2
        assert list(client.check_membership(timeout=10).diff.discrepancies) == []
        assert _issue(client, "n5", "token-n5-again").state == SUCCEEDED


def test_microcluster_truststore_force_removal(own_lab: labs.Lab) -> None:
    """PR #515's test_truststore_force_removal: removing an unknown member fails; c3.yaml deleted on every node →
    remove c3 refused, forced with acknowledgements succeeds, and a token for c4 can be issued."""
    with Client(own_lab.endpoint) as client:
        with pytest.raises(NotFound):
            _remove(client, "nonexist", "remove-nonexist", force=True)
        for node in ("n1", "n2", "n3"):
            d.distrust(own_lab, node, "n3")
        with pytest.raises(DirtyMembership):
            _remove(client, "n3", "remove-n3")
        acks = [x.id for x in client.check_membership(timeout=10).diff.discrepancies]
        assert _remove(client, "n3", "force-n3", force=True, acks=acks).state == SUCCEEDED
        assert _issue(client, "n4", "token-n4").state == SUCCEEDED


def test_two_dead_members_are_removed_one_after_the_other(tmp_path: Path) -> None:
    lab = labs.up(tmp_path / "lab", 5)
    try:
        for name in ("n4", "n5"):
            os.kill(lab.node(name)["pid"], signal.SIGKILL)
        with Client(lab.endpoint) as client:
            with pytest.raises(DirtyMembership):
                _remove(client, "n4", "remove-n4")  # a normal removal needs the member to take part
            first = _remove(client, "n4", "force-n4", force=True)
            assert first.state == SUCCEEDED and "n5" in first.plan, "the dead n5's truststore is the remainder"
            second = _remove(client, "n5", "force-n5", force=True)
            assert second.state == SUCCEEDED
            diff = client.check_membership(timeout=10).diff
            assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3"] and list(diff.discrepancies) == []
    finally:
        labs.down(lab.dir)


def _wait_for_done(client: Client, operation_id: str, count: int, timeout: float = 30.0) -> o.Operation:
    """The operation once its first count steps are done (the reconciler applies deferred ones in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        operation = client.get_operation(operation_id)
        if all(step.state == o.STEP_STATE_DONE for step in operation.steps[:count]) or time.monotonic() > deadline:
            return operation
        time.sleep(0.5)


def test_a_forced_removal_finishes_on_each_node_when_it_answers_again(tmp_path: Path) -> None:
    """n3 is dead and n4 away when n3 is force-removed: the removal succeeds at once, its truststore copy on n4 and the
    fence of n3 deferred. When n4 answers, the reconciler removes n3 from it; when n3's agent comes back, it is fenced
    (its Raft files gone), so that it can neither be trusted nor come back on its own."""
    lab = labs.up(tmp_path / "lab", 4)
    try:
        for name in ("n3", "n4"):
            os.kill(lab.node(name)["pid"], signal.SIGKILL)
        with Client(lab.endpoint) as client:
            removal = _remove(client, "n3", "force-n3", force=True)
            assert removal.state == SUCCEEDED, removal
            deferred = [(step.name, step.state) for step in removal.steps if step.deferred]
            assert deferred == [
                ("remove n3 from n4's truststore when n4 answers", o.STEP_STATE_PENDING),
                ("fence n3 when it answers", o.STEP_STATE_PENDING),
            ]
            assert all(s.state == o.STEP_STATE_DONE for s in removal.steps if not s.deferred)
            n4_trusts_n3 = Path(lab.node("n4")["state_dir"]) / "truststore" / "n3.yaml"
            assert n4_trusts_n3.exists()

            labs.restart_agent(lab, "n4")
            operation = _wait_for_done(client, removal.id, len(removal.steps) - 1)
            *rest, fence = (s.state for s in operation.steps)
            assert set(rest) == {o.STEP_STATE_DONE}, operation
            # Tried while n3 is away, the fence is sent and not answered: it may have been applied, and is sent again.
            assert fence in (o.STEP_STATE_PENDING, o.STEP_STATE_SENT)
            assert not n4_trusts_n3.exists()

            n3_info = Path(lab.node("n3")["state_dir"]) / "database" / "info.yaml"
            assert n3_info.exists()
            labs.restart_agent(lab, "n3")
            operation = _wait_for_done(client, removal.id, len(removal.steps))
            assert all(s.state == o.STEP_STATE_DONE for s in operation.steps), operation
            assert not n3_info.exists(), "the removed node was not fenced"
            diff = client.check_membership(timeout=10).diff
            assert sorted(m.name for m in diff.members) == ["n1", "n2", "n4"] and list(diff.discrepancies) == []
    finally:
        labs.down(lab.dir)


def test_a_deferred_step_is_skipped_once_its_node_has_left(tmp_path: Path) -> None:
    lab = labs.up(tmp_path / "lab", 4)
    try:
        for name in ("n3", "n4"):
            os.kill(lab.node(name)["pid"], signal.SIGKILL)
        with Client(lab.endpoint) as client:
            first = _remove(client, "n3", "force-n3", force=True)
            assert _remove(client, "n4", "force-n4", force=True).state == SUCCEEDED
            skipped = [s for s in first.steps if s.name == "remove n3 from n4's truststore when n4 answers"]
            assert len(skipped) == 1
            index = list(first.steps).index(skipped[0])
            deadline = time.monotonic() + 30
            while client.get_operation(first.id).steps[index].state != o.STEP_STATE_SKIPPED:
                assert time.monotonic() < deadline, client.get_operation(first.id)
                time.sleep(0.5)
    finally:
        labs.down(lab.dir)


# --- the crash matrix -----------------------------------------------------------------------------------------------


# Each step once in `make test`, before or after it in turn; both with MEMBERGUARD_CRASH_MATRIX=full.
BOUNDARIES = [
    f"{when}-step:{index}" for index, moments in enumerate(matrix.chosen(("before", "after"), 7)) for when in moments
]


@pytest.mark.parametrize("fault", BOUNDARIES)
def test_a_removal_survives_the_coordinator_killed_at_every_step_boundary(own_lab: labs.Lab, fault: str) -> None:
    os.kill(own_lab.document["coordinator"]["pid"], signal.SIGTERM)
    crashing, endpoint = start_coordinator(own_lab, {FAULT_ENV: fault})
    with Client(endpoint) as client, pytest.raises(MemberguardError):
        _remove(client, "n3", "remove-n3")
    assert crashing.wait(30) == 137, "the armed fault did not fire"
    restarted, endpoint = start_coordinator(own_lab, {})
    try:
        with Client(endpoint) as client:
            [listed] = client.list_operations().operations
            # The restarted coordinator reconciles what the crash left: wait for it to finish.
            operation = client.wait_operation(listed.id, wait=20)
            # Killed before its commit point (step 0) was applied, it rolls back; after, it rolls forward.
            assert operation.state == (ROLLED_BACK if fault == "before-step:0" else SUCCEEDED), operation
            members = _members(client)
            if operation.state == ROLLED_BACK:
                assert members == ["n1", "n2", "n3"]
                assert _remove(client, "n3", "remove-n3-again").state == SUCCEEDED
            assert _members(client) == ["n1", "n2"]
            assert list(client.check_membership(timeout=10).diff.discrepancies) == []
            assert _remove(client, "n3", "remove-n3").id == operation.id, "a retry returns the recorded outcome"
    finally:
        restarted.terminate()
        restarted.wait(10)


def test_a_parked_removal_blocks_every_mutation_until_it_is_finished(own_lab: labs.Lab) -> None:
    os.kill(own_lab.document["coordinator"]["pid"], signal.SIGTERM)
    failing, endpoint = start_coordinator(own_lab, {FAULT_ENV: "fail-step:2"})
    try:
        with Client(endpoint) as client:
            parked = _remove(client, "n3", "remove-n3")
            assert parked.state == o.OPERATION_STATE_PARKED
            assert "n1's truststore" in parked.plan and "failure injected" in parked.error
            assert [s.state for s in parked.steps[:2]] == [o.STEP_STATE_DONE] * 2, "past its commit point"
            with pytest.raises(OperationParked) as refused:
                _issue(client, "n5", "token-n5")
            assert refused.value.violations[0][:2] == ("PARKED_OPERATION", parked.id)
    finally:
        failing.terminate()
        failing.wait(10)
    restarted, endpoint = start_coordinator(own_lab, {})
    try:
        with Client(endpoint) as client:
            assert client.get_operation(parked.id).state == SUCCEEDED, "the restarted coordinator finished it"
            assert _members(client) == ["n1", "n2"]
            assert _issue(client, "n5", "token-n5-again").state == SUCCEEDED
    finally:
        restarted.terminate()
        restarted.wait(10)
