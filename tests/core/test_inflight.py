"""Discrepancies explained by an operation in flight, on plain values: a removal half done, then properties checked
with hypothesis over the diff engine's random broken views."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.diff import compute_diff
from coordinator.core.inflight import IN_FLIGHT, explain_in_flight, is_about
from coordinator.core.model import ClusterView, Discrepancy, DiscrepancyKind, Member, MembershipDiff, Severity, Source
from coordinator.core.operation import Audit, OperationKind, OperationRecord, OperationState

from .test_diff import broken_views
from .views import address, consistent_view, drop_records, fail_agent, fingerprint_of, name

K = DiscrepancyKind
BLOCKING, WARNING, INFO = Severity.BLOCKING, Severity.WARNING, Severity.INFO


def operation(member: Member, state: OperationState = OperationState.RUNNING, op_id: str = "op-1") -> OperationRecord:
    return OperationRecord(
        id=op_id,
        kind=OperationKind.REMOVE,
        member=member,
        state=state,
        steps=(),
        error="",
        plan="",
        audit=Audit(requested_by="operator", certificate_fingerprint="", request_id=op_id, verdict="", fingerprint=""),
        epoch=1,
        created_at=0.0,
        updated_at=0.0,
    )


def member(i: int) -> Member:
    return Member(name(i), fingerprint_of(name(i)), address(i), i)


def removal_half_done() -> ClusterView:
    """n3 is out of the leader's Raft configuration (the removal's commit point); every other source still holds it.
    Unrelated to it, n1's truststore lacks n2."""
    view = drop_records(consistent_view(3), Source.RAFT_CONFIG, address(3))
    return drop_records(view, Source.TRUSTSTORE, address(2), ["n1"])


def test_a_removal_in_flight_explains_what_it_leaves_about_its_member_and_nothing_else() -> None:
    diff = compute_diff(removal_half_done())
    explained = explain_in_flight(diff, [operation(member(3))])
    about_n2 = [d for d in explained.discrepancies if d.member is not None and d.member.name == "n2"]
    assert [(d.kind, d.severity, d.node, d.explained_by) for d in about_n2] == [(K.MISSING, BLOCKING, "n1", "")]
    others = [d for d in explained.discrepancies if d not in about_n2]
    kinds = {(d.kind, d.source) for d in others}
    # The row that outlives the Raft entry, n3's own identity, and every node's lagging view that still lists n3.
    assert (K.MISSING, Source.RAFT_CONFIG) in kinds and (K.NODE_INFO_MISMATCH, Source.NODE_INFO) in kinds
    assert (K.VIEW_DIFFERS, Source.RAFT_NODE_VIEW) in kinds
    assert all(d.severity is INFO and d.explained_by == "op-1" for d in others)
    assert explained.discrepancies[0] == about_n2[0], "still most severe first"
    assert explained.fingerprint == diff.fingerprint and explained.members == diff.members
    assert sorted(d.id for d in explained.discrepancies) == sorted(d.id for d in diff.discrepancies)


def test_the_members_own_silent_agent_is_explained_even_once_it_is_no_member() -> None:
    view = fail_agent(drop_records(consistent_view(3), Source.RAFT_CONFIG, address(3)), "n3")
    unreachable = [
        d
        for d in explain_in_flight(compute_diff(view), [operation(member(3))]).discrepancies
        if d.kind is K.AGENT_UNREACHABLE
    ]
    assert [(d.node, d.severity, d.explained_by) for d in unreachable] == [("n3", INFO, "op-1")]


def test_a_member_is_recognised_by_any_one_of_name_certificate_address_and_node_id() -> None:
    diff = compute_diff(removal_half_done())
    whole = explain_in_flight(diff, [operation(member(3))])
    certificate = Member(certificate_fingerprint=fingerprint_of("n3"))
    for partial in (Member(name="n3"), certificate, Member(address=address(3)), Member(node_id=3)):
        explained = [d.id for d in explain_in_flight(diff, [operation(partial)]).discrepancies if d.explained_by]
        assert explained, partial
        assert set(explained) <= {d.id for d in whole.discrepancies if d.explained_by}, partial
    # The members table carries no node ID: its row that outlives the Raft entry is n3's by name and address only.
    by_node_id = explain_in_flight(diff, [operation(Member(node_id=3))])
    assert [d.severity for d in by_node_id.discrepancies if d.kind is K.MISSING and d.node == ""] == [BLOCKING]


def test_a_parked_or_finished_operation_explains_nothing() -> None:
    diff = compute_diff(removal_half_done())
    for state in OperationState:
        if state not in IN_FLIGHT:
            assert explain_in_flight(diff, [operation(member(3), state)]) == diff, state


