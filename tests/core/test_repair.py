"""Repair plans on plain values: each rule on its own, one scenario per kind of discrepancy (real diffs of the views
tests/core/views.py builds), then properties over random three-source states checked with hypothesis, with a small
model of what the agents' steps do to a view (`apply`)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.diff import compute_diff
from coordinator.core.model import (
    AgentFailure,
    ClusterView,
    DiscrepancyKind,
    Evidence,
    InvalidEntry,
    Member,
    MemberRecord,
    RemedySafety,
    Role,
    Source,
    SourceReport,
)
from coordinator.core.operation import Audit, OperationKind, OperationRecord, OperationState
from coordinator.core.plan import (
    COORDINATOR,
    Action,
    EnsureMemberRow,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveThroughMicrocluster,
    RemoveTruststoreRecord,
)
from coordinator.core.quorum import QuorumInput, raft_key, raft_members
from coordinator.core.repair import (
    RepairAction,
    RepairPlan,
    UnknownActions,
    UnknownDiscrepancies,
    plan_repair,
)

from .test_diff import (
    duplicate_address,
    ghost_raft_member,
    ghost_row,
    partial_fan_out,
    pending_row_only,
    pending_row_trusted_by_leader,
    removal_crashed_after_raft,
    removed_node_returns,
    row_deleted_and_heartbeat_ran,
    row_deleted_while_in_raft,
    shuffled,
    spare_lags,
    stale_cache,
    truststore_file_deleted,
    truststore_file_deleted_on_leader,
    truststore_record,
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
    edit_reports,
    fail_agent,
    fingerprint_of,
    name,
    on_microcluster,
    raft_entry,
    replace_records,
    row,
    set_report,
    trust,
)

K = DiscrepancyKind
SAFE, CONFIRM = RemedySafety.SAFE, RemedySafety.NEEDS_CONFIRMATION
TABLE, TRUSTSTORE, RAFT, NODE_RAFT, CACHE, INFO_YAML = (
    Source.MEMBERS_TABLE,
    Source.TRUSTSTORE,
    Source.RAFT_CONFIG,
    Source.RAFT_NODE_VIEW,
    Source.RAFT_CACHE,
    Source.NODE_INFO,
)
GRACE = 300.0
SETTLED = 3600.0  # seconds since the members table and the Raft configuration last changed: past the grace period


def pem(member_name: str) -> str:
    return f"-----BEGIN CERTIFICATE-----\n{member_name}\n-----END CERTIFICATE-----\n"


def fingerprint_of_pem(certificate: str) -> str:
    return fingerprint_of(certificate.splitlines()[1])


# What the coordinator's registry pins: the certificate of every member the tests make.
PINNED = {fingerprint_of(name(i)): pem(name(i)) for i in range(1, 8)}


def settled(view: ClusterView, age: float | None = SETTLED) -> ClusterView:
    """The members table and the Raft configuration last changed `age` seconds ago (None: they cannot tell)."""
    changed_at = None if age is None else view.now - age
    for source in (TABLE, RAFT):
        view = set_report(view, source, changed_at=changed_at)
    return view


def plan(
    view: ClusterView,
    *,
    in_flight: Iterable[OperationRecord] = (),
    only: Iterable[str] = (),
    certificates: dict[str, str] | None = None,
    seen_since: dict[str, float] | None = None,
) -> RepairPlan:
    return plan_repair(
        view,
        compute_diff(view),
        in_flight=in_flight,
        now=view.now,
        grace=GRACE,
        only=tuple(only),
        certificates=PINNED if certificates is None else certificates,
        seen_since=seen_since or {},
    )


def steps(action: RepairAction) -> list[tuple[str, Action]]:
    return [(step.planned.target, step.planned.action) for step in action.steps]


def ids(view: ClusterView, kind: DiscrepancyKind) -> list[str]:
    return [d.id for d in compute_diff(view).discrepancies if d.kind is kind]


def unplanned_kinds(view: ClusterView, repair: RepairPlan) -> Counter[DiscrepancyKind]:
    kinds = {d.id: d.kind for d in compute_diff(view).discrepancies}
    return Counter(kinds[u.discrepancy] for u in repair.unplanned)


def operation(member_name: str, state: OperationState = OperationState.RUNNING, op_id: str = "op-1") -> OperationRecord:
    return OperationRecord(
        id=op_id,
        kind=OperationKind.JOIN,
        member=Member(member_name),
        state=state,
        steps=(),
        error="",
        plan="",
        audit=Audit(requested_by="operator", certificate_fingerprint="", request_id=op_id, verdict="", fingerprint=""),
        epoch=1,
        created_at=0.0,
        updated_at=0.0,
    )


# --- what the agents' steps do, on a view ---------------------------------------------------------------------------


def apply(view: ClusterView, actions: Iterable[RepairAction]) -> ClusterView:
    """The view as the next gather would see it once every step of the actions was applied, in order."""
    for action in actions:
        for step in action.steps:
            view = apply_step(view, step.planned.target, step.planned.action)
    return view


def apply_step(view: ClusterView, target: str, action: Action) -> ClusterView:
    """What each step does (coordinator/agent/steps.py): a write replaces `<name>.yaml` or the row of that name; a
    truststore removal deletes `<name>.yaml` and every file holding the name; a Raft removal reaches every node's
    views; fencing empties the node's own identity and views; the coordinator stops asking a member it forgot."""
    match action:
        case EnsureTruststoreRecord(name=record_name, address=record_address, certificate_pem=certificate):
            file = f"{record_name}.yaml"
            written = MemberRecord(record_name, record_address, fingerprint_of_pem(certificate), entry=file)
            return rewrite(
                view, TRUSTSTORE, [target], lambda r: r.entry == file, [replace(written, certificate_pem=certificate)]
            )
        case RemoveTruststoreRecord(name=record_name):
            file = f"{record_name}.yaml"
            return rewrite(view, TRUSTSTORE, [target], lambda r: r.name == record_name or r.entry == file, files={file})
        case EnsureMemberRow(name=row_name, address=row_address, certificate_pem=certificate, role=role_text):
            role = Role.from_text(role_text)
            written = MemberRecord(row_name, row_address, fingerprint_of_pem(certificate), 0, role, role_text, row_name)
            return rewrite(view, TABLE, None, lambda r: r.name == row_name, [written])
        case RemoveMemberRow(name=row_name):
            return rewrite(view, TABLE, None, lambda r: r.name == row_name)
        case RemoveRaftEntry(node_id=node_id, address=entry_address):
            for source in (RAFT, NODE_RAFT, CACHE):
                view = rewrite(view, source, None, lambda r: (r.address, r.node_id) == (entry_address, node_id))
            return view
        case FenceNode():
            for source in (INFO_YAML, NODE_RAFT, CACHE):
                view = rewrite(view, source, [target], lambda r: True)
            return view
        case ForgetMember(name=member_name):
            return replace(view, nodes=tuple(o for o in view.nodes if o.node != member_name))
        case _:
            raise AssertionError(f"a repair never plans {action}")


