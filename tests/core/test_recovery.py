"""Recovery decisions on plain values (coordinator/core/recovery.py).

The property the journal exists for: whatever prefix of a join or a removal ran, whichever step was sent and then
cut off (applied by its agent or not), whether the joiner survived, recovery ends with the member wholly in or wholly
out. The sources are modelled as sets of facts that the plan's actions change; the decisions are the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.core.diff import compute_diff
from coordinator.core.model import ClusterView, Member, Role, Source
from coordinator.core.operation import (
    Abandon,
    Audit,
    OperationKind,
    OperationRecord,
    OperationState,
    Park,
    RollBack,
    Start,
    Step,
    StepDone,
    StepSent,
    StepSkipped,
    StepState,
    StepUndone,
    Succeed,
    apply,
    committed,
    next_step,
)
from coordinator.core.plan import (
    Action,
    EnsureMemberRow,
    EnsureRaftEntry,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    Joiner,
    RegisterMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveTruststoreRecord,
    RevokeMicroclusterToken,
    plan_join,
    plan_microcluster_token,
    plan_removal,
)
from coordinator.core.recovery import (
    Back,
    Effect,
    Forward,
    Wait,
    abandon_violations,
    commit_effect,
    decide,
    silent_agents,
)
from coordinator.core.repair import plan_repair
from tests.core import views

MEMBERS = ("n1", "n2", "n3")
JOINER = Joiner("n4", views.address(4), "PEM-n4", "127.0.0.1:9404", 4)


@dataclass
class Cluster:
    """The three sources as facts, and what the coordinator and the joiner's node hold."""

    rows: dict[str, str] = field(default_factory=lambda: {m: "voter" for m in MEMBERS})
    trust: set[tuple[str, str]] = field(default_factory=lambda: {(n, m) for n in MEMBERS for m in MEMBERS})
    raft: set[int] = field(default_factory=lambda: {1, 2, 3})
    registered: set[str] = field(default_factory=lambda: set(MEMBERS))
    fenced: set[str] = field(default_factory=set)

    def apply(self, target: str, action: Action) -> None:
        match action:
            case EnsureMemberRow(name=name, role=role):
                self.rows[name] = role
            case RemoveMemberRow(name=name):
                self.rows.pop(name, None)
            case EnsureTruststoreRecord(name=name):
                self.trust.add((target, name))
            case RemoveTruststoreRecord(name=name):
                self.trust.discard((target, name))
            case EnsureRaftEntry(node_id=node_id):
                self.raft.add(node_id)
            case RemoveRaftEntry(node_id=node_id):
                self.raft.discard(node_id)
            case FenceNode():
                self.fenced.add(target)
            case RegisterMember(name=name):
                self.registered.add(name)
            case ForgetMember(name=name):
                self.registered.discard(name)

    def wholly_in(self, name: str, node_id: int) -> bool:
        return (
            self.rows.get(name) not in (None, "PENDING")
            and all((m, name) in self.trust for m in MEMBERS if m != name)
            and node_id in self.raft
            and name in self.registered
        )

    def wholly_out(self, name: str, node_id: int) -> bool:
        return (
            name not in self.rows
            and not any((m, name) in self.trust for m in MEMBERS if m != name)
            and node_id not in self.raft
            and name not in self.registered
        )


def record_of(kind: OperationKind, member: Member, steps: tuple[Step, ...]) -> OperationRecord:
    audit = Audit(requested_by="ops", certificate_fingerprint="", request_id="r", verdict="consistent", fingerprint="")
    return OperationRecord(
        id="op",
        kind=kind,
        member=member,
        state=OperationState.QUEUED,
        steps=steps,
        error="",
        plan="",
        audit=audit,
        epoch=1,
        created_at=0.0,
        updated_at=0.0,
    )


def join_record() -> OperationRecord:
    diff = compute_diff(views.consistent_view(3))
    plan = plan_join(diff, JOINER, reachable=MEMBERS, certificates={m: f"PEM-{m}" for m in MEMBERS})
    steps = tuple(Step(s.name, s.commit_point, target=s.target, action=s.action) for s in plan.steps)
    return record_of(OperationKind.JOIN, Member("n4", "", JOINER.address, 4), steps)


