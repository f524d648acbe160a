"""The diff engine on plain values: one table of divergence scenarios, then properties checked with hypothesis.

Scenario names (S1, S2, ...) are those of docs/scenarios.md. Each scenario starts from a consistent
cluster (tests/core/views.py) and breaks it the way the real failure does.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.diff import MAX_EVIDENCE_RECORDS, compute_diff, discrepancy_id, fingerprint
from coordinator.core.model import (
    AgentFailure,
    ClusterView,
    Discrepancy,
    DiscrepancyKind,
    Evidence,
    InvalidEntry,
    Member,
    MemberRecord,
    Remedy,
    RemedySafety,
    RemedyStep,
    RepairStepKind,
    Role,
    Severity,
    Source,
)

from .views import (
    NOW,
    add_raft_member,
    add_records,
    address,
    consistent_view,
    drop_node,
    drop_records,
    edit_node_view,
    fail_agent,
    fingerprint_of,
    name,
    raft_entry,
    remove_raft_member,
    replace_records,
    row,
    set_report,
    trust,
)

K = DiscrepancyKind
WRITE, DELETE = RepairStepKind.WRITE_RECORD, RepairStepKind.DELETE_RECORD
BLOCKING, WARNING, INFO = Severity.BLOCKING, Severity.WARNING, Severity.INFO
TABLE, TRUSTSTORE, RAFT, NODE_RAFT, CACHE, INFO_YAML, AGENT = (
    Source.MEMBERS_TABLE,
    Source.TRUSTSTORE,
    Source.RAFT_CONFIG,
    Source.RAFT_NODE_VIEW,
    Source.RAFT_CACHE,
    Source.NODE_INFO,
    Source.AGENT,
)


def only(view: ClusterView, kind: DiscrepancyKind) -> Discrepancy:
    """The one discrepancy of this kind in the view's diff."""
    (found,) = [d for d in compute_diff(view).discrepancies if d.kind is kind]
    return found


# --- scenarios -----------------------------------------------------------------------------------------------------


def ghost_raft_member() -> ClusterView:
    """S1: the engine added n4 to Raft, then the members-table insert failed; only the leader trusts n4."""
    view = add_raft_member(consistent_view(3), 4, Role.SPARE)
    return add_records(view, TRUSTSTORE, [trust(4)], nodes=["n1"])


def pending_row_only() -> ClusterView:
    """S2: the leader wrote n4's PENDING row and crashed before n4 reached Raft."""
    return add_records(consistent_view(3), TABLE, [row(4, Role.PENDING)])


def pending_row_trusted_by_leader() -> ClusterView:
    """S3: as S2, and the leader's truststore already holds n4."""
    return add_records(pending_row_only(), TRUSTSTORE, [trust(4)], nodes=["n1"])


def partial_fan_out() -> ClusterView:
    """S4: n4 joined, but n2 and n3 have not written its truststore record yet."""
    return drop_records(consistent_view(4), TRUSTSTORE, address(4), nodes=["n2", "n3"])


def row_deleted_while_in_raft() -> ClusterView:
    """S6: n3's row was deleted by hand; n3 is still a Raft voter and every truststore still holds it."""
    return drop_records(consistent_view(3), TABLE, address(3))


def row_deleted_and_heartbeat_ran() -> ClusterView:
    """S6, later: the heartbeat has also erased n3 from every truststore."""
    return drop_records(row_deleted_while_in_raft(), TRUSTSTORE, address(3))


def removal_crashed_after_raft() -> ClusterView:
    """S7: n4's removal took it out of the table and Raft, then crashed; n1 still trusts n4, now gone."""
    view = drop_records(consistent_view(4), TABLE, address(4))
    view = remove_raft_member(view, 4)
    view = drop_records(view, TRUSTSTORE, address(4), nodes=["n2", "n3"])
    return drop_node(view, "n4")


def removed_node_returns() -> ClusterView:
    """S7/S8: the cluster is clean of n4, but n4 kept its files and still believes it is a member."""
    others = ["n1", "n2", "n3"]
    view = drop_records(consistent_view(4), TABLE, address(4))
    view = drop_records(view, RAFT, address(4))
    view = drop_records(view, NODE_RAFT, address(4), nodes=others)
    view = drop_records(view, CACHE, address(4), nodes=others)
    view = drop_records(view, TRUSTSTORE, address(4), nodes=others)
    return set_report(view, CACHE, nodes=["n4"], age=3600.0)


def truststore_file_deleted() -> ClusterView:
    """S9: n2.yaml was deleted from n3's truststore."""
    return drop_records(consistent_view(3), TRUSTSTORE, address(2), nodes=["n3"])


def truststore_file_deleted_on_leader() -> ClusterView:
    """S10: as S9, on the leader n1."""
    return drop_records(consistent_view(3), TRUSTSTORE, address(2), nodes=["n1"])