def rewrite(
    view: ClusterView,
    source: Source,
    nodes: Iterable[str] | None,
    dropped: Callable[[MemberRecord], bool],
    added: Iterable[MemberRecord] = (),
    files: frozenset[str] | set[str] = frozenset(),
) -> ClusterView:
    """Drop the records `dropped` picks and add the new ones; the invalid entries of every file dropped, written or
    named in `files` go too. A report this changes is stamped as changed now; one it leaves alone keeps its time."""

    def edit(report: SourceReport) -> SourceReport:
        if report.error:
            return report
        gone = [r for r in report.records if dropped(r)]
        records = (*(r for r in report.records if not dropped(r)), *added)
        touched = {*files, *(r.entry for r in gone), *(r.entry for r in added)}
        invalid = tuple(e for e in report.invalid_entries if e.entry not in touched)
        if Counter(records) == Counter(report.records) and invalid == report.invalid_entries:
            return report
        # Read back as the readers list them: a truststore is a directory, read in file-name order.
        records = tuple(sorted(records, key=lambda r: (r.entry, r.name, r.address, r.node_id)))
        return replace(report, records=records, invalid_entries=invalid, changed_at=view.now)

    return edit_reports(view, source, edit, nodes)


# --- one scenario per kind of discrepancy ---------------------------------------------------------------------------


def misfiled(view: ClusterView, i: int, node: str, entry: str) -> ClusterView:
    """node's truststore keeps member i's record in a file named otherwise, which microcluster still trusts."""
    moved = replace(trust(i), entry=entry)
    view = replace_records(view, TRUSTSTORE, trust(i), moved, nodes=[node])
    misnamed = (InvalidEntry(entry, f"misnamed: file {entry} holds name {name(i)}"),)
    return set_report(view, TRUSTSTORE, nodes=[node], invalid_entries=misnamed)


V3 = settled(consistent_view(3))

