"""Joins on the local backend: a new node's agent calls the coordinator's join listener with its token.

Real processes: the lab's coordinator and agents, and the joiner's own agent; the joiner verifies the coordinator
by the fingerprint its token pins, and the coordinator verifies the joiner by dialling its agent pinned to the
certificate it submitted.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from memberguard import Client
from memberguard.v1 import operation_pb2 as o

from coordinator.core import tokens
from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from coordinator.pki import make_identity
from tests import matrix
from tests.restarts import start_coordinator


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3)
    yield running
    labs.down(running.dir)


@pytest.fixture
def joining(own_lab: labs.Lab) -> Iterator[labs.JoiningNode]:
    """n4, laid out as a node that is about to join, its agent running and trusting no coordinator yet."""
    node = labs.start_joining_node(own_lab, "n4")
    yield node
    node.stop()


def _names(client: Client) -> list[str]:
    return sorted(m.name for m in client.check_membership(timeout=10).diff.members)


def test_a_node_joins_with_its_token_and_the_cluster_stays_consistent(
    own_lab: labs.Lab, joining: labs.JoiningNode
) -> None:
    with Client(own_lab.endpoint) as client:
        token = client.issue_token("n4").token
        operation = joining.join(token)
        assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        assert operation.kind == o.OPERATION_KIND_JOIN and operation.audit.requested_by == "join token"
        commit = next(step for step in operation.steps if step.commit_point)
        assert "joins the Raft configuration" in commit.name
        diff = client.check_membership(timeout=10).diff
        assert list(diff.discrepancies) == [], list(diff.discrepancies)
        assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3", "n4"]
        assert list(diff.nodes) == ["n1", "n2", "n3", "n4"], "the coordinator now asks n4's agent too"
        assert client.list_tokens() == [], "the token was consumed"
        # The token is spent: joining again with it is refused and runs nothing twice.
        with pytest.raises(grpc.aio.AioRpcError) as again:
            joining.join(token)
        assert again.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert _names(client) == ["n1", "n2", "n3", "n4"]
        assert len(client.list_operations().operations) == 2, "the token's issue and the one join"


def _forged(token: str) -> str:
    """The same token with another secret: it decodes, and the coordinator has no such token."""
    return tokens.encode_token(replace(tokens.decode_token(token), secret=os.urandom(32)))


@pytest.mark.parametrize("how", ["forged", "revoked", "for another name"])
def test_a_bad_token_is_refused_and_changes_nothing(own_lab: labs.Lab, joining: labs.JoiningNode, how: str) -> None:
    with Client(own_lab.endpoint) as client:
        token = client.issue_token("n5" if how == "for another name" else "n4").token
        before = client.check_membership(timeout=10).diff.fingerprint
        if how == "forged":
            token = _forged(token)
        elif how == "revoked":
            client.revoke_token("n4")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            joining.join(token)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
        assert token not in (refused.value.details() or ""), "no token in error details"
        assert client.check_membership(timeout=10).diff.fingerprint == before
        assert _names(client) == ["n1", "n2", "n3"]


def test_a_joiner_whose_certificate_does_not_carry_its_name_is_refused(
    own_lab: labs.Lab, joining: labs.JoiningNode
) -> None:
    with Client(own_lab.endpoint) as client:
        token = client.issue_token("n4").token
        other = replace(joining, identity=make_identity("somebody-else"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            other.join(token)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _names(client) == ["n1", "n2", "n3"]


def test_a_join_that_fails_before_its_commit_point_fences_the_joiner_and_leaves_no_trace(
    own_lab: labs.Lab, joining: labs.JoiningNode
) -> None:
    os.kill(own_lab.document["coordinator"]["pid"], signal.SIGTERM)
    # Trusting n4 on n2 fails: a step before the commit point.
    failing, endpoint = start_coordinator(own_lab, {FAULT_ENV: "fail-step:2"})
    try:
        with Client(endpoint) as client:
            before = client.check_membership(timeout=10).diff.fingerprint
            token = client.issue_token("n4").token
            operation = joining.join(token)
            assert operation.state == o.OPERATION_STATE_ROLLED_BACK, operation
            assert [s.state for s in operation.steps[:2]] == [o.STEP_STATE_UNDONE] * 2
            assert not (joining.state_dir / "database" / "info.yaml").exists(), "the joiner was fenced first"
            assert client.check_membership(timeout=10).diff.fingerprint == before
            assert [t.name for t in client.list_tokens()] == ["n4"], "the token was released for a retry"
    finally:
        failing.terminate()
        failing.wait(10)


JOIN_STEPS = 14  # 3-node lab: reserve, 3 trusts, the joiner trusts 4, commit, 3 trusts, role, register
# "applied": the agent applied the step and the coordinator died before journaling it (write-ahead intent undoes or
# confirms it).
# Each step once in `make test`, the moment taking turns; all three at every step with MEMBERGUARD_CRASH_MATRIX=full.
JOIN_BOUNDARIES = [
    f"{when}-step:{index}"
    for index, moments in enumerate(matrix.chosen(("before", "applied", "after"), JOIN_STEPS))
    for when in moments
]
COMMIT = 8


@pytest.mark.parametrize("fault", JOIN_BOUNDARIES)
def test_a_join_survives_the_coordinator_killed_at_every_step_boundary(
    own_lab: labs.Lab, joining: labs.JoiningNode, fault: str
) -> None:
    os.kill(own_lab.document["coordinator"]["pid"], signal.SIGTERM)
    crashing, endpoint = start_coordinator(own_lab, {FAULT_ENV: fault})
    with Client(endpoint) as client:
        token = client.issue_token("n4").token  # it names this coordinator's join listener
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            joining.join(token)
        assert crashing.wait(30) == 137, "the armed fault did not fire"
    finally:
        if crashing.poll() is None:
            crashing.kill()
            crashing.wait()
    restarted, endpoint = start_coordinator(own_lab, {})
    try:
        with Client(endpoint) as client:
            [operation] = [op for op in client.list_operations().operations if op.kind == o.OPERATION_KIND_JOIN]
            assert len(operation.steps) == JOIN_STEPS
            when, _, index = fault.partition("-step:")
            committed = int(index) > COMMIT or (int(index) == COMMIT and when in ("applied", "after"))
            diff = client.check_membership(timeout=10).diff
            assert list(diff.discrepancies) == [], list(diff.discrepancies)
            if committed:
                assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
                assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3", "n4"]
                assert client.list_tokens() == []
            else:
                assert operation.state == o.OPERATION_STATE_ROLLED_BACK, operation
                assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3"], "no trace of n4"
                if fault == "before-step:0":
                    # The journal never saw it start (Start goes with step 0's SENT): nothing was sent, and the joiner,
                    # told nothing, is left as it is.
                    assert {s.state for s in operation.steps} == {o.STEP_STATE_PENDING}, operation
                else:
                    assert not (joining.state_dir / "database" / "info.yaml").exists(), "the joiner was fenced"
                assert [t.name for t in client.list_tokens()] == ["n4"], "the token is released for a retry"
    finally:
        restarted.terminate()
        restarted.wait(10)