def duplicate_address() -> ClusterView:
    """S12: n3 rejoined as n3b under its old address while n3's row was left behind."""
    rejoined = replace(trust(3), name="n3b", certificate_fingerprint=fingerprint_of("n3b"), entry="n3b.yaml")
    view = add_records(consistent_view(3), TRUSTSTORE, [rejoined])
    return add_records(view, TABLE, [replace(row(3), name="n3b", certificate_fingerprint=fingerprint_of("n3b"))])


def ghost_row() -> ClusterView:
    """S15: n4 has a row the heartbeat set to role "" (not in Raft); every truststore holds it."""
    view = add_records(consistent_view(3), TABLE, [replace(row(4), role=None, role_text="")])
    return add_records(view, TRUSTSTORE, [trust(4)])


def stale_cache(age: float) -> ClusterView:
    """n2's cluster.yaml was written before n3 joined, age seconds ago."""
    view = drop_records(consistent_view(3), CACHE, address(3), nodes=["n2"])
    return set_report(view, CACHE, nodes=["n2"], age=age)


def cache_with_other_roles() -> ClusterView:
    """n2's old cluster.yaml still has n3 as a spare: the role adjuster has promoted it since."""
    view = replace_records(consistent_view(3), CACHE, raft_entry(3), raft_entry(3, Role.SPARE), nodes=["n2"])
    return set_report(view, CACHE, nodes=["n2"], age=600.0)


def spare_lags() -> ClusterView:
    """n3 is a spare, which gets no log: its own view of Raft may lack n1 for as long as it stays a spare."""
    view = consistent_view(3, roles=[Role.VOTER, Role.VOTER, Role.SPARE])
    return drop_records(view, NODE_RAFT, address(1), nodes=["n3"])


def invalid_truststore_entries() -> ClusterView:
    """n2's truststore has a misnamed file (so n3's record is unreadable), a stray file and a broken one."""
    view = drop_records(consistent_view(3), TRUSTSTORE, address(3), nodes=["n2"])
    entries = (
        InvalidEntry("n3.yaml", "file n3.yaml holds name n9"),
        InvalidEntry("notes.txt", "not a .yaml file"),
        InvalidEntry("broken.yaml", "not valid YAML"),
    )
    return set_report(view, TRUSTSTORE, nodes=["n2"], invalid_entries=entries)


def no_leader_and_stale_cache() -> ClusterView:
    """No node reaches a leader. Raft comparisons are skipped, so n2's stale cluster.yaml is not reported."""
    return set_report(stale_cache(600.0), RAFT, error="no leader")


def truststore_record(**changes: str) -> ClusterView:
    """n2's truststore record of n3 differs from n3's row in the given fields."""
    return replace_records(consistent_view(3), TRUSTSTORE, trust(3), replace(trust(3), **changes), nodes=["n2"])


V3 = consistent_view(3)