# (scenario, view, the actions as (safety, [(target, action), ...]), the kinds left unplanned)
Expected = list[tuple[RemedySafety, list[tuple[str, Action]]]]
SCENARIOS: list[tuple[str, ClusterView, Expected, list[DiscrepancyKind]]] = [
    (
        "S9 MISSING from a truststore",
        settled(truststore_file_deleted()),
        [(SAFE, [("n3", EnsureTruststoreRecord("n2", address(2), pem("n2")))])],
        [],
    ),
    (
        "S10 MISSING from the leader's truststore",
        settled(truststore_file_deleted_on_leader()),
        [(SAFE, [("n1", EnsureTruststoreRecord("n2", address(2), pem("n2")))])],
        [],
    ),
    (
        "S4 MISSING after a partial fan-out",
        settled(partial_fan_out()),
        [(SAFE, [(node, EnsureTruststoreRecord("n4", address(4), pem("n4")))]) for node in ("n2", "n3")],
        [],
    ),
    (
        "S6 MISSING from the members table, restored from the member's own agent",
        settled(row_deleted_while_in_raft()),
        [(SAFE, [("n1", EnsureMemberRow("n3", address(3), pem("n3"), "voter"))])],
        [],
    ),
    (
        "S6 MISSING row, and the heartbeat erased the member's records",
        settled(row_deleted_and_heartbeat_ran()),
        [
            (
                SAFE,
                [("n1", EnsureMemberRow("n3", address(3), pem("n3"), "voter"))]
                + [(node, EnsureTruststoreRecord("n3", address(3), pem("n3"))) for node in ("n1", "n2", "n3")],
            )
        ],
        [],
    ),
    (
        "S1 MISSING row of a Raft member no agent speaks for",
        settled(ghost_raft_member()),
        [
            (
                CONFIRM,
                [
                    ("n1", RemoveRaftEntry(4, address(4), Role.SPARE)),
                    ("n1", RemoveTruststoreRecord("n4")),
                    (COORDINATOR, ForgetMember("n4")),
                ],
            )
        ],
        [],
    ),
    (
        "S2 MISSING from Raft: a stalled join's PENDING row",
        settled(pending_row_only()),
        [(SAFE, [("n1", RemoveMemberRow("n4")), (COORDINATOR, ForgetMember("n4"))])],
        [],
    ),
    (
        "S3 MISSING from Raft, trusted by the leader",
        settled(pending_row_trusted_by_leader()),
        [
            (
                SAFE,
                [
                    ("n1", RemoveMemberRow("n4")),
                    ("n1", RemoveTruststoreRecord("n4")),
                    (COORDINATOR, ForgetMember("n4")),
                ],
            )
        ],
        [],
    ),
    (
        "S15 MISSING from Raft: a ghost row every truststore holds",
        settled(ghost_row()),
        [
            (
                SAFE,
                [("n1", RemoveMemberRow("n4"))]
                + [(node, RemoveTruststoreRecord("n4")) for node in ("n1", "n2", "n3")]
                + [(COORDINATOR, ForgetMember("n4"))],
            )
        ],
        [],
    ),
    (
        "S7 ORPHAN left by a removal that crashed",
        settled(removal_crashed_after_raft()),
        [(SAFE, [("n1", RemoveTruststoreRecord("n4")), (COORDINATOR, ForgetMember("n4"))])],
        [],
    ),
    (
        "S7/S8 NODE_INFO_MISMATCH and ORPHAN: a removed node that still believes it is a member",
        settled(removed_node_returns()),
        [(SAFE, [("n4", RemoveTruststoreRecord("n4")), ("n4", FenceNode()), (COORDINATOR, ForgetMember("n4"))])],
        [K.VIEW_DIFFERS, K.VIEW_DIFFERS],
    ),
    (
        "UNWATCHED_MEMBER: n3 joined without memberguard, and no agent runs on its node",
        drop_node(V3, "n3"),
        [],
        [K.UNWATCHED_MEMBER],
    ),
    (
        "NODE_INFO_MISMATCH of a Raft member",
        replace_records(V3, INFO_YAML, raft_entry(3), replace(raft_entry(3), address="127.0.0.1:7999"), nodes=["n3"]),
        [],
        [K.NODE_INFO_MISMATCH],
    ),
    (
        "ADDRESS_MISMATCH in a truststore",
        settled(truststore_record(address="127.0.0.1:7999")),
        [(SAFE, [("n2", EnsureTruststoreRecord("n3", address(3), pem("n3")))])],
        [],
    ),
    (
        "CERTIFICATE_MISMATCH in a truststore",
        settled(truststore_record(certificate_fingerprint=fingerprint_of("other"))),
        [(SAFE, [("n2", EnsureTruststoreRecord("n3", address(3), pem("n3")))])],
        [],
    ),
    (
        "NAME_MISMATCH: a member's certificate under a name nobody has",
        settled(truststore_record(name="n9", entry="n9.yaml")),
        [
            (
                SAFE,
                [("n2", EnsureTruststoreRecord("n3", address(3), pem("n3"))), ("n2", RemoveTruststoreRecord("n9"))],
            )
        ],
        [],
    ),
    (
        "INVALID_ENTRY: a member's record in a misnamed file",
        misfiled(V3, 3, "n2", "copy.yaml"),
        [(SAFE, [("n2", RemoveTruststoreRecord("n3")), ("n2", EnsureTruststoreRecord("n3", address(3), pem("n3")))])],
        [],
    ),
    (
        "INVALID_ENTRY that is not a record",
        set_report(V3, TRUSTSTORE, nodes=["n2"], invalid_entries=(InvalidEntry("notes.txt", "not a .yaml file"),)),
        [],
        [K.INVALID_ENTRY],
    ),
    ("DUPLICATE_ADDRESS", settled(duplicate_address()), [], [K.DUPLICATE_ADDRESS]),
    ("VIEW_DIFFERS: an old cluster.yaml", settled(stale_cache(60.0)), [], [K.VIEW_DIFFERS]),
    ("VIEW_DIFFERS: a spare's own view", settled(spare_lags()), [], [K.VIEW_DIFFERS]),
    ("ROLE_DIFFERS", replace_records(V3, TABLE, row(3), row(3, Role.PENDING)), [], [K.ROLE_DIFFERS]),
    (
        "SOURCE_UNREADABLE",
        set_report(V3, TRUSTSTORE, nodes=["n2"], error="permission denied"),
        [],
        [K.SOURCE_UNREADABLE],
    ),
    ("AGENT_UNREACHABLE", fail_agent(V3, "n3"), [], [K.AGENT_UNREACHABLE]),
    ("AGENT_UNTRUSTED", fail_agent(V3, "n3", AgentFailure.UNTRUSTED), [], [K.AGENT_UNTRUSTED]),
    (
        "AGENT_CERTIFICATE_MISMATCH",
        edit_node_view(V3, "n2", certificate_fingerprint=fingerprint_of("impostor")),
        [],
        [K.AGENT_CERTIFICATE_MISMATCH],
    ),
    (
        "NO_LEADER: nothing is planned, not even what the table alone would show",
        set_report(settled(truststore_record(address="127.0.0.1:7999")), RAFT, error="no leader"),
        [],
        [K.NO_LEADER, K.ADDRESS_MISMATCH],
    ),
]


