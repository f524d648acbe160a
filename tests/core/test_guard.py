"""The guard on plain values: the policy table row by row, its fixed points as named tests, microcluster's own
integration tests replayed on diffs, then properties checked with hypothesis.

Row tests do not read POLICY: each states what a discrepancy of one kind must do to each operation (docs/design.md),
builds a diff holding just that discrepancy, and asserts decide()'s verdict.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from typing import cast

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from coordinator.core.diff import compute_diff, discrepancy_id
from coordinator.core.guard import (
    POLICY,
    Parked,
    Proceed,
    Refused,
    Request,
    Rule,
    Stale,
    Verdict,
    Violation,
    decide,
    rule_for,
)
from coordinator.core.model import (
    ClusterView,
    Discrepancy,
    DiscrepancyKind,
    Member,
    MembershipDiff,
    Role,
    Severity,
    Source,
)
from coordinator.core.operation import Audit, OperationKind, OperationRecord, OperationState
from coordinator.core.quorum import QuorumInput

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
)

K = DiscrepancyKind
BLOCKING, WARNING, INFO = Severity.BLOCKING, Severity.WARNING, Severity.INFO
TOKEN, JOIN, REMOVE, FORCE, REPAIR = (
    OperationKind.ISSUE_TOKEN,
    OperationKind.JOIN,
    OperationKind.REMOVE,
    OperationKind.FORCE_REMOVE,
    OperationKind.REPAIR,
)
NORMAL = (TOKEN, JOIN, REMOVE)


def member(i: int, role: Role | None = Role.VOTER) -> Member:
    return Member(name(i), fingerprint_of(name(i)), address(i), i, role)


def request(operation: OperationKind, target: str, *acknowledged: str, fingerprint: str = "") -> Request:
    return Request(operation, target, fingerprint, frozenset(acknowledged))


def refused_types(verdict: Verdict) -> list[str]:
    assert isinstance(verdict, Refused), verdict
    return [v.type for v in verdict.violations]


def ids(diff: MembershipDiff, kind: DiscrepancyKind, of: str = "") -> list[str]:
    """The ids of the diff's discrepancies of this kind (about the member named of, when given)."""
    return [d.id for d in diff.discrepancies if d.kind is kind and (not of or (d.member and d.member.name == of))]


# --- the policy table, row by row ----------------------------------------------------------------------------------

# A 5-voter cluster where everyone answers: the quorum rule holds for every removal below, even with one agent
# unreachable, so that a row test sees the table and nothing else. n5 is the member removed, n6 the joiner,
# n4 "another member".
FIVE = compute_diff(consistent_view(5))
TARGETS = {TOKEN: "n6", JOIN: "n6", REMOVE: "n5", FORCE: "n5", REPAIR: "n5"}
OTHER = member(4)

# Where each kind is found, as diff.py reports it; facts about a node's own source carry no member.
SOURCES = {
    K.MISSING: Source.TRUSTSTORE,
    K.ORPHAN: Source.TRUSTSTORE,
    K.ADDRESS_MISMATCH: Source.TRUSTSTORE,
    K.CERTIFICATE_MISMATCH: Source.TRUSTSTORE,
    K.NAME_MISMATCH: Source.TRUSTSTORE,
    K.DUPLICATE_ADDRESS: Source.MEMBERS_TABLE,
    K.VIEW_DIFFERS: Source.RAFT_CACHE,
    K.ROLE_DIFFERS: Source.MEMBERS_TABLE,
    K.INVALID_ENTRY: Source.TRUSTSTORE,
    K.SOURCE_UNREADABLE: Source.TRUSTSTORE,
    K.AGENT_UNREACHABLE: Source.AGENT,
    K.AGENT_UNTRUSTED: Source.AGENT,
    K.AGENT_CERTIFICATE_MISMATCH: Source.AGENT,
    K.NO_LEADER: Source.RAFT_CONFIG,
    K.NODE_INFO_MISMATCH: Source.NODE_INFO,
    K.UNWATCHED_MEMBER: Source.AGENT,
}
ABOUT_A_NODE = {K.VIEW_DIFFERS, K.INVALID_ENTRY, K.SOURCE_UNREADABLE}