SCENARIOS = [
    ("S1 ghost Raft member", ghost_raft_member(), [(K.MISSING, BLOCKING, TABLE, "")]),
    ("S2 PENDING row only", pending_row_only(), [(K.MISSING, BLOCKING, RAFT, "")]),
    ("S3 PENDING row, trusted by leader", pending_row_trusted_by_leader(), [(K.MISSING, BLOCKING, RAFT, "")]),
    (
        "S4 partial truststore fan-out",
        partial_fan_out(),
        [(K.MISSING, BLOCKING, TRUSTSTORE, "n2"), (K.MISSING, BLOCKING, TRUSTSTORE, "n3")],
    ),
    ("S6 row deleted, still in Raft", row_deleted_while_in_raft(), [(K.MISSING, BLOCKING, TABLE, "")]),
    ("S6 after the heartbeat", row_deleted_and_heartbeat_ran(), [(K.MISSING, BLOCKING, TABLE, "")]),
    ("S7 removal crashed after Raft", removal_crashed_after_raft(), [(K.ORPHAN, BLOCKING, TRUSTSTORE, "n1")]),
    (
        "S7/S8 removed node still lists itself",
        removed_node_returns(),
        [
            (K.ORPHAN, BLOCKING, TRUSTSTORE, "n4"),
            (K.NODE_INFO_MISMATCH, BLOCKING, INFO_YAML, "n4"),
            (K.VIEW_DIFFERS, WARNING, NODE_RAFT, "n4"),
            (K.VIEW_DIFFERS, WARNING, CACHE, "n4"),
        ],
    ),
    ("S9 truststore file deleted", truststore_file_deleted(), [(K.MISSING, BLOCKING, TRUSTSTORE, "n3")]),
    ("S10 deleted on the leader", truststore_file_deleted_on_leader(), [(K.MISSING, BLOCKING, TRUSTSTORE, "n1")]),
    ("S12 duplicate address", duplicate_address(), [(K.DUPLICATE_ADDRESS, BLOCKING, TABLE, "")]),
    ("S15 ghost row", ghost_row(), [(K.MISSING, BLOCKING, RAFT, "")]),
    ("old cluster.yaml lacks a member", stale_cache(60.0), [(K.VIEW_DIFFERS, WARNING, CACHE, "n2")]),
    ("young cluster.yaml lacks a member", stale_cache(2.0), [(K.VIEW_DIFFERS, INFO, CACHE, "n2")]),
    ("cluster.yaml differs in roles only", cache_with_other_roles(), [(K.VIEW_DIFFERS, INFO, CACHE, "n2")]),
    ("a spare's own Raft view lags", spare_lags(), [(K.VIEW_DIFFERS, INFO, NODE_RAFT, "n3")]),
    ("unreachable agent", fail_agent(V3, "n3"), [(K.AGENT_UNREACHABLE, WARNING, AGENT, "n3")]),
    (
        "untrusted agent",
        fail_agent(V3, "n3", AgentFailure.UNTRUSTED),
        [(K.AGENT_UNTRUSTED, BLOCKING, AGENT, "n3")],
    ),
    (
        "unreadable truststore",
        set_report(V3, TRUSTSTORE, nodes=["n2"], error="permission denied"),
        [(K.SOURCE_UNREADABLE, BLOCKING, TRUSTSTORE, "n2")],
    ),
    (
        "unreadable cluster.yaml",
        set_report(V3, CACHE, nodes=["n2"], error="permission denied"),
        [(K.SOURCE_UNREADABLE, WARNING, CACHE, "n2")],
    ),
    (
        "invalid, misnamed and non-yaml truststore entries",
        invalid_truststore_entries(),
        [(K.INVALID_ENTRY, WARNING, TRUSTSTORE, "n2")] * 3 + [(K.MISSING, BLOCKING, TRUSTSTORE, "n2")],
    ),
    ("no leader", set_report(V3, RAFT, error="no leader"), [(K.NO_LEADER, BLOCKING, RAFT, "")]),
    (
        "no agent answers",
        fail_agent(fail_agent(fail_agent(V3, "n1"), "n2"), "n3"),
        [(K.AGENT_UNREACHABLE, WARNING, AGENT, n) for n in ("n1", "n2", "n3")]
        + [(K.NO_LEADER, BLOCKING, RAFT, ""), (K.SOURCE_UNREADABLE, BLOCKING, TABLE, "")],
    ),
    ("no leader skips Raft comparisons", no_leader_and_stale_cache(), [(K.NO_LEADER, BLOCKING, RAFT, "")]),
    (
        "one node cannot reach the leader",
        set_report(V3, RAFT, nodes=["n3"], error="connection refused"),
        [(K.SOURCE_UNREADABLE, WARNING, RAFT, "n3")],
    ),
    (
        "no node can read the members table",
        set_report(V3, TABLE, error="database is locked"),
        [(K.SOURCE_UNREADABLE, BLOCKING, TABLE, "")],
    ),
    (
        "one node read an older members table",
        drop_records(V3, TABLE, address(2), nodes=["n3"]),
        [(K.VIEW_DIFFERS, INFO, TABLE, "n3")],
    ),
    (
        "invalid members-table row",
        set_report(V3, TABLE, invalid_entries=(InvalidEntry("row 7", "certificate is not PEM"),)),
        [(K.INVALID_ENTRY, WARNING, TABLE, "")],
    ),
    (
        "agent serves another certificate",
        edit_node_view(V3, "n2", certificate_fingerprint=fingerprint_of("impostor")),
        [(K.AGENT_CERTIFICATE_MISMATCH, BLOCKING, AGENT, "n2")],
    ),
    (
        "truststore has another address",
        truststore_record(address="127.0.0.1:7999"),
        [(K.ADDRESS_MISMATCH, BLOCKING, TRUSTSTORE, "n2")],
    ),
    (
        "truststore has another certificate",
        truststore_record(certificate_fingerprint=fingerprint_of("other")),
        [(K.CERTIFICATE_MISMATCH, BLOCKING, TRUSTSTORE, "n2")],
    ),
    (
        "truststore has a certificate under another name",
        truststore_record(name="n9", entry="n9.yaml"),
        [(K.NAME_MISMATCH, BLOCKING, TRUSTSTORE, "n2"), (K.MISSING, BLOCKING, TRUSTSTORE, "n2")],
    ),
    (
        "PENDING row already in Raft",
        replace_records(V3, TABLE, row(3), row(3, Role.PENDING)),
        [(K.ROLE_DIFFERS, INFO, TABLE, "")],
    ),
]