@pytest.mark.parametrize(("view", "expected", "left"), [pytest.param(v, e, u, id=i) for i, v, e, u in SCENARIOS])
def test_scenario(view: ClusterView, expected: Expected, left: list[DiscrepancyKind]) -> None:
    repair = plan(view)
    assert [(action.safety, steps(action)) for action in repair.actions] == expected
    assert unplanned_kinds(view, repair) == Counter(left)
    # Every discrepancy is either cleared by an action or listed with why.
    cleared = {i for action in repair.actions for i in action.clears}
    assert cleared | {u.discrepancy for u in repair.unplanned} == {d.id for d in compute_diff(view).discrepancies}
    after = apply(view, repair.actions)
    assert cleared.isdisjoint(d.id for d in compute_diff(after).discrepancies)


def test_the_scenarios_cover_every_kind_of_discrepancy() -> None:
    found = {d.kind for _, view, _, _ in SCENARIOS for d in compute_diff(view).discrepancies}
    assert found == set(DiscrepancyKind)


# --- the rules, one at a time ---------------------------------------------------------------------------------------


def test_a_restored_truststore_record_is_the_members_tables_row() -> None:
    view = settled(truststore_file_deleted())
    (action,) = plan(view).actions
    (step,) = action.steps
    assert action.clears == tuple(ids(view, K.MISSING))
    assert (step.source, step.evidence) == (TRUSTSTORE, Evidence(TABLE, "n1", (row(2),)))
    assert "members-table row says who it is" in action.reason


def test_a_missing_row_is_restored_only_from_the_members_own_agent() -> None:
    view = settled(row_deleted_and_heartbeat_ran())
    (action,) = plan(view).actions
    evidence = action.steps[0].evidence
    assert evidence is not None and (evidence.source, evidence.node) == (Source.AGENT, "n3")
    # Who n3's agent says it is: its name, the Raft entry its info.yaml holds, the certificate it serves.
    assert evidence.records == (MemberRecord("n3", address(3), fingerprint_of("n3"), node_id=3),)
    # Without n3's agent the same facts are a ghost: its removal is a human's call, and nothing is restored.
    silent = fail_agent(view, "n3")
    (ghost,) = plan(silent).actions
    assert ghost.safety is CONFIRM
    assert not any(isinstance(a, EnsureMemberRow | EnsureTruststoreRecord) for _, a in steps(ghost))
    assert ghost.reason.startswith("Confirm that node 3 at 127.0.0.1:7003 is gone or wiped")
    assert "n3 did not answer, and may be it" in ghost.reason


def test_a_row_is_restored_with_the_certificate_the_view_carries() -> None:
    """A gather with certificates carries the PEMs: the planner needs no pinned copy then."""
    view = settled(row_deleted_while_in_raft())
    own = trust(3)
    view = replace_records(view, TRUSTSTORE, own, replace(own, certificate_pem=pem("n3")), nodes=["n2"])
    (action,) = plan(view, certificates={}).actions
    assert steps(action) == [("n1", EnsureMemberRow("n3", address(3), pem("n3"), "voter"))]


def test_without_any_copy_of_the_certificate_nothing_is_restored() -> None:
    view = settled(row_deleted_while_in_raft())
    repair = plan(view, certificates={})
    assert repair.actions == ()
    (left,) = repair.unplanned
    assert "No copy of n3's certificate" in left.reason


def test_a_row_is_not_restored_over_a_row_that_claims_the_same_name() -> None:
    """n3's agent reports itself at its Raft address, but a row of its name records another address."""
    view = settled(row_deleted_while_in_raft())
    view = add_records(view, TABLE, [replace(row(3), address="127.0.0.1:7999")])
    repair = plan(view)
    assert not any(isinstance(a, EnsureMemberRow) for action in repair.actions for _, a in steps(action))
    assert any("a human's decision" in u.reason for u in repair.unplanned)