def about(kind: DiscrepancyKind, severity: Severity, who: Member) -> Discrepancy:
    """One discrepancy of this kind about who (a member, or for node-level kinds the member's node)."""
    source = SOURCES[kind]
    if kind is K.SOURCE_UNREADABLE and severity is not BLOCKING:
        source = Source.RAFT_CACHE  # a WARNING-level unreadable source: the node's cluster.yaml
    subject: Member | None = who
    node = who.name if source in (Source.AGENT, Source.NODE_INFO) else ("n1" if source is Source.TRUSTSTORE else "")
    if kind is K.NO_LEADER:
        subject, node = None, ""
    elif kind in ABOUT_A_NODE:
        subject, node = None, who.name
    elif kind is K.DUPLICATE_ADDRESS:
        subject = Member(address=who.address)
    return Discrepancy(
        id=discrepancy_id(kind, subject, source, node),
        kind=kind,
        severity=severity,
        member=subject,
        source=source,
        node=node,
        summary=f"{kind.name} about {who.name}.",
    )


def diff_with(*discrepancies: Discrepancy) -> MembershipDiff:
    return replace(FIVE, discrepancies=discrepancies)


# For every kind at every severity diff.py gives it, and every operation, what decide() must answer, written as
# three letters: about the member operated on; the same, acknowledged; about another member (R refused, P proceeds).
# A repair is what clears the diff: only NO_LEADER refuses it.
REPAIR_FIRST = {TOKEN: "RRR", JOIN: "RRR", REMOVE: "RRR", FORCE: "RPP", REPAIR: "PPP"}
NEVER = {TOKEN: "PPP", JOIN: "PPP", REMOVE: "PPP", FORCE: "PPP", REPAIR: "PPP"}
EFFECTS: dict[tuple[DiscrepancyKind, Severity], dict[OperationKind, str]] = {
    (K.MISSING, BLOCKING): REPAIR_FIRST,
    (K.ORPHAN, BLOCKING): REPAIR_FIRST,
    (K.ADDRESS_MISMATCH, BLOCKING): REPAIR_FIRST,
    (K.CERTIFICATE_MISMATCH, BLOCKING): REPAIR_FIRST,
    (K.NAME_MISMATCH, BLOCKING): REPAIR_FIRST,
    (K.DUPLICATE_ADDRESS, BLOCKING): REPAIR_FIRST,
    (K.VIEW_DIFFERS, WARNING): NEVER,
    (K.VIEW_DIFFERS, INFO): NEVER,
    (K.ROLE_DIFFERS, INFO): NEVER,
    (K.INVALID_ENTRY, WARNING): NEVER,
    (K.SOURCE_UNREADABLE, BLOCKING): REPAIR_FIRST,
    (K.SOURCE_UNREADABLE, WARNING): {TOKEN: "PPP", JOIN: "PPP", REMOVE: "PPP", FORCE: "RPP", REPAIR: "PPP"},
    # Unreachable: the quorum rule's business, but a normal removal needs its member to take part.
    (K.AGENT_UNREACHABLE, WARNING): {TOKEN: "PPP", JOIN: "PPP", REMOVE: "RRP", FORCE: "PPP", REPAIR: "PPP"},
    (K.AGENT_UNTRUSTED, BLOCKING): REPAIR_FIRST,
    (K.AGENT_CERTIFICATE_MISMATCH, BLOCKING): REPAIR_FIRST,
    (K.NO_LEADER, BLOCKING): {operation: "RRR" for operation in OperationKind},
    (K.NODE_INFO_MISMATCH, BLOCKING): REPAIR_FIRST,
    # Unwatched: the quorum rule's business too; removing it acts on a node nobody reads, so it is acknowledged.
    (K.UNWATCHED_MEMBER, WARNING): {TOKEN: "PPP", JOIN: "PPP", REMOVE: "RPP", FORCE: "RPP", REPAIR: "PPP"},
}

ROWS = [
    pytest.param(kind, severity, operation, effect, id=f"{kind.name}-{severity.name}-{operation.name}")
    for (kind, severity), effects in EFFECTS.items()
    for operation, effect in effects.items()
]


