"""Recovery decisions: what to do with an unfinished operation, from its journal record and what the sources say now
(docs/design.md, "The journal and recovery").

The journal alone cannot tell where a crash left an operation: a step SENT may or may not have been applied (the
agent may have applied it just before the coordinator died), and a commit step that failed may have taken effect
all the same. So `decide` takes a fresh observation besides the record, and answers with one decision:

- Forward: the commit point is passed (recorded, or seen in the sources): finish the remaining steps. A commit step
  whose effect the sources show is confirmed first (`confirm`).
- Back: undo every step that may have been applied, in the order given, then record the rollback. Undoing a step
  that never ran is a no-op (every action is idempotent), which is what makes write-ahead intent safe.
- Wait: the operation cannot go either way now (a node its next step needs is silent, or no source can tell whether
  its commit took effect): it is parked, with the reason and what would clear it.

The order of a join's rollback is the zombie rule (microcluster #774): a joiner left able to add itself to the Raft
configuration later becomes a ghost member. A joiner that answers is fenced first. A joiner that is gone cannot be
fenced, so its trust is revoked first instead: once no member's truststore holds its certificate, no engine and no
agent accepts it, and it cannot add itself; then the rest is undone, the cluster-wide steps through a member that
answers, and the steps on the joiner's own node are skipped and reported ("reset it before it comes back"). A join
therefore never waits for its dead joiner.

A repair (kind REPAIR: a repair plan's chosen actions, core/repair.py) is recovered by the same rules, and is safe by
construction because of what its steps are. Its first step is its commit point, and its steps only make a source
hold what the authoritative records say (a row from a live Raft member's own report, a truststore record from the
members table) or delete what no authoritative record makes a member; none adds to the Raft configuration. So:
- Once its first step is done it only rolls forward: each remaining step is re-sent (all are idempotent) when its
  node answers, and a member is never left half-repaired by an undo. Forward never adds to Raft: no step does.
- Before that, nothing was applied but maybe its first step. Its rollback sends nothing (`_back` gives each undo no
  action): the reverse of a repair step takes away a record the authoritative records vouch for (undoing a restored
  truststore record distrusts a live member), and no reverse may add to Raft. The first
  step's own effect, if it had one, is left as it is; alone it harms no member, except a step that takes something
  away from a source a Raft member may need (its truststore record, or its Raft entry): for those `decide` waits until
  the source shows whether it took effect, and rolls forward when it did.
- A SENT first step is settled from the fresh diff (`commit_effect` knows the effect of each repair step kind): shown
  applied, it is confirmed and the repair rolls forward; shown absent, it rolls back, sending nothing.

`abandon_violations` is the rule for an operator ending a parked operation by hand.

Pure: no I/O and no clock. The runner (coordinator/operations.py) gathers, calls `decide`, journals, sends.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from enum import Enum

from coordinator.core.guard import Violation
from coordinator.core.inflight import is_about
from coordinator.core.model import Discrepancy, DiscrepancyKind, Member, MembershipDiff, Role, Severity, Source
from coordinator.core.operation import (
    OperationKind,
    OperationRecord,
    OperationState,
    StepState,
    commit_index,
    committed,
    undo_order,
)
from coordinator.core.plan import (
    COORDINATOR,
    Action,
    EnsureMemberRow,
    EnsureRaftEntry,
    EnsureTruststoreRecord,
    IssueMicroclusterToken,
    JoinThroughMicrocluster,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveThroughMicrocluster,
    RemoveTruststoreRecord,
    undo,
)


class Effect(Enum):
    """What the sources say of a commit step's effect."""

    APPLIED = "applied"
    ABSENT = "absent"
    UNKNOWN = "unknown"  # the source that would show it could not be read


@dataclass(frozen=True)
class Forward:
    confirm: int | None = None  # the commit step to record DONE first: the sources show it took effect


@dataclass(frozen=True)
class Undo:
    """One step of a rollback: apply `action` (the step's reverse) on `target`, or, when `action` is None, record the
    step reversed with nothing to send (its action has no reverse) — or skipped when `skipped` (its node is gone)."""

    index: int
    target: str
    action: Action | None
    skipped: bool = False


@dataclass(frozen=True)
class Back:
    cause: str  # why the operation is rolled back (the error it ends with)
    fence: bool  # fence the joiner before anything else (it answered)
    undo: tuple[Undo, ...]
    unreset: str = ""  # the node that could not be fenced or cleaned: it must be reset before it comes back


@dataclass(frozen=True)
class Wait:
    error: str  # why it cannot go on now (for a rollback, the rollback's cause: it is what the rollback ends with)
    plan: str  # what would clear it


Decision = Forward | Back | Wait

# A cluster-wide source that no node could read is reported with no node: the diff then shows nothing about it.
_NOBODY_READ = (DiscrepancyKind.NO_LEADER, DiscrepancyKind.SOURCE_UNREADABLE)
_SILENT = (DiscrepancyKind.AGENT_UNREACHABLE, DiscrepancyKind.AGENT_UNTRUSTED)
# What says a record is not what the authoritative records want: missing, or held differently.
_WRONG = (
    DiscrepancyKind.MISSING,
    DiscrepancyKind.ADDRESS_MISMATCH,
    DiscrepancyKind.CERTIFICATE_MISMATCH,
    DiscrepancyKind.NAME_MISMATCH,
)
INTERRUPTED = "interrupted before its commit point"