def test_no_truststore_is_rewritten_to_a_certificate_the_members_own_agent_disputes() -> None:
    """n2's row records a certificate n2's agent does not serve. Even with a copy of the row's certificate at hand (an
    operator pinned it, or a gather carried it), writing it would distrust n2 everywhere if its agent is right."""
    view = replace_records(V3, TABLE, row(2), replace(row(2), certificate_fingerprint=fingerprint_of("other")))
    repair = plan(view, certificates={**PINNED, fingerprint_of("other"): pem("other")})
    assert repair.actions == ()
    assert unplanned_kinds(view, repair) == Counter({K.CERTIFICATE_MISMATCH: 3, K.AGENT_CERTIFICATE_MISMATCH: 1})
    assert all("a human's decision" in u.reason for u in repair.unplanned)


def test_nothing_is_ever_added_to_raft() -> None:
    """S2: a PENDING row Raft does not hold is removed once the grace period is over; Raft is not made to match."""
    (action,) = plan(settled(pending_row_only())).actions
    assert not any(isinstance(step.planned.action, RemoveRaftEntry) for step in action.steps)
    assert "not in the leader's Raft configuration" in action.reason


def ghost_voter(unreachable: Iterable[str]) -> ClusterView:
    """n4 is a voter in the Raft configuration that nothing else names; the given members' agents do not answer."""
    view = settled(add_raft_member(consistent_view(3), 4, Role.VOTER))
    for node in unreachable:
        view = fail_agent(view, node)
    return view


def test_a_voter_is_removed_only_when_the_voters_that_answered_keep_a_quorum() -> None:
    # Four voters, n2 silent: without n4, two of the three remaining voters answer, a majority.
    (action,) = plan(ghost_voter(["n2"])).actions
    assert steps(action)[0] == ("n1", RemoveRaftEntry(4, address(4), Role.VOTER))
    # n2 and n3 silent: one of three is no majority.
    view = ghost_voter(["n2", "n3"])
    repair = plan(view)
    assert repair.actions == ()
    (left,) = [u for u in repair.unplanned if u.discrepancy in ids(view, K.MISSING)]
    assert left.reason.startswith("Refused removing node 4") and "needed: 2" in left.reason


def test_nothing_about_a_member_with_an_operation_in_flight_is_planned() -> None:
    view = settled(removal_crashed_after_raft())
    for state in (OperationState.QUEUED, OperationState.RUNNING, OperationState.PARKED):
        repair = plan(view, in_flight=[operation("n4", state)])
        assert repair.actions == ()
        (left,) = repair.unplanned
        assert left.reason.startswith(f"Operation op-1 (join, {state.name.lower()}) is about n4")
    # A finished operation is history.
    assert len(plan(view, in_flight=[operation("n4", OperationState.ROLLED_BACK)]).actions) == 1
    # A join in flight leaves truststores partial by design (S4): the repair leaves them to it.
    assert plan(settled(partial_fan_out()), in_flight=[operation("n4")]).actions == ()


def test_an_orphan_is_removed_only_after_the_grace_period_and_the_plan_says_when() -> None:
    young = settled(removal_crashed_after_raft(), age=10.0)
    (left,) = plan(young).unplanned
    assert left.eligible_at == NOW - 10.0 + GRACE
    assert "less than the grace period" in left.reason
    # Sources that cannot tell when they changed prove nothing: not eligible, and no time is promised.
    unknown = settled(removal_crashed_after_raft(), age=None)
    (left,) = plan(unknown).unplanned
    assert left.eligible_at is None and "unknown" in left.reason
    # The coordinator having seen the orphan for longer than the grace period proves it as well.
    (orphan,) = ids(unknown, K.ORPHAN)
    (action,) = plan(unknown, seen_since={orphan: NOW - GRACE - 1}).actions
    assert action.safety is SAFE and action.clears == (orphan,)
    # It deletes n1's copy, which the evidence shows; n4 itself never answered, so it must be reset by hand.
    assert action.steps[0].evidence == Evidence(TRUSTSTORE, "n1", (trust(4),))
    assert action.remainder == "n4 was not fenced: reset it before it comes back"


def test_a_lagging_view_is_waited_for_and_nothing_authoritative_is_edited() -> None:
    view = settled(stale_cache(600.0))
    repair = plan(view)
    assert repair.actions == ()
    (left,) = repair.unplanned
    assert "waited for" in left.reason and "never fixed by editing" in left.reason


def test_nothing_is_planned_on_or_from_an_agent_that_did_not_answer() -> None:
    """n3 did not answer: whether its truststore lacks n2 is unknown, and the fix on n1 does not wait for it."""
    view = fail_agent(settled(drop_records(consistent_view(3), TRUSTSTORE, address(2), nodes=["n1", "n3"])), "n3")
    repair = plan(view)
    assert [steps(action) for action in repair.actions] == [
        [("n1", EnsureTruststoreRecord("n2", address(2), pem("n2")))]
    ]
    assert unplanned_kinds(view, repair) == Counter([K.AGENT_UNREACHABLE])