def removal_record() -> OperationRecord:
    diff = compute_diff(views.consistent_view(3))
    member = next(m for m in diff.members if m.name == "n3")
    plan = plan_removal(diff, member, reachable=MEMBERS)
    steps = tuple(Step(s.name, s.commit_point, target=s.target, action=s.action) for s in plan.steps)
    return record_of(OperationKind.REMOVE, member, steps)


def crashed(record: OperationRecord, cluster: Cluster, done: int, sent_applied: bool | None) -> OperationRecord:
    """Runs the first `done` steps as the runner does (SENT, applied, DONE); then, unless sent_applied is None, sends
    the next one and crashes before its outcome is recorded: applied by its agent, or not."""
    record = apply(record, Start(), 1.0)
    for index in range(done):
        step = record.steps[index]
        assert step.action is not None
        record = apply(record, StepSent(index), 1.0)
        cluster.apply(step.target, step.action)
        record = apply(record, StepDone(index), 1.0)
    following = next_step(record)
    if sent_applied is not None and following is not None:
        record = apply(record, StepSent(following), 1.0)
        step = record.steps[following]
        if sent_applied:
            assert step.action is not None
            cluster.apply(step.target, step.action)
    return record


def effect(record: OperationRecord, cluster: Cluster) -> Effect:
    commit = next(s for s in record.steps if s.commit_point)
    match commit.action:
        case EnsureRaftEntry(node_id=node_id):
            return Effect.APPLIED if node_id in cluster.raft else Effect.ABSENT
        case RemoveRaftEntry(node_id=node_id):
            return Effect.ABSENT if node_id in cluster.raft else Effect.APPLIED
    raise AssertionError(commit)


def recover(record: OperationRecord, cluster: Cluster, silent: frozenset[str]) -> OperationRecord:
    """What the reconciler does, passes until the operation is finished: decide, then act on the model. A silent
    member answers again after one pass (a Wait is retried); a dead joiner never does."""
    for _ in range(5):
        if record.state.finished:
            return record
        decision = decide(record, commit=effect(record, cluster), silent=silent, nodes=MEMBERS)
        match decision:
            case Wait(error=error, plan=plan):
                record = apply(record, Park(error, plan), 2.0)
                record = replace(record, state=OperationState.RUNNING)  # Resume, as the next pass does
                silent = silent & {"n4"}
            case Back():
                if decision.fence:
                    cluster.fenced.add(record.member.name)
                for undo in decision.undo:
                    assert not (undo.action is not None and undo.target in silent), "an undo sent to a silent node"
                    if undo.skipped:
                        record = apply(record, StepSkipped(undo.index), 2.0)
                        continue
                    if undo.action is not None:
                        cluster.apply(undo.target, undo.action)
                    record = apply(record, StepUndone(undo.index), 2.0)
                record = apply(record, RollBack(decision.cause), 2.0)
            case Forward(confirm=confirm):
                if confirm is not None:
                    record = apply(record, StepDone(confirm), 2.0)
                while (index := next_step(record)) is not None:
                    step = record.steps[index]
                    assert step.action is not None and step.target not in silent
                    cluster.apply(step.target, step.action)
                    record = apply(apply(record, StepSent(index), 2.0), StepDone(index), 2.0)
                record = apply(record, Succeed(), 2.0)
    raise AssertionError(f"recovery did not finish: {record}")


STEPS = len(join_record().steps)
COMMIT = next(i for i, s in enumerate(join_record().steps) if s.commit_point)  # the engine join


@given(
    done=st.integers(0, STEPS),
    sent_applied=st.none() | st.booleans(),
    joiner_dead=st.booleans(),
    silent_member=st.none() | st.sampled_from(MEMBERS),
)
def test_a_join_crashed_anywhere_ends_wholly_in_or_wholly_out(
    done: int, sent_applied: bool | None, joiner_dead: bool, silent_member: str | None
) -> None:
    cluster = Cluster()
    record = crashed(join_record(), cluster, done, sent_applied)
    silent = frozenset({"n4"} if joiner_dead else set()) | frozenset({silent_member} if silent_member else set())
    was_committed = committed(record)
    final = recover(record, cluster, silent)
    assert cluster.wholly_in("n4", 4) or cluster.wholly_out("n4", 4), (cluster, final)
    if final.state is OperationState.SUCCEEDED:
        assert cluster.wholly_in("n4", 4)
    else:
        assert final.state is OperationState.ROLLED_BACK and not was_committed
        assert cluster.wholly_out("n4", 4)
        # A joiner that answered is fenced; one that did not is named, to be reset by hand.
        assert ("n4" in cluster.fenced) != ("n4 was not reset" in final.error or joiner_dead)