@pytest.mark.parametrize(("view", "expected"), [pytest.param(v, e, id=i) for i, v, e in SCENARIOS])
def test_scenario(view: ClusterView, expected: list[tuple[DiscrepancyKind, Severity, Source, str]]) -> None:
    found = [(d.kind, d.severity, d.source, d.node) for d in compute_diff(view).discrepancies]
    assert Counter(found) == Counter(expected)


# --- details of single scenarios -----------------------------------------------------------------------------------


def test_a_consistent_cluster_has_no_discrepancies() -> None:
    diff = compute_diff(consistent_view(3))
    assert diff.discrepancies == ()
    assert diff.consistent
    assert diff.members == tuple(Member(name(i), fingerprint_of(name(i)), address(i), i, Role.VOTER) for i in (1, 2, 3))
    assert diff.nodes == ("n1", "n2", "n3")
    assert diff.observed_at == NOW
    assert diff.fingerprint == fingerprint(consistent_view(3))


def test_a_raft_member_without_a_row_is_named_by_its_own_agent() -> None:
    missing = only(row_deleted_and_heartbeat_ran(), K.MISSING)
    assert missing.member == Member("n3", fingerprint_of("n3"), address(3), 3, Role.VOTER)
    assert missing.remedies[0].action.startswith("Restore n3's members-table row from its own agent's report")
    assert [r.safety for r in missing.remedies] == [
        RemedySafety.NEEDS_CONFIRMATION,
        RemedySafety.NEEDS_CONFIRMATION,
        RemedySafety.UNSAFE,
    ]


def test_a_raft_member_without_a_row_or_agent_is_named_by_a_truststore() -> None:
    missing = only(ghost_raft_member(), K.MISSING)
    assert missing.member == Member("n4", fingerprint_of("n4"), address(4), 4, Role.SPARE)
    # Without n4's own report there is nothing to rebuild its row from, so removal is the only way out.
    assert "remove node 4 from the Raft configuration" in missing.remedies[0].action
    assert Evidence(TRUSTSTORE, "n1", (trust(4),)) in missing.evidence
    assert Evidence(TRUSTSTORE, "n2", ()) in missing.evidence


def test_a_pending_row_is_a_pending_member_and_says_so() -> None:
    diff = compute_diff(pending_row_only())
    assert Member("n4", fingerprint_of("n4"), address(4), 0, Role.PENDING) in diff.members
    assert "PENDING" in only(pending_row_only(), K.MISSING).summary


def test_a_missing_truststore_record_is_restored_from_the_table() -> None:
    missing = only(truststore_file_deleted(), K.MISSING)
    assert missing.member is not None and missing.member.name == "n2"
    assert Evidence(TRUSTSTORE, "n3", ()) in missing.evidence
    assert Evidence(TABLE, "", (row(2),)) in missing.evidence
    assert missing.remedies[0].safety is RemedySafety.SAFE


def test_an_orphan_may_be_removed_only_with_confirmation() -> None:
    orphan = only(removal_crashed_after_raft(), K.ORPHAN)
    assert orphan.member == Member("n4", fingerprint_of("n4"), address(4))
    assert [r.safety for r in orphan.remedies] == [
        RemedySafety.NEEDS_CONFIRMATION,
        RemedySafety.NEEDS_CONFIRMATION,
        RemedySafety.UNSAFE,
    ]
    assert Evidence(TRUSTSTORE, "n1", (trust(4),)) in orphan.evidence
    assert Evidence(TABLE, "", ()) in orphan.evidence


def test_a_duplicate_address_lists_both_claims() -> None:
    duplicate = only(duplicate_address(), K.DUPLICATE_ADDRESS)
    (table,) = [e for e in duplicate.evidence if e.source is TABLE]
    assert {r.name for r in table.records} == {"n3", "n3b"}


def test_no_leader_is_cluster_wide_and_says_how_to_recover() -> None:
    no_leader = only(set_report(V3, RAFT, error="no leader"), K.NO_LEADER)
    assert (no_leader.member, no_leader.node) == (None, "")
    assert ".reconfigure" in no_leader.remedies[1].action and "cluster edit" in no_leader.remedies[1].action
    assert no_leader.remedies[-1].safety is RemedySafety.UNSAFE


def test_a_lagging_view_carries_its_age() -> None:
    assert only(stale_cache(60.0), K.VIEW_DIFFERS).age == 60.0


def test_an_unreachable_agent_is_about_its_member_and_nothing_else() -> None:
    diff = compute_diff(fail_agent(V3, "n3"))
    (unreachable,) = diff.discrepancies
    assert unreachable.member == Member("n3", fingerprint_of("n3"), address(3), 3, Role.VOTER)


def test_invalid_entries_have_distinct_ids() -> None:
    ids = [d.id for d in compute_diff(invalid_truststore_entries()).discrepancies if d.kind is K.INVALID_ENTRY]
    assert len(set(ids)) == 3


