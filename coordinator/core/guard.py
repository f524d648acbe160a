"""The guard: may this membership operation run against this diff? ("clear the diff before mutating")

`decide` takes the request, a fresh diff, the quorum input and the parked operations, and answers in this order
(docs/design.md, "The guard"):
0. a parked operation → Parked, whatever the diff says: a half-done change must be finished (or abandoned) before
   another starts on top of it, and its violations say what would clear it;
1. a discrepancy that blocks this operation and was not acknowledged → Refused, one violation per discrepancy;
   violations of the quorum rule (quorum.py) are refused in the same verdict, so the caller sees everything at once;
2. a fingerprint that is not the diff's → Stale (the caller re-reads and retries: its test-and-set failed);
3. otherwise Proceed, naming the acknowledgements the decision relied on (for the audit trail).

Which discrepancy blocks which operation is the one table POLICY, read like etcd's `ValidateConfigurationChange`
switch. Around it, three rules hold whatever the table says:
- an INFO discrepancy (expected lag) never blocks;
- NO_LEADER refuses everything, acknowledged or not: nothing can be committed, and the violation says how to recover;
- a kind the table does not know blocks every operation and cannot be acknowledged (the contract says "treat unknown
  kinds as blocking").

Acknowledging is how a forced removal gets past what is broken about the member it removes; it never lifts NO_LEADER,
a repair-only rule, or the quorum rule. An acknowledged id that is not in the diff is ignored: the fact it named may
have been cleared since the caller read it.

Pure: Refused and Stale become FAILED_PRECONDITION (with google.rpc.PreconditionFailure) and ABORTED in status.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from coordinator.core.model import Discrepancy, DiscrepancyKind, Member, MembershipDiff, Severity, same_member
from coordinator.core.operation import OperationKind, OperationRecord
from coordinator.core.quorum import QuorumInput, QuorumViolation, check_add, check_remove, raft_key


class Rule(Enum):
    """What a discrepancy of one kind does to one operation. Only REFUSES applies to an INFO discrepancy too."""

    IGNORED = "never blocks this operation"
    BLOCKS = "blocks until repaired; acknowledging does not lift it"
    BLOCKS_IF_SEVERE = "blocks until repaired when its severity is BLOCKING; a WARNING is only reported"
    BLOCKS_IF_TARGET = "blocks until repaired when about the member operated on; about another member it does not"
    ACKNOWLEDGE_IF_TARGET = "blocks when about the member operated on, unless acknowledged; about another it does not"
    REFUSES = "refuses at any severity, acknowledged or not"


@dataclass(frozen=True)
class Request:
    """A guarded operation as the core sees it.

    member names the joiner or the member to remove; an address also names a member no record gives a name to (a
    ghost Raft member). expected_fingerprint is the diff fingerprint the caller saw; empty means "only if consistent
    now". acknowledged holds discrepancy ids the caller accepts, where the policy allows it.
    """

    operation: OperationKind
    member: str
    expected_fingerprint: str = ""
    acknowledged: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Violation:
    """One reason for a refusal, shaped like google.rpc.PreconditionFailure.Violation."""

    type: str  # the discrepancy kind's name, "QUORUM", "UNKNOWN_MEMBER" or "PARKED_OPERATION"
    subject: str  # the discrepancy id, the member's name, or the parked operation's id
    description: str


@dataclass(frozen=True)
class Proceed:
    acknowledged_used: frozenset[str]  # the acknowledged ids without which the operation would have been refused


@dataclass(frozen=True)
class Parked:
    violations: tuple[Violation, ...]  # one PARKED_OPERATION per parked operation, in the order given


@dataclass(frozen=True)
class Refused:
    violations: tuple[Violation, ...]  # one per blocking discrepancy in diff order, then UNKNOWN_MEMBER, QUORUM


@dataclass(frozen=True)
class Stale:
    current_fingerprint: str


Verdict = Proceed | Parked | Refused | Stale


_K = DiscrepancyKind
_IGNORED, _BLOCKS, _IF_SEVERE, _IF_TARGET, _ACK_TARGET, _REFUSES = (
    Rule.IGNORED,
    Rule.BLOCKS,
    Rule.BLOCKS_IF_SEVERE,
    Rule.BLOCKS_IF_TARGET,
    Rule.ACKNOWLEDGE_IF_TARGET,
    Rule.REFUSES,
)
_COLUMNS = (
    OperationKind.ISSUE_TOKEN,
    OperationKind.JOIN,
    OperationKind.REMOVE,
    OperationKind.FORCE_REMOVE,
    OperationKind.REPAIR,
)

# Why the rows are what they are:
# - Every fact that says the records disagree about who a member is or whom a node trusts blocks the normal
#   operations until it is repaired, and blocks a forced removal only when it is about the member removed, which is
#   what a forced removal is for (microcluster's test_membership_consistency and test_truststore_force_removal).
# - An unreachable agent is the quorum rule's business (quorum.py counts it as not answering); it blocks a normal
#   removal of that very member, which needs the member to take part (fence and wipe it): force it instead.
# - Lagging views, roles and unparseable entries never decide by themselves: a lagging engine counts as not
#   answering (quorum.py), roles move on their own, and a bad entry grants no trust (what it hides shows up as
#   MISSING).
# - An unreadable source blocks when the diff says it is severe (a truststore, or a cluster-wide source nobody could
#   read); a node's unreadable Raft view counts against quorum instead, and its unreadable cache or info.yaml is
#   only reported.
# - A member no agent watches is, like an unreachable agent, the quorum rule's business (it counts as not answering);
#   removing it means acting on a node memberguard cannot see (its truststore is not read, it cannot be fenced), so
#   the caller acknowledges that first.
# - A repair is what clears the diff, so no discrepancy blocks it: what it may do about each one is core/repair.py's.
#   Only NO_LEADER refuses it, as it refuses everything.
# fmt: off
_ROWS: dict[DiscrepancyKind, tuple[Rule, Rule, Rule, Rule, Rule]] = {
    #                              ISSUE_TOKEN  JOIN         REMOVE       FORCE_REMOVE REPAIR
    _K.MISSING:                    (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.ORPHAN:                     (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.ADDRESS_MISMATCH:           (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.CERTIFICATE_MISMATCH:       (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.NAME_MISMATCH:              (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.DUPLICATE_ADDRESS:          (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.VIEW_DIFFERS:               (_IGNORED,    _IGNORED,    _IGNORED,    _IGNORED,    _IGNORED),
    _K.ROLE_DIFFERS:               (_IGNORED,    _IGNORED,    _IGNORED,    _IGNORED,    _IGNORED),
    _K.INVALID_ENTRY:              (_IGNORED,    _IGNORED,    _IGNORED,    _IGNORED,    _IGNORED),
    _K.SOURCE_UNREADABLE:          (_IF_SEVERE,  _IF_SEVERE,  _IF_SEVERE,  _ACK_TARGET, _IGNORED),
    _K.AGENT_UNREACHABLE:          (_IGNORED,    _IGNORED,    _IF_TARGET,  _IGNORED,    _IGNORED),
    _K.AGENT_UNTRUSTED:            (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.AGENT_CERTIFICATE_MISMATCH: (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.NO_LEADER:                  (_REFUSES,    _REFUSES,    _REFUSES,    _REFUSES,    _REFUSES),
    _K.NODE_INFO_MISMATCH:         (_BLOCKS,     _BLOCKS,     _BLOCKS,     _ACK_TARGET, _IGNORED),
    _K.UNWATCHED_MEMBER:           (_IGNORED,    _IGNORED,    _ACK_TARGET, _ACK_TARGET, _IGNORED),
}
# fmt: on

POLICY: Mapping[tuple[DiscrepancyKind, OperationKind], Rule] = MappingProxyType(
    {(kind, operation): rule for kind, rules in _ROWS.items() for operation, rule in zip(_COLUMNS, rules, strict=True)}
)

_NO_LEADER_ADVICE = (
    "No membership change can be committed without a leader, acknowledged or not. Bring back enough voters for the "
    "Raft configuration to elect a leader; if the lost voters will never return, rewrite the configuration once, on "
    "one surviving node, with dqlite's `.reconfigure` or microcluster's `cluster edit` (never on two nodes, never "
    "twice: that splits the cluster)."
)

_DOING = {
    OperationKind.ISSUE_TOKEN: "issuing a token",
    OperationKind.JOIN: "a join",
    OperationKind.REMOVE: "a removal",
    OperationKind.FORCE_REMOVE: "a forced removal",
    OperationKind.REPAIR: "a repair",
}


def decide(
    request: Request,
    diff: MembershipDiff,
    quorum: QuorumInput | None = None,
    parked: Sequence[OperationRecord] = (),
) -> Verdict:
    """The guard's verdict on request against a fresh diff; quorum defaults to what the diff itself shows."""
    blocked = parked_first(parked)
    if blocked is not None:
        return blocked
    quorum = QuorumInput.from_diff(diff) if quorum is None else quorum
    target = _Target.named(request.member, diff)
    violations: list[Violation] = []
    used: set[str] = set()
    for discrepancy in diff.discrepancies:
        blocking = _blocking(discrepancy, request, target)
        if blocking is None:
            continue
        why, acknowledgeable = blocking
        if acknowledgeable and discrepancy.id in request.acknowledged:
            used.add(discrepancy.id)
            continue
        violations.append(Violation(_kind_name(discrepancy.kind), discrepancy.id, f"{discrepancy.summary} {why}"))
    violations += _target_violations(request, target)
    violations += _quorum_violations(request, quorum, target)
    if violations:
        return Refused(tuple(violations))
    if request.expected_fingerprint and request.expected_fingerprint != diff.fingerprint:
        return Stale(diff.fingerprint)
    return Proceed(frozenset(used))


