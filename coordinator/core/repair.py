"""Repair plans: the discrepancies of a diff turned into actions that clear them, each either safe by construction or
marked as a human's decision (docs/design.md, "Safety rules for repairs and removals").

An action is one repair of one member: a few of plan.py's steps, each applied by one node's agent (or by the
coordinator itself), with the source it touches and the evidence for what it writes or deletes. The rules:

- The leader's Raft configuration decides who is a member; the members table decides who that member is (name,
  address, certificate). Nothing is ever added to the Raft configuration.
- A truststore record that is missing, or differs from the members table, is rewritten from the table. A Raft member
  without a row gets its row back from its own agent: the node whose info.yaml holds the Raft entry, serving the
  certificate the row is given. Every truststore that lacks that member then learns it from the same report.
- What neither record makes a member (a truststore record of nobody, a row Raft does not hold, a node that still
  believes it is a member) is removed, everywhere it is held, only when no operation is in flight for it and it has
  been so for longer than the grace period. How long is proven by the last change of the members table and the Raft
  configuration (their changed_at: since then they have lacked it), or by when the coordinator first saw the
  discrepancy, whichever proves more; when neither is known it is not eligible, and the plan says so.
- A Raft member that no row names and no agent speaks for may be gone, or may be an agent that did not answer: its
  removal waits for a human to confirm it, and like every change that commits, for the quorum rule (quorum.py).
- A lagging view, a role, an unreadable source, an agent that did not answer or whose certificate is disputed is
  waited for or left to a human: nothing is planned from what is unknown, and nothing authoritative is edited to
  match a view. Without a leader nothing is planned at all.
- Nothing is planned on a node an unfinished operation is about, not even a step for another member.
- A step that would overwrite or delete a truststore file holding some other record is not planned, unless an action
  before it moves that record out of the way; otherwise a human moves the file.
- On the microcluster backend a repair goes through microcluster where it has a flow: its leader's heartbeat rewrites
  every truststore from the members table, so no truststore record is written or deleted (a write would race that
  rewrite: the plan says to wait for it); an orphan row goes through microcluster's own removal, forced, as
  `microctl cluster remove NAME --force --address ADDRESS` makes it. What it has no flow for is written through
  dqlite, as on the dqlite backend: a live Raft member's row (through another member, whose daemon's schema
  versions it takes) and a ghost Raft member's entry. A node that neither record knows, microcluster can neither
  remove nor reset: a human resets it.

Actions are planned in rounds, each in this order: rows restored, truststore records rewritten, removals, and
removals from the Raft configuration; a round plans what the ones before it made possible (a file moved out of the
way). Each action is planned against what those before it leave: the quorum (a removal from Raft counts for the next
one) and every truststore. An action's id is a digest of what it clears and what it does, so the same diff plans the
same ids and a caller can confirm an action by id.

Repairs only roll forward (every step is idempotent, and none of them undoes another), so no step is marked as a
commit point: whoever journals the plan decides how it is recovered.

Pure: no I/O and no clock; time comes from the caller.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from functools import cached_property
from types import MappingProxyType

from coordinator.core.diff import discrepancy_id
from coordinator.core.inflight import is_about
from coordinator.core.model import (
    ClusterView,
    Discrepancy,
    DiscrepancyKind,
    Evidence,
    Member,
    MemberRecord,
    MembershipDiff,
    NodeView,
    RemedySafety,
    Source,
)
from coordinator.core.operation import OperationRecord
from coordinator.core.plan import (
    COORDINATOR,
    Action,
    CannotPlan,
    EnsureMemberRow,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    PlannedStep,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveThroughMicrocluster,
    RemoveTruststoreRecord,
    plan_removal,
)
from coordinator.core.quorum import QuorumInput, RaftKey, check_add, check_remove, raft_key, raft_members

# Action ids are compared across coordinators and releases: change the encoding only together with its version.
_ID_VERSION = "memberguard-repair-action-v1"

_SAFE = RemedySafety.SAFE
_CONFIRM = RemedySafety.NEEDS_CONFIRMATION
_K = DiscrepancyKind
_NOTHING: Mapping[str, str] = MappingProxyType({})
_NEVER_SEEN: Mapping[str, float] = MappingProxyType({})


# --- the plan -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepairStep:
    """One step of an action: who applies what (plan.py's step), the source it writes or deletes in, and the evidence.

    evidence is, for a write, the record it copies, where that was read; for a deletion, what is deleted, where it is
    held. source and evidence are None for the coordinator's own step (its registry and tokens).
    """

    planned: PlannedStep
    source: Source | None
    evidence: Evidence | None


@dataclass(frozen=True)
class RepairAction:
    id: str
    clears: tuple[str, ...]  # the discrepancy ids it clears
    member: Member  # whom it repairs
    safety: RemedySafety  # SAFE, or NEEDS_CONFIRMATION: applied only when the caller confirms its id
    reason: str  # why it is safe, or what a human must decide
    steps: tuple[RepairStep, ...]
    remainder: str = ""  # what it leaves (truststores not read or left to an operation), in a sentence; "" if none


@dataclass(frozen=True)
class Unplanned:
    """A discrepancy no action clears, and why. eligible_at is when an orphan in its grace period may be removed."""

    discrepancy: str
    reason: str
    eligible_at: float | None = None


@dataclass(frozen=True)
class RepairPlan:
    fingerprint: str  # the diff's: the plan holds only while the diff does
    actions: tuple[RepairAction, ...]
    unplanned: tuple[Unplanned, ...]  # in diff order

    def chosen(self, confirmed: Collection[str] = ()) -> tuple[RepairAction, ...]:
        """What an apply runs, in plan order: every SAFE action, and those the caller confirmed by id."""
        unknown = set(confirmed) - {action.id for action in self.actions}
        if unknown:
            raise UnknownActions(unknown, "actions of this plan")
        return tuple(action for action in self.actions if action.safety is _SAFE or action.id in confirmed)


class UnknownIds(Exception):
    """The caller named ids that are not there; nothing was planned or applied."""

    def __init__(self, ids: Iterable[str], where: str) -> None:
        self.ids = tuple(sorted(ids))
        super().__init__(f"not {where}: {', '.join(self.ids)}")


class UnknownDiscrepancies(UnknownIds):
    """Discrepancy ids asked for that the diff does not hold (the facts they named may have been cleared since)."""


class UnknownActions(UnknownIds):
    """Action ids confirmed that the plan does not hold."""


def plan_repair(
    view: ClusterView,
    diff: MembershipDiff,
    *,
    in_flight: Iterable[OperationRecord] = (),
    now: float,
    grace: float,
    only: Collection[str] = (),
    certificates: Mapping[str, str] = _NOTHING,
    seen_since: Mapping[str, float] = _NEVER_SEEN,
) -> RepairPlan:
    """The actions that clear diff's discrepancies (those in `only`, when given), and why the others stay.

    view is what diff was computed from. in_flight are the journal's operations: every one not finished (a parked one
    too, which the reconciler takes up again) keeps the repair away from its member. certificates maps certificate
    fingerprints to PEMs the coordinator holds itself (its registry pins the certificates agents serve); a PEM in the
    view's records serves as well. seen_since maps discrepancy ids to when the coordinator first saw them, in every
    check since. grace is in seconds, now in seconds since the epoch.

    An action clears every discrepancy about the record it repairs; it is planned when any of them is asked for.
    """
    asked = frozenset(only)
    unknown = asked - {d.id for d in diff.discrepancies}
    if unknown:
        raise UnknownDiscrepancies(unknown, "in the diff")
    answered = {o.node: o.view for o in sorted(view.nodes, key=lambda o: o.node) if o.view is not None}
    facts = _Facts(diff, MappingProxyType(answered), certificates)
    planner = _Planner(
        facts,
        tuple(operation for operation in in_flight if not operation.state.finished),
        _Quorum(list(raft_members(diff)), QuorumInput.from_diff(diff).reachable),
        now,
        grace,
        seen_since,
    )
    groups: dict[_Key, list[Discrepancy]] = {}
    refusals: dict[str, _Refusal] = {}
    for discrepancy in diff.discrepancies:
        placed = _place(discrepancy, facts)
        if isinstance(placed, _Refusal):
            refusals[discrepancy.id] = placed
        else:
            groups.setdefault(placed, []).append(discrepancy)
    # In rounds: a repair may need a file that another one, later in the order, moves out of its way.
    pending = [key for key in sorted(groups) if not asked or not asked.isdisjoint(d.id for d in groups[key])]
    actions: list[RepairAction] = []
    planned = True
    while pending and planned:
        planned = False
        for key in list(pending):
            outcome = planner.outcome(key, groups[key])
            if isinstance(outcome, _Refusal):
                refusals.update((d.id, outcome) for d in groups[key])
                continue
            actions.append(outcome)
            pending.remove(key)
            planned = True
            for d in groups[key]:
                refusals.pop(d.id, None)
    unplanned = tuple(
        Unplanned(d.id, refusal.reason, refusal.eligible_at)
        for d in diff.discrepancies
        if (refusal := refusals.get(d.id)) is not None and (not asked or d.id in asked)
    )
    return RepairPlan(diff.fingerprint, tuple(actions), unplanned)


# --- which repair a discrepancy belongs to ------------------------------------------------------------------------


class _Repair(IntEnum):
    """The kinds of repair, in the order each round plans them."""

    RESTORE_ROW = 1  # a live Raft member's row, from its own agent (and the truststores that lack it)
    TRUST = 2  # one truststore's record of one member, from the members table
    REMOVE = 3  # what no record makes a member: its row, records, engine files and tokens
    REMOVE_FROM_RAFT = 4  # a Raft member no row names and no agent speaks for: last, each checked for quorum


@dataclass(frozen=True, order=True)
class _Key:
    """One repair: its kind, the node whose truststore it repairs ("" for a member's repair everywhere), and whom."""

    repair: _Repair
    node: str
    subject: str


@dataclass(frozen=True)
class _Refusal:
    reason: str
    eligible_at: float | None = None


_NO_LEADER = _Refusal(
    "No node could read the Raft configuration from a leader, and the leader's configuration decides who is a "
    "member: nothing is planned until enough voters are back to elect one."
)

# Kinds that no repair clears: what they report is waited for, or only a human can decide it.
_LEFT: dict[DiscrepancyKind, Callable[[Discrepancy], str]] = {
    _K.VIEW_DIFFERS: lambda d: (
        f"{d.node}'s view lags the authoritative record: it is waited for (a node's Raft views catch up with the "
        f"leader, a stale read of the table with the next gather; restart {d.node}'s engine if it stays behind), "
        "never fixed by editing the authoritative record to match it."
    ),
    _K.ROLE_DIFFERS: lambda d: "Roles are the role adjuster's to move and the heartbeat's to record: it is waited for.",
    _K.SOURCE_UNREADABLE: lambda d: (
        f"What {d.node or 'every node'}'s source holds is unknown, and nothing is planned from what is unknown: make "
        "it readable, then check again."
    ),
    _K.AGENT_UNREACHABLE: lambda d: (
        f"{d.node} is unknown, not absent: nothing is planned from its agent or on its node until it answers."
    ),
    _K.UNWATCHED_MEMBER: lambda d: (
        f"{d.node} joined without memberguard: a human adopts it (`memberguard adopt` on its node, and its agent"
        " started); nothing is planned on a node whose sources nobody reads."
    ),
    _K.AGENT_UNTRUSTED: lambda d: (
        f"A human must check which certificate {d.node}'s agent serves, and pin it only if it is {d.node}'s member "
        "certificate: nothing is planned from an agent the coordinator does not trust."
    ),
    _K.AGENT_CERTIFICATE_MISMATCH: lambda d: (
        f"Whether {d.node} is the certificate its row records or the one its agent serves is a human's decision: "
        "the members table is never rewritten from a disputed agent."
    ),
    _K.DUPLICATE_ADDRESS: lambda d: (
        f"Which claim on {(d.member or Member()).address} is right is a human's decision: keep the one whose "
        "certificate the node serving there presents, and delete the others by name."
    ),
}

_NOT_A_RECORD = _Refusal(
    "No agent step rewrites an entry that is not a member record: a human repairs it or moves it out of the way."
)


def _place(d: Discrepancy, facts: _Facts) -> _Key | _Refusal:
    """The repair that clears d, or why there is none. On microcluster a truststore's record is the heartbeat's."""
    placed = _repair_of(d, facts)
    if isinstance(placed, _Key) and facts.on_microcluster and d.source is Source.TRUSTSTORE:
        return _left_to_the_heartbeat(d.node, facts)
    return placed


def _left_to_the_heartbeat(node: str, facts: _Facts) -> _Refusal:
    """Said as the diff says it (diff.py's heartbeat remedy), with why memberguard does not write it instead."""
    node_view = facts.views.get(node)
    interval = None if node_view is None else node_view.role_adjustment_interval
    every = "on every heartbeat" if interval is None else f"every {interval:g} s"
    return _Refusal(
        f"Wait for microcluster's heartbeat, which rewrites {node}'s truststore from the members table {every} when "
        f"the leader reaches {node}; check again after it. memberguard writes no truststore on microcluster: its write "
        f"would race that rewrite. A drift that outlasts the heartbeat means the leader does not reach {node}, or "
        f"{node} has no row."
    )


def _repair_of(d: Discrepancy, facts: _Facts) -> _Key | _Refusal:
    if facts.no_leader:
        return _NO_LEADER
    left = _LEFT.get(d.kind)
    if left is not None:
        return _Refusal(left(d))
    member = d.member or Member()
    if d.kind is _K.MISSING and d.source is Source.TRUSTSTORE:
        return _Key(_Repair.TRUST, d.node, member.name)
    if d.kind is _K.MISSING and d.source is Source.MEMBERS_TABLE:
        if facts.answers_for(member):
            return _Key(_Repair.RESTORE_ROW, "", member.name)
        return _Key(_Repair.REMOVE_FROM_RAFT, "", f"{member.address}/{member.node_id}")
    if d.kind in (_K.MISSING, _K.ORPHAN):  # a row that Raft does not hold; a truststore record of nobody
        return _Key(_Repair.REMOVE, "", member.name)
    if d.kind in (_K.ADDRESS_MISMATCH, _K.CERTIFICATE_MISMATCH, _K.NAME_MISMATCH) and member.name in facts.trusted:
        return _Key(_Repair.TRUST, d.node, member.name)
    if d.kind in (_K.ADDRESS_MISMATCH, _K.CERTIFICATE_MISMATCH):
        # The row of a member Raft does not hold: its records go with it, whatever they say.
        return _Key(_Repair.REMOVE, "", member.name)
    if d.kind is _K.NAME_MISMATCH:
        return _Refusal(
            f"{member.name} is not in the Raft configuration, so no record of it is restored; which name its "
            "certificate belongs under is a human's decision."
        )
    if d.kind is _K.NODE_INFO_MISMATCH:
        if d.node in facts.raft_names:
            return _Refusal(
                f"{d.node} is in the Raft configuration, but its info.yaml disagrees with its entry or row: a human "
                "decides which is right; resetting a member would take it out."
            )
        return _Key(_Repair.REMOVE, "", d.node)
    if d.kind is _K.INVALID_ENTRY:
        return _place_entry(d, facts)
    # A kind from a newer peer: what it reports is not understood, so nothing is done about it.
    return _Refusal("This coordinator has no repair for this kind of discrepancy.")


def _place_entry(d: Discrepancy, facts: _Facts) -> _Key | _Refusal:
    """A truststore file whose name is not that of the record inside (microcluster trusts by the record's name, so
    it still trusts someone) is cleared by the repair of that record; no other invalid entry has a repair."""
    record = facts.misnamed_record(d)
    if record is None:
        return _NOT_A_RECORD
    if record.name in facts.trusted:
        return _Key(_Repair.TRUST, d.node, record.name)
    owner = facts.owner(record.certificate_fingerprint)
    if record.name not in facts.member_names and owner is not None:
        return _Key(_Repair.TRUST, d.node, owner.name)
    if (d.node, record.name) in facts.orphans:
        return _Key(_Repair.REMOVE, "", record.name)
    return _NOT_A_RECORD


# --- what the plan is made from -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """The diff, the views of the nodes whose agents answered (by name, in name order), and known certificates."""

    diff: MembershipDiff
    views: Mapping[str, NodeView]
    certificates: Mapping[str, str]

    @cached_property
    def on_microcluster(self) -> bool:
        return self.diff.backend == "microcluster"

    @cached_property
    def no_leader(self) -> bool:
        return any(d.kind is _K.NO_LEADER for d in self.diff.discrepancies)

    @cached_property
    def trusted(self) -> dict[str, list[Member]]:
        """Raft members with a row, by name: whom the truststores must hold. (Two under one name is a conflict.)"""
        rowless = {
            raft_key(d.member)
            for d in self.diff.discrepancies
            if d.kind is _K.MISSING and d.source is Source.MEMBERS_TABLE and d.member is not None
        }
        found: dict[str, list[Member]] = {}
        for member in raft_members(self.diff):
            if member.name and raft_key(member) not in rowless:
                found.setdefault(member.name, []).append(member)
        return found

    @cached_property
    def disputed(self) -> frozenset[str]:
        """Members whose agent serves another certificate than their row records: which of the two is theirs is open."""
        return frozenset(d.node for d in self.diff.discrepancies if d.kind is _K.AGENT_CERTIFICATE_MISMATCH)

    @cached_property
    def raft_names(self) -> frozenset[str]:
        return frozenset(member.name for member in raft_members(self.diff) if member.name)

    @cached_property
    def member_names(self) -> frozenset[str]:
        return frozenset(member.name for member in self.diff.members if member.name)

    @cached_property
    def orphans(self) -> frozenset[tuple[str, str]]:
        """(node, name) of every orphan truststore record."""
        return frozenset(
            (d.node, d.member.name) for d in self.diff.discrepancies if d.kind is _K.ORPHAN and d.member is not None
        )

    @cached_property
    def duplicated(self) -> frozenset[str]:
        """Addresses two rows or two Raft entries claim: which record there is right is open."""
        return frozenset(
            d.member.address for d in self.diff.discrepancies if d.kind is _K.DUPLICATE_ADDRESS and d.member is not None
        )

    @cached_property
    def authoritative_since(self) -> float | None:
        """Since when the members table and the Raft configuration have been as they are now: the latest change of
        any reading of them; None when a reading cannot tell."""
        changes = [
            report.changed_at
            for node_view in self.views.values()
            for source in (Source.MEMBERS_TABLE, Source.RAFT_CONFIG)
            if (report := node_view.report(source)) is not None and not report.error
        ]
        if not changes or None in changes:
            return None
        return max(change for change in changes if change is not None)

    @cached_property
    def _pems(self) -> dict[str, str]:
        pems = dict(self.certificates)
        for node_view in self.views.values():
            for report in node_view.sources:
                pems.update((r.certificate_fingerprint, r.certificate_pem) for r in report.records if r.certificate_pem)
        return pems

    def pem(self, fingerprint: str) -> str:
        return self._pems.get(fingerprint, "")

    def records(self, node: str, source: Source) -> tuple[MemberRecord, ...] | None:
        """What the source holds on node; None when its agent did not answer or the source could not be read."""
        node_view = self.views.get(node)
        report = None if node_view is None else node_view.report(source)
        return None if report is None or report.error else report.records

    def read(self, source: Source, wanted: Callable[[MemberRecord], bool]) -> Evidence | None:
        """The wanted records of a cluster-wide source, as the first node (in name order) that holds any read them."""
        for node in self.views:
            held = tuple(record for record in self.records(node, source) or () if wanted(record))
            if held:
                return Evidence(source, node, held)
        return None

    def answers_for(self, member: Member) -> bool:
        """Whether the Raft member's own agent answered: the diff named the member after a node whose info.yaml holds
        the member's Raft entry."""
        info = self.records(member.name, Source.NODE_INFO) or ()
        return bool(member.name) and any(_same_entry(record, member) for record in info)

    def owner(self, fingerprint: str) -> Member | None:
        """The one Raft member with a row that the certificate belongs to."""
        owners = [m for members in self.trusted.values() for m in members if m.certificate_fingerprint == fingerprint]
        return owners[0] if len(owners) == 1 else None

    def misnamed_record(self, d: Discrepancy) -> MemberRecord | None:
        """The truststore record held in the file an INVALID_ENTRY discrepancy is about, if the file holds one."""
        for record in self.records(d.node, Source.TRUSTSTORE) or ():
            if discrepancy_id(_K.INVALID_ENTRY, None, Source.TRUSTSTORE, d.node, entry=record.entry) == d.id:
                return record
        return None


def _same_entry(record: MemberRecord, member: Member) -> bool:
    # Node ID 0 means the record carries none.
    return record.address == member.address and (
        record.node_id == member.node_id or 0 in (record.node_id, member.node_id)
    )


@dataclass
class _Quorum:
    """The Raft configuration as the plan's removals so far leave it, and the members whose engines answered."""

    members: list[Member]
    reachable: frozenset[RaftKey]

    def admit(self, member: Member, steps: Iterable[RepairStep]) -> _Refusal | None:
        """Why the action's commit could not be made, or None (then a removal from Raft counts for the next)."""
        actions = [step.planned.action for step in steps]
        if any(isinstance(action, RemoveRaftEntry) for action in actions):
            violations = check_remove(self.members, member, self.reachable)
            if not violations:
                self.members = [m for m in self.members if raft_key(m) != raft_key(member)]
            return _Refusal(" ".join(v.description for v in violations)) if violations else None
        if any(isinstance(action, RemoveMemberRow | RemoveThroughMicrocluster) for action in actions):
            # The row is in no Raft entry: removing it changes no vote, but the table is replicated.
            violations = check_remove(self.members, Member(name=member.name), self.reachable)
            return _Refusal(" ".join(v.description for v in violations)) if violations else None
        refused = check_add(self.members, self.reachable)
        if refused and any(isinstance(action, EnsureMemberRow) for action in actions):
            v = refused[0]
            return _Refusal(
                f"Restoring {member.name}'s row is a commit to the replicated members table, and only {v.reachable} "
                f"of the {v.voters_after} voters answered, fewer than the {v.needed} a commit needs."
            )
        return None


# --- planning one repair ------------------------------------------------------------------------------------------


@dataclass
class _Planner:
    facts: _Facts
    operations: tuple[OperationRecord, ...]  # not finished
    quorum: _Quorum
    now: float
    grace: float
    seen_since: Mapping[str, float]
    # Each answering node's truststore as the actions planned so far leave it (None: it could not be read).
    truststores: dict[str, tuple[MemberRecord, ...] | None] = field(init=False)

    def __post_init__(self) -> None:
        self.truststores = {node: self.facts.records(node, Source.TRUSTSTORE) for node in self.facts.views}

    @cached_property
    def busy(self) -> frozenset[str]:
        """Answering nodes an unfinished operation is about: the repair does nothing on them, not even a step for
        another member (a joiner or a node being removed may be fenced or reset under it)."""
        return frozenset(op.member.name for op in self.operations) & self.facts.views.keys()

    @cached_property
    def workable(self) -> tuple[str, ...]:
        """The nodes the plan's steps may go to, in name order."""
        return tuple(node for node in self.facts.views if node not in self.busy)

    def outcome(self, key: _Key, group: list[Discrepancy]) -> RepairAction | _Refusal:
        # Whom the repair is for: a Raft member as the diff has it, anyone else by the name its records go by.
        whom = key.repair in (_Repair.RESTORE_ROW, _Repair.REMOVE_FROM_RAFT)
        subject = (group[0].member or Member()) if whom else Member(name=key.subject)
        refusal = self._held_back(group, subject)
        if refusal is not None:
            return refusal
        if key.repair is _Repair.RESTORE_ROW:
            built = self._restore_row(subject)
        elif key.repair is _Repair.TRUST:
            built = self._trust(key.node, subject.name)
        else:
            built = self._removal(subject, group, from_raft=key.repair is _Repair.REMOVE_FROM_RAFT)
        if isinstance(built, _Refusal):
            return built
        member, safety, reason, steps, remainder = built
        refusal = self.quorum.admit(member, steps)
        if refusal is not None:
            return refusal
        self._leave(steps)
        clears = tuple(sorted(d.id for d in group))
        return RepairAction(_action_id(clears, steps), clears, member, safety, reason, steps, remainder)

    def _leave(self, steps: Iterable[RepairStep]) -> None:
        """Count the truststore steps of a planned action in: a write replaces `<name>.yaml`, a removal deletes it
        and every file holding the name (coordinator/agent/steps.py)."""
        for step in steps:
            node, action = step.planned.target, step.planned.action
            records = self.truststores.get(node)
            if records is None or step.source is not Source.TRUSTSTORE:
                continue
            if isinstance(action, EnsureTruststoreRecord) and step.evidence is not None:
                file = f"{action.name}.yaml"
                fingerprint = step.evidence.records[0].certificate_fingerprint
                written = MemberRecord(name=action.name, address=action.address, certificate_fingerprint=fingerprint)
                records = (*(r for r in records if r.entry != file), replace(written, entry=file))
            elif isinstance(action, RemoveTruststoreRecord):
                records = tuple(r for r in records if r.name != action.name and r.entry != f"{action.name}.yaml")
            self.truststores[node] = records

    def _held_back(self, group: list[Discrepancy], subject: Member) -> _Refusal | None:
        """Why nothing may be done about these discrepancies now, whatever the repair: an operation in flight for
        their member (or their node), or an address whose right claim is open."""
        for operation in self.operations:
            about = _same(subject, operation.member) or any(is_about(d, operation.member) for d in group)
            if about or any(d.explained_by == operation.id for d in group):
                return _Refusal(
                    f"Operation {operation.id} ({operation.kind.name.lower()}, {operation.state.name.lower()}) is "
                    f"about {_label(operation.member)}: it changes these records itself, so the repair leaves them to "
                    "it."
                )
        disputed = sorted({d.member.address for d in group if d.member is not None} & self.facts.duplicated)
        if disputed:
            return _Refusal(f"Which record of {', '.join(disputed)} is right is open (a duplicate address) first.")
        return None

    def _restore_row(self, member: Member) -> _Built | _Refusal:
        """A live Raft member's row, from its own agent's report; then every truststore that lacks it learns it."""
        node = member.name
        node_view = self.facts.views[node]
        fingerprint = node_view.certificate_fingerprint
        claims = self.facts.read(
            Source.MEMBERS_TABLE,
            lambda r: r.name == node or r.certificate_fingerprint == fingerprint or r.address == member.address,
        )
        if claims is not None:
            return _Refusal(
                f"{node}'s own agent reports it as node {member.node_id} at {member.address}, but the members table "
                f"already has a row with its name, certificate or address ({_names(claims.records)}): which is right "
                "is a human's decision."
            )
        pem = self.facts.pem(fingerprint)
        if not pem:
            return _Refusal(_no_certificate(node, fingerprint))
        # On microcluster through a member with a row: the row takes the schema versions of the daemon that writes it.
        via = next(
            (
                n
                for n in self.workable
                if (table := self.facts.records(n, Source.MEMBERS_TABLE)) is not None
                and (not self.facts.on_microcluster or any(r.name == n for r in table))
            ),
            None,
        )
        if via is None or member.role is None:
            through = " through a member with a row of its own" if self.facts.on_microcluster else ""
            return _Refusal(f"No agent that answered could read the members table to restore {node}'s row{through}.")
        # What the agent says about itself: its name, the Raft entry its info.yaml holds, the certificate it serves.
        itself = MemberRecord(name=node, address=member.address, certificate_fingerprint=fingerprint)
        report = Evidence(
            Source.AGENT,
            node,
            (replace(itself, node_id=member.node_id),),
            f"its info.yaml holds node {member.node_id} at {member.address}; it serves certificate {fingerprint}",
        )
        row = EnsureMemberRow(node, member.address, pem, member.role.text)
        steps = [RepairStep(PlannedStep(f"restore {node}'s members-table row", via, row), Source.MEMBERS_TABLE, report)]
        restored = (
            f"{node} is node {member.node_id} at {member.address} in the leader's Raft configuration, and its own "
            "agent, serving the certificate the coordinator checked, holds that entry in its info.yaml: its row is "
            f"restored from that report, as a {member.role.text}"
        )
        if self.facts.on_microcluster:
            # microcluster writes rows only in its join, which a Raft member cannot go through again: the row is
            # written through dqlite, and the heartbeat then puts the member back into every truststore.
            reason = (
                f"{restored}, through dqlite (microcluster has no flow that restores a row); microcluster's heartbeat "
                "then writes it into every truststore the leader reaches."
            )
            return member, _SAFE, reason, tuple(steps), ""
        want = replace(itself, certificate_pem=pem)
        unread = sorted(self.busy)
        for holder in self.workable:
            records = self.truststores[holder]
            if records is None:
                unread.append(holder)
                continue
            trust = _trust_steps(holder, records, want, report, self.facts)
            if isinstance(trust, _Refusal):
                return trust
            steps += trust
        remainder = _unreached(self.facts, unread, f"may lack {node}")
        reason = f"{restored}, and every truststore that lacks it learns it."
        return member, _SAFE, reason, tuple(steps), remainder

    def _trust(self, node: str, name: str) -> _Built | _Refusal:
        """One truststore's record of one Raft member, made what the members table says."""
        if name in self.facts.disputed:
            # Writing the row's certificate would settle the dispute for the table, and distrust the live member
            # everywhere if its agent serves the right one.
            return _Refusal(
                f"{name}'s agent serves another certificate than its members-table row records: which one is {name}'s "
                "is a human's decision, and no truststore is rewritten to either until it is made."
            )
        candidates = self.facts.trusted.get(name, [])
        if len(candidates) != 1:
            return _Refusal(
                f"{len(candidates)} Raft members with a row go by {name}: whose name it is is a human's decision."
            )
        member = candidates[0]
        row = self.facts.read(Source.MEMBERS_TABLE, lambda r: _identity(r) == _identity(member))
        records = self.truststores.get(node)
        if row is None or records is None:
            return _Refusal(f"{name}'s members-table row or {node}'s truststore could not be read.")
        pem = row.records[0].certificate_pem or self.facts.pem(member.certificate_fingerprint)
        if not pem:
            return _Refusal(_no_certificate(name, member.certificate_fingerprint))
        want = replace(row.records[0], certificate_pem=pem)
        steps = _trust_steps(node, records, want, row, self.facts)
        if isinstance(steps, _Refusal):
            return steps
        reason = (
            f"{name} is in the leader's Raft configuration and its members-table row says who it is: {node}'s "
            f"truststore is made to hold exactly that record, under {name}'s own name and file, and no other."
        )
        return member, _SAFE, reason, steps, ""

    def _removal(self, member: Member, group: list[Discrepancy], *, from_raft: bool) -> _Built | _Refusal:
        """Everything held of what no record makes a member; of a Raft member no row or agent vouches for, on a
        human's word."""
        label = _label(member)
        if from_raft:
            others = [m for m in self.facts.diff.members if m.name == member.name and raft_key(m) != raft_key(member)]
            if member.name and others:
                return _Refusal(f"Another member goes by {label} too: which records are whose is a human's decision.")
        elif member.name in self.facts.raft_names:
            return _Refusal(f"A Raft member goes by {label} too: which records are whose is a human's decision.")
        since = self._orphaned_since(group)
        if since is None:
            return _Refusal(
                f"How long the records have held {label} as they do is unknown (the members table and the Raft "
                "configuration cannot tell when they last changed, and the coordinator has not seen it before): a "
                "human decides, or a later check proves it."
            )
        eligible_at = since + self.grace
        if eligible_at > self.now:
            return _Refusal(
                f"The records have held {label} as they do for {self.now - since:.0f}s, less than the grace period of "
                f"{self.grace:.0f}s: a join or a removal in its last steps looks the same. It becomes eligible at "
                f"{eligible_at:.0f}.",
                eligible_at,
            )
        held = f"no operation is in flight for it, and it has been so for {self.now - since:.0f}s, longer than the "
        held += f"grace period of {self.grace:.0f}s"
        if self.facts.on_microcluster:
            return self._microcluster_removal(member, held, from_raft=from_raft)
        try:
            plan = plan_removal(self.facts.diff, member, reachable=self.workable)
        except CannotPlan as exc:
            return _Refusal(f"No agent that answered can apply the removal: {exc}.")
        steps = self._removal_steps(plan.steps, member)
        if isinstance(steps, _Refusal):
            return steps
        unread = [*self.busy, *(n for n in self.workable if self.truststores[n] is None)]
        remainder = _unreached(self.facts, unread, f"may still hold {label}", leaving=member.name)
        if member.name and member.name not in self.workable:
            remainder = "; ".join(filter(None, (remainder, f"{label} was not fenced: reset it before it comes back")))
        if from_raft:
            return member, _CONFIRM, f"{self._gone(member, held)} Its Raft entry and records go.", steps, remainder
        reason = (
            f"{label} is not in the leader's Raft configuration, so no record makes it a member; {held}. What is held "
            f"of it goes (its row, truststore records and tokens), and {label} is fenced if its agent answers."
        )
        return member, _SAFE, reason, steps, remainder

    def _gone(self, member: Member, held: str) -> str:
        """What a human confirms before a Raft member that no row or agent vouches for is removed, and why."""
        silent = sorted(set(self.facts.diff.nodes) - set(self.facts.views))
        maybe = f" ({', '.join(silent)} did not answer, and may be it)" if silent else ""
        entry = f" (node {member.node_id} at {member.address})" if member.name else ""
        return (
            f"Confirm that {_label(member)}{entry} is gone or wiped: it is in the Raft configuration, but no row names "
            f"it and no agent answered for it{maybe}; {held}."
        )

    def _microcluster_removal(self, member: Member, held: str, *, from_raft: bool) -> _Built | _Refusal:
        """On microcluster: an orphan row goes through microcluster's own removal, forced, since its consistency check
        refuses any removal while the orphan is in the table; a ghost's Raft entry goes through dqlite, since
        microcluster removes only what a row or a truststore record names. The truststores follow the heartbeat."""
        label = _label(member)
        if from_raft:
            via = next((n for n in self.workable if n != member.name), None)
            if via is None:
                return _Refusal(f"No agent that answered, other than {label}'s, can apply the removal.")
            removal = RemoveRaftEntry(member.node_id, member.address, member.role)
            planned = [PlannedStep(f"remove {label} from the Raft configuration", via, removal)]
            if member.name:
                forget = ForgetMember(member.name)
                planned.append(PlannedStep(f"forget {member.name}'s certificate and tokens", COORDINATOR, forget))
            steps = self._removal_steps(planned, member)
            if isinstance(steps, _Refusal):
                return steps
            reason = (
                f"{self._gone(member, held)} Its Raft entry is removed through dqlite: microcluster removes a member "
                "by the row or truststore record that names it, running the product's removal hooks for it, and "
                "nothing names this one. The heartbeat drops any truststore record of it."
            )
            return member, _CONFIRM, reason, steps, ""
        rows = self.facts.read(Source.MEMBERS_TABLE, lambda r: r.name == member.name)
        if rows is None:
            return _Refusal(
                f"{label} is in neither the members table nor the Raft configuration: microcluster knows no member to "
                "remove, and its heartbeat does not reach it. A human resets it: stops its daemon and clears its state "
                "directory."
            )
        address = rows.records[0].address
        try:
            plan = plan_removal(self.facts.diff, replace(member, address=address), reachable=self.workable, force=True)
        except CannotPlan as exc:
            return _Refusal(f"No agent that answered can apply the removal: {exc}.")
        # Forced from the first request on, microcluster's removal leaves its forced repeat nothing to do.
        planned = [step for i, step in enumerate(plan.steps) if i == 0 or step.action != plan.steps[i - 1].action]
        steps = self._removal_steps(planned, member)
        if isinstance(steps, _Refusal):
            return steps
        reason = (
            f"{label} is not in the leader's Raft configuration, so no record makes it a member; {held}. microcluster "
            f"removes it, as `microctl cluster remove {member.name} --force --address {address}` does: it deletes the "
            f"row and its leader's truststore record, and resets {label} if its daemon answers; its heartbeat takes "
            f"{label} out of every other truststore. Forced, because microcluster's own consistency check refuses "
            "every removal while this row is in the table."
        )
        return member, _SAFE, reason, steps, plan.remainder

    def _orphaned_since(self, group: list[Discrepancy]) -> float | None:
        """The earliest time from which the group's facts have provably held, or None when nothing proves one."""
        proofs = [self.seen_since[d.id] for d in group if d.id in self.seen_since]
        if self.facts.authoritative_since is not None:
            proofs.append(self.facts.authoritative_since)
        return min(proofs, default=None)

    def _removal_steps(self, planned: Iterable[PlannedStep], member: Member) -> tuple[RepairStep, ...] | _Refusal:
        """A removal's steps with their evidence; a deletion of something no readable source holds is left out."""
        steps = []
        for step in planned:
            if step.deferred:
                continue  # a node that did not answer is unknown now: the remainder names it
            step = replace(step, commit_point=False)
            found = self._removed(step, member)
            if isinstance(found, _Refusal):
                return found
            if found is not None:
                steps.append(found)
        return tuple(steps)

    def _removed(self, step: PlannedStep, member: Member) -> RepairStep | _Refusal | None:
        """One removal step with what it deletes, or None when nothing that answered holds it."""
        target = step.target
        match step.action:
            case RemoveTruststoreRecord(name=name):
                records = self.truststores.get(target) or ()
                held = tuple(record for record in records if record.name == name)
                if not held:
                    return None
                stray = _bystanders(records, {name}, "")
                if stray:
                    return _moved_by_hand(target, stray)
                return RepairStep(step, Source.TRUSTSTORE, Evidence(Source.TRUSTSTORE, target, held))
            case RemoveMemberRow(name=name) | RemoveThroughMicrocluster(name=name):
                rows = self.facts.read(Source.MEMBERS_TABLE, lambda r: r.name == name)
                return None if rows is None else RepairStep(step, Source.MEMBERS_TABLE, rows)
            case RemoveRaftEntry():
                entry = self.facts.read(Source.RAFT_CONFIG, lambda r: (r.address, r.node_id) == raft_key(member))
                return None if entry is None else RepairStep(step, Source.RAFT_CONFIG, entry)
            case FenceNode():
                info = Evidence(Source.NODE_INFO, target, self.facts.records(target, Source.NODE_INFO) or ())
                return RepairStep(step, Source.NODE_INFO, info)
            case _:
                return RepairStep(step, None, None)  # the coordinator forgets the member's certificate and tokens


# (member, safety, reason, steps, remainder)
_Built = tuple[Member, RemedySafety, str, tuple[RepairStep, ...], str]


def _trust_steps(
    node: str, records: tuple[MemberRecord, ...], want: MemberRecord, source: Evidence, facts: _Facts
) -> tuple[RepairStep, ...] | _Refusal:
    """The steps that make one truststore hold `want` exactly, in `<name>.yaml`, and the certificate under no name
    that is nobody's; none when it does already.

    A copy of the record in a misnamed file is removed with `<name>.yaml` first, then the record is written: the agent
    removes a member's record with every misnamed copy, and writing `<name>.yaml` alone would leave the copy trusting.
    """
    file = f"{want.name}.yaml"
    named = [record for record in records if record.name == want.name]
    misfiled = [record for record in named if record.entry != file]
    right = any(
        (record.entry, record.address, record.certificate_fingerprint)
        == (file, want.address, want.certificate_fingerprint)
        for record in named
    )
    aliases = sorted(
        {
            record.name
            for record in records
            if record.certificate_fingerprint == want.certificate_fingerprint
            and record.name != want.name
            and record.name not in facts.member_names
        }
    )
    writes = bool(misfiled) or not right
    stray = _bystanders(records, {*([want.name] if misfiled else []), *aliases}, want.name if writes else "")
    if stray:
        return _moved_by_hand(node, stray)

    def step(description: str, action: Action, evidence: Evidence) -> RepairStep:
        return RepairStep(PlannedStep(description, node, action), Source.TRUSTSTORE, evidence)

    steps = []
    if misfiled:
        held = Evidence(Source.TRUSTSTORE, node, tuple(named))
        steps.append(
            step(
                f"remove {want.name}'s misnamed copies from {node}'s truststore",
                RemoveTruststoreRecord(want.name),
                held,
            )
        )
    if writes:
        record = EnsureTruststoreRecord(want.name, want.address, want.certificate_pem)
        steps.append(step(f"restore {want.name} in {node}'s truststore", record, source))
    for alias in aliases:
        copies = Evidence(Source.TRUSTSTORE, node, tuple(r for r in records if r.name == alias))
        removal = RemoveTruststoreRecord(alias)
        steps.append(
            step(f"remove {want.name}'s certificate under the name {alias} from {node}'s truststore", removal, copies)
        )
    return tuple(steps)


def _bystanders(records: Iterable[MemberRecord], removed: Collection[str], written: str) -> list[MemberRecord]:
    """The records of other names in the files that removing `removed` (each name's own file and every file holding
    it) and writing `written`'s file would delete or overwrite."""
    records = list(records)
    names = {*removed, written} - {""}
    files = {f"{name}.yaml" for name in names} | {record.entry for record in records if record.name in removed}
    return [record for record in records if record.entry in files and record.name not in names]


def _moved_by_hand(node: str, stray: list[MemberRecord]) -> _Refusal:
    entries = ", ".join(sorted({record.entry for record in stray}))
    return _Refusal(
        f"{entries} in {node}'s truststore also holds {_names(stray)}, which the repair would overwrite or delete: a "
        "human moves it first."
    )


# --- building blocks ----------------------------------------------------------------------------------------------


def _action_id(clears: tuple[str, ...], steps: Iterable[RepairStep]) -> str:
    """A digest of what the action clears and does. PEMs are left out: a certificate is named by its fingerprint, and
    the same certificate may be encoded in more than one way."""
    done = []
    for step in steps:
        arguments = {k: v for k, v in asdict(step.planned.action).items() if k != "certificate_pem"}
        done.append([step.planned.target, type(step.planned.action).__name__, arguments])
    encoded = json.dumps([_ID_VERSION, clears, done], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def _no_certificate(name: str, fingerprint: str) -> str:
    return (
        f"No copy of {name}'s certificate ({fingerprint}) was gathered or is pinned: gather with certificates, or pin "
        "it, and plan again."
    )


def _unreached(facts: _Facts, unread: Iterable[str], what: str, *, leaving: str = "") -> str:
    """What the plan leaves in the truststores it did not read, or left to an operation in flight."""
    silent = set(facts.diff.nodes) - set(facts.views)
    nodes = sorted((silent | set(unread)) - {leaving})
    return (
        f"the truststores of {', '.join(nodes)} (not read, or left to an operation in flight) {what}" if nodes else ""
    )


def _same(one: Member, other: Member) -> bool:
    """Whether two partial identities name one member: they share a name, an address or a dqlite node ID."""
    return (
        (bool(one.name) and one.name == other.name)
        or (bool(one.address) and one.address == other.address)
        or (bool(one.node_id) and one.node_id == other.node_id)
    )


def _identity(record: MemberRecord | Member) -> tuple[str, str, str]:
    return record.name, record.certificate_fingerprint, record.address


def _names(records: Iterable[MemberRecord]) -> str:
    return ", ".join(sorted({record.name or record.address for record in records}))


def _label(member: Member) -> str:
    return member.name or (f"node {member.node_id} at {member.address}" if member.node_id else member.address)