def test_a_file_holding_another_record_is_not_overwritten_until_a_repair_moves_it() -> None:
    """n2 lacks n3, and its n3.yaml holds n1's record: writing n3.yaml would lose it. n1's record goes to its own
    file first, so n3's can be restored in the same plan."""
    view = misfiled(drop_records(V3, TRUSTSTORE, address(3), nodes=["n2"]), 1, "n2", "n3.yaml")
    repair = plan(view)
    assert [steps(action) for action in repair.actions] == [
        [("n2", RemoveTruststoreRecord("n1")), ("n2", EnsureTruststoreRecord("n1", address(1), pem("n1")))],
        [("n2", EnsureTruststoreRecord("n3", address(3), pem("n3")))],
    ]
    assert repair.unplanned == ()


def orphan_over_a_members_file(age: float) -> ClusterView:
    """n2 lacks n3, and its n3.yaml holds n5's record, which no other source holds."""
    view = drop_records(consistent_view(3), TRUSTSTORE, address(3), nodes=["n2"])
    view = add_records(view, TRUSTSTORE, [replace(trust(5), entry="n3.yaml")], nodes=["n2"])
    view = set_report(view, TRUSTSTORE, nodes=["n2"], invalid_entries=(InvalidEntry("n3.yaml", "misnamed"),))
    return settled(view, age)


def test_a_file_that_holds_an_orphan_is_freed_by_its_removal_once_the_orphan_is_old_enough() -> None:
    young = orphan_over_a_members_file(10.0)
    repair = plan(young)
    assert repair.actions == ()
    (missing,) = ids(young, K.MISSING)
    (left,) = [u for u in repair.unplanned if u.discrepancy == missing]
    assert left.reason.startswith("n3.yaml in n2's truststore also holds n5, which the repair would overwrite")
    old = orphan_over_a_members_file(SETTLED)
    assert [steps(action) for action in plan(old).actions] == [
        [("n2", RemoveTruststoreRecord("n5")), (COORDINATOR, ForgetMember("n5"))],
        [("n2", EnsureTruststoreRecord("n3", address(3), pem("n3")))],
    ]


def test_only_the_asked_discrepancies_are_planned_and_unknown_ids_are_refused() -> None:
    view = settled(partial_fan_out())
    on_n2, on_n3 = ids(view, K.MISSING)
    (action,) = plan(view, only=[on_n3]).actions
    assert action.clears == (on_n3,) and steps(action)[0][0] == "n3"
    with pytest.raises(UnknownDiscrepancies) as refused:
        plan(view, only=[on_n2, "0123456789abcdef", "feedfacefeedface"])
    assert refused.value.ids == ("0123456789abcdef", "feedfacefeedface")


def test_an_apply_runs_the_safe_actions_and_those_confirmed_by_id() -> None:
    # The ghost n4 (a human's call) beside a truststore that lacks n2 (safe).
    view = settled(drop_records(ghost_raft_member(), TRUSTSTORE, address(2), nodes=["n3"]))
    repair = plan(view)
    safe, confirm = repair.actions
    assert (safe.safety, confirm.safety) == (SAFE, CONFIRM)
    assert repair.chosen() == (safe,)
    assert repair.chosen([confirm.id]) == (safe, confirm)
    with pytest.raises(UnknownActions) as refused:
        repair.chosen([confirm.id, "not-an-action"])
    assert refused.value.ids == ("not-an-action",)


def test_action_ids_name_the_repair_whatever_the_gather_order() -> None:
    view = settled(partial_fan_out())
    first = plan(view)
    again = plan(shuffled(view, random.Random(7)))
    assert [a.id for a in again.actions] == [a.id for a in first.actions]
    assert len({a.id for a in first.actions}) == 2


# --- on the microcluster backend ------------------------------------------------------------------------------------


def test_on_microcluster_no_truststore_is_written_the_heartbeat_rewrites_it() -> None:
    """A missing record (S9), a different one and a misnamed file: microcluster's leader rewrites every truststore from
    the members table each heartbeat, so memberguard waits for it, in the words of the diff's own first remedy."""
    drifts = [
        truststore_file_deleted(),
        truststore_record(address="127.0.0.1:7999"),
        misfiled(V3, 1, "n2", "old-n1.yaml"),
        removal_crashed_after_raft(),  # n1 still trusts n4, which no row or Raft entry names
    ]
    for drift in drifts:
        view = on_microcluster(settled(drift))
        assert plan(on_microcluster(drift)).actions == () and plan(settled(drift)).actions != ()
        repair = plan(view)
        assert repair.actions == ()
        diff = compute_diff(view)
        for d in diff.discrepancies:
            (left,) = [u for u in repair.unplanned if u.discrepancy == d.id]
            if d.source is TRUSTSTORE and d.kind is not K.INVALID_ENTRY:
                wait = d.remedies[0].action.removesuffix(" check again after it.")
                assert left.reason.startswith(wait), (left.reason, wait)
                assert "every 5 s" in left.reason and "would race that rewrite" in left.reason


