"""Discrepancies explained by an operation in flight (docs/design.md, "Identity, views and the diff").

While a join or a removal runs, the sources disagree about its member by design: a removed member's row outlives
its Raft entry by a step, a joiner is trusted on some nodes and not yet on others. CheckMembership still reports
those facts, under their own kind and id, but as INFO, naming the operation that explains them, so that a change
going to plan does not read as a broken cluster.

A discrepancy is about an operation's member when
- its member is that member: the same name, address or dqlite node ID (as far as each of the two carries them);
- it is a fact on that member's own node (a removed node's sources, a joiner's truststore); or
- it names no member and every record on which its evidence disagrees is that member's (another node's cached Raft
  configuration that still lists a removed member).

Only an operation in flight explains anything: queued or running. A parked one is not going to plan, so what it left
keeps its severity, and blocks. Explaining changes severities and nothing else: ids, kinds and the fingerprint (over
the facts, not the verdicts) stay as they are. The guard never sees explanations: it decides under the membership
lock, where no other operation is in flight.

Pure: no I/O and no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from coordinator.core.diff import discrepancy_order
from coordinator.core.model import Discrepancy, Evidence, Member, MemberRecord, MembershipDiff, Severity, same_member
from coordinator.core.operation import OperationRecord, OperationState

IN_FLIGHT = frozenset({OperationState.QUEUED, OperationState.RUNNING})


def explain_in_flight(diff: MembershipDiff, operations: Iterable[OperationRecord]) -> MembershipDiff:
    """The diff with every discrepancy about the member of an operation in flight made INFO and marked with that
    operation's id (the first such operation in the order given); the others are left as they are."""
    in_flight = [operation for operation in operations if operation.state in IN_FLIGHT]
    if not in_flight:
        return diff
    explained = (_explained(discrepancy, in_flight) for discrepancy in diff.discrepancies)
    return replace(diff, discrepancies=tuple(sorted(explained, key=discrepancy_order)))


def is_about(discrepancy: Discrepancy, member: Member) -> bool:
    """Whether the discrepancy is about the member, or about the member's own node (see the module docstring)."""
    if member.name and discrepancy.node == member.name:
        return True
    if discrepancy.member is not None:
        return same_member(discrepancy.member, member)
    differing = _differing(discrepancy.evidence)
    return bool(differing) and all(same_member(record, member) for record in differing)


def _explained(discrepancy: Discrepancy, in_flight: Sequence[OperationRecord]) -> Discrepancy:
    for operation in in_flight:
        if is_about(discrepancy, operation.member):
            return replace(discrepancy, severity=Severity.INFO, explained_by=operation.id)
    return discrepancy


def _differing(evidence: Sequence[Evidence]) -> list[MemberRecord]:
    """The records that some of the evidence holds and some does not, compared by identity: a record's role or the
    entry it sits in may differ between sources for the same member."""
    if len(evidence) < 2:
        return []
    held = [{_identity(record) for record in item.records} for item in evidence]
    everywhere = set.intersection(*held)
    return [record for item in evidence for record in item.records if _identity(record) not in everywhere]


def _identity(record: MemberRecord) -> tuple[str, str, str, int]:
    return record.name, record.certificate_fingerprint, record.address, record.node_id
