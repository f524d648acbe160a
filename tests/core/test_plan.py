"""Removal plans, computed from real diffs of plain views."""

from __future__ import annotations

import pytest

from coordinator.core.diff import compute_diff
from coordinator.core.model import Member, Role, Source
from coordinator.core.plan import (
    COORDINATOR,
    MICROCLUSTER_JOIN_TOKEN_TTL,
    AgentPin,
    CannotPlan,
    EnsureMemberRow,
    EnsureRaftEntry,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    IssueMicroclusterToken,
    Joiner,
    JoinThroughMicrocluster,
    NotOnMicrocluster,
    RegisterMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveThroughMicrocluster,
    RemoveTruststoreRecord,
    RevokeMicroclusterToken,
    plan_join,
    plan_microcluster_token,
    plan_removal,
    undo,
)

from .views import (
    add_raft_member,
    address,
    consistent_view,
    drop_records,
    fail_agent,
    name,
    on_microcluster,
    raft_entry,
)


def _member(diff_members: tuple[Member, ...], member_name: str) -> Member:
    return next(m for m in diff_members if m.name == member_name)


def test_a_healthy_members_removal_commits_in_raft_then_cleans_every_source() -> None:
    diff = compute_diff(consistent_view(3))
    n3 = _member(diff.members, "n3")
    plan = plan_removal(diff, n3, reachable={"n1", "n2", "n3"})
    assert [(step.target, step.action) for step in plan.steps] == [
        ("n1", RemoveRaftEntry(n3.node_id, n3.address, Role.VOTER)),
        ("n1", RemoveMemberRow("n3")),
        ("n1", RemoveTruststoreRecord("n3")),
        ("n2", RemoveTruststoreRecord("n3")),
        ("n3", RemoveTruststoreRecord("n3")),
        ("n3", FenceNode()),
        (COORDINATOR, ForgetMember("n3")),
    ]
    assert [step.commit_point for step in plan.steps] == [True] + [False] * 6
    assert plan.remainder == ""


def test_a_dead_member_is_removed_from_what_answers_and_the_rest_is_deferred() -> None:
    view = fail_agent(fail_agent(consistent_view(4), "n3"), "n4")
    diff = compute_diff(view)
    pin = AgentPin("127.0.0.1:7003", "PEM of n3")
    plan = plan_removal(diff, _member(diff.members, "n3"), reachable={"n1", "n2"}, agent=pin)
    assert [(step.target, step.action, step.deferred) for step in plan.steps[3:]] == [
        ("n2", RemoveTruststoreRecord("n3"), False),
        (COORDINATOR, ForgetMember("n3"), False),
        ("n4", RemoveTruststoreRecord("n3"), True),  # n4 did not answer: its copy waits for it
        ("n3", FenceNode("127.0.0.1:7003", "PEM of n3"), True),  # reached through the pin, once forgotten
    ]
    assert [step.target for step in plan.steps[:3]] == ["n1", "n1", "n1"]
    assert "n4" in plan.remainder and "fenced when it does" in plan.remainder


def test_without_its_agent_pin_a_dead_member_is_left_to_reset_by_hand() -> None:
    diff = compute_diff(fail_agent(consistent_view(3), "n3"))
    plan = plan_removal(diff, _member(diff.members, "n3"), reachable={"n1", "n2"})
    assert not any(isinstance(step.action, FenceNode) for step in plan.steps)
    assert "reset it before it comes back" in plan.remainder


def test_deferred_steps_need_a_commit_point_before_them() -> None:
    # Only truststores name n9 (no row, no Raft entry): nothing commits, so an unreachable copy is only reported.
    view = fail_agent(consistent_view(3), "n3")
    diff = compute_diff(view)
    plan = plan_removal(diff, Member(name="n9"), reachable={"n1", "n2"})
    assert not any(step.commit_point or step.deferred for step in plan.steps)
    assert "n3" in plan.remainder and "(no answer)" in plan.remainder