def test_the_first_operation_in_flight_that_is_about_the_member_explains_it() -> None:
    diff = compute_diff(removal_half_done())
    operations = [
        operation(member(3), OperationState.PARKED, "parked"),
        operation(member(3), OperationState.QUEUED, "queued"),
        operation(member(3), op_id="running"),
    ]
    explained = explain_in_flight(diff, operations)
    assert {d.explained_by for d in explained.discrepancies} == {"queued", ""}


# --- properties ----------------------------------------------------------------------------------------------------

STATES = st.sampled_from(list(OperationState))


@st.composite
def operations(draw: st.DrawFn, size: int) -> list[OperationRecord]:
    """Operations about members of the cluster or strangers, known by some of name, address and node ID."""
    found = []
    for index in range(draw(st.integers(0, 3))):
        i = draw(st.integers(1, size + 2))
        known = draw(st.sets(st.sampled_from(["name", "address", "node_id"]), min_size=1))
        partial = Member(
            name(i) if "name" in known else "",
            "",
            address(i) if "address" in known else "",
            i if "node_id" in known else 0,
        )
        found.append(operation(partial, draw(STATES), f"op-{index}"))
    return found


@st.composite
def explanations(draw: st.DrawFn) -> tuple[MembershipDiff, list[OperationRecord], MembershipDiff]:
    view = draw(broken_views())
    diff = compute_diff(view)
    ops = draw(operations(len(view.nodes)))
    return diff, ops, explain_in_flight(diff, ops)


@given(explanations())
def test_explaining_never_changes_the_fingerprint_or_the_facts(
    case: tuple[MembershipDiff, list[OperationRecord], MembershipDiff],
) -> None:
    diff, _, explained = case
    assert explained.fingerprint == diff.fingerprint
    assert (explained.members, explained.nodes, explained.observed_at) == (diff.members, diff.nodes, diff.observed_at)
    stripped = sorted((replace(d, severity=INFO, explained_by="") for d in explained.discrepancies), key=_id)
    assert stripped == sorted((replace(d, severity=INFO) for d in diff.discrepancies), key=_id)


def _id(discrepancy: Discrepancy) -> str:
    return discrepancy.id


@given(explanations())
def test_explaining_never_touches_discrepancies_about_other_members(
    case: tuple[MembershipDiff, list[OperationRecord], MembershipDiff],
) -> None:
    diff, ops, explained = case
    in_flight = [o for o in ops if o.state in IN_FLIGHT]
    by_id = {d.id: d for d in explained.discrepancies}
    for before in diff.discrepancies:
        after = by_id[before.id]
        if not any(is_about(before, o.member) for o in in_flight):
            assert after == before
        else:
            assert after.explained_by in {o.id for o in in_flight if is_about(before, o.member)}


@given(explanations())
def test_explaining_only_ever_lowers_a_severity_to_info(
    case: tuple[MembershipDiff, list[OperationRecord], MembershipDiff],
) -> None:
    diff, _, explained = case
    before = {d.id: d.severity for d in diff.discrepancies}
    for after in explained.discrepancies:
        assert after.severity <= before[after.id]
        assert after.severity is INFO or not after.explained_by
        if before[after.id] is INFO:
            assert after.severity is INFO


@given(explanations())
def test_a_discrepancy_about_another_member_of_the_cluster_is_never_explained(
    case: tuple[MembershipDiff, list[OperationRecord], MembershipDiff],
) -> None:
    """Independent of is_about: a discrepancy on a node no operation is about, whose member shares no name, address or
    node ID with any operation's member, keeps its severity."""
    diff, ops, explained = case
    in_flight = [o.member for o in ops if o.state in IN_FLIGHT]
    by_id = {d.id: d for d in explained.discrepancies}
    for before in diff.discrepancies:
        if before.member is None or any(before.node and before.node == m.name for m in in_flight):
            continue
        shared = any(
            (m.name and m.name == before.member.name)
            or (m.address and m.address == before.member.address)
            or (m.node_id and m.node_id == before.member.node_id)
            for m in in_flight
        )
        if not shared:
            assert by_id[before.id].severity is before.severity and not by_id[before.id].explained_by


def test_the_severity_order_is_kept_after_explaining() -> None:
    explained = explain_in_flight(compute_diff(removal_half_done()), [operation(member(3))])
    severities = [d.severity for d in explained.discrepancies]
    assert severities == sorted(severities, reverse=True)
    assert WARNING not in severities