@pytest.mark.parametrize(("kind", "severity", "operation", "effect"), ROWS)
def test_policy_row(kind: DiscrepancyKind, severity: Severity, operation: OperationKind, effect: str) -> None:
    target = TARGETS[operation]
    on_target = about(kind, severity, member(int(target[1:])))
    on_other = about(kind, severity, OTHER)
    cases = [
        (on_target, decide(request(operation, target), diff_with(on_target))),
        (on_target, decide(request(operation, target, on_target.id), diff_with(on_target))),
        (on_other, decide(request(operation, target), diff_with(on_other))),
    ]
    for (discrepancy, verdict), expected in zip(cases, effect, strict=True):
        if expected == "P":
            assert isinstance(verdict, Proceed), verdict
        else:
            assert isinstance(verdict, Refused), verdict
            assert verdict.violations[0].type == kind.name
            assert verdict.violations[0].subject == discrepancy.id
            assert verdict.violations[0].description.startswith(discrepancy.summary)
    acknowledged = cases[1][1]
    if isinstance(acknowledged, Proceed) and effect[0] == "R":
        assert acknowledged.acknowledged_used == {on_target.id}


def test_the_row_tests_cover_every_kind_and_operation() -> None:
    assert {kind for kind, _ in EFFECTS} == set(DiscrepancyKind)
    assert all(set(effects) == set(OperationKind) for effects in EFFECTS.values())
    assert set(POLICY) == {(kind, operation) for kind in DiscrepancyKind for operation in OperationKind}


@pytest.mark.parametrize("kind", [k for k in DiscrepancyKind if k is not K.NO_LEADER], ids=lambda k: k.name)
@pytest.mark.parametrize("operation", list(OperationKind), ids=lambda o: o.name)
def test_info_never_blocks(kind: DiscrepancyKind, operation: OperationKind) -> None:
    target = TARGETS[operation]
    discrepancy = about(kind, INFO, member(int(target[1:])))
    assert isinstance(decide(request(operation, target), diff_with(discrepancy)), Proceed)


# --- the fixed points ----------------------------------------------------------------------------------------------


def test_a_blocking_discrepancy_refuses_every_normal_operation_acknowledged_or_not() -> None:
    # S9: n2.yaml deleted from n3's truststore.
    diff = compute_diff(drop_records(consistent_view(3), Source.TRUSTSTORE, address(2), nodes=["n3"]))
    (missing,) = ids(diff, K.MISSING)
    for operation, target in ((TOKEN, "n4"), (JOIN, "n4"), (REMOVE, "n1"), (REMOVE, "n2")):
        assert refused_types(decide(request(operation, target), diff)) == ["MISSING"]
        assert refused_types(decide(request(operation, target, missing), diff)) == ["MISSING"]


def test_an_unreachable_member_does_not_stop_tokens_joins_or_other_removals() -> None:
    diff = compute_diff(fail_agent(consistent_view(5), "n4"))
    assert [d.kind for d in diff.discrepancies] == [K.AGENT_UNREACHABLE]
    for operation, target in ((TOKEN, "n6"), (JOIN, "n6"), (REMOVE, "n5"), (FORCE, "n5")):
        assert decide(request(operation, target), diff) == Proceed(frozenset())


def test_a_normal_removal_of_an_unreachable_member_is_refused_and_a_forced_one_is_not() -> None:
    diff = compute_diff(fail_agent(consistent_view(3), "n3"))
    (unreachable,) = diff.discrepancies
    verdict = decide(request(REMOVE, "n3", unreachable.id), diff)
    assert refused_types(verdict) == ["AGENT_UNREACHABLE"]
    assert isinstance(verdict, Refused) and "force" in verdict.violations[0].description
    assert decide(request(FORCE, "n3"), diff) == Proceed(frozenset())