def test_a_member_outside_raft_commits_with_its_row() -> None:
    """S15: a ghost row. There is no Raft entry to remove; deleting the row is the commit point."""
    view = drop_records(consistent_view(3), Source.RAFT_CONFIG, address(3))
    diff = compute_diff(view)
    n3 = next(m for m in diff.members if m.name == name(3))
    plan = plan_removal(diff, n3, reachable={"n1", "n2"})
    assert isinstance(plan.steps[0].action, RemoveMemberRow) and plan.steps[0].commit_point
    assert not any(isinstance(step.action, RemoveRaftEntry) for step in plan.steps)


def test_a_ghost_raft_member_is_removed_by_address() -> None:
    """S1: Raft holds a member no row names: only its Raft entry can go."""
    view = drop_records(consistent_view(3), Source.MEMBERS_TABLE, address(3))
    view = drop_records(view, Source.TRUSTSTORE, address(3))
    view = fail_agent(view, "n3")
    diff = compute_diff(view)
    ghost = Member(address=raft_entry(3).address, node_id=raft_entry(3).node_id, role=Role.VOTER)
    plan = plan_removal(diff, ghost, reachable={"n1", "n2"})
    assert [step.action for step in plan.steps] == [RemoveRaftEntry(ghost.node_id, ghost.address, Role.VOTER)]


def test_no_plan_without_another_reachable_node() -> None:
    diff = compute_diff(consistent_view(2))
    with pytest.raises(CannotPlan):
        plan_removal(diff, _member(diff.members, "n2"), reachable={"n2"})


def _joiner(node_id: int = 99) -> Joiner:
    return Joiner("n4", "127.0.0.1:7004", "PEM-n4", "127.0.0.1:8004", node_id)


def _certificates(count: int) -> dict[str, str]:
    return {name(i): f"PEM-{name(i)}" for i in range(1, count + 1)}


def test_a_join_reserves_then_commits_with_the_joiners_own_raft_entry_then_finishes() -> None:
    diff = compute_diff(consistent_view(3))
    plan = plan_join(diff, _joiner(), reachable={"n1", "n2", "n3"}, certificates=_certificates(3))
    actions = [(step.target, step.action) for step in plan.steps]
    assert actions[0] == ("n1", EnsureMemberRow("n4", "127.0.0.1:7004", "PEM-n4", "PENDING"))
    assert actions[1:4] == [(n, EnsureTruststoreRecord("n4", "127.0.0.1:7004", "PEM-n4")) for n in ("n1", "n2", "n3")]
    # The joiner trusts every member before its engine joins: on the real engine it talks to them over TLS.
    assert actions[4:8] == [
        ("n4", EnsureTruststoreRecord(name(i), address(i), f"PEM-{name(i)}")) for i in (1, 2, 3)
    ] + [("n4", EnsureTruststoreRecord("n4", "127.0.0.1:7004", "PEM-n4"))]
    [commit] = [step for step in plan.steps if step.commit_point]
    assert plan.steps.index(commit) == 8
    assert (commit.target, commit.action) == ("n4", EnsureRaftEntry(99, "127.0.0.1:7004", Role.VOTER))
    assert actions[9:] == [
        (n, EnsureTruststoreRecord("n4", "127.0.0.1:7004", "PEM-n4")) for n in ("n1", "n2", "n3")
    ] + [
        ("n1", EnsureMemberRow("n4", "127.0.0.1:7004", "PEM-n4", "voter")),
        (COORDINATOR, RegisterMember("n4", "127.0.0.1:8004", "PEM-n4")),
    ]


def test_every_step_before_a_joins_commit_point_can_be_undone() -> None:
    diff = compute_diff(consistent_view(3))
    plan = plan_join(diff, _joiner(), reachable={"n1", "n2", "n3"}, certificates=_certificates(3))
    before = plan.steps[: next(i for i, s in enumerate(plan.steps) if s.commit_point) + 1]
    undone = [undo(step.action) for step in before]
    assert undone == [RemoveMemberRow("n4")] + [RemoveTruststoreRecord("n4")] * 3 + [
        RemoveTruststoreRecord(name(i)) for i in (1, 2, 3)
    ] + [RemoveTruststoreRecord("n4"), RemoveRaftEntry(99, "127.0.0.1:7004")]
    assert undo(FenceNode()) is None


def test_a_join_needs_every_members_certificate() -> None:
    diff = compute_diff(consistent_view(3))
    with pytest.raises(CannotPlan, match="n3"):
        plan_join(diff, _joiner(), reachable={"n1", "n2", "n3"}, certificates=_certificates(2))