def parked_first(parked: Sequence[OperationRecord]) -> Parked | None:
    """The rule that comes before every other, for every change and every repair: a parked operation is finished
    (or abandoned) before anything starts on top of it."""
    if not parked:
        return None
    return Parked(tuple(Violation("PARKED_OPERATION", r.id, f"{r.error}; {r.plan}") for r in parked))


def rule_for(kind: DiscrepancyKind, operation: OperationKind) -> Rule | None:
    """POLICY's rule, or None for a kind the table does not know (which blocks every operation)."""
    return POLICY.get((kind, operation))


# --- one discrepancy ----------------------------------------------------------------------------------------------


def _blocking(d: Discrepancy, request: Request, target: _Target) -> tuple[str, bool] | None:
    """None when d does not block the request; otherwise why it blocks, and whether acknowledging its id lifts it."""
    rule = rule_for(d.kind, request.operation)
    doing = _DOING[request.operation]
    if rule is None:
        return "This coordinator does not know this kind of discrepancy, so it blocks every operation.", False
    if rule is Rule.REFUSES:
        return _NO_LEADER_ADVICE, False
    if d.severity is Severity.INFO or rule is Rule.IGNORED:
        return None
    if rule is Rule.BLOCKS or (rule is Rule.BLOCKS_IF_SEVERE and d.severity is Severity.BLOCKING):
        return f"It blocks {doing} until it is repaired; acknowledging it does not lift it.", False
    if rule is Rule.BLOCKS_IF_TARGET and target.about(d):
        why = f"It is about {target.name}, and {doing} needs {target.name} to take part: bring it back, or force it."
        return why, False
    if rule is Rule.ACKNOWLEDGE_IF_TARGET and target.about(d):
        return f"It is about {target.name}: repair it, or acknowledge its id to go ahead with {doing}.", True
    return None