def test_discrepancies_come_most_severe_first() -> None:
    view = fail_agent(truststore_file_deleted(), "n2")
    view = drop_records(view, TABLE, address(2), nodes=["n3"])
    severities = [d.severity for d in compute_diff(view).discrepancies]
    assert severities == [BLOCKING, WARNING, INFO]


def test_a_discrepancy_id_names_the_fact_not_the_role() -> None:
    voter = Member("n1", fingerprint_of("n1"), address(1), 1, Role.VOTER)
    spare = replace(voter, role=Role.SPARE)
    same = discrepancy_id(K.MISSING, voter, TRUSTSTORE, "n2")
    assert discrepancy_id(K.MISSING, spare, TRUSTSTORE, "n2") == same
    assert discrepancy_id(K.MISSING, voter, TRUSTSTORE, "n3") != same
    assert discrepancy_id(K.ORPHAN, voter, TRUSTSTORE, "n2") != same
    assert len(same) == 16 and int(same, 16) >= 0


def test_the_fingerprint_ignores_volatile_facts() -> None:
    view = set_report(V3, TRUSTSTORE, nodes=["n2"], error="permission denied")
    volatile = set_report(view, TRUSTSTORE, nodes=["n2"], error="input/output error")
    volatile = set_report(volatile, RAFT, leader_address=address(2))
    volatile = set_report(volatile, CACHE, age=999.0)
    volatile = drop_records(volatile, CACHE, address(1))  # lagging sources are left out entirely
    volatile = replace_records(volatile, TABLE, row(3), row(3, Role.SPARE))
    volatile = replace_records(volatile, RAFT, raft_entry(3), raft_entry(3, Role.SPARE))
    volatile = replace(volatile, now=NOW + 60)
    assert fingerprint(volatile) == fingerprint(view)
    assert fingerprint(fail_agent(V3, "n3")) != fingerprint(fail_agent(V3, "n3", AgentFailure.UNTRUSTED))
    assert fingerprint(view) != fingerprint(V3)
    # The certificate an agent serves is who the node is, as the coordinator sees it.
    assert fingerprint(edit_node_view(V3, "n2", certificate_fingerprint=fingerprint_of("x"))) != fingerprint(V3)


# --- remedies in typed form ---------------------------------------------------------------------------------------


def test_a_missing_truststore_record_is_written_from_its_row() -> None:
    restore, unsafe = only(truststore_file_deleted(), K.MISSING).remedies
    assert restore.steps == (RemedyStep(WRITE, TRUSTSTORE, "n3", trust(2), Evidence(TABLE, "", (row(2),))),)
    # What not to do is as typed as what to do: taking the member out of Raft.
    assert unsafe.steps == (
        RemedyStep(DELETE, RAFT, record=MemberRecord(address=address(2), node_id=2), evidence=raft_evidence(2)),
    )


def raft_evidence(i: int) -> Evidence:
    return Evidence(RAFT, "", (raft_entry(i),))


def test_a_record_that_differs_is_rewritten_from_its_row() -> None:
    (mismatch,) = compute_diff(truststore_record(address="127.0.0.1:7999")).discrepancies
    (rewrite,) = mismatch.remedies
    assert rewrite.safety is RemedySafety.SAFE
    assert rewrite.steps == (RemedyStep(WRITE, TRUSTSTORE, "n2", trust(3), Evidence(TABLE, "", (row(3),))),)


def test_a_certificate_under_another_name_is_deleted_by_that_name_then_rewritten() -> None:
    misnamed = replace(trust(3), name="n9", entry="n9.yaml")
    (fix,) = only(truststore_record(name="n9", entry="n9.yaml"), K.NAME_MISMATCH).remedies
    assert [(step.kind, step.node, step.record) for step in fix.steps] == [
        (DELETE, "n2", MemberRecord(name="n9")),
        (WRITE, "n2", trust(3)),
    ]
    assert fix.steps[0].evidence == Evidence(TRUSTSTORE, "n2", (misnamed,))


def test_a_row_is_restored_from_the_members_own_agent_never_from_a_truststore() -> None:
    restore, remove, unsafe = only(row_deleted_while_in_raft(), K.MISSING).remedies
    ((write,), (delete,), (copy,)) = restore.steps, remove.steps, unsafe.steps
    assert (write.kind, write.source, write.node) == (WRITE, TABLE, "")
    assert write.record == replace(row(3), entry="")
    assert write.evidence is not None and (write.evidence.source, write.evidence.node) == (AGENT, "n3")
    assert write.evidence.records == (MemberRecord("n3", address(3), fingerprint_of("n3"), node_id=3),)
    assert delete == RemedyStep(
        DELETE, RAFT, record=MemberRecord(address=address(3), node_id=3), evidence=raft_evidence(3)
    )
    assert (copy.kind, copy.source, unsafe.safety) == (WRITE, TABLE, RemedySafety.UNSAFE)
    assert copy.evidence == Evidence(TRUSTSTORE, "n1", (trust(3),))