@given(done=st.integers(0, len(removal_record().steps)), sent_applied=st.none() | st.booleans())
def test_a_removal_crashed_anywhere_ends_wholly_in_or_wholly_out(done: int, sent_applied: bool | None) -> None:
    cluster = Cluster()
    record = crashed(removal_record(), cluster, done, sent_applied)
    final = recover(record, cluster, frozenset())
    assert cluster.wholly_in("n3", 3) or cluster.wholly_out("n3", 3)
    assert (final.state is OperationState.SUCCEEDED) == cluster.wholly_out("n3", 3)


def test_a_dead_joiners_trust_is_revoked_before_anything_else_is_undone() -> None:
    cluster = Cluster()
    record = crashed(join_record(), cluster, done=COMMIT, sent_applied=None)  # up to "n4 trusts itself"
    decision = decide(record, commit=Effect.ABSENT, silent={"n4"}, nodes=MEMBERS)
    assert isinstance(decision, Back) and not decision.fence and decision.unreset == "n4"
    first = decision.undo[: len(MEMBERS)]
    assert {(u.target, u.action) for u in first} == {(m, RemoveTruststoreRecord("n4")) for m in MEMBERS}
    # The joiner's own truststore cannot be reached: those steps are skipped, not waited for.
    own = [u for u in decision.undo if record.steps[u.index].target == "n4"]
    assert own and all(u.skipped and u.action is None for u in own)


def test_a_sent_engine_join_of_a_dead_joiner_is_undone_through_a_member() -> None:
    cluster = Cluster()
    record = crashed(join_record(), cluster, done=COMMIT, sent_applied=True)  # the engine joined, then silence
    decision = decide(record, commit=Effect.ABSENT, silent={"n4"}, nodes=MEMBERS)
    assert isinstance(decision, Back)
    commit = next(u for u in decision.undo if record.steps[u.index].commit_point)
    assert commit.target == "n1" and commit.action == RemoveRaftEntry(4, JOINER.address)


def test_a_sent_commit_whose_effect_cannot_be_seen_waits() -> None:
    record = crashed(join_record(), Cluster(), done=COMMIT, sent_applied=True)
    decision = decide(record, commit=Effect.UNKNOWN, silent=set(), nodes=MEMBERS)
    assert isinstance(decision, Wait) and "took effect" in decision.error


def test_a_sent_commit_seen_applied_is_confirmed_and_goes_forward() -> None:
    record = crashed(join_record(), Cluster(), done=COMMIT, sent_applied=True)
    index = next(i for i, s in enumerate(record.steps) if s.commit_point)
    assert decide(record, commit=Effect.APPLIED, silent={"n4"}, nodes=MEMBERS) == Forward(confirm=index)


def test_a_forward_step_for_a_silent_node_waits() -> None:
    record = crashed(join_record(), Cluster(), done=COMMIT + 1, sent_applied=None)  # committed
    decision = decide(record, commit=Effect.APPLIED, silent={"n2"}, nodes=MEMBERS)
    assert isinstance(decision, Wait) and "n2" in decision.plan


def test_a_queued_operation_is_rolled_back_without_steps() -> None:
    decision = decide(join_record(), commit=Effect.ABSENT, silent=set(), nodes=MEMBERS)
    assert isinstance(decision, Back) and decision.undo == () and not decision.fence


def test_a_finished_operation_has_nothing_to_decide() -> None:
    record = crashed(join_record(), Cluster(), done=0, sent_applied=None)
    finished = apply(record, RollBack("stopped"), 2.0)
    with pytest.raises(ValueError, match="finished"):
        decide(finished, commit=Effect.ABSENT, silent=set(), nodes=MEMBERS)