def test_on_microcluster_the_heartbeats_interval_is_said_only_when_the_view_carries_it() -> None:
    view = on_microcluster(settled(truststore_file_deleted()))
    for node in ("n1", "n2", "n3"):
        view = edit_node_view(view, node, role_adjustment_interval=None)
    (left,) = plan(view).unplanned
    assert "rewrites n3's truststore from the members table on every heartbeat" in left.reason


def test_on_microcluster_a_missing_row_is_restored_through_another_member_and_nothing_else_is_written() -> None:
    """The leader n1's row was deleted: on dqlite n1's own agent writes it back, with the truststores that lack it. On
    microcluster another member writes it (the row takes that daemon's schema versions), and the heartbeat restores
    the truststores."""
    view = settled(drop_records(row_deleted_and_heartbeat_ran(), TABLE, address(1)))
    view = drop_records(view, TRUSTSTORE, address(1), nodes=["n2"])
    on_dqlite = {action.member.name: steps(action) for action in plan(view).actions}
    assert on_dqlite["n1"][0] == ("n1", EnsureMemberRow("n1", address(1), pem("n1"), "voter"))
    assert any(isinstance(a, EnsureTruststoreRecord) for _, a in on_dqlite["n1"])
    view = on_microcluster(view)
    repair = plan(view)
    assert {action.member.name: steps(action) for action in repair.actions} == {
        "n1": [("n2", EnsureMemberRow("n1", address(1), pem("n1"), "voter"))],
        "n3": [("n2", EnsureMemberRow("n3", address(3), pem("n3"), "voter"))],
    }
    assert all(a.safety is SAFE and "microcluster's heartbeat then writes it" in a.reason for a in repair.actions)
    assert [(a.steps[0].evidence or Evidence(TABLE)).source for a in repair.actions] == [Source.AGENT] * 2
    assert all(u.reason.startswith("Wait for microcluster's heartbeat") for u in repair.unplanned)


def test_on_microcluster_an_orphan_row_goes_through_microclusters_own_removal_forced() -> None:
    """S3: a PENDING row Raft does not hold, its record in the leader's truststore. microcluster's consistency check
    refuses every removal while the row is there, so the request is forced, with the row's address."""
    view = on_microcluster(settled(pending_row_trusted_by_leader()))
    (action,) = plan(view).actions
    assert steps(action) == [
        ("n1", RemoveThroughMicrocluster("n4", address(4), 0, force=True)),
        (COORDINATOR, ForgetMember("n4")),
    ]
    assert action.steps[0].evidence == Evidence(TABLE, "n1", (row(4, Role.PENDING),))
    assert action.safety is SAFE and "microctl cluster remove n4 --force --address 127.0.0.1:7004" in action.reason
    assert action.remainder.startswith("n4's agent did not answer: microcluster resets a removed member only")
    assert action.clears == tuple(ids(view, K.MISSING))
    # Young, it waits for the grace period as on every backend.
    young = on_microcluster(settled(pending_row_trusted_by_leader(), age=10.0))
    (left,) = plan(young).unplanned
    assert left.eligible_at == NOW - 10.0 + GRACE


def test_on_microcluster_a_ghost_raft_member_is_removed_through_dqlite_when_confirmed() -> None:
    """S1: no row names the ghost n4 for microcluster's removal to find; its entry goes through dqlite on a human's
    word, and the leader's record of it is left to the heartbeat."""
    view = on_microcluster(settled(ghost_raft_member()))
    (action,) = plan(view).actions
    assert action.safety is CONFIRM and action.reason.startswith("Confirm that n4 (node 4 at 127.0.0.1:7004)")
    assert "removed through dqlite" in action.reason
    assert steps(action) == [("n1", RemoveRaftEntry(4, address(4), Role.SPARE)), (COORDINATOR, ForgetMember("n4"))]
    # The quorum rule holds as on every backend: a ghost voter with two of four voters silent stays.
    assert plan(on_microcluster(ghost_voter(["n2", "n3"]))).actions == ()


def test_on_microcluster_a_node_no_record_knows_is_left_to_a_human_to_reset() -> None:
    """S8: n4 was removed, but kept its files. microcluster neither removes nor heartbeats a node its table and Raft
    do not hold, and the agent applies no fence on this backend."""
    view = on_microcluster(settled(removed_node_returns()))
    repair = plan(view)
    assert repair.actions == ()
    assert any("A human resets it" in u.reason for u in repair.unplanned)


# --- properties -----------------------------------------------------------------------------------------------------

ROLES = st.sampled_from([Role.VOTER, Role.STAND_BY, Role.SPARE])
FAULTS = [
    "drop row",
    "drop raft entry",
    "drop trust",
    "misfile",
    "alias",
    "stranger row",
    "stranger trust",
    "ghost",
    "agent",
]


