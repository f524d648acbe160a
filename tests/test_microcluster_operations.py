"""Guarded operations on a microcluster lab go through microcluster itself, on its members' control sockets: a join is
microcluster's token from a member's daemon and the joiner's own POST core/control with it, a removal is DELETE
core/1.0/cluster/{name}. memberguard decides, journals and recovers; microcluster changes its own membership. Each
ends consistent by memberguard's check and by `microctl cluster list`, the two printed side by side."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from memberguard import Client, MemberguardError
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o

from coordinator.lab import lab as labs
from coordinator.lab import microcluster
from coordinator.lab.ports import loopback_addresses
from tests.restarts import start_coordinator

pytestmark = pytest.mark.microcluster

SETTLE = 30.0  # seconds: the truststores follow a removal on microcluster's next heartbeats (2 s in the lab)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path_factory.mktemp("lab"), 5, backend="microcluster")
    try:
        yield running
    finally:
        labs.down(running.dir)


def _microctl(lab: labs.Lab, via: str, *args: str) -> list[dict[str, str]]:
    """What `microctl ARGS --format json` prints on node via."""
    node = lab.node(via)
    listed = microcluster.microctl(node["state_dir"], *args, "--format", "json", timeout=60, leader_within=30)
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))


def _listed(lab: labs.Lab, via: str) -> list[str]:
    """The members `microctl cluster list` shows on node via."""
    return sorted(row["name"] for row in _microctl(lab, via, "cluster", "list"))


def _settled(client: Client) -> pb.MembershipDiff:
    """The diff once nothing in it is above INFO, within SETTLE seconds. INFO stays: a spare's own view of Raft lags
    for as long as it is a spare, and of two members one is."""
    deadline = time.monotonic() + SETTLE
    while True:
        diff = client.check_membership(timeout=10).diff
        loud = [d for d in diff.discrepancies if d.severity != pb.SEVERITY_INFO]
        if not loud:
            return diff
        assert time.monotonic() < deadline, [(pb.DiscrepancyKind.Name(d.kind), d.summary) for d in loud]
        time.sleep(0.3)


def _side_by_side(what: str, client: Client, lab: labs.Lab, via: str) -> tuple[list[str], list[str]]:
    ours = sorted(m.name for m in _settled(client).members)
    theirs = _listed(lab, via)
    print(f"{what}: memberguard's members {ours}, microctl cluster list {theirs}")
    return ours, theirs


def _steps(operation: o.Operation) -> list[tuple[str, str]]:
    return [(s.name, o.StepState.Name(s.state).removeprefix("STEP_STATE_")) for s in operation.steps]


def test_a_token_is_microclusters_own_issued_behind_the_guard_and_joins_through_microctl(
    lab: labs.Lab, tmp_path: Path
) -> None:
    with Client(lab.endpoint) as client:
        _settled(client)
        issued = client.issue_token("n9", ttl=600, microcluster=True, timeout=60)
        assert issued.state == o.OPERATION_STATE_SUCCEEDED, issued
        assert _steps(issued) == [("microcluster issues n9's join token on n1", "DONE")]
        assert "microctl init n9" in issued.plan
        # microcluster's types.Token: its secret, the cluster certificate's fingerprint and the members' addresses.
        token = json.loads(base64.b64decode(issued.token))
        assert sorted(token) == ["fingerprint", "join_addresses", "secret"]
        again = client.issue_token("n9", ttl=600, microcluster=True, timeout=60).token
        assert again != issued.token
        assert [row["name"] for row in _microctl(lab, "n1", "tokens", "list")] == ["n9"], "a re-issue replaces"
        kept = b"".join(path.read_bytes() for path in (lab.dir / "coordinator").glob("journal.db*"))
        assert json.loads(base64.b64decode(again))["secret"].encode() not in kept, "the journal keeps no secret"
        [address] = loopback_addresses(1)
        with microcluster.uninitialised(tmp_path / "n9", tmp_path / "n9.log") as state_dir:
            joined = subprocess.run(
                [str(microcluster.MICROCTL), "--state-dir", str(state_dir), "init", "n9", address, "--token", again],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert joined.returncode == 0, joined.stderr
            assert "n9" in _listed(lab, "n1")
            diff = client.check_membership(timeout=10).diff
            found = [(pb.DiscrepancyKind.Name(d.kind), d.summary) for d in diff.discrepancies]
            print(f"n9 joined through microctl, no agent of memberguard's: {found}")
            unwatched = [d for d in diff.discrepancies if d.kind == pb.DISCREPANCY_KIND_UNWATCHED_MEMBER]
            assert [(d.node, d.severity) for d in unwatched] == [("n9", pb.SEVERITY_WARNING)], found
            removed = client.remove_member(
                "n9", force=True, acknowledged=[d.id for d in diff.discrepancies], timeout=60
            )
            assert removed.state == o.OPERATION_STATE_SUCCEEDED, removed
        ours, theirs = _side_by_side("n9 joined with memberguard's token, then removed", client, lab, "n1")
    assert ours == theirs == ["n1", "n2", "n3", "n4", "n5"]


def test_a_join_through_memberguard_is_microclusters_own_join(lab: labs.Lab) -> None:
    """`lab add-node`: the joiner's agent presents memberguard's token; memberguard has a member's daemon issue
    microcluster's token, the joiner's daemon join with it, and registers the joiner. microcluster used its token up."""
    with Client(lab.endpoint) as client:
        _settled(client)
        labs.add_node(lab.dir, "n6")
        [join] = [op for op in client.list_operations().operations if op.kind == o.OPERATION_KIND_JOIN]
        assert join.state == o.OPERATION_STATE_SUCCEEDED, join
        assert _steps(join) == [
            ("microcluster issues n6's join token on n1", "DONE"),
            ("n6 joins through microcluster", "DONE"),
            ("register n6", "DONE"),
        ]
        assert _microctl(lab, "n1", "tokens", "list") == [], "microcluster consumed its token"
        ours, theirs = _side_by_side("n6 joined through memberguard", client, lab, "n1")
        assert ours == theirs == ["n1", "n2", "n3", "n4", "n5", "n6"]
        assert client.remove_member("n6", timeout=60).state == o.OPERATION_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("fault", "joined"),
    [("before-step:1", False), ("applied-step:1", True)],
    ids=["token-issued", "joined-unrecorded"],
)
def test_a_join_whose_coordinator_was_killed_ends_wholly_in_or_out(lab: labs.Lab, fault: str, joined: bool) -> None:
    """Killed once microcluster's token was issued (nothing joined yet: the restarted coordinator rolls back, revoking
    it), or once the joiner's daemon had joined and before the journal recorded it (the sources show it a member:
    rolled forward). The restarted coordinator decides from what microcluster holds, not from the journal."""
    name = "n7" if joined else "n8"
    start_coordinator(lab, {"MEMBERGUARD_FAULT": fault})
    try:
        with pytest.raises(labs.LabError):
            labs.add_node(lab.dir, name)
    finally:
        start_coordinator(lab, {})
    with Client(lab.endpoint) as client:
        [operation] = [
            op
            for op in client.list_operations().operations
            if (op.kind, op.member.name) == (o.OPERATION_KIND_JOIN, name)
        ]
        operation = client.wait_operation(operation.id, wait=60)
        expected = o.OPERATION_STATE_SUCCEEDED if joined else o.OPERATION_STATE_ROLLED_BACK
        assert operation.state == expected, operation
        assert _microctl(lab, "n1", "tokens", "list") == [], "the token is used or revoked"
        what = f"{name}'s join, the coordinator killed at {fault}"
        ours, theirs = _side_by_side(what, client, lab, "n1")
        assert ours == theirs == sorted(["n1", "n2", "n3", "n4", "n5"] + ([name] if joined else []))
        if joined:
            assert client.remove_member(name, timeout=60).state == o.OPERATION_STATE_SUCCEEDED


def test_a_removal_is_microclusters_own(lab: labs.Lab) -> None:
    with Client(lab.endpoint) as client:
        _settled(client)
        operation = client.remove_member("n5", timeout=60)
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        assert _steps(operation) == [
            ("remove n5 through microcluster", "DONE"),
            ("finish what microcluster left of n5, by force", "DONE"),
            ("forget n5's certificate and tokens", "DONE"),
        ]
        assert operation.plan == "", "the member's daemon answered: microcluster reset it"
        ours, theirs = _side_by_side("removed n5", client, lab, "n1")
    assert ours == theirs == ["n1", "n2", "n3", "n4"]


def test_a_dead_member_is_refused_by_microcluster_and_removed_by_force(lab: labs.Lab) -> None:
    """n4's daemon is killed, its agent still answers: memberguard reports the daemon unreadable (a WARNING, which
    does not stop a removal); microcluster refuses the plain removal, since it cannot run the member's pre-remove
    hook. The operation rolls back with microcluster's words, nothing changed; forced, it goes through."""
    os.kill(lab.node("n4")["microcluster"]["pid"], signal.SIGKILL)
    with Client(lab.endpoint) as client:
        deadline = time.monotonic() + SETTLE
        while True:
            diff = client.check_membership(timeout=10).diff
            loud = {(d.kind, d.severity, d.node) for d in diff.discrepancies if d.severity != pb.SEVERITY_INFO}
            if loud:
                break
            assert time.monotonic() < deadline, "the dead daemon is never reported"
            time.sleep(0.2)
        assert loud == {(pb.DISCREPANCY_KIND_SOURCE_UNREADABLE, pb.SEVERITY_WARNING, "n4")}
        refused = client.remove_member("n4", timeout=60)
        print(f"plain removal of n4, its daemon dead: {o.OperationState.Name(refused.state)}: {refused.error}")
        assert refused.state == o.OPERATION_STATE_ROLLED_BACK, refused
        assert "microcluster refused to remove n4" in refused.error and "pre-remove" in refused.error
        assert _listed(lab, "n1") == ["n1", "n2", "n3", "n4"]
        about = [d.id for d in diff.discrepancies if d.severity != pb.SEVERITY_INFO]
        operation = client.remove_member("n4", force=True, acknowledged=about, timeout=60)
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        assert _steps(operation)[0] == ("remove n4 through microcluster", "DONE")
        ours, theirs = _side_by_side("force-removed n4, its daemon killed", client, lab, "n1")
    assert ours == theirs == ["n1", "n2", "n3"]


def test_a_coordinator_killed_once_microcluster_removed_finishes_on_restart(lab: labs.Lab) -> None:
    """Killed after the agent had microcluster remove n3 and before the journal recorded it: the restarted
    coordinator's reconciler sees from the sources that the removal took effect, and rolls it forward."""
    start_coordinator(lab, {"MEMBERGUARD_FAULT": "applied-step:0"})
    try:
        with Client(lab.endpoint) as client, pytest.raises(MemberguardError):
            client.remove_member("n3", timeout=60)
    finally:
        start_coordinator(lab, {})
    with Client(lab.endpoint) as client:
        [operation] = [op for op in client.list_operations().operations if op.member.name == "n3"]
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        what = "n3's removal, the coordinator killed after microcluster removed it"
        ours, theirs = _side_by_side(what, client, lab, "n1")
    assert ours == theirs == ["n1", "n2"]