def test_an_orphan_is_deleted_from_the_truststore_that_holds_it_and_its_node_reset() -> None:
    remove, reset, unsafe = only(removal_crashed_after_raft(), K.ORPHAN).remedies
    held = Evidence(TRUSTSTORE, "n1", (trust(4),))
    assert remove.steps == (RemedyStep(DELETE, TRUSTSTORE, "n1", MemberRecord(name="n4"), held),)
    assert reset.steps == (RemedyStep(RepairStepKind.RESET_NODE, INFO_YAML, "n4"),)
    assert unsafe.steps == (
        RemedyStep(WRITE, TABLE, record=MemberRecord("n4", address(4), fingerprint_of("n4")), evidence=held),
    )


def test_a_stalled_join_is_cleared_everywhere_it_is_held() -> None:
    clear, unsafe = only(pending_row_trusted_by_leader(), K.MISSING).remedies
    assert [(step.kind, step.source, step.node) for step in clear.steps] == [
        (DELETE, TABLE, ""),
        (DELETE, TRUSTSTORE, "n1"),
        (RepairStepKind.FORGET_MEMBER, None, ""),
        (RepairStepKind.RESET_NODE, INFO_YAML, "n4"),
    ]
    assert clear.steps[0].record == MemberRecord(name="n4") == clear.steps[1].record
    assert unsafe.steps == (clear.steps[0],)


def test_a_duplicate_address_is_confirmed_by_a_human_and_never_deleted_by_address() -> None:
    keep, unsafe = only(duplicate_address(), K.DUPLICATE_ADDRESS).remedies
    (confirm,) = keep.steps
    assert confirm.kind is RepairStepKind.CONFIRM and confirm.evidence is not None
    assert {record.name for record in confirm.evidence.records} == {"n3", "n3b"}
    (by_address,) = unsafe.steps
    assert (by_address.kind, by_address.source, by_address.record) == (DELETE, TABLE, MemberRecord(address=address(3)))


def test_what_no_agent_step_does_is_left_by_hand_naming_the_entry() -> None:
    invalid = [d for d in compute_diff(invalid_truststore_entries()).discrepancies if d.kind is K.INVALID_ENTRY]
    entries = {step.record.entry for d in invalid for step in d.remedies[0].steps if step.record is not None}
    assert entries == {"n3.yaml", "notes.txt", "broken.yaml"}
    assert {step.kind for d in invalid for step in d.remedies[0].steps} == {RepairStepKind.BY_HAND}
    lagging = only(stale_cache(60.0), K.VIEW_DIFFERS)
    assert [(s.kind, s.source, s.node) for s in lagging.remedies[0].steps] == [
        (RepairStepKind.RESTART_ENGINE, CACHE, "n2")
    ]


UNSAFE_SENTENCES = [
    ("no leader", set_report(V3, RAFT, error="no leader")),
    ("duplicate address", duplicate_address()),
    ("stalled join", pending_row_only()),
    ("ghost row", ghost_row()),
    ("Raft member without a row", row_deleted_while_in_raft()),
    ("missing truststore record", truststore_file_deleted()),
    ("orphan", removal_crashed_after_raft()),
    ("removed node returns", removed_node_returns()),
]


@pytest.mark.parametrize("view", [pytest.param(v, id=i) for i, v in UNSAFE_SENTENCES])
def test_an_unsafe_remedy_says_what_not_to_do_and_why(view: ClusterView) -> None:
    unsafe = [r for d in compute_diff(view).discrepancies for r in d.remedies if r.safety is RemedySafety.UNSAFE]
    assert unsafe
    for remedy in unsafe:
        what, _, why = remedy.action.partition(": ")
        assert what.startswith("Do not ") and len(why.split()) >= 5, remedy.action


# --- properties ----------------------------------------------------------------------------------------------------

ROLES = st.sampled_from([Role.VOTER, Role.STAND_BY, Role.SPARE])
EVERY_SOURCE = [TABLE, TRUSTSTORE, RAFT, NODE_RAFT, CACHE, INFO_YAML]
NOT_LAGGING = [TABLE, TRUSTSTORE, RAFT, INFO_YAML]


@st.composite
def consistent_views(draw: st.DrawFn) -> ClusterView:
    size = draw(st.integers(1, 7))
    return consistent_view(size, roles=draw(st.lists(ROLES, min_size=size, max_size=size)))


def dropped_record(view: ClusterView, source: Source, member: int, node: str) -> ClusterView:
    # A cluster-wide source is one record: removing a member from it removes it from every node's reading.
    return drop_records(view, source, address(member), None if source.cluster_wide else [node])