def test_a_forced_removal_is_blocked_only_by_facts_about_its_member() -> None:
    # n2's row and n3.yaml on n1 are both gone: removing n2 by force needs only n2's fact acknowledged.
    view = drop_records(consistent_view(5), Source.MEMBERS_TABLE, address(2))
    view = drop_records(view, Source.TRUSTSTORE, address(3), nodes=["n1"])
    diff = compute_diff(view)
    (about_n2,) = ids(diff, K.MISSING, "n2")
    (about_n3,) = ids(diff, K.MISSING, "n3")
    verdict = decide(request(FORCE, "n2"), diff)
    assert isinstance(verdict, Refused) and [v.subject for v in verdict.violations] == [about_n2]
    assert decide(request(FORCE, "n2", about_n2), diff) == Proceed(frozenset({about_n2}))
    # Acknowledging the other member's fact in the same request is allowed; it lifts nothing, so it is not "used".
    assert decide(request(FORCE, "n2", about_n2, about_n3), diff) == Proceed(frozenset({about_n2}))
    # A normal removal of n2, or of anyone, is still refused.
    assert refused_types(decide(request(REMOVE, "n2", about_n2, about_n3), diff)) == ["MISSING", "MISSING"]


def test_a_cluster_wide_fact_is_about_the_member_a_forced_removal_removes() -> None:
    # Nobody could read the members table: n3's row cannot be deleted, so the forced removal must say it knows.
    diff = compute_diff(set_report(consistent_view(3), Source.MEMBERS_TABLE, error="database is locked"))
    (unreadable,) = ids(diff, K.SOURCE_UNREADABLE)
    assert refused_types(decide(request(FORCE, "n3"), diff)) == ["SOURCE_UNREADABLE"]
    assert decide(request(FORCE, "n3", unreadable), diff) == Proceed(frozenset({unreadable}))


def test_two_dead_members_are_force_removed_one_after_the_other() -> None:
    # n4 and n5 died, and a removal that crashed after its first step deleted both rows.
    view = fail_agent(fail_agent(consistent_view(5), "n4"), "n5")
    for i in (4, 5):
        view = drop_records(view, Source.MEMBERS_TABLE, address(i))
    first = compute_diff(view)
    (n4_row,) = ids(first, K.MISSING, "n4")
    (n5_row,) = ids(first, K.MISSING, "n5")
    assert refused_types(decide(request(FORCE, "n4"), first)) == ["MISSING"]
    assert decide(request(FORCE, "n4", n4_row, n5_row, fingerprint=first.fingerprint), first) == Proceed(
        frozenset({n4_row})
    )
    # n4 is gone from every source and its node is wiped; gather again before the next one.
    view = drop_records(view, Source.TRUSTSTORE, address(4))
    view = drop_node(remove_raft_member(view, 4), "n4")
    second = compute_diff(view)
    assert ids(second, K.MISSING) == [n5_row]  # the same fact keeps its id across gathers
    assert decide(request(FORCE, "n5", n5_row, fingerprint=second.fingerprint), second) == Proceed(frozenset({n5_row}))
    # The first fingerprint is stale now.
    assert decide(request(FORCE, "n5", n5_row, fingerprint=first.fingerprint), second) == Stale(second.fingerprint)


def test_no_leader_refuses_every_operation_acknowledged_or_not_and_says_how_to_recover() -> None:
    diff = compute_diff(set_report(consistent_view(3), Source.RAFT_CONFIG, error="no leader"))
    every_id = [d.id for d in diff.discrepancies]
    for operation in OperationKind:
        verdict = decide(request(operation, "n3", *every_id, fingerprint=diff.fingerprint), diff)
        assert isinstance(verdict, Refused)
        (no_leader,) = [v for v in verdict.violations if v.type == "NO_LEADER"]
        assert ".reconfigure" in no_leader.description and "cluster edit" in no_leader.description
        assert "once" in no_leader.description


def _parked(op_id: str, member: str) -> OperationRecord:
    return OperationRecord(
        id=op_id,
        kind=OperationKind.REMOVE,
        member=Member(name=member),
        state=OperationState.PARKED,
        steps=(),
        error=f"{member}'s agent did not answer",
        plan=f"bring {member} back",
        audit=Audit(requested_by="operator", certificate_fingerprint="", request_id=op_id, verdict="", fingerprint=""),
        epoch=1,
        created_at=0.0,
        updated_at=0.0,
    )


