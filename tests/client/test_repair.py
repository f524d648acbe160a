"""Repair on a real lab: the plan for a divergence, that planning changes nothing, and the refusals (a stale
fingerprint, ids the diff or the plan does not hold, a parked operation), through the client and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from memberguard import Client, InvalidArgument, OperationParked, StaleFingerprint
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2

from coordinator.lab import lab as labs

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