def test_commit_effect_reads_the_raft_configuration_and_knows_when_it_cannot() -> None:
    record = join_record()
    diff = compute_diff(views.consistent_view(3))
    assert commit_effect(record, diff) is Effect.ABSENT
    joined = compute_diff(views.add_raft_member(views.consistent_view(3), 4))
    assert commit_effect(replace(record, member=Member("n4", "", views.address(4), 4)), joined) is Effect.APPLIED
    removal = removal_record()
    assert commit_effect(removal, diff) is Effect.ABSENT
    assert commit_effect(removal, compute_diff(views.remove_raft_member(views.consistent_view(3), 3))) is Effect.APPLIED


def test_a_removal_through_microcluster_took_effect_once_the_row_or_the_raft_entry_is_gone() -> None:
    """microcluster deletes the row, then the Raft entry: a crash between the two is past the point of return."""
    healthy = views.on_microcluster(views.consistent_view(3))
    diff = compute_diff(healthy)
    member = next(m for m in diff.members if m.name == "n3")
    plan = plan_removal(diff, member, reachable=MEMBERS)
    removal = record_of(
        OperationKind.REMOVE,
        member,
        tuple(Step(s.name, s.commit_point, target=s.target, action=s.action) for s in plan.steps),
    )
    no_row = views.drop_records(healthy, Source.MEMBERS_TABLE, views.address(3))
    assert commit_effect(removal, diff) is Effect.ABSENT
    assert commit_effect(removal, compute_diff(no_row)) is Effect.APPLIED
    assert commit_effect(removal, compute_diff(views.remove_raft_member(no_row, 3))) is Effect.APPLIED
    unread = views.set_report(healthy, Source.MEMBERS_TABLE, error="no leader")
    assert commit_effect(removal, compute_diff(unread)) is Effect.UNKNOWN


def test_a_microcluster_token_sent_and_never_confirmed_is_revoked() -> None:
    diff = compute_diff(views.on_microcluster(views.consistent_view(3)))
    plan = plan_microcluster_token(diff, "n4", ttl=60.0, reachable=MEMBERS)
    steps = tuple(Step(s.name, s.commit_point, target=s.target, action=s.action) for s in plan.steps)
    record = apply(
        apply(record_of(OperationKind.ISSUE_TOKEN, Member(name="n4"), steps), Start(), 1.0), StepSent(0), 1.0
    )
    assert commit_effect(record, diff) is Effect.ABSENT, "no source shows a token"
    back = decide(record, commit=Effect.ABSENT, silent=set(), nodes=MEMBERS)
    assert isinstance(back, Back) and [(u.target, u.action) for u in back.undo] == [
        ("n1", RevokeMicroclusterToken("n4"))
    ]


def test_silent_agents_are_the_nodes_that_did_not_answer() -> None:
    view = views.fail_agent(views.consistent_view(3), "n2")
    assert silent_agents(compute_diff(view)) == {"n2"}


def test_only_a_parked_operation_is_abandoned_and_past_its_commit_point_only_by_force() -> None:
    diff = compute_diff(views.consistent_view(3))
    running = crashed(join_record(), Cluster(), done=2, sent_applied=None)
    assert [v.type for v in abandon_violations(running, diff, force=True, acknowledged=())] == ["NOT_PARKED"]
    early = apply(running, Park("stuck", "wait"), 2.0)
    assert abandon_violations(early, diff, force=False, acknowledged=()) == []
    late = apply(crashed(join_record(), Cluster(), COMMIT, sent_applied=True), Park("stuck", "wait"), 2.0)
    assert [v.type for v in abandon_violations(late, diff, force=False, acknowledged=())] == ["PAST_COMMIT_POINT"]
    # Forced, it is refused while a blocking discrepancy about n4 is not acknowledged.
    joined = compute_diff(views.add_raft_member(views.consistent_view(3), 4))
    about = [v.subject for v in abandon_violations(late, joined, force=True, acknowledged=())]
    assert about and abandon_violations(late, joined, force=True, acknowledged=about) == []
    assert apply(late, Abandon("abandoned by ops: n4 is gone"), 3.0).state is OperationState.ABANDONED


def test_the_model_applies_the_plans_as_written() -> None:
    # The property above is only as good as its model: a join run whole is wholly in, a removal wholly out.
    cluster = Cluster()
    joined = crashed(join_record(), cluster, STEPS, sent_applied=None)
    assert cluster.wholly_in("n4", 4) and all(s.state is StepState.DONE for s in joined.steps)
    removed = Cluster()
    crashed(removal_record(), removed, len(removal_record().steps), sent_applied=None)
    assert removed.wholly_out("n3", 3)