def test_a_parked_operation_stops_every_operation_before_anything_else_is_weighed() -> None:
    # A clean diff, a dirty one, a stale fingerprint, an acknowledged id: a parked operation comes first in each case.
    clean = compute_diff(consistent_view(3))
    dirty = compute_diff(drop_records(consistent_view(3), Source.TRUSTSTORE, address(3), ["n2"]))
    assert not clean.discrepancies and dirty.discrepancies
    parked = [_parked("op-7", "n3"), _parked("op-9", "n2")]
    for diff in (clean, dirty):
        for operation in OperationKind:
            every_id = [d.id for d in diff.discrepancies]
            verdict = decide(request(operation, "n3", *every_id, fingerprint="stale"), diff, parked=parked)
            assert verdict == Parked(
                (
                    Violation("PARKED_OPERATION", "op-7", "n3's agent did not answer; bring n3 back"),
                    Violation("PARKED_OPERATION", "op-9", "n2's agent did not answer; bring n2 back"),
                )
            )
    assert isinstance(decide(request(OperationKind.JOIN, "n4"), clean, parked=[]), Proceed)


def test_an_unknown_kind_blocks_every_operation() -> None:
    # A kind added after this coordinator was built: a number with no name, even at INFO severity.
    unknown = replace(about(K.MISSING, INFO, OTHER), kind=cast(DiscrepancyKind, 99), id="future")
    for operation in OperationKind:
        verdict = decide(request(operation, TARGETS[operation], "future"), diff_with(unknown))
        assert refused_types(verdict) == ["DISCREPANCY_KIND_99"]
        assert rule_for(unknown.kind, operation) is None


def test_an_acknowledged_id_that_is_not_in_the_diff_is_ignored() -> None:
    assert decide(request(FORCE, "n5", "cleared-since"), FIVE) == Proceed(frozenset())
    assert decide(request(TOKEN, "n6", "cleared-since"), FIVE) == Proceed(frozenset())


def test_acknowledging_never_overrides_the_quorum_rule() -> None:
    # Three voters, n3 down; n2's row deleted. Force-removing n2 would leave 1 of 2 voters answering.
    view = drop_records(fail_agent(consistent_view(3), "n3"), Source.MEMBERS_TABLE, address(2))
    diff = compute_diff(view)
    every_id = [d.id for d in diff.discrepancies]
    verdict = decide(request(FORCE, "n2", *every_id), diff)
    assert refused_types(verdict) == ["QUORUM"]
    assert isinstance(verdict, Refused)
    quorum = verdict.violations[0]
    assert quorum.subject == "n2"
    assert "voters before: 3, after: 2, reachable: 1, needed: 2" in quorum.description
    # Removing the dead one is fine.
    n3_facts = [d.id for d in diff.discrepancies]
    assert isinstance(decide(request(FORCE, "n3", *n3_facts), diff), Proceed)


def test_a_join_is_refused_only_when_the_voters_answering_are_no_majority() -> None:
    one_down = compute_diff(fail_agent(consistent_view(3), "n3"))
    two_down = compute_diff(fail_agent(fail_agent(consistent_view(3), "n3"), "n2"))
    for operation in (TOKEN, JOIN):
        assert isinstance(decide(request(operation, "n4"), one_down), Proceed)
        assert refused_types(decide(request(operation, "n4"), two_down)) == ["QUORUM"]


def test_a_repair_is_blocked_by_no_discrepancy_nor_the_quorum_rule_but_checks_its_fingerprint() -> None:
    # Two of three voters down and a truststore record missing: what a repair is for; it adds no one to Raft.
    dirty = compute_diff(
        drop_records(fail_agent(fail_agent(consistent_view(3), "n3"), "n2"), Source.TRUSTSTORE, address(2), ["n1"])
    )
    assert {K.MISSING, K.AGENT_UNREACHABLE} <= {d.kind for d in dirty.discrepancies}
    assert decide(Request(REPAIR, "", dirty.fingerprint), dirty) == Proceed(frozenset())
    assert decide(Request(REPAIR, "", "seen-earlier"), dirty) == Stale(dirty.fingerprint)


def test_blocking_is_decided_before_the_fingerprint() -> None:
    dirty = compute_diff(drop_records(consistent_view(3), Source.TRUSTSTORE, address(2), nodes=["n3"]))
    clean = compute_diff(consistent_view(3))
    assert isinstance(decide(request(TOKEN, "n4", fingerprint="seen-earlier"), dirty), Refused)
    assert decide(request(TOKEN, "n4", fingerprint="seen-earlier"), clean) == Stale(clean.fingerprint)
    assert decide(request(TOKEN, "n4", fingerprint=clean.fingerprint), clean) == Proceed(frozenset())
    # No fingerprint: "only if consistent now".
    assert decide(request(TOKEN, "n4"), clean) == Proceed(frozenset())
    assert isinstance(decide(request(TOKEN, "n4"), dirty), Refused)


