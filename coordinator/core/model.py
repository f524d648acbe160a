"""The values the pure core works on: what agents report, and the diff computed from it.

Everything here is a frozen value with no I/O. Enum numbers equal the protobuf enum numbers in
protos/memberguard/v1/membership.proto, so the adapters convert by number (coordinator/messages.py)
and tests/test_messages.py checks that the two stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Role(IntEnum):
    """A member's Raft role, or PENDING while it joins."""

    VOTER = 1
    STAND_BY = 2
    SPARE = 3
    PENDING = 4

    @property
    def votes(self) -> bool:
        return self is Role.VOTER

    @property
    def text(self) -> str:
        """The members table's role column: go-dqlite's NodeRole.String(), or microcluster's PENDING."""
        return _ROLE_TEXT[self]

    @classmethod
    def from_text(cls, text: str) -> Role | None:
        """The role a members-table role column names; None for anything else (a ghost row's "")."""
        return _TEXT_ROLE.get(text)


_ROLE_TEXT = {Role.VOTER: "voter", Role.STAND_BY: "stand-by", Role.SPARE: "spare", Role.PENDING: "PENDING"}
_TEXT_ROLE = {text: role for role, text in _ROLE_TEXT.items()}


class Source(IntEnum):
    """One record of membership, as read on one node."""

    MEMBERS_TABLE = 1
    TRUSTSTORE = 2
    RAFT_CONFIG = 3
    RAFT_NODE_VIEW = 4
    RAFT_CACHE = 5
    NODE_INFO = 6
    AGENT = 7

    @property
    def cluster_wide(self) -> bool:
        """The members table and the authoritative Raft configuration are one record for the whole cluster,
        however many nodes read them; the other sources are each node's own."""
        return self in (Source.MEMBERS_TABLE, Source.RAFT_CONFIG)


class Severity(IntEnum):
    INFO = 1
    WARNING = 2
    BLOCKING = 3


class DiscrepancyKind(IntEnum):
    MISSING = 1
    ORPHAN = 2
    ADDRESS_MISMATCH = 3
    CERTIFICATE_MISMATCH = 4
    NAME_MISMATCH = 5
    DUPLICATE_ADDRESS = 6
    VIEW_DIFFERS = 7
    ROLE_DIFFERS = 8
    INVALID_ENTRY = 9
    SOURCE_UNREADABLE = 10
    AGENT_UNREACHABLE = 11
    AGENT_UNTRUSTED = 12
    AGENT_CERTIFICATE_MISMATCH = 13
    NO_LEADER = 14
    NODE_INFO_MISMATCH = 15
    UNWATCHED_MEMBER = 16


class RemedySafety(IntEnum):
    SAFE = 1
    NEEDS_CONFIRMATION = 2
    UNSAFE = 3


class RepairStepKind(IntEnum):
    """What one step of a remedy does; the contract's RepairStep carries it, for a repair plan's steps too."""

    WRITE_RECORD = 1
    DELETE_RECORD = 2
    RESET_NODE = 3
    FORGET_MEMBER = 4  # the coordinator's own: the certificate it pinned for the member, and its tokens
    RESTART_ENGINE = 5
    WAIT = 6
    CONFIRM = 7
    BY_HAND = 8


# --- what agents report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberRecord:
    """One record of one member in one source. Empty strings and 0 mean "this source carries no such field"."""

    name: str = ""
    address: str = ""
    certificate_fingerprint: str = ""
    node_id: int = 0
    role: Role | None = None
    role_text: str = ""
    entry: str = ""
    # The PEM travels only when asked for (repair needs it, the diff does not); it is not part of equality.
    certificate_pem: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class InvalidEntry:
    entry: str
    reason: str


@dataclass(frozen=True)
class SourceReport:
    """What one source holds on one node. A non-empty error means the records are unknown, not empty."""

    source: Source
    records: tuple[MemberRecord, ...] = ()
    invalid_entries: tuple[InvalidEntry, ...] = ()
    error: str = ""
    changed_at: float | None = None  # seconds since the epoch when the source last changed, when it can tell
    leader_address: str = ""

    def age(self, now: float) -> float | None:
        """Seconds since the source last changed; a clock set back reads as 0, not as a negative age."""
        return None if self.changed_at is None else max(0.0, now - self.changed_at)