# --- repairs ----------------------------------------------------------------------------------------------------------


def repair_record(view_of_repair: ClusterView) -> OperationRecord:
    """The REPAIR operation the coordinator journals for the plan of a view: every action's steps in plan order, the
    first its commit point."""
    diff = compute_diff(view_of_repair)
    plan = plan_repair(
        view_of_repair,
        diff,
        now=1e9,
        grace=300.0,
        certificates={views.fingerprint_of("n3"): "PEM-n3"},
        seen_since={d.id: 0.0 for d in diff.discrepancies},  # every orphan is past its grace period
    )
    planned = [step.planned for action in plan.chosen() for step in action.steps]
    steps = tuple(
        Step(s.name, i == 0, target=s.target, action=s.action) for i, s in enumerate(planned) if not s.deferred
    )
    return record_of(OperationKind.REPAIR, Member(), steps)


# S9 on two nodes: n1's and n2's truststores lost n3's record; two actions, one step each.
N3_UNTRUSTED = views.drop_records(views.consistent_view(3), Source.TRUSTSTORE, views.address(3), ["n1", "n2"])


def repair_effect(record: OperationRecord, cluster: Cluster) -> Effect:
    commit = next(s for s in record.steps if s.commit_point)
    assert isinstance(commit.action, EnsureTruststoreRecord)
    return Effect.APPLIED if (commit.target, commit.action.name) in cluster.trust else Effect.ABSENT


@given(done=st.integers(0, 2), sent_applied=st.none() | st.booleans(), silent=st.sampled_from([(), ("n2",)]))
def test_a_repair_crashed_anywhere_finishes_or_changed_nothing_and_never_adds_to_raft(
    done: int, sent_applied: bool | None, silent: tuple[str, ...]
) -> None:
    record = repair_record(N3_UNTRUSTED)
    assert [s.commit_point for s in record.steps] == [True, False]
    cluster = Cluster(trust={(n, m) for n in MEMBERS for m in MEMBERS} - {("n1", "n3"), ("n2", "n3")})
    record = crashed(record, cluster, done, sent_applied)
    before = set(cluster.trust)
    for _ in range(3):
        if record.state.finished:
            break
        decision = decide(record, commit=repair_effect(record, cluster), silent=frozenset(silent), nodes=MEMBERS)
        match decision:
            case Back(undo=undo):
                # Nothing is sent to undo a repair: what its first step may have done is left as it is.
                assert all(u.action is None and not u.skipped for u in undo)
                for u in undo:
                    record = apply(record, StepUndone(u.index), 2.0)
                record = apply(record, RollBack(decision.cause), 2.0)
            case Forward(confirm=confirm):
                if confirm is not None:
                    record = apply(record, StepDone(confirm), 2.0)
                while (index := next_step(record)) is not None:
                    step = record.steps[index]
                    assert step.action is not None
                    cluster.apply(step.target, step.action)
                    record = apply(apply(record, StepSent(index), 2.0), StepDone(index), 2.0)
                record = apply(record, Succeed(), 2.0)
            case Wait():
                silent = ()  # the silent node answers at the next pass
    assert cluster.raft == {1, 2, 3}
    if record.state is OperationState.SUCCEEDED:
        assert {("n1", "n3"), ("n2", "n3")} <= cluster.trust
    else:
        # Rolled back: only before its first step took effect, and the trust is as the crash left it.
        assert record.state is OperationState.ROLLED_BACK and done == 0 and not sent_applied
        assert cluster.trust == before


def test_a_repairs_first_step_that_takes_away_waits_until_its_effect_shows() -> None:
    # A truststore record of nobody (n5), held by n1 only; its removal is the repair's first step.
    orphan = views.add_records(views.consistent_view(3), Source.TRUSTSTORE, [views.trust(5)], ["n1"])
    record = repair_record(orphan)
    first = record.steps[0]
    assert (first.target, first.action) == ("n1", RemoveTruststoreRecord("n5"))
    sent = apply(apply(record, Start(), 1.0), StepSent(0), 1.0)
    assert isinstance(decide(sent, commit=Effect.UNKNOWN, silent={"n1"}, nodes=MEMBERS), Wait)
    assert decide(sent, commit=Effect.APPLIED, silent=set(), nodes=MEMBERS) == Forward(confirm=0)
    back = decide(sent, commit=Effect.ABSENT, silent=set(), nodes=MEMBERS)
    assert isinstance(back, Back) and [(u.index, u.action) for u in back.undo] == [(0, None)]