def test_violations_come_in_diff_order_then_quorum() -> None:
    view = drop_records(consistent_view(3), Source.TRUSTSTORE, address(2), nodes=["n1", "n3"])
    view = fail_agent(fail_agent(view, "n2"), "n3")
    diff = compute_diff(view)
    verdict = decide(request(TOKEN, "n4"), diff)
    assert isinstance(verdict, Refused)
    blocking = [d.id for d in diff.discrepancies if d.kind is K.MISSING]
    assert [v.subject for v in verdict.violations] == [*blocking, "n4"]
    assert verdict.violations[-1].type == "QUORUM"


def test_removing_a_member_nobody_knows_is_refused() -> None:
    # microcluster: `remove nonexist --force --address 127.0.0.1:9999` must fail.
    for operation in (REMOVE, FORCE):
        verdict = decide(request(operation, "nonexist"), FIVE)
        assert verdict == Refused(
            (
                Violation(
                    "UNKNOWN_MEMBER",
                    "nonexist",
                    "nonexist is in no members-table row, truststore, Raft configuration or agent report, so there "
                    "is nothing to remove.",
                ),
            )
        )


def test_a_ghost_raft_member_is_removed_by_its_address() -> None:
    # S1, wiped joiner: n4 added itself to Raft as a spare; no record anywhere names it.
    diff = compute_diff(add_raft_member(consistent_view(3), 4, Role.SPARE))
    (ghost,) = ids(diff, K.MISSING)
    assert refused_types(decide(request(FORCE, address(4)), diff)) == ["MISSING"]
    assert decide(request(FORCE, address(4), ghost), diff) == Proceed(frozenset({ghost}))


def test_an_orphan_left_by_a_crashed_removal_is_force_removed_by_name() -> None:
    # S7: n4 left the table and Raft; n1 still trusts it.
    view = drop_records(consistent_view(4), Source.MEMBERS_TABLE, address(4))
    view = remove_raft_member(view, 4)
    view = drop_node(drop_records(view, Source.TRUSTSTORE, address(4), nodes=["n2", "n3"]), "n4")
    diff = compute_diff(view)
    (orphan,) = ids(diff, K.ORPHAN)
    assert refused_types(decide(request(TOKEN, "n5"), diff)) == ["ORPHAN"]
    assert decide(request(FORCE, "n4", orphan), diff) == Proceed(frozenset({orphan}))


def test_a_stalled_join_blocks_the_next_one() -> None:
    # S2: the leader wrote n4's PENDING row and crashed before n4 reached Raft.
    diff = compute_diff(add_records(consistent_view(3), Source.MEMBERS_TABLE, [row(4, Role.PENDING)]))
    assert refused_types(decide(request(JOIN, "n5"), diff)) == ["MISSING"]
    (stalled,) = ids(diff, K.MISSING)
    assert decide(request(FORCE, "n4", stalled), diff) == Proceed(frozenset({stalled}))


def test_an_explicit_quorum_input_overrides_the_diffs() -> None:
    # Just before REMOVE the coordinator re-reads the leader's configuration; decide uses what it is given.
    members = tuple(member(i) for i in (1, 2, 3))
    fresh = QuorumInput(members, frozenset({(address(3), 3)}))
    verdict = decide(request(REMOVE, "n2"), compute_diff(consistent_view(3)), fresh)
    assert refused_types(verdict) == ["QUORUM"]


# --- microcluster's integration tests (docs/scenarios.md), replayed on diffs ------------------------------------------


def forgotten(view: ClusterView, i: int) -> ClusterView:
    """The cluster after member i's removal completed: in no source, its node wiped."""
    for source in (Source.MEMBERS_TABLE, Source.TRUSTSTORE):
        view = drop_records(view, source, address(i))
    return drop_node(remove_raft_member(view, i), name(i))