@st.composite
def broken_clusters(draw: st.DrawFn) -> tuple[ClusterView, tuple[OperationRecord, ...]]:
    """A consistent cluster of 3-5 nodes with up to four faults in its three sources (a row, a Raft entry or a
    truststore record lost; a record misfiled, over another's file or not, or under a stranger's name; a stranger's
    row, record or Raft entry),
    agents lost, the authoritative sources' age, and perhaps an operation for someone."""
    size = draw(st.integers(3, 5))
    view = consistent_view(size, roles=draw(st.lists(ROLES, min_size=size, max_size=size)))
    for _ in range(draw(st.integers(0, 4))):
        fault = draw(st.sampled_from(FAULTS))
        i, node = draw(st.integers(1, size)), name(draw(st.integers(1, size)))
        stranger = draw(st.integers(size + 1, size + 2))
        if fault == "drop row":
            view = drop_records(view, TABLE, address(i))
        elif fault == "drop raft entry":
            view = drop_records(view, RAFT, address(i))
        elif fault == "drop trust":
            view = drop_records(view, TRUSTSTORE, address(i), nodes=[node])
        elif fault == "misfile":
            # A record copied to a file of its own, or over another member's file (whose record is lost).
            over = draw(st.integers(1, size))
            if over != i:
                view = drop_records(view, TRUSTSTORE, address(over), nodes=[node])
            view = misfiled(view, i, node, f"{name(over)}.yaml" if over != i else f"copy-of-{name(i)}.yaml")
        elif fault == "alias":
            alias = replace(trust(i), name=f"alias{i}", entry=f"alias{i}.yaml")
            view = add_records(view, TRUSTSTORE, [alias], nodes=[node])
        elif fault == "stranger row":
            view = add_records(view, TABLE, [row(stranger, Role.PENDING)])
        elif fault == "stranger trust":
            view = add_records(view, TRUSTSTORE, [trust(stranger)], nodes=[node])
        elif fault == "ghost":
            view = add_raft_member(view, stranger, draw(ROLES))
        else:
            view = fail_agent(view, node)
    view = settled(view, draw(st.sampled_from([None, 10.0, SETTLED])))
    states = st.sampled_from([OperationState.QUEUED, OperationState.RUNNING, OperationState.PARKED])
    ops = draw(st.lists(st.builds(operation, st.sampled_from([name(i) for i in range(1, 8)]), states), max_size=1))
    return view, tuple(ops)


def removed_names(action: Action) -> set[str]:
    match action:
        case RemoveTruststoreRecord(name=removed) | RemoveMemberRow(name=removed) | ForgetMember(name=removed):
            return {removed}
        case _:
            return set()


@given(broken_clusters())
def test_a_plan_never_adds_to_raft_never_breaks_quorum_and_never_touches_an_operations_member(
    cluster: tuple[ClusterView, tuple[OperationRecord, ...]],
) -> None:
    view, in_flight = cluster
    diff = compute_diff(view)
    repair = plan(view, in_flight=in_flight)
    answered = {o.node for o in view.nodes if o.view is not None}
    members, reachable = list(raft_members(diff)), QuorumInput.from_diff(diff).reachable
    for action in repair.actions:
        for target, step in steps(action):
            assert target in answered | {COORDINATOR}
            assert not any(target == op.member.name or op.member.name in removed_names(step) for op in in_flight)
            if isinstance(step, RemoveRaftEntry):
                members = [m for m in members if raft_key(m) != (step.address, step.node_id)]
                voters = [m for m in members if m.role is Role.VOTER]
                assert members, "the last member was removed"
                assert sum(raft_key(m) in reachable for m in voters) >= len(voters) // 2 + 1
    after = apply(view, repair.actions)
    raft_before, raft_after = (
        {
            (r.address, r.node_id)
            for o in v.nodes
            if o.view
            for s in o.view.sources
            if s.source is RAFT
            for r in s.records
        }
        for v in (view, after)
    )
    assert raft_after <= raft_before


@given(broken_clusters())
def test_applying_a_plan_clears_what_it_claims_once_and_for_all(
    cluster: tuple[ClusterView, tuple[OperationRecord, ...]],
) -> None:
    view, in_flight = cluster
    repair = plan(view, in_flight=in_flight)
    left = {u.discrepancy for u in repair.unplanned}
    for chosen in (repair.chosen(), repair.actions):  # the safe actions alone, then every action confirmed
        after = apply(view, chosen)
        assert apply(after, chosen) == after
        claimed = {i for action in chosen for i in action.clears}
        assert claimed.isdisjoint(d.id for d in compute_diff(after).discrepancies)
        again = plan(after, in_flight=in_flight).chosen()
        if chosen == repair.chosen():
            assert again == ()
        else:
            # A confirmed removal of a silent voter may give back the quorum a refused commit lacked; nothing else.
            assert {i for action in again for i in action.clears} <= left