def silent_agents(diff: MembershipDiff) -> frozenset[str]:
    """The nodes whose agents did not answer the gather (or answered as someone the coordinator does not trust): what
    they hold is unknown, never absent, and no step can be sent to them."""
    return frozenset(d.node for d in diff.discrepancies if d.kind in _SILENT and d.node)


def commit_effect(record: OperationRecord, diff: MembershipDiff) -> Effect:
    """Whether the diff shows the effect of the record's commit step. A source nobody could read shows nothing: a
    member absent from a Raft configuration that is unknown has not been removed from it."""
    index = commit_index(record)
    action = None if index is None else record.steps[index].action
    target = "" if index is None else record.steps[index].target
    unknown = {d.source for d in diff.discrepancies if d.kind in _NOBODY_READ and not d.node}
    match action:
        case EnsureTruststoreRecord(name=name) | RemoveTruststoreRecord(name=name):
            if target in silent_agents(diff) or any(
                d.kind is DiscrepancyKind.SOURCE_UNREADABLE and d.source is Source.TRUSTSTORE and d.node == target
                for d in diff.discrepancies
            ):
                return Effect.UNKNOWN
            about = [d for d in diff.discrepancies if d.source is Source.TRUSTSTORE and d.node == target]
            if isinstance(action, EnsureTruststoreRecord):
                wrong = any(d.kind in _WRONG and _names(d, name) for d in about)
                return Effect.ABSENT if wrong else Effect.APPLIED
            held = any(d.kind is not DiscrepancyKind.MISSING and _names(d, name) for d in about)
            return Effect.ABSENT if held else Effect.APPLIED
        case EnsureMemberRow(name=name, address=address):
            if Source.MEMBERS_TABLE in unknown:
                return Effect.UNKNOWN
            wrong = any(
                d.kind in _WRONG and d.source is Source.MEMBERS_TABLE and _same(d.member, name, address)
                for d in diff.discrepancies
            )
            return Effect.ABSENT if wrong else Effect.APPLIED
        case RemoveRaftEntry(node_id=node_id, address=address):
            if Source.RAFT_CONFIG in unknown:
                return Effect.UNKNOWN
            gone = not any(m.node_id == node_id and m.address == address for m in diff.members)
        case RemoveMemberRow(name=name):
            if Source.MEMBERS_TABLE in unknown:
                return Effect.UNKNOWN
            gone = not any(m.name == name for m in diff.members)
        case IssueMicroclusterToken():
            # No source shows a token, and one whose caller never received it admits nobody it was meant for: as good
            # as not issued, and rolled back (revoked).
            return Effect.ABSENT
        case RemoveThroughMicrocluster(name=name, address=address, node_id=node_id):
            if unknown & {Source.MEMBERS_TABLE, Source.RAFT_CONFIG}:
                return Effect.UNKNOWN
            # microcluster deletes the row, then the Raft entry: a member missing either is past the point of return.
            # A member with no node ID was a row only.
            # The diff still names a member its truststores hold; a row that is gone is MISSING from the table.
            in_table = any(m.name == name for m in diff.members) and not any(
                d.kind is DiscrepancyKind.MISSING
                and d.source is Source.MEMBERS_TABLE
                and _same(d.member, name, address)
                for d in diff.discrepancies
            )
            in_raft = node_id == 0 or any(
                m.node_id == node_id and m.address == address and m.role is not None for m in diff.members
            )
            gone = not (in_table and in_raft)
        case JoinThroughMicrocluster(name=name, address=address):
            if unknown & {Source.MEMBERS_TABLE, Source.RAFT_CONFIG}:
                return Effect.UNKNOWN
            joined = [m for m in diff.members if m.name == name or m.address == address]
            if not joined:
                return Effect.ABSENT
            if any(m.role not in (None, Role.PENDING) for m in joined):
                return Effect.APPLIED
            # A PENDING row: microcluster is still joining it, or its join died half-way. The sources will tell.
            return Effect.UNKNOWN
        case EnsureRaftEntry(node_id=node_id, address=address):
            if Source.RAFT_CONFIG in unknown:
                return Effect.UNKNOWN
            gone = not any(m.node_id == node_id and m.address == address and m.role is not None for m in diff.members)
            return Effect.ABSENT if gone else Effect.APPLIED
        case _:
            return Effect.UNKNOWN
    return Effect.APPLIED if gone else Effect.ABSENT


def _names(d: Discrepancy, name: str) -> bool:
    return d.member is not None and d.member.name == name


def _same(member: Member | None, name: str, address: str) -> bool:
    # A Raft member without a row may be known by its address only.
    return member is not None and (member.name == name or (not member.name and member.address == address))