def test_a_repairs_first_step_that_only_writes_is_rolled_back_unseen_sending_nothing() -> None:
    record = apply(apply(repair_record(N3_UNTRUSTED), Start(), 1.0), StepSent(0), 1.0)
    back = decide(record, commit=Effect.UNKNOWN, silent={"n1"}, nodes=MEMBERS)
    assert isinstance(back, Back) and [(u.index, u.action) for u in back.undo] == [(0, None)]


def test_commit_effect_knows_the_repair_steps_from_the_diff() -> None:
    trust_n3 = apply(repair_record(N3_UNTRUSTED), Start(), 1.0)  # first: restore n3 in n1's truststore
    assert commit_effect(trust_n3, compute_diff(N3_UNTRUSTED)) is Effect.ABSENT
    only_n2 = views.drop_records(views.consistent_view(3), Source.TRUSTSTORE, views.address(3), ["n2"])
    assert commit_effect(trust_n3, compute_diff(only_n2)) is Effect.APPLIED
    assert commit_effect(trust_n3, compute_diff(views.fail_agent(N3_UNTRUSTED, "n1"))) is Effect.UNKNOWN
    orphan = views.add_records(views.consistent_view(3), Source.TRUSTSTORE, [views.trust(5)], ["n1"])
    remove_n5 = repair_record(orphan)
    assert commit_effect(remove_n5, compute_diff(orphan)) is Effect.ABSENT
    assert commit_effect(remove_n5, compute_diff(views.consistent_view(3))) is Effect.APPLIED
    no_row = views.drop_records(views.consistent_view(3), Source.MEMBERS_TABLE, views.address(3))
    restore_row = record_of(
        OperationKind.REPAIR,
        Member(),
        (
            Step(
                "restore n3's row", True, target="n1", action=EnsureMemberRow("n3", views.address(3), "PEM-n3", "voter")
            ),
        ),
    )
    assert commit_effect(restore_row, compute_diff(no_row)) is Effect.ABSENT
    assert commit_effect(restore_row, compute_diff(views.consistent_view(3))) is Effect.APPLIED


def test_a_join_through_microcluster_took_effect_once_the_joiner_is_in_raft_and_not_while_only_pending() -> None:
    joined = views.on_microcluster(views.consistent_view(4))
    before = views.drop_node(
        views.drop_records(
            views.drop_records(
                views.drop_records(views.remove_raft_member(joined, 4), Source.MEMBERS_TABLE, views.address(4)),
                Source.TRUSTSTORE,
                views.address(4),
            ),
            Source.RAFT_CACHE,
            views.address(4),
        ),
        "n4",
    )
    diff = compute_diff(before)
    plan = plan_join(diff, replace(JOINER, node_id=0), reachable=MEMBERS, certificates={})
    steps = tuple(Step(s.name, s.commit_point, target=s.target, action=s.action) for s in plan.steps)
    record = apply(
        apply(
            apply(record_of(OperationKind.JOIN, Member("n4", address=JOINER.address), steps), Start(), 1.0),
            StepDone(0),
            1.0,
        ),
        StepSent(1),
        1.0,
    )
    assert commit_effect(record, diff) is Effect.ABSENT
    assert commit_effect(record, compute_diff(views.drop_node(joined, "n4"))) is Effect.APPLIED
    pending = views.add_records(before, Source.MEMBERS_TABLE, [views.row(4, Role.PENDING, "PENDING")])
    assert commit_effect(record, compute_diff(pending)) is Effect.UNKNOWN, "microcluster may still be joining it"
    unread = views.set_report(before, Source.MEMBERS_TABLE, error="no leader")
    assert commit_effect(record, compute_diff(unread)) is Effect.UNKNOWN
    back = decide(record, commit=Effect.ABSENT, silent=set(), nodes=MEMBERS)
    assert isinstance(back, Back) and back.fence
    assert [(u.target, u.action) for u in back.undo if u.action] == [("n1", RevokeMicroclusterToken("n4"))]