def test_membership_consistency() -> None:
    """c2's row deleted: remove, join and token are refused; a forced removal with the fact acknowledged is not,
    and a token is issued afterwards."""
    view = drop_records(consistent_view(3), Source.MEMBERS_TABLE, address(2))
    diff = compute_diff(view)
    (row_gone,) = ids(diff, K.MISSING, "n2")
    assert refused_types(decide(request(REMOVE, "n2"), diff)) == ["MISSING"]
    assert refused_types(decide(request(JOIN, "n4"), diff)) == ["MISSING"]
    assert refused_types(decide(request(TOKEN, "n5"), diff)) == ["MISSING"]
    assert refused_types(decide(request(FORCE, "n2"), diff)) == ["MISSING"]
    assert decide(request(FORCE, "n2", row_gone, fingerprint=diff.fingerprint), diff) == Proceed(frozenset({row_gone}))
    after = compute_diff(forgotten(view, 2))
    assert decide(request(TOKEN, "n5", fingerprint=after.fingerprint), after) == Proceed(frozenset())


def test_truststore_force_removal() -> None:
    """c3.yaml removed on every node: remove c3 is refused; forced with every fact acknowledged it is not."""
    view = drop_records(consistent_view(3), Source.TRUSTSTORE, address(3))
    diff = compute_diff(view)
    facts = ids(diff, K.MISSING, "n3")
    assert len(facts) == 3
    assert refused_types(decide(request(REMOVE, "n3"), diff)) == ["MISSING"] * 3
    partial = decide(request(FORCE, "n3", *facts[:2]), diff)
    assert isinstance(partial, Refused) and [v.subject for v in partial.violations] == facts[2:]
    assert decide(request(FORCE, "n3", *facts), diff) == Proceed(frozenset(facts))
    after = compute_diff(forgotten(view, 3))
    assert decide(request(TOKEN, "n4"), after) == Proceed(frozenset())


def test_parallel_joins_pass_one_after_the_other() -> None:
    """Joins queue on the lock: each is decided on the diff the previous one left, which is consistent."""
    view = consistent_view(1)
    for i in (2, 3, 4):
        assert decide(request(JOIN, name(i)), compute_diff(view)) == Proceed(frozenset())
        view = consistent_view(i)
    assert len(compute_diff(view).members) == 4


# --- properties ----------------------------------------------------------------------------------------------------

PEOPLE = [member(i) for i in range(1, 7)]


@st.composite
def hand_made_diffs(draw: st.DrawFn) -> MembershipDiff:
    """The five-voter cluster with up to four discrepancies of any kind and severity about any member or node."""
    drawn = draw(
        st.lists(
            st.builds(about, st.sampled_from(DiscrepancyKind), st.sampled_from(Severity), st.sampled_from(PEOPLE)),
            max_size=4,
            unique_by=lambda d: d.id,
        )
    )
    return diff_with(*drawn)


@st.composite
def broken_view_diffs(draw: st.DrawFn) -> MembershipDiff:
    """Real diffs: a consistent cluster with a few records dropped, agents lost or sources unreadable."""
    size = draw(st.integers(1, 5))
    view = consistent_view(size)
    for _ in range(draw(st.integers(0, 3))):
        node = name(draw(st.integers(1, size)))
        fault = draw(st.sampled_from(["table", "truststore", "agent", "unreadable"]))
        if fault == "table":
            view = drop_records(view, Source.MEMBERS_TABLE, address(draw(st.integers(1, size))))
        elif fault == "truststore":
            view = drop_records(view, Source.TRUSTSTORE, address(draw(st.integers(1, size))), nodes=[node])
        elif fault == "agent":
            view = fail_agent(view, node)
        else:
            source = draw(st.sampled_from([Source.TRUSTSTORE, Source.RAFT_CACHE, Source.RAFT_CONFIG]))
            view = set_report(view, source, nodes=[node], error="unreadable")
    return compute_diff(view)


DIFFS = st.one_of(hand_made_diffs(), broken_view_diffs())


