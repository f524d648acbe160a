"""The quorum rule (etcd's IsReadyToRemoveVotingMember) on plain values, then derived from real diffs, then hypothesis.

Member i is n<i> at 127.0.0.1:<7000 + i> with dqlite node ID i, as in tests/core/views.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.diff import compute_diff
from coordinator.core.model import AgentFailure, ClusterView, Member, Role, Source
from coordinator.core.quorum import (
    QuorumInput,
    QuorumReason,
    QuorumViolation,
    RaftKey,
    check_add,
    check_remove,
    raft_key,
    raft_members,
    reachable_members,
)

from .views import (
    add_raft_member,
    add_records,
    address,
    consistent_view,
    drop_node,
    drop_records,
    fail_agent,
    fingerprint_of,
    name,
    remove_raft_member,
    row,
    set_report,
    trust,
)

VOTER, STAND_BY, SPARE = Role.VOTER, Role.STAND_BY, Role.SPARE


def member(i: int, role: Role = VOTER) -> Member:
    return Member(name(i), fingerprint_of(name(i)), address(i), i, role)


def cluster(*roles: Role) -> list[Member]:
    return [member(i, role) for i, role in enumerate(roles, start=1)]


def reachable(*members: int) -> frozenset[RaftKey]:
    return frozenset((address(i), i) for i in members)


def without(members: Iterable[Member], i: int) -> list[Member]:
    return [m for m in members if m.node_id != i]


# --- removal ---------------------------------------------------------------------------------------------------------


def test_three_voters_one_unreachable_removing_the_unreachable_one_is_allowed() -> None:
    assert check_remove(cluster(VOTER, VOTER, VOTER), member(3), reachable(1, 2)) == []


def test_three_voters_one_unreachable_removing_a_reachable_one_is_refused_with_the_numbers() -> None:
    (violation,) = check_remove(cluster(VOTER, VOTER, VOTER), member(1), reachable(1, 2))
    assert violation == QuorumViolation(QuorumReason.NO_MAJORITY, "removing n1", 3, 2, 1, 2)
    assert "voters before: 3, after: 2, reachable: 1, needed: 2" in violation.description
    assert violation.description.startswith("Refused removing n1: only 1 of the 2 voters")


def test_five_voters_two_unreachable() -> None:
    five = cluster(*[VOTER] * 5)
    up = reachable(1, 2, 3)
    # Removing a dead voter leaves 3 of 4 answering (3 needed); removing a live one leaves 2 of 4.
    assert check_remove(five, member(4), up) == []
    assert check_remove(five, member(5), up) == []
    assert check_remove(five, member(1), up) == [QuorumViolation(QuorumReason.NO_MAJORITY, "removing n1", 5, 4, 2, 3)]


def test_five_voters_three_unreachable_nothing_can_be_removed() -> None:
    five = cluster(*[VOTER] * 5)
    for i in range(1, 6):
        assert check_remove(five, member(i), reachable(1, 2)) != []


def test_the_last_member_is_never_removed() -> None:
    for role in (VOTER, SPARE):
        (violation,) = check_remove(cluster(role), member(1, role), reachable(1))
        assert violation.reason is QuorumReason.LAST_MEMBER
        assert "last member" in violation.description


def test_the_last_voter_is_not_removed_while_spares_remain() -> None:
    (violation,) = check_remove(cluster(VOTER, SPARE, SPARE), member(1), reachable(1, 2, 3))
    assert violation == QuorumViolation(QuorumReason.NO_MAJORITY, "removing n1", 1, 0, 0, 1)


def test_two_voters_may_shrink_to_one() -> None:
    # microcluster PR #138: 2 → 1 is allowed, the remaining voter is a majority of itself.
    assert check_remove(cluster(VOTER, VOTER), member(2), reachable(1)) == []


def test_removing_a_non_voter_never_breaks_a_quorum_that_holds() -> None:
    members = cluster(VOTER, VOTER, VOTER, SPARE, STAND_BY)
    assert check_remove(members, member(4, SPARE), reachable(1, 2)) == []
    assert check_remove(members, member(5, STAND_BY), reachable(1, 2)) == []
    # Even a dead non-voter: it does not count.
    assert check_remove(members, member(4, SPARE), reachable(1, 2, 5)) == []


def test_removing_a_non_voter_needs_a_quorum_to_commit() -> None:
    (violation,) = check_remove(cluster(VOTER, VOTER, VOTER, SPARE), member(4, SPARE), reachable(1, 4))
    assert violation == QuorumViolation(QuorumReason.NO_MAJORITY, "removing n4", 3, 3, 1, 2)


def test_removing_a_member_that_is_not_in_raft_changes_no_count() -> None:
    three = cluster(VOTER, VOTER, VOTER)
    outsider = Member("n9", fingerprint_of("n9"), address(9))
    assert check_remove(three, outsider, reachable(1, 2)) == []
    assert check_remove(three, outsider, reachable(1)) == [
        QuorumViolation(QuorumReason.NO_MAJORITY, "removing n9", 3, 3, 1, 2)
    ]


def test_a_ghost_member_is_named_by_its_raft_identity() -> None:
    ghost = Member(address=address(4), node_id=4, role=SPARE)
    (violation,) = check_remove([ghost], ghost, frozenset())
    assert violation.change == f"removing node 4 at {address(4)}"


def test_two_dead_members_are_removed_one_after_the_other() -> None:
    members = cluster(VOTER, VOTER, VOTER, VOTER)
    up = reachable(1, 2)
    # Removing both dead voters of four at once would be fine for Raft, but each removal is its own commit:
    # after the first, 2 of 3 voters answer (2 needed); after the second, 2 of 2.
    assert check_remove(members, member(3), up) == []
    after_first = without(members, 3)
    assert check_remove(after_first, member(4), up) == []
    # A live voter cannot be next: 1 of 2 would answer.
    assert check_remove(after_first, member(1), up) != []


def test_duplicate_claims_on_one_raft_entry_count_once() -> None:
    n3b = Member("n3b", fingerprint_of("n3b"), address(3), 3, VOTER)
    members = [*cluster(VOTER, VOTER, VOTER), n3b]
    assert check_remove(members, member(1), reachable(1, 2, 3)) == []
    (violation,) = check_remove(members, n3b, reachable(3))
    assert (violation.voters_before, violation.voters_after) == (3, 2)


# --- addition --------------------------------------------------------------------------------------------------------


def test_adding_with_a_member_unreachable_is_allowed() -> None:
    assert check_add(cluster(VOTER, VOTER, VOTER), reachable(1, 2)) == []
    assert check_add(cluster(*[VOTER] * 5), reachable(1, 2, 3)) == []


def test_adding_with_a_majority_unreachable_is_refused_with_the_numbers() -> None:
    (violation,) = check_add(cluster(VOTER, VOTER, VOTER), reachable(3))
    assert violation == QuorumViolation(QuorumReason.NO_MAJORITY, "adding a member", 3, 3, 1, 2)
    assert "voters before: 3, after: 3, reachable: 1, needed: 2" in violation.description


def test_adding_counts_only_voters() -> None:
    members = cluster(VOTER, VOTER, VOTER, SPARE, SPARE)
    assert check_add(members, reachable(1, 4, 5)) != []
    assert check_add(members, reachable(1, 2)) == []


def test_adding_to_an_unknown_configuration_is_refused() -> None:
    assert [v.reason for v in check_add([], frozenset())] == [QuorumReason.NO_MAJORITY]


# --- from a diff -----------------------------------------------------------------------------------------------------


def keys(*members: int) -> frozenset[RaftKey]:
    return reachable(*members)


def test_everyone_answers_in_a_consistent_cluster() -> None:
    diff = compute_diff(consistent_view(3))
    assert raft_members(diff) == tuple(member(i) for i in (1, 2, 3))
    assert reachable_members(diff) == keys(1, 2, 3)


@pytest.mark.parametrize(
    ("edit", "answering"),
    [
        pytest.param(lambda v: fail_agent(v, "n2"), keys(1, 3), id="agent unreachable"),
        pytest.param(lambda v: fail_agent(v, "n2", AgentFailure.UNTRUSTED), keys(1, 3), id="agent untrusted"),
        pytest.param(lambda v: drop_node(v, "n2"), keys(1, 3), id="node never asked"),
        pytest.param(
            lambda v: set_report(v, Source.RAFT_NODE_VIEW, ["n2"], error="connection refused"),
            keys(1, 3),
            id="own engine does not answer",
        ),
        pytest.param(
            lambda v: set_report(v, Source.RAFT_CONFIG, ["n2"], error="no leader"),
            keys(1, 3),
            id="cannot reach the leader",
        ),
        pytest.param(
            lambda v: set_report(
                drop_records(v, Source.RAFT_NODE_VIEW, address(3), ["n2"]), Source.RAFT_NODE_VIEW, ["n2"], age=600.0
            ),
            keys(1, 3),
            id="own engine lags for long",
        ),
        pytest.param(
            lambda v: set_report(v, Source.RAFT_CACHE, ["n2"], error="permission denied"),
            keys(1, 2, 3),
            id="unreadable cluster.yaml is not the engine",
        ),
        pytest.param(
            lambda v: drop_records(v, Source.TRUSTSTORE, address(2), ["n3"]),
            keys(1, 2, 3),
            id="a missing truststore record is not silence",
        ),
    ],
)
def test_who_answered_is_derived_from_the_diff(
    edit: Callable[[ClusterView], ClusterView], answering: frozenset[RaftKey]
) -> None:
    assert reachable_members(compute_diff(edit(consistent_view(3)))) == answering


def test_a_ghost_raft_member_never_answers() -> None:
    view = add_raft_member(consistent_view(3), 4, SPARE)
    diff = compute_diff(add_records(view, Source.TRUSTSTORE, [trust(4)], ["n1"]))
    assert raft_key(member(4, SPARE)) in {raft_key(m) for m in raft_members(diff)}
    assert reachable_members(diff) == keys(1, 2, 3)


def test_a_pending_row_is_not_in_the_raft_configuration() -> None:
    diff = compute_diff(add_records(consistent_view(3), Source.MEMBERS_TABLE, [row(4, Role.PENDING)]))
    assert [m.name for m in raft_members(diff)] == ["n1", "n2", "n3"]


def test_two_dead_members_removed_one_after_the_other_from_diffs() -> None:
    view = fail_agent(fail_agent(consistent_view(5), "n4"), "n5")
    first = QuorumInput.from_diff(compute_diff(view))
    assert first.reachable == keys(1, 2, 3)
    assert check_remove(first.members, member(4), first.reachable) == []
    # The removal done: n4 is in no source, and its node is gone. Recompute before the next removal.
    for source in (Source.MEMBERS_TABLE, Source.TRUSTSTORE):
        view = drop_records(view, source, address(4))
    view = drop_node(remove_raft_member(view, 4), "n4")
    second = QuorumInput.from_diff(compute_diff(view))
    assert [m.name for m in second.members] == ["n1", "n2", "n3", "n5"]
    assert check_remove(second.members, member(5), second.reachable) == []
    assert check_remove(second.members, member(1), second.reachable) == []  # 2 of 3 would still answer


# --- properties ------------------------------------------------------------------------------------------------------

ROLES = st.sampled_from([VOTER, STAND_BY, SPARE])


@st.composite
def configurations(draw: st.DrawFn) -> tuple[list[Member], frozenset[RaftKey]]:
    roles = draw(st.lists(ROLES, min_size=0, max_size=7))
    members = cluster(*roles)
    up = draw(st.sets(st.integers(1, len(roles) + 1)))
    return members, reachable(*up)


def majority_holds(members: list[Member], up: frozenset[RaftKey]) -> bool:
    voters = [m for m in members if m.role is VOTER]
    return sum(1 for m in voters if raft_key(m) in up) >= len(voters) // 2 + 1


@given(configurations(), st.integers(1, 8))
def test_no_removal_is_allowed_that_leaves_fewer_reachable_voters_than_a_majority(
    configuration: tuple[list[Member], frozenset[RaftKey]], target: int
) -> None:
    members, up = configuration
    chosen = next((m for m in members if m.node_id == target), member(target))
    after = without(members, target)
    violations = check_remove(members, chosen, up)
    if not violations:
        assert after and majority_holds(after, up)
    else:
        # And it refuses nothing else: every refusal has a reason the numbers show.
        assert not after or not majority_holds(after, up)
        assert all(v.reachable < v.needed or v.reason is QuorumReason.LAST_MEMBER for v in violations)


@given(configurations())
def test_an_addition_is_refused_exactly_when_the_reachable_voters_are_no_majority(
    configuration: tuple[list[Member], frozenset[RaftKey]],
) -> None:
    members, up = configuration
    assert (check_add(members, up) == []) is majority_holds(members, up)


@given(configurations(), st.integers(1, 8))
def test_removing_a_non_voter_is_refused_only_when_an_addition_would_be(
    configuration: tuple[list[Member], frozenset[RaftKey]], target: int
) -> None:
    members, up = configuration
    chosen = next((m for m in members if m.node_id == target), member(target, SPARE))
    if chosen.role is not VOTER and len(members) > 1:
        assert (check_remove(members, chosen, up) == []) is (check_add(members, up) == [])