def record_of(source: Source, member: int, role: Role) -> MemberRecord:
    if source is TABLE:
        return row(member, role)
    return trust(member) if source is TRUSTSTORE else raft_entry(member, role)


@st.composite
def broken_views(draw: st.DrawFn) -> ClusterView:
    """A consistent view with up to four random faults: a record dropped or added (a stranger's, or a member's again
    with another role), an agent lost, a source unreadable, a cache aged."""
    view = draw(consistent_views())
    size = len(view.nodes)
    for _ in range(draw(st.integers(0, 4))):
        node = name(draw(st.integers(1, size)))
        source = draw(st.sampled_from(EVERY_SOURCE))
        fault = draw(st.sampled_from(["drop", "add", "agent", "unreadable", "age"]))
        if fault == "drop":
            view = dropped_record(view, source, draw(st.integers(1, size)), node)
        elif fault == "add":
            record = record_of(source, draw(st.integers(1, size + 2)), draw(ROLES))
            view = add_records(view, source, [record], None if source.cluster_wide else [node])
        elif fault == "agent":
            view = fail_agent(view, node, draw(st.sampled_from(AgentFailure)))
        elif fault == "unreadable":
            view = set_report(view, source, nodes=[node], error="unreadable")
        else:
            view = set_report(view, CACHE, nodes=[node], age=draw(st.floats(0, 100)))
    return view


def shuffled(view: ClusterView, rnd: random.Random) -> ClusterView:
    """The same facts in another order: nodes, sources within a view, and records within a report."""

    def shuffle(items: tuple[MemberRecord, ...]) -> tuple[MemberRecord, ...]:
        return tuple(rnd.sample(items, len(items)))

    observations = []
    for observation in rnd.sample(view.nodes, len(view.nodes)):
        if observation.view is not None:
            reports = [replace(r, records=shuffle(r.records)) for r in observation.view.sources]
            rnd.shuffle(reports)
            observation = replace(observation, view=replace(observation.view, sources=tuple(reports)))
        observations.append(observation)
    return replace(view, nodes=tuple(observations))


@given(broken_views(), st.randoms(use_true_random=False))
def test_order_of_nodes_and_records_does_not_matter(view: ClusterView, rnd: random.Random) -> None:
    other = shuffled(view, rnd)
    assert fingerprint(other) == fingerprint(view)
    assert compute_diff(other) == compute_diff(view)


@given(consistent_views())
def test_a_consistent_view_of_any_size_has_no_discrepancies(view: ClusterView) -> None:
    assert compute_diff(view).discrepancies == ()


@given(broken_views())
def test_ids_are_unique_within_a_diff(view: ClusterView) -> None:
    ids = [d.id for d in compute_diff(view).discrepancies]
    assert len(ids) == len(set(ids))


@given(consistent_views(), st.data())
def test_deleting_any_record_blocks_and_changes_the_fingerprint(view: ClusterView, data: st.DataObject) -> None:
    size = len(view.nodes)
    node = name(data.draw(st.integers(1, size)))
    source = data.draw(st.sampled_from(NOT_LAGGING))
    # info.yaml holds only the node's own identity; every other source holds every member.
    member = int(node[1:]) if source is INFO_YAML else data.draw(st.integers(1, size))
    broken = dropped_record(view, source, member, node)
    assert any(d.severity is BLOCKING for d in compute_diff(broken).discrepancies)
    assert fingerprint(broken) != fingerprint(view)


@given(broken_views())
def test_compute_diff_is_deterministic(view: ClusterView) -> None:
    assert compute_diff(view) == compute_diff(view)


def remedies(view: ClusterView) -> list[Remedy]:
    return [remedy for d in compute_diff(view).discrepancies for remedy in d.remedies]


def holds(record: MemberRecord, held: MemberRecord) -> bool:
    """Whether held is the record a deletion names: it agrees on every field the deletion sets."""
    return all(
        getattr(record, part) in ("", 0, getattr(held, part))
        for part in ("name", "address", "certificate_fingerprint", "node_id")
    )


@st.composite
def drifted_truststores(draw: st.DrawFn) -> ClusterView:
    """A broken view whose truststores also drifted from the table: records lost, or moved to another address or
    certificate, on random nodes. These are what the SAFE writes repair."""
    view = draw(broken_views())
    size = len(view.nodes)
    for _ in range(draw(st.integers(1, 4))):
        node, member = name(draw(st.integers(1, size))), draw(st.integers(1, size))
        drift = draw(st.sampled_from(["lost", "address", "certificate"]))
        if drift == "lost":
            view = drop_records(view, TRUSTSTORE, address(member), [node])
        else:
            changed = {"address": "10.9.9.9:1"} if drift == "address" else {"certificate_fingerprint": "f" * 64}
            view = replace_records(view, TRUSTSTORE, trust(member), replace(trust(member), **changed), [node])
    return view