@st.composite
def requests(draw: st.DrawFn, diff: MembershipDiff) -> Request:
    known = [d.id for d in diff.discrepancies]
    acknowledged = draw(st.sets(st.sampled_from(known))) if known else set()
    acknowledged |= draw(st.sets(st.sampled_from(["cleared-since", "typo"])))
    # Forced removals of a member something is wrong with are where acknowledgements matter: draw them often.
    mentioned = sorted({d.member.name for d in diff.discrepancies if d.member and d.member.name})
    return Request(
        draw(st.sampled_from([*OperationKind, FORCE, FORCE])),
        draw(st.sampled_from([*mentioned, *mentioned, *(m.name for m in diff.members), "n6", "nobody"])),
        draw(st.sampled_from(["", diff.fingerprint, "seen-earlier"])),
        frozenset(acknowledged),
    )


@given(DIFFS, st.data())
def test_no_proceed_while_a_discrepancy_the_policy_says_blocks_is_there(
    diff: MembershipDiff, data: st.DataObject
) -> None:
    req = data.draw(requests(diff))
    target = next((m for m in PEOPLE if m.name == req.member), None)
    must_refuse = False
    for d in diff.discrepancies:
        rule = rule_for(d.kind, req.operation)
        if rule in (None, Rule.REFUSES) or (rule is Rule.BLOCKS and d.severity is not INFO):
            must_refuse = True
        if rule is Rule.BLOCKS_IF_SEVERE and d.severity is BLOCKING:
            must_refuse = True
        on_target = target is not None and (d.member == target or (d.member is None and d.node == target.name))
        if rule is Rule.ACKNOWLEDGE_IF_TARGET and on_target and d.severity is not INFO and d.id not in req.acknowledged:
            must_refuse = True
    if must_refuse:
        assert isinstance(decide(req, diff), Refused)


@given(DIFFS, st.data())
def test_acknowledging_more_never_turns_a_pass_into_a_refusal(diff: MembershipDiff, data: st.DataObject) -> None:
    req = data.draw(requests(diff))
    more = req.acknowledged | data.draw(st.sets(st.sampled_from([d.id for d in diff.discrepancies] or ["x"])))
    before, after = decide(req, diff), decide(replace(req, acknowledged=more), diff)
    if not isinstance(before, Refused):
        assert type(after) is type(before)
    if isinstance(after, Refused):
        assert isinstance(before, Refused)
        assert set(after.violations) <= set(before.violations)


@given(DIFFS, st.sampled_from(Severity), st.data())
def test_no_leader_always_refuses(diff: MembershipDiff, severity: Severity, data: st.DataObject) -> None:
    no_leader = about(K.NO_LEADER, severity, PEOPLE[0])
    diff = replace(diff, discrepancies=(*diff.discrepancies, no_leader))
    req = data.draw(requests(diff))
    req = replace(req, acknowledged=req.acknowledged | {no_leader.id}, expected_fingerprint=diff.fingerprint)
    verdict = decide(req, diff)
    assert isinstance(verdict, Refused)
    assert "NO_LEADER" in [v.type for v in verdict.violations]


@given(DIFFS, st.data(), st.randoms(use_true_random=False))
def test_decide_is_deterministic_and_independent_of_discrepancy_order(
    diff: MembershipDiff, data: st.DataObject, rnd: random.Random
) -> None:
    req = data.draw(requests(diff))
    verdict = decide(req, diff)
    assert decide(req, diff) == verdict
    shuffled = replace(diff, discrepancies=tuple(rnd.sample(diff.discrepancies, len(diff.discrepancies))))
    other = decide(req, shuffled)
    if isinstance(verdict, Refused):
        assert isinstance(other, Refused)
        assert Counter(other.violations) == Counter(verdict.violations)
    else:
        assert other == verdict


@given(DIFFS, st.data())
def test_a_forced_removal_ignores_what_is_wrong_with_other_members(diff: MembershipDiff, data: st.DataObject) -> None:
    named = [m for m in diff.members if m.name]
    assume(named)
    target = data.draw(st.sampled_from(named))
    elsewhere = replace(
        diff,
        discrepancies=tuple(
            d
            for d in diff.discrepancies
            if d.member is not None and d.member.name not in ("", target.name) and d.member.address != target.address
        ),
    )
    verdict = decide(Request(FORCE, target.name), elsewhere)
    if isinstance(verdict, Refused):
        assert {v.type for v in verdict.violations} <= {"QUORUM"}
