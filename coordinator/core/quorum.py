"""The quorum rule: may the Raft configuration change now without losing a majority that answers?

Modelled on etcd's `IsReadyToRemoveVotingMember`: quorum is counted over the voters that would remain, and only the
voters whose engines answered count. Every membership change is itself a Raft commit (the configuration entry, or the
members-table row in the replicated database), so every change, an addition included, needs a majority of the
voters to answer.

Members are keyed by their Raft identity, (address, dqlite node ID): that is what Raft votes by, and it exists for
every Raft member, while a name can be missing (a ghost member no record names, S1) or claimed twice (S12).

Pure: the caller gathers the configuration and who answered; `QuorumInput.from_diff` derives both from a diff.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum

from coordinator.core.model import DiscrepancyKind, Member, MembershipDiff, Role, Severity, Source

RaftKey = tuple[str, int]  # (address, dqlite node ID)

# The roles a member of the Raft configuration has; PENDING (and no role) means a members-table row only.
_RAFT_ROLES = frozenset({Role.VOTER, Role.STAND_BY, Role.SPARE})

# A node that could not read its own engine's configuration, or the leader's through its engine, cannot vouch that
# its engine is taking part: it counts as not answering, like a node whose agent gave no view at all.
_ENGINE_SOURCES = frozenset({Source.RAFT_NODE_VIEW, Source.RAFT_CONFIG})


class QuorumReason(Enum):
    LAST_MEMBER = "LAST_MEMBER"  # the change would leave the Raft configuration empty
    NO_MAJORITY = "NO_MAJORITY"  # fewer voters would answer than a majority of the voters after the change


@dataclass(frozen=True)
class QuorumViolation:
    """Why a change was refused, with the numbers it was decided on (etcd logs the same ones when it refuses)."""

    reason: QuorumReason
    change: str  # what was asked, e.g. "removing n2", "adding a member"
    voters_before: int
    voters_after: int
    reachable: int  # voters after the change whose engines answered
    needed: int  # ⌊voters_after / 2⌋ + 1

    @property
    def description(self) -> str:
        numbers = (
            f"voters before: {self.voters_before}, after: {self.voters_after}, reachable: {self.reachable}, "
            f"needed: {self.needed}"
        )
        if self.reason is QuorumReason.LAST_MEMBER:
            return f"Refused {self.change}: it is the last member of the Raft configuration ({numbers})."
        return (
            f"Refused {self.change}: only {self.reachable} of the {self.voters_after} voters after the change "
            f"answered, fewer than the {self.needed} a majority needs, so the change could not be committed or "
            f"would leave a cluster that cannot commit ({numbers})."
        )


@dataclass(frozen=True)
class QuorumInput:
    """The authoritative Raft configuration (members with their Raft roles) and the members whose engines answered."""

    members: tuple[Member, ...]
    reachable: frozenset[RaftKey]

    @classmethod
    def from_diff(cls, diff: MembershipDiff) -> QuorumInput:
        return cls(raft_members(diff), reachable_members(diff))


def raft_key(member: Member) -> RaftKey:
    return member.address, member.node_id


def raft_members(diff: MembershipDiff) -> tuple[Member, ...]:
    """The diff's members that are in the leader's Raft configuration (a table-only row has no Raft role)."""
    return tuple(member for member in diff.members if member.role in _RAFT_ROLES)


def reachable_members(diff: MembershipDiff) -> frozenset[RaftKey]:
    """The Raft members whose engines answered directly during the gather, by (address, node ID).

    A member answered when its node (an agent's node is named after its member) was observed and its agent gave a
    view, and that view could read its engine's Raft configuration and the leader's, and its engine's own view does
    not lag the leader's past the warning threshold (a voter whose configuration has not moved for two role-adjustment
    ticks is not following the leader). A member no agent speaks for (a ghost with no name, a node the coordinator
    did not know to ask) did not answer: unknown is never counted as present.
    """
    silent = {
        d.node
        for d in diff.discrepancies
        if d.kind in (DiscrepancyKind.AGENT_UNREACHABLE, DiscrepancyKind.AGENT_UNTRUSTED)
        or (d.kind is DiscrepancyKind.SOURCE_UNREADABLE and d.source in _ENGINE_SOURCES)
        or (
            d.kind is DiscrepancyKind.VIEW_DIFFERS
            and d.source is Source.RAFT_NODE_VIEW
            and d.severity >= Severity.WARNING
        )
    }
    answered = set(diff.nodes) - silent
    return frozenset(raft_key(member) for member in raft_members(diff) if member.name and member.name in answered)


def check_remove(members: Iterable[Member], target: Member, reachable: Collection[RaftKey]) -> list[QuorumViolation]:
    """Every reason why removing target from the Raft configuration would break the quorum rule.

    After the removal, the voters that answered must be at least ⌊V'/2⌋+1 of the V' voters that remain, and the
    configuration must not become empty. Removing a non-voter leaves V' = V: it never breaks a quorum that holds,
    but like any change it cannot be committed without one. A target that is not in the configuration changes
    nothing in Raft; its removal still writes the replicated members table, so the same majority is required.
    """
    config = _configuration(members)
    key = raft_key(target)
    remaining = {k: role for k, role in config.items() if k != key}
    change = f"removing {_label(target)}"
    voters_before = _voters(config)
    if config and not remaining:
        return [QuorumViolation(QuorumReason.LAST_MEMBER, change, voters_before, 0, 0, 1)]
    return _majority(change, voters_before, remaining, reachable)


def check_add(members: Iterable[Member], reachable: Collection[RaftKey]) -> list[QuorumViolation]:
    """Why adding a member (issuing its token, or its join) would break the quorum rule.

    A joiner enters as a spare, so the voters stay V; an unreachable member is no reason to refuse, unless the voters
    that answered are not a majority of V, in which case the cluster could not commit the change.
    """
    config = _configuration(members)
    return _majority("adding a member", _voters(config), config, reachable)


def _configuration(members: Iterable[Member]) -> dict[RaftKey, Role]:
    """Raft key → role. Two members may share one Raft entry (two rows claiming one address): it counts once."""
    config: dict[RaftKey, Role] = {}
    for member in members:
        if member.role in _RAFT_ROLES:
            config.setdefault(raft_key(member), member.role)
    return config


def _voters(config: dict[RaftKey, Role]) -> int:
    return sum(1 for role in config.values() if role.votes)


def _majority(
    change: str, voters_before: int, after: dict[RaftKey, Role], reachable: Collection[RaftKey]
) -> list[QuorumViolation]:
    voters_after = _voters(after)
    answered = sum(1 for key, role in after.items() if role.votes and key in reachable)
    needed = voters_after // 2 + 1
    if answered >= needed:
        return []
    return [QuorumViolation(QuorumReason.NO_MAJORITY, change, voters_before, voters_after, answered, needed)]


def _label(member: Member) -> str:
    return member.name or (f"node {member.node_id} at {member.address}" if member.node_id else member.address)