@given(drifted_truststores())
def test_every_safe_write_is_a_copy_of_a_row_the_table_holds(view: ClusterView) -> None:
    readings = {
        record for o in view.nodes if o.view for r in o.view.sources if r.source is TABLE for record in r.records
    }
    for remedy in remedies(view):
        for step in remedy.steps:
            if remedy.safety is not RemedySafety.SAFE or step.kind is not WRITE:
                continue
            assert step.evidence is not None and (step.evidence.source, step.evidence.node) == (TABLE, "")
            (copied,) = step.evidence.records
            assert copied in readings
            assert step.record == replace(copied, role=None, role_text="", entry=f"{copied.name}.yaml")


@given(broken_views())
def test_no_remedy_but_an_unsafe_one_adds_to_raft_and_each_deletes_only_what_is_held(view: ClusterView) -> None:
    for remedy in remedies(view):
        assert remedy.steps, remedy.action
        for step in remedy.steps:
            # Who a step is about on a cluster-wide source is the cluster, on a node's own source that node.
            assert (step.node == "") is (step.source is None or step.source.cluster_wide), step
            if remedy.safety is RemedySafety.UNSAFE:
                continue
            assert (step.kind, step.source) != (WRITE, RAFT)
            if step.kind is DELETE:
                assert step.record is not None and step.evidence is not None
                assert any(holds(step.record, held) for held in step.evidence.records), step


@pytest.mark.parametrize("orphans", [20, 200])
def test_evidence_grows_with_the_orphans_not_their_square(orphans: int) -> None:
    # Many truststore records sharing one certificate (a copied directory, a tool gone wrong): each orphan's evidence
    # would otherwise hold every other one, in every discrepancy, on every node.
    shared = fingerprint_of("shared")
    records = [
        MemberRecord(name=f"x{i}", address=f"10.1.0.{i}:9000", certificate_fingerprint=shared, entry=f"x{i}.yaml")
        for i in range(orphans)
    ]
    diff = compute_diff(add_records(consistent_view(3), TRUSTSTORE, records))
    about_orphans = [d for d in diff.discrepancies if d.member is not None and d.member.name.startswith("x")]
    assert len({d.member.name for d in about_orphans if d.member}) == orphans
    for discrepancy in about_orphans:
        for evidence in discrepancy.evidence:
            assert len(evidence.records) <= MAX_EVIDENCE_RECORDS
            if evidence.records and discrepancy.member is not None:
                # The record of the member itself comes first, whatever else shares its certificate.
                assert evidence.records[0].name == discrepancy.member.name
            if evidence.source is TRUSTSTORE and orphans > MAX_EVIDENCE_RECORDS:
                assert f"{orphans - MAX_EVIDENCE_RECORDS} more records" in evidence.detail


def test_on_microcluster_a_truststore_drift_names_the_heartbeat_that_rewrites_it_and_still_blocks() -> None:
    view = drop_records(consistent_view(3), TRUSTSTORE, address(3), ["n2"])
    plain = compute_diff(view)
    for node in ("n1", "n2", "n3"):
        view = edit_node_view(view, node, backend="microcluster", role_adjustment_interval=2.0)
    diff = compute_diff(view)
    [missing] = diff.discrepancies
    assert (missing.kind, missing.severity, missing.node) == (K.MISSING, BLOCKING, "n2")
    assert missing.remedies[0].safety is RemedySafety.SAFE and "heartbeat" in missing.remedies[0].action
    assert "every 2 s" in missing.summary and missing.remedies[1:] == plain.discrepancies[0].remedies
    assert diff.fingerprint == plain.fingerprint and missing.id == plain.discrepancies[0].id


def test_a_member_no_agent_speaks_for_is_unwatched_and_an_agent_that_is_silent_is_not() -> None:
    unwatched = compute_diff(drop_node(consistent_view(3), "n3"))
    assert [(d.kind, d.severity, d.node, d.member and d.member.name) for d in unwatched.discrepancies] == [
        (K.UNWATCHED_MEMBER, Severity.WARNING, "n3", "n3")
    ]
    [remedy] = unwatched.discrepancies[0].remedies
    assert "memberguard adopt" in remedy.action and remedy.safety is RemedySafety.NEEDS_CONFIRMATION
    silent = compute_diff(fail_agent(consistent_view(3), "n3"))
    assert K.UNWATCHED_MEMBER not in {d.kind for d in silent.discrepancies}, "asked, and silent: unreachable"
    ghost_row = compute_diff(drop_node(remove_raft_member(consistent_view(3), 3), "n3"))
    assert K.UNWATCHED_MEMBER not in {d.kind for d in ghost_row.discrepancies}, "a row Raft does not hold is no member"