def test_on_microcluster_a_removal_is_microclusters_request_then_its_forced_finish() -> None:
    diff = compute_diff(on_microcluster(consistent_view(3)))
    n3 = _member(diff.members, "n3")
    plan = plan_removal(diff, n3, reachable={"n1", "n2", "n3"})
    assert [(step.target, step.action, step.commit_point) for step in plan.steps] == [
        ("n1", RemoveThroughMicrocluster("n3", n3.address, n3.node_id, force=False), True),
        ("n1", RemoveThroughMicrocluster("n3", n3.address, n3.node_id, force=True), False),
        (COORDINATOR, ForgetMember("n3"), False),
    ]
    assert plan.remainder == ""


def test_on_microcluster_a_forced_removal_of_a_silent_member_forces_and_says_to_reset_it() -> None:
    diff = compute_diff(fail_agent(on_microcluster(consistent_view(3)), "n3"))
    plan = plan_removal(diff, _member(diff.members, "n3"), reachable={"n1", "n2"}, force=True)
    assert [step.action.force for step in plan.steps[:2] if isinstance(step.action, RemoveThroughMicrocluster)] == [
        True,
        True,
    ]
    assert not any(step.deferred for step in plan.steps), "microcluster's heartbeat, not memberguard, fixes the rest"
    assert "reset it before it comes back" in plan.remainder


def test_on_microcluster_a_ghost_without_a_name_leaves_raft_through_dqlite() -> None:
    ghost = raft_entry(4)
    diff = compute_diff(on_microcluster(add_raft_member(consistent_view(3), 4)))
    member = next(m for m in diff.members if m.address == ghost.address)
    plan = plan_removal(diff, member, reachable={"n1", "n2", "n3"}, force=True)
    assert [(step.target, step.action, step.commit_point) for step in plan.steps] == [
        ("n1", RemoveRaftEntry(ghost.node_id, ghost.address, Role.VOTER), True)
    ]


def test_microclusters_own_token_is_issued_by_a_daemon_that_answers_and_only_on_microcluster() -> None:
    with pytest.raises(NotOnMicrocluster, match="needs the microcluster backend"):
        plan_microcluster_token(compute_diff(consistent_view(3)), "n4", ttl=60.0, reachable={"n1", "n2", "n3"})
    diff = compute_diff(fail_agent(on_microcluster(consistent_view(3)), "n1"))
    plan = plan_microcluster_token(diff, "n4", ttl=60.0, reachable={"n2", "n3"})
    assert [(step.target, step.action, step.commit_point) for step in plan.steps] == [
        ("n2", IssueMicroclusterToken("n4", 60.0), True)
    ]
    assert undo(plan.steps[0].action) == RevokeMicroclusterToken("n4"), "a token nobody received is revoked"
    assert "microctl init n4" in plan.remainder
    with pytest.raises(CannotPlan):
        plan_microcluster_token(diff, "n4", ttl=60.0, reachable=set())


def test_on_microcluster_a_join_is_microclusters_token_then_the_joiners_own_join_then_its_registration() -> None:
    diff = compute_diff(fail_agent(on_microcluster(consistent_view(3)), "n1"))
    plan = plan_join(diff, _joiner(node_id=0), reachable={"n2", "n3"}, certificates=_certificates(3))
    assert [(step.target, step.action, step.commit_point) for step in plan.steps] == [
        ("n2", IssueMicroclusterToken("n4", MICROCLUSTER_JOIN_TOKEN_TTL), False),
        ("n4", JoinThroughMicrocluster("n4", "127.0.0.1:7004"), True),
        (COORDINATOR, RegisterMember("n4", "127.0.0.1:8004", "PEM-n4"), False),
    ]
    # Nothing of the join is memberguard's to write: microcluster writes the row, the truststores and the Raft entry.
    assert not any(
        isinstance(step.action, EnsureMemberRow | EnsureTruststoreRecord | EnsureRaftEntry) for step in plan.steps
    )
    assert undo(plan.steps[0].action) == RevokeMicroclusterToken("n4"), "a join rolled back revokes its token"