def _kind_name(kind: DiscrepancyKind) -> str:
    # A kind from a newer peer may be a bare number with no name.
    return kind.name if isinstance(kind, DiscrepancyKind) else f"DISCREPANCY_KIND_{int(kind)}"


# --- the member operated on ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """Every identity the request's member goes by in the diff. Records of one member may each carry only part of
    its identity (a Raft entry has no name, a truststore record no node ID), so a discrepancy is about the target
    when its member shares any part of it."""

    name: str
    known: bool  # some member, discrepancy or node goes by this name
    members: tuple[Member, ...]  # the diff's members going by it
    identities: tuple[Member, ...]  # those and the members of the discrepancies going by it

    @classmethod
    def named(cls, name: str, diff: MembershipDiff) -> _Target:
        def goes_by(member: Member | None) -> bool:
            return bool(name) and member is not None and name in (member.name, member.address)

        members = tuple(m for m in diff.members if goes_by(m))
        mentioned = [d.member for d in diff.discrepancies if d.member is not None and goes_by(d.member)]
        identities = [*members, *mentioned]
        return cls(
            name=name,
            known=bool(identities) or name in diff.nodes,
            members=members,
            identities=tuple(identities),
        )

    def about(self, d: Discrepancy) -> bool:
        """True when d concerns this member. A fact about no member is about a node's own source (about this member
        when it is this member's node) or about the whole cluster (node ""), which concerns every member."""
        m = d.member
        if m is None:
            return d.node in ("", self.name)
        return (bool(m.name) and m.name == self.name) or any(same_member(m, identity) for identity in self.identities)


def _target_violations(request: Request, target: _Target) -> list[Violation]:
    if request.operation.removes and not target.known:
        description = (
            f"{request.member} is in no members-table row, truststore, Raft configuration or agent report, "
            "so there is nothing to remove."
        )
        return [Violation("UNKNOWN_MEMBER", request.member, description)]
    return []


def _quorum_violations(request: Request, quorum: QuorumInput, target: _Target) -> list[Violation]:
    if request.operation is OperationKind.REPAIR:
        return []  # it adds no one, and core/repair.py checks each removal it plans against what those before leave
    if request.operation.removes:
        found = _check_removals(quorum, target)
    else:
        found = check_add(quorum.members, quorum.reachable)
    return [Violation("QUORUM", request.member, violation.description) for violation in found]


def _check_removals(quorum: QuorumInput, target: _Target) -> list[QuorumViolation]:
    """The target's Raft entries are removed one after the other, each against what the previous one left. A name
    on two Raft entries is a broken state, but its removal must not break quorum either."""
    keys = {raft_key(member) for member in target.members}
    entries = [member for member in quorum.members if raft_key(member) in keys] or [Member(name=target.name)]
    members, found = list(quorum.members), []
    for entry in entries:
        found += check_remove(members, entry, quorum.reachable)
        members = [member for member in members if raft_key(member) != raft_key(entry)]
    return found