def decide(
    record: OperationRecord,
    *,
    commit: Effect,
    silent: Collection[str],
    nodes: Sequence[str],
    cause: str = INTERRUPTED,
) -> Decision:
    """The decision for an unfinished operation that nothing is running.

    commit is what the sources say of its commit step (commit_effect); silent names the nodes whose agents did not
    answer just now (a joiner whose agent did not answer its probe among them); nodes are the cluster's nodes, for
    a member through which to undo the cluster-wide steps; cause is why it stopped, for a rollback's error."""
    if record.state.finished:
        raise ValueError(f"operation {record.id} is finished: there is nothing to decide")
    if record.state is OperationState.QUEUED:
        return Back("the coordinator stopped before it ran", fence=False, undo=())
    confirm = None
    if not committed(record):
        index = commit_index(record)
        if index is not None and record.steps[index].state is StepState.SENT:
            harmless = record.kind is OperationKind.REPAIR and not _takes_away(record.steps[index].action)
            if commit is Effect.UNKNOWN and not harmless:
                return Wait(
                    f"cannot tell whether '{record.steps[index].name}' took effect: no node could read its source",
                    "wait until a node reads the Raft configuration and the members table again",
                )
            if commit is Effect.APPLIED:
                confirm = index
        if confirm is None:
            return _back(record, silent=silent, nodes=nodes, cause=cause)
    # Deferred steps wait for their silent nodes by design: they never hold the operation back.
    remaining = [
        i
        for i, step in enumerate(record.steps)
        if step.state is not StepState.DONE and not step.deferred and i != confirm
    ]
    # Forward only when every node the remaining steps need answers: a run that stops half-way helps nobody.
    blocked = next((i for i in remaining if record.steps[i].target in silent), None)
    if blocked is not None:
        step = record.steps[blocked]
        return Wait(
            f"'{step.name}' needs {step.target}, whose agent does not answer",
            f"finish it when {step.target} answers: {', '.join(record.steps[i].name for i in remaining)}",
        )
    return Forward(confirm)


def _back(record: OperationRecord, *, silent: Collection[str], nodes: Sequence[str], cause: str) -> Decision:
    joiner = record.member.name if record.kind is OperationKind.JOIN else ""
    gone = bool(joiner) and joiner in silent
    relay = next((node for node in sorted(nodes) if node not in silent and node != joiner), None)
    steps: list[Undo] = []
    for index in undo_order(record):
        step = record.steps[index]
        # A repair's rollback sends nothing: see the module docstring.
        action = undo(step.action) if step.action is not None and record.kind is not OperationKind.REPAIR else None
        target = step.target
        if action is not None and target != COORDINATOR and target in silent:
            if target == joiner and not _cluster_wide(action):
                steps.append(Undo(index, target, None, skipped=True))
                continue
            if not _cluster_wide(action) or relay is None:
                return Wait(
                    cause,
                    f"rolling back: undoing '{step.name}' needs {target}, whose agent does not answer; the rollback"
                    f" goes on when {target} answers",
                )
            target = relay  # the members table and the Raft configuration can be reached through any member
        steps.append(Undo(index, target, action))
    if gone:
        # Trust first: revoking the joiner's certificate on every member is what keeps it from adding itself later.
        steps.sort(key=lambda u: not _revokes(u, joiner))
    return Back(cause, fence=bool(joiner) and not gone, undo=tuple(steps), unreset=joiner if gone else "")


def _takes_away(action: Action | None) -> bool:
    """Whether a repair step, applied alone, may take from a Raft member what it needs: a truststore record (a
    repair removes a live member's misnamed copies before it writes the record) or its Raft entry."""
    return isinstance(action, RemoveTruststoreRecord | RemoveRaftEntry)


def _cluster_wide(action: Action) -> bool:
    return isinstance(action, RemoveMemberRow | RemoveRaftEntry | EnsureMemberRow | EnsureRaftEntry)


def _revokes(step: Undo, joiner: str) -> bool:
    return isinstance(step.action, RemoveTruststoreRecord) and step.action.name == joiner and step.target != joiner


def abandon_violations(
    record: OperationRecord, diff: MembershipDiff, *, force: bool, acknowledged: Collection[str]
) -> list[Violation]:
    """Why an operator may not end the operation now (empty: it may). Only a parked operation can be abandoned: a
    running one is someone's to finish. One that may be past its commit point (its commit step done or sent) leaves
    a member half-in whatever happens next, so it is abandoned only by force, with every discrepancy about its member
    that is not INFO acknowledged: the operator has seen what is left and takes it on."""
    if record.state is not OperationState.PARKED:
        return [Violation("NOT_PARKED", record.id, f"operation {record.id} is {record.state.name}, not PARKED")]
    index = commit_index(record)
    reached = index is not None and record.steps[index].state.maybe_applied
    if not reached:
        return []
    if not force:
        return [
            Violation(
                "PAST_COMMIT_POINT",
                record.id,
                "it may be past its commit point: let it finish, or abandon it with force and the discrepancies about"
                f" {record.member.name or record.member.address} acknowledged",
            )
        ]
    return [
        Violation(d.kind.name, d.id, d.summary)
        for d in diff.discrepancies
        if d.severity >= Severity.WARNING and is_about(d, record.member) and d.id not in acknowledged
    ]
