"""Repair on a real lab: the plan for a divergence, that planning changes nothing, and the refusals (a stale
fingerprint, ids the diff or the plan does not hold, a parked operation), through the client and the CLI; then its
apply: S9 and a two-action repair applied and checked again, a stale fingerprint at apply, an action that needs
confirmation, apply twice, and the coordinator killed at a step boundary of a two-action repair."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from memberguard import Client, InvalidArgument, MemberguardError, OperationParked, StaleFingerprint
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2, repair_pb2

from coordinator.core.model import Role
from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests import divergence as d
from tests.restarts import start_coordinator

MEMBERGUARD = str(Path(sys.executable).parent / "memberguard")


def _missing_record(lab: labs.Lab) -> Path:
    """S9: n2's truststore loses n3's record; returns the file, to put back."""
    record = Path(lab.node("n2")["state_dir"]) / "truststore" / "n3.yaml"
    record.unlink()
    return record


def test_a_missing_truststore_record_is_planned_back_from_the_table_and_nothing_changes(own_lab: labs.Lab) -> None:
    record = _missing_record(own_lab)
    with Client(own_lab.endpoint) as client:
        diff = client.check_membership().diff
        [missing] = diff.discrepancies
        plan = client.plan_repair(expected_fingerprint=diff.fingerprint)
        assert plan.fingerprint == diff.fingerprint and not plan.unplanned
        [action] = plan.actions
        assert list(action.clears) == [missing.id] and action.safety == pb.REMEDY_SAFETY_SAFE
        assert action.member.name == "n3"
        [step] = action.steps
        assert (step.node, step.source) == ("n2", pb.SOURCE_TRUSTSTORE)
        # The evidence is the members table's row of n3, whose certificate the record must carry.
        assert step.evidence.source == pb.SOURCE_MEMBERS_TABLE
        assert [r.certificate_fingerprint for r in step.evidence.records] == [missing.member.certificate_fingerprint]
        # A plan changes nothing: the file is still gone and the diff is the same.
        assert not record.exists()
        assert client.check_membership().diff.fingerprint == diff.fingerprint
        # The same diff plans the same ids, whatever the order the agents answered in.
        assert client.plan_repair().actions[0].id == action.id


def test_a_consistent_cluster_has_nothing_to_repair(own_lab: labs.Lab) -> None:
    with Client(own_lab.endpoint) as client:
        plan = client.plan_repair()
    assert not plan.actions and not plan.unplanned
    shown = subprocess.run(
        [MEMBERGUARD, "repair", "--lab", str(own_lab.dir)], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "nothing to repair" in shown.stdout


def test_bad_input_is_refused_precisely_and_changes_nothing(own_lab: labs.Lab) -> None:
    _missing_record(own_lab)
    with Client(own_lab.endpoint) as client:
        diff = client.check_membership().diff
        with pytest.raises(StaleFingerprint) as stale:
            client.plan_repair(expected_fingerprint="0" * 64)
        assert stale.value.diff is not None and stale.value.diff.fingerprint == diff.fingerprint
        with pytest.raises(InvalidArgument) as unknown:
            client.plan_repair(discrepancy_ids=["nope", diff.discrepancies[0].id])
        assert [field for field, _ in unknown.value.field_violations] == ["discrepancy_ids"]
        assert "nope" in unknown.value.field_violations[0][1]
        with pytest.raises(InvalidArgument) as unconfirmable:
            client.plan_repair(confirmed_action_ids=["not-an-action"])
        assert [field for field, _ in unconfirmable.value.field_violations] == ["confirmed_action_ids"]
        assert client.check_membership().diff.fingerprint == diff.fingerprint


def test_a_parked_operation_comes_first(parking_lab: labs.Lab) -> None:
    with Client(parking_lab.endpoint) as client:
        parked = client.remove_member("n3", timeout=30)
        assert parked.state == operation_pb2.OPERATION_STATE_PARKED
        with pytest.raises(OperationParked) as refused:
            client.plan_repair()
    assert refused.value.operation_ids == [parked.id]


def test_the_cli_prints_the_plan_and_its_json(own_lab: labs.Lab) -> None:
    _missing_record(own_lab)
    table = subprocess.run([MEMBERGUARD, "repair", "--lab", str(own_lab.dir)], capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    assert "safe  n3" in table.stdout and "restore n3 in n2's truststore" in table.stdout
    shown = subprocess.run(
        [MEMBERGUARD, "repair", "--lab", str(own_lab.dir), "-o", "json"], capture_output=True, text=True, timeout=60
    )
    with Client(own_lab.endpoint) as client:
        plan = client.plan_repair()
    assert json.loads(shown.stdout)["actions"][0]["id"] == plan.actions[0].id


# --- apply ----------------------------------------------------------------------------------------------------------

REPAIR, SUCCEEDED = operation_pb2.OPERATION_KIND_REPAIR, operation_pb2.OPERATION_STATE_SUCCEEDED


def _untrusted_on_two(lab: labs.Lab) -> list[Path]:
    """n1's and n2's truststores lose n3's record: two actions, one step each."""
    records = [d.truststore(lab, node) / "n3.yaml" for node in ("n1", "n2")]
    for record in records:
        record.unlink()
    return records


def _step_names(plan: repair_pb2.RepairPlan) -> list[str]:
    return [step.name for action in plan.actions for step in action.steps]