@dataclass(frozen=True)
class NodeView:
    """Everything one node's agent sees."""

    node: str
    backend: str
    certificate_fingerprint: str
    sources: tuple[SourceReport, ...]
    role_adjustment_interval: float | None = None  # seconds; None when nothing rewrites the cache

    def report(self, source: Source) -> SourceReport | None:
        for report in self.sources:
            if report.source is source:
                return report
        return None


class AgentFailure(IntEnum):
    """Why the coordinator holds no view for a node."""

    UNREACHABLE = 1
    UNTRUSTED = 2


@dataclass(frozen=True)
class NodeObservation:
    """The outcome of asking one node's agent: a view, or the reason there is none."""

    node: str
    address: str
    view: NodeView | None = None
    failure: AgentFailure | None = None
    detail: str = ""


@dataclass(frozen=True)
class ClusterView:
    """The core's only input: every node's observation from one gather, plus the clock reading."""

    nodes: tuple[NodeObservation, ...]
    now: float  # seconds since the epoch when the gather finished


# --- what the core computes -----------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A member's identity (name, certificate fingerprint, address, dqlite node ID) and its role."""

    name: str = ""
    certificate_fingerprint: str = ""
    address: str = ""
    node_id: int = 0
    role: Role | None = None


def same_member(held: Member | MemberRecord, member: Member) -> bool:
    """Whether held is a record of member: the one rule for "is this about member M?". Each source records only part
    of a member's identity (a Raft entry has no name, a truststore record no node ID), so sharing any non-empty part
    of it (name, certificate fingerprint, address, node ID) is enough."""
    return (
        (bool(held.name) and held.name == member.name)
        or (bool(held.certificate_fingerprint) and held.certificate_fingerprint == member.certificate_fingerprint)
        or (bool(held.address) and held.address == member.address)
        or (held.node_id != 0 and held.node_id == member.node_id)
    )


@dataclass(frozen=True)
class Evidence:
    source: Source
    node: str = ""
    records: tuple[MemberRecord, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class RemedyStep:
    """A remedy's action in typed form, one step of it: what it does to which source, on which node, with which record,
    from which evidence. node is "" for the cluster-wide sources and the coordinator's own step. record is what a
    write writes, what a deletion deletes (by the fields it sets), whom a forget is about, what a human repairs.

    The contract carries it as a RepairStep, the message a repair plan's steps (coordinator/core/repair.py) use: both
    say what is done where from which evidence, a plan's steps also which agent sends it."""

    kind: RepairStepKind
    source: Source | None = None
    node: str = ""
    record: MemberRecord | None = None
    evidence: Evidence | None = None


@dataclass(frozen=True)
class Remedy:
    """A way to clear a discrepancy: action is one imperative sentence, steps the same in typed form. An UNSAFE remedy
    is what not to do: its sentence says so and why, its steps are what a program must not do."""

    action: str
    safety: RemedySafety
    steps: tuple[RemedyStep, ...]


@dataclass(frozen=True)
class Discrepancy:
    id: str
    kind: DiscrepancyKind
    severity: Severity
    member: Member | None
    source: Source | None
    node: str
    summary: str
    evidence: tuple[Evidence, ...] = ()
    remedies: tuple[Remedy, ...] = ()
    age: float | None = None
    # The operation in flight that explains it (coordinator/core/inflight.py); "" when none does.
    explained_by: str = ""


@dataclass(frozen=True)
class MembershipDiff:
    fingerprint: str
    discrepancies: tuple[Discrepancy, ...]
    members: tuple[Member, ...]
    nodes: tuple[str, ...]
    observed_at: float
    # The backend the agents that answered report (one cluster has one); "" when none answered, or they disagree.
    backend: str = ""

    @property
    def consistent(self) -> bool:
        """True when nothing would block or warn: INFO-level lag alone still counts as consistent."""
        return all(d.severity is Severity.INFO for d in self.discrepancies)