def test_s9_applied_restores_the_record_and_a_second_apply_finds_nothing(own_lab: labs.Lab) -> None:
    record = _missing_record(own_lab)
    with Client(own_lab.endpoint) as client:
        diff = client.check_membership().diff
        plan = client.plan_repair(expected_fingerprint=diff.fingerprint)
        applied = client.apply_repair(expected_fingerprint=diff.fingerprint, request_id="repair-s9")
        assert [a.id for a in applied.plan.actions] == [a.id for a in plan.actions]
        operation = applied.operation
        assert (operation.kind, operation.state) == (REPAIR, SUCCEEDED), operation
        assert [s.name for s in operation.steps] == _step_names(plan)
        assert operation.steps[0].commit_point and operation.audit.fingerprint == diff.fingerprint
        assert record.exists()
        assert list(client.check_membership().diff.discrepancies) == []
        # A retry with the same request id gets the operation back; a new apply has nothing to do.
        assert client.apply_repair(request_id="repair-s9").operation.id == operation.id
        again = client.apply_repair()
        assert not again.plan.actions and not again.HasField("operation")
        assert [o.id for o in client.list_operations().operations] == [operation.id]


def test_the_cli_applies_a_two_action_repair_and_checks_again(own_lab: labs.Lab) -> None:
    records = _untrusted_on_two(own_lab)
    with Client(own_lab.endpoint) as client:
        plan = client.plan_repair()
    assert len(plan.actions) == 2
    shown = subprocess.run(
        [MEMBERGUARD, "repair", "--apply", "--lab", str(own_lab.dir), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert [a["id"] for a in document["plan"]["actions"]] == [a.id for a in plan.actions]
    assert document["operation"]["state"] == "OPERATION_STATE_SUCCEEDED"
    assert [s["name"] for s in document["operation"]["steps"]] == _step_names(plan)
    assert "discrepancies" not in document["diff"], "the membership checked again is clean"
    assert all(record.exists() for record in records)


def test_a_stale_fingerprint_at_apply_is_aborted_and_nothing_changes(own_lab: labs.Lab) -> None:
    record = _missing_record(own_lab)
    with Client(own_lab.endpoint) as client:
        diff = client.check_membership().diff
        with pytest.raises(StaleFingerprint) as stale:
            client.apply_repair(expected_fingerprint="0" * 64)
        assert stale.value.diff is not None and stale.value.diff.fingerprint == diff.fingerprint
        assert not record.exists()
        assert not client.list_operations().operations
        assert client.check_membership().diff.fingerprint == diff.fingerprint


def test_an_action_that_needs_confirmation_is_applied_only_once_confirmed(own_lab: labs.Lab) -> None:
    # A ghost in the Raft configuration (no row, no agent) besides S9; a short grace period makes it eligible.
    os.kill(own_lab.document["coordinator"]["pid"], signal.SIGTERM)
    coordinator, endpoint = start_coordinator(own_lab, {}, {"repair_grace": 1.0})
    ghost = (9, "127.0.0.1:7999", Role.SPARE)
    try:
        d.set_raft(own_lab, [*d.raft_entries(own_lab), ghost])
        record = _missing_record(own_lab)
        time.sleep(1.5)
        with Client(endpoint) as client:
            plan = client.plan_repair()
            [confirm] = [a for a in plan.actions if a.safety == pb.REMEDY_SAFETY_NEEDS_CONFIRMATION]
            [safe] = [a for a in plan.actions if a.safety == pb.REMEDY_SAFETY_SAFE]
            first = client.apply_repair().operation
            assert first.state == SUCCEEDED and [s.name for s in first.steps] == [s.name for s in safe.steps]
            assert record.exists() and ghost in d.raft_entries(own_lab)
            again = client.apply_repair(confirmed_action_ids=[confirm.id])
            assert [a.id for a in again.plan.actions] == [confirm.id]
            assert again.operation.state == SUCCEEDED
            assert ghost not in d.raft_entries(own_lab)
            # What is left is the other nodes' cached configurations catching up: waited for, never repaired.
            left = client.check_membership().diff.discrepancies
            assert {x.kind for x in left} <= {pb.DISCREPANCY_KIND_VIEW_DIFFERS}
    finally:
        coordinator.terminate()
        coordinator.wait(10)


@pytest.mark.parametrize("fault", ["applied-step:0", "after-step:0", "before-step:1"])
def test_a_repair_survives_the_coordinator_killed_at_a_step_boundary(own_lab: labs.Lab, fault: str) -> None:
    records = _untrusted_on_two(own_lab)
    os.kill(own_lab.document["coordinator"]["pid"], signal.SIGTERM)
    crashing, endpoint = start_coordinator(own_lab, {FAULT_ENV: fault})
    with Client(endpoint) as client, pytest.raises(MemberguardError):
        client.apply_repair(request_id="repair-two")
    assert crashing.wait(30) == 137, "the armed fault did not fire"
    assert not records[1].exists(), "the crash came before the second action"
    restarted, endpoint = start_coordinator(own_lab, {})
    try:
        with Client(endpoint) as client:
            [listed] = client.list_operations().operations
            # Its first step applied (recorded or only seen in the truststore), the repair rolls forward.
            operation = client.wait_operation(listed.id, wait=20)
            assert (operation.kind, operation.state) == (REPAIR, SUCCEEDED), operation
            assert all(record.exists() for record in records)
            assert list(client.check_membership().diff.discrepancies) == []
            assert client.apply_repair(request_id="repair-two").operation.id == operation.id
    finally:
        restarted.terminate()
        restarted.wait(10)
