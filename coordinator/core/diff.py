"""The membership diff: every source on every node compared with the cluster's reference, as typed discrepancies.

The members table and the authoritative Raft configuration are each one record for the whole cluster that every node
reads; the reading most nodes agree on is the reference. The table says *who* a member is (name, certificate), Raft
says *whether* it is one; the two are merged by address, microcluster's join key. Each node's own sources (truststore,
its live and cached Raft configuration, info.yaml, the agent itself) are then compared with that reference.

Two rules hold throughout:
- What could not be read is unknown, never empty. An unreachable agent or a source with an error gets its own
  discrepancy and no "missing" ones, and a comparison whose reference is unknown is skipped, not guessed.
- Equal facts give an equal diff. Every input order is canonicalised before it is compared or reported, so ids,
  evidence and the fingerprint do not depend on the order in which agents answered or listed their records.

Scenario names (S1, S2, ...) refer to the divergence catalogue in docs/scenarios.md.
Pure: no I/O and no clock. Time comes from ClusterView.now.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

from coordinator.core.model import (
    AgentFailure,
    ClusterView,
    Discrepancy,
    DiscrepancyKind,
    Evidence,
    InvalidEntry,
    Member,
    MemberRecord,
    MembershipDiff,
    NodeObservation,
    NodeView,
    Remedy,
    RemedySafety,
    RemedyStep,
    RepairStepKind,
    Role,
    Severity,
    Source,
    SourceReport,
    same_member,
)

# The most records one piece of evidence lists (see _evidence).
MAX_EVIDENCE_RECORDS = 8

# Both encodings are compared across coordinators and releases: change them only together with their version.
_FINGERPRINT_VERSION = "memberguard-diff-v1"
_ID_VERSION = "memberguard-discrepancy-v1"

# A node's own Raft views lag the leader by design (a follower's log, the engine's periodic rewrite of cluster.yaml).
# They are judged by their age, and kept out of the fingerprint so that routine lag does not invalidate it.
_LAGGING = frozenset({Source.RAFT_NODE_VIEW, Source.RAFT_CACHE})

# microcluster's role column holds PENDING until the leader's heartbeat writes go-dqlite's role name.

_NOUNS = {
    Source.MEMBERS_TABLE: "members table",
    Source.TRUSTSTORE: "truststore",
    Source.RAFT_CONFIG: "Raft configuration",
    Source.RAFT_NODE_VIEW: "own Raft configuration",
    Source.RAFT_CACHE: "cluster.yaml",
    Source.NODE_INFO: "info.yaml",
    Source.AGENT: "agent",
}

_Identity = tuple[str, str, str, int]
_NodeViews = tuple[tuple[str, NodeView], ...]
_SourceFacts = tuple[int, bool, tuple[_Identity, ...], tuple[str, ...]]

_SAFE = RemedySafety.SAFE
_CONFIRM = RemedySafety.NEEDS_CONFIRMATION
_UNSAFE = RemedySafety.UNSAFE
_WRITE = RepairStepKind.WRITE_RECORD
_DELETE = RepairStepKind.DELETE_RECORD


# --- public API ---------------------------------------------------------------------------------------------------


def compute_diff(view: ClusterView) -> MembershipDiff:
    """Compare every source on every node; one discrepancy per fact that disagrees."""
    observations = sorted(view.nodes, key=lambda observation: observation.node)
    views = tuple((o.node, o.view) for o in observations if o.view is not None)
    table, table_found = _agreed_reading(views, Source.MEMBERS_TABLE)
    raft, raft_found = _agreed_reading(views, Source.RAFT_CONFIG)
    ref = _reference(views, table, raft, view.now)
    found = table_found + raft_found + _agent_failures(observations, ref) + _membership(ref)
    found += _unwatched(observations, ref)
    for node, node_view in views:
        found += _node_findings(node, node_view, ref)
    return MembershipDiff(
        fingerprint=fingerprint(view),
        discrepancies=tuple(sorted(found, key=discrepancy_order)),
        members=tuple(sorted((joined.member for joined in ref.joined), key=_identity)),
        nodes=tuple(o.node for o in observations),
        observed_at=view.now,
        backend=_backend(views),
    )


def _backend(views: _NodeViews) -> str:
    backends = {node_view.backend for _, node_view in views}
    return backends.pop() if len(backends) == 1 else ""


def fingerprint(view: ClusterView) -> str:
    """SHA-256 (hex) of the non-volatile facts: which identities each source on each node holds.

    Roles, role texts, ages, error texts and the leader's address are left out: they change while membership does
    not, and a fingerprint that moved with them would make every guarded operation race the role adjuster.
    """
    facts = sorted(_node_facts(observation) for observation in view.nodes)
    return _digest([_FINGERPRINT_VERSION, facts])


def discrepancy_id(
    kind: DiscrepancyKind, member: Member | None, source: Source | None, node: str, *, entry: str = ""
) -> str:
    """A short digest that stays the same across gathers as long as the fact does, so that it can be acknowledged.

    The member's role is left out because the role adjuster may move it between gathers. entry tells apart facts
    that differ only in the source entry they are about (two invalid files in one truststore).
    """
    identity = None if member is None else _identity(member)
    return _digest([_ID_VERSION, kind.value, identity, None if source is None else source.value, node, entry])[:16]


# --- the reference: the cluster-wide sources, agreed and merged ---------------------------------------------------


@dataclass(frozen=True)
class _Reading:
    """A node's reading of a cluster-wide source, in canonical order so that equal readings compare equal."""

    records: tuple[MemberRecord, ...]
    invalid_entries: tuple[InvalidEntry, ...]


@dataclass(frozen=True)
class _Joined:
    """A reference member, with the members-table row and the authoritative Raft entry it was merged from."""

    member: Member
    row: MemberRecord | None
    entry: MemberRecord | None


@dataclass(frozen=True)
class _Reference:
    """What each node's own sources are compared with. rows or raft is None when no node could read that source."""

    now: float  # when the gather finished: ages are measured to it
    views: _NodeViews
    rows: tuple[MemberRecord, ...] | None
    raft: tuple[MemberRecord, ...] | None
    joined: tuple[_Joined, ...]
    duplicated: frozenset[str]  # addresses claimed by two rows or by two Raft entries

    # Looked up once per record of every node: indexes keep a check of N nodes' views of N members O(N²).
    @cached_property
    def _members_by_name(self) -> dict[str, Member]:
        return {j.member.name: j.member for j in reversed(self.joined)}

    @cached_property
    def _members_by_row_name(self) -> dict[str, Member]:
        return {j.row.name: j.member for j in reversed(self.joined) if j.row is not None}

    @cached_property
    def _rows_by_name(self) -> dict[str, MemberRecord]:
        return {row.name: row for row in reversed(self.rows or ())}

    def member_named(self, name: str) -> Member | None:
        return self._members_by_name.get(name)

    def member_of(self, row: MemberRecord) -> Member:
        # Every row of the reference was merged into at least one member, so this always finds one.
        return self._members_by_row_name[row.name]

    def row_named(self, name: str) -> MemberRecord | None:
        return self._rows_by_name.get(name)


def _agreed_reading(views: _NodeViews, source: Source) -> tuple[_Reading | None, list[Discrepancy]]:
    """The reading of a cluster-wide source that most nodes agree on, and how the other nodes' readings differ.

    Every node reads the same record, so a node whose reading differs caught it mid-change or asked a stale leader:
    worth reporting, but the majority is the better guess at the record itself.
    """
    readings: dict[str, _Reading] = {}
    errors: dict[str, str] = {}
    for node, node_view in views:
        report = node_view.report(source)
        if report is not None and report.error:
            errors[node] = report.error
        elif report is not None:
            readings[node] = _Reading(_sorted(report.records), _sorted_invalid(report.invalid_entries))
    if not readings:
        return None, [_nobody_could_read(source, errors)]
    counts = Counter(readings.values())
    # max() keeps the first of equal counts and readings are in node-name order, so ties go to the first node.
    agreed = max(counts, key=counts.__getitem__)
    found = [_unreadable(source, node, error, Severity.WARNING) for node, error in errors.items()]
    for node, reading in readings.items():
        if reading != agreed:
            agreed_records, node_records = Counter(agreed.records), Counter(reading.records)
            differing = (agreed_records - node_records) + (node_records - agreed_records)
            summary = (
                f"{node} read the {_NOUNS[source]} differently from {counts[agreed]} of {len(readings)} nodes, "
                f"on {_labels(_sorted(differing)) or 'its invalid entries'}."
            )
            evidence = (Evidence(source, "", agreed.records), Evidence(source, node, reading.records))
            found.append(
                _discrepancy(
                    DiscrepancyKind.VIEW_DIFFERS, Severity.INFO, summary, source=source, node=node, evidence=evidence
                )
            )
    return agreed, found + _invalid_entries(source, "", agreed.invalid_entries)


def _nobody_could_read(source: Source, errors: dict[str, str]) -> Discrepancy:
    evidence = tuple(Evidence(source, node, detail=error) for node, error in errors.items())
    if source is Source.RAFT_CONFIG:
        by_hand = RemedyStep(RepairStepKind.BY_HAND, Source.RAFT_CONFIG)
        return _discrepancy(
            DiscrepancyKind.NO_LEADER,
            Severity.BLOCKING,
            "No node could read the Raft configuration from a leader, so who the members are is unknown.",
            source=source,
            evidence=evidence,
            remedies=(
                Remedy("Bring back enough voters for the Raft configuration to elect a leader.", _CONFIRM, (by_hand,)),
                Remedy(
                    "If the lost voters will never return, rewrite the Raft configuration once, on one surviving node, "
                    "with dqlite's `.reconfigure` or microcluster's `cluster edit`.",
                    _CONFIRM,
                    (by_hand,),
                ),
                Remedy(
                    "Do not reconfigure on more than one node, or more than once: each rewrite starts a configuration "
                    "of its own, and the cluster splits.",
                    _UNSAFE,
                    (by_hand,),
                ),
            ),
        )
    return _discrepancy(
        DiscrepancyKind.SOURCE_UNREADABLE,
        Severity.BLOCKING,
        f"No node could read the {_NOUNS[source]}, so no member's identity can be checked.",
        source=source,
        evidence=evidence,
    )


def _reference(views: _NodeViews, table: _Reading | None, raft: _Reading | None, now: float) -> _Reference:
    rows = _group(table.records if table else (), lambda record: record.address)
    entries = _group(raft.records if raft else (), lambda record: record.address)
    addresses = sorted(rows.keys() | entries.keys())
    joined: dict[_Identity, _Joined] = {}
    for address in addresses:
        for candidate in _join(rows.get(address, []), entries.get(address, []), views):
            # Records that differ only in role make one member: the role is not part of who it is.
            joined.setdefault(_identity(candidate.member), candidate)
    return _Reference(
        now=now,
        views=views,
        rows=table.records if table else None,
        raft=raft.records if raft else None,
        joined=tuple(joined.values()),
        duplicated=frozenset(a for a in addresses if len(rows.get(a, ())) > 1 or len(entries.get(a, ())) > 1),
    )


def _join(rows: list[MemberRecord], entries: list[MemberRecord], views: _NodeViews) -> list[_Joined]:
    """Merge the rows and Raft entries at one address. A duplicated address pairs every row with every entry, so
    that each claim shows up as a member; its DUPLICATE_ADDRESS discrepancy says that only one can be right."""
    if rows and entries:
        return [
            _Joined(Member(row.name, row.certificate_fingerprint, row.address, entry.node_id, entry.role), row, entry)
            for row in rows
            for entry in entries
        ]
    table_only = [_Joined(_table_only_member(row), row, None) for row in rows]
    return table_only + [_Joined(_raft_only_member(entry, views), None, entry) for entry in entries]


def _table_only_member(row: MemberRecord) -> Member:
    role = Role.PENDING if _row_role(row) is Role.PENDING else None
    return Member(row.name, row.certificate_fingerprint, row.address, row.node_id, role)


def _raft_only_member(entry: MemberRecord, views: _NodeViews) -> Member:
    """Raft entries carry no name or certificate. The member's own agent knows best who it is; failing that, a
    truststore may still hold it."""
    agent = _own_agent(entry, views)
    if agent is not None:
        node, node_view = agent
        return Member(node, node_view.certificate_fingerprint, entry.address, entry.node_id, entry.role)
    for _, node_view in views:
        for record in _readable_records(node_view, Source.TRUSTSTORE):
            if record.address == entry.address:
                return Member(record.name, record.certificate_fingerprint, entry.address, entry.node_id, entry.role)
    return Member(address=entry.address, node_id=entry.node_id, role=entry.role)


def _own_agent(entry: MemberRecord, views: _NodeViews) -> tuple[str, NodeView] | None:
    """The node whose info.yaml holds this Raft entry. Its agent speaks for the member: the coordinator checked the
    certificate it serves."""
    for node, node_view in views:
        if any(_same_entry(record, entry) for record in _readable_records(node_view, Source.NODE_INFO)):
            return node, node_view
    return None


# --- findings about the cluster as a whole ------------------------------------------------------------------------


def _agent_failures(observations: Sequence[NodeObservation], ref: _Reference) -> list[Discrepancy]:
    found = []
    for observation in observations:
        if observation.view is not None:
            continue
        node = observation.node
        member = ref.member_named(node)
        evidence = (Evidence(Source.AGENT, node, detail=observation.detail),)
        if observation.failure is AgentFailure.UNTRUSTED:
            discrepancy = _discrepancy(
                DiscrepancyKind.AGENT_UNTRUSTED,
                Severity.BLOCKING,
                f"{node}'s agent serves a certificate the coordinator does not trust for {node}.",
                member=member,
                source=Source.AGENT,
                node=node,
                evidence=evidence,
                remedies=(
                    Remedy(
                        f"Check which certificate {node}'s agent serves, and pin it only if it is {node}'s member "
                        "certificate.",
                        _CONFIRM,
                        (RemedyStep(RepairStepKind.CONFIRM, Source.AGENT, node, evidence=evidence[0]),),
                    ),
                ),
            )
        else:
            discrepancy = _discrepancy(
                DiscrepancyKind.AGENT_UNREACHABLE,
                Severity.WARNING,
                f"{node}'s agent did not answer, so what {node} holds is unknown.",
                member=member,
                source=Source.AGENT,
                node=node,
                evidence=evidence,
            )
        found.append(discrepancy)
    return found


def _unwatched(observations: Sequence[NodeObservation], ref: _Reference) -> list[Discrepancy]:
    """The members (a row and a Raft entry) whose node no agent speaks for: they joined without memberguard."""
    asked = {observation.node for observation in observations}
    found = []
    for joined in ref.joined:
        member, row, entry = joined.member, joined.row, joined.entry
        if row is None or entry is None or not member.name or member.name in asked or row.address in ref.duplicated:
            continue
        found.append(
            _discrepancy(
                DiscrepancyKind.UNWATCHED_MEMBER,
                Severity.WARNING,
                f"{member.name} is a member, but no agent of memberguard's runs on its node: what it holds is unknown.",
                member=member,
                source=Source.AGENT,
                node=member.name,
                evidence=(_read_row(row), _read(Source.RAFT_CONFIG, (entry,))),
                remedies=(
                    Remedy(
                        f"Adopt {member.name}: run `memberguard adopt` on its node and start its agent.",
                        _CONFIRM,
                        (RemedyStep(RepairStepKind.BY_HAND, Source.AGENT, member.name),),
                    ),
                ),
            )
        )
    return found


def _membership(ref: _Reference) -> list[Discrepancy]:
    """Compare the members table with the authoritative Raft configuration (S1, S2, S3, S6, S12, S15)."""
    found = [_duplicate_address(address, ref) for address in sorted(ref.duplicated)]
    for joined in ref.joined:
        member, row, entry = joined.member, joined.row, joined.entry
        if row is not None and entry is not None:
            if _row_role(row) is not entry.role:
                found.append(_role_differs(member, row, entry, ref))
        # Which claim on a duplicated address is missing where is the question its DUPLICATE_ADDRESS already asks.
        elif member.address in ref.duplicated:
            continue
        elif row is not None and ref.raft is not None:
            found.append(_missing_from_raft(member, row, ref))
        elif entry is not None and ref.rows is not None:
            found.append(_missing_from_table(member, entry, ref))
    return found


def _duplicate_address(address: str, ref: _Reference) -> Discrepancy:
    rows = [row for row in ref.rows or () if row.address == address]
    source = Source.MEMBERS_TABLE if len(rows) > 1 else Source.RAFT_CONFIG
    claims = rows if len(rows) > 1 else [entry for entry in ref.raft or () if entry.address == address]
    member = Member(address=address)
    by_address = RemedyStep(
        _DELETE, Source.MEMBERS_TABLE, record=MemberRecord(address=address), evidence=_read(Source.MEMBERS_TABLE, rows)
    )
    return _discrepancy(
        DiscrepancyKind.DUPLICATE_ADDRESS,
        Severity.BLOCKING,
        f"{_labels(claims)} each claim {address} in the {_NOUNS[source]}.",
        member=member,
        source=source,
        evidence=_holdings(member, ref),
        remedies=(
            Remedy(
                f"Keep only the claim on {address} whose certificate the node serving there presents, and delete the "
                "others by name.",
                _CONFIRM,
                (RemedyStep(RepairStepKind.CONFIRM, source, evidence=_read(source, claims)),),
            ),
            Remedy(
                f"Do not delete the members-table rows at {address} by address: that deletes every claim, the right "
                "one with the others.",
                _UNSAFE,
                (by_address,),
            ),
        ),
    )


def _missing_from_raft(member: Member, row: MemberRecord, ref: _Reference) -> Discrepancy:
    name = member.name
    delete_row = RemedyStep(_DELETE, Source.MEMBERS_TABLE, record=MemberRecord(name=name), evidence=_read_row(row))
    forget = RemedyStep(
        RepairStepKind.FORGET_MEMBER,
        record=MemberRecord(name=name, address=row.address, certificate_fingerprint=row.certificate_fingerprint),
    )
    if member.role is Role.PENDING:
        summary = f"{name} has a PENDING members-table row but is not in the Raft configuration: its join stalled."
        remedies = (
            Remedy(
                f"Once no join traffic for {name} has been seen for a grace period, delete its members-table row, "
                f"truststore records and tokens, and reset {name} before it joins again.",
                _CONFIRM,
                (
                    delete_row,
                    *_truststore_deletions(name, ref),
                    forget,
                    RemedyStep(RepairStepKind.RESET_NODE, Source.NODE_INFO, name),
                ),
            ),
            Remedy(
                f"Do not delete {name}'s row while its join is still in flight: the join would still reach the Raft "
                "configuration, as a member no row names (S1).",
                _UNSAFE,
                (delete_row,),
            ),
        )
    else:
        summary = f"{name} has a members-table row (role {row.role_text!r}) but is not in the Raft configuration."
        add = RemedyStep(
            _WRITE,
            Source.RAFT_CONFIG,
            record=MemberRecord(address=row.address, node_id=row.node_id),
            evidence=_read_row(row),
        )
        remedies = (
            Remedy(
                f"Once {name} has been out of Raft for a grace period, delete its members-table row and tokens; "
                "the truststores follow.",
                _CONFIRM,
                (delete_row, forget),
            ),
            Remedy(
                f"Do not add {name} to the Raft configuration to match the table: the Raft configuration decides who "
                "is a member, and a node added that does not run as one is a vote that never answers.",
                _UNSAFE,
                (add,),
            ),
        )
    return _discrepancy(
        DiscrepancyKind.MISSING,
        Severity.BLOCKING,
        summary,
        member=member,
        source=Source.RAFT_CONFIG,
        evidence=_holdings(member, ref),
        remedies=remedies,
    )


def _missing_from_table(member: Member, entry: MemberRecord, ref: _Reference) -> Discrepancy:
    label = _label(member)
    # A row can be rebuilt only from what the member proves about itself, that is from its own agent's report.
    row = MemberRecord(
        name=member.name,
        address=member.address,
        certificate_fingerprint=member.certificate_fingerprint,
        role=member.role,
        role_text="" if member.role is None else member.role.text,
    )
    report = Evidence(
        Source.AGENT,
        member.name,
        (replace(row, node_id=member.node_id, role=None, role_text=""),),
        f"its info.yaml holds node {member.node_id} at {member.address}; it serves certificate "
        f"{member.certificate_fingerprint}",
    )
    restore = (
        (
            Remedy(
                f"Restore {label}'s members-table row from its own agent's report.",
                _CONFIRM,
                (RemedyStep(_WRITE, Source.MEMBERS_TABLE, record=row, evidence=report),),
            ),
        )
        if _own_agent(entry, ref.views) is not None
        else ()
    )
    copied = _truststore_copy(entry.address, ref)
    from_copy = RemedyStep(
        _WRITE,
        Source.MEMBERS_TABLE,
        record=row if copied is None else replace(copied.records[0], entry="", certificate_pem=""),
        evidence=copied,
    )
    remove = RemedyStep(
        _DELETE,
        Source.RAFT_CONFIG,
        record=MemberRecord(address=entry.address, node_id=entry.node_id),
        evidence=Evidence(Source.RAFT_CONFIG, "", (entry,)),
    )
    return _discrepancy(
        DiscrepancyKind.MISSING,
        Severity.BLOCKING,
        f"{label} (node {member.node_id} at {member.address}) is in the Raft configuration but has no members-table "
        "row.",
        member=member,
        source=Source.MEMBERS_TABLE,
        evidence=_holdings(member, ref),
        remedies=(
            *restore,
            Remedy(
                f"Once {label} is confirmed gone or wiped, remove node {member.node_id} from the Raft configuration "
                "by address, checking quorum first if it votes.",
                _CONFIRM,
                (remove,),
            ),
            Remedy(
                f"Do not re-insert {label}'s row from truststore data: a truststore record is a copy that may be "
                "stale or another member's, and only the member's own agent proves who it is.",
                _UNSAFE,
                (from_copy,),
            ),
        ),
    )


def _role_differs(member: Member, row: MemberRecord, entry: MemberRecord, ref: _Reference) -> Discrepancy:
    raft_role = _role_name(entry.role)
    if _row_role(row) is Role.PENDING:
        summary = (
            f"{member.name}'s members-table row is still PENDING though it is a {raft_role} in Raft: the heartbeat "
            "has not recorded its role yet."
        )
    else:
        summary = (
            f"{member.name}'s members-table role is {row.role_text!r} but its Raft role is {raft_role}: the "
            "heartbeat has not caught up with the role adjuster."
        )
    return _discrepancy(
        DiscrepancyKind.ROLE_DIFFERS,
        Severity.INFO,
        summary,
        member=member,
        source=Source.MEMBERS_TABLE,
        evidence=_holdings(member, ref),
    )


# --- findings about one node --------------------------------------------------------------------------------------


def _node_findings(node: str, node_view: NodeView, ref: _Reference) -> list[Discrepancy]:
    found = []
    for source in Source:
        report = node_view.report(source)
        if report is None or source.cluster_wide:
            continue
        if report.error:
            # Without its truststore nobody knows whom a node trusts; the other per-node sources only lag or inform.
            severity = Severity.BLOCKING if source is Source.TRUSTSTORE else Severity.WARNING
            found.append(_unreadable(source, node, report.error, severity))
            continue
        found += _invalid_entries(source, node, report.invalid_entries)
        if source is Source.TRUSTSTORE:
            found += _heartbeat_rewrites(node, node_view, _truststore(node, report, ref))
        elif source in _LAGGING:
            found += _raft_view(node, node_view, report, ref)
        elif source is Source.NODE_INFO:
            found += _node_info(node, node_view, report, ref)
    return found + _agent_certificate(node, node_view, ref)


def _truststore(node: str, report: SourceReport, ref: _Reference) -> list[Discrepancy]:
    """Compare one node's truststore with the members table (S4, S7, S8, S9, S10)."""
    if ref.rows is None:
        return []
    records = _sorted(report.records)
    found = []
    if ref.raft is not None:
        # Only members in both records must be trusted everywhere: a join in flight legitimately leaves truststores
        # partial, and a row that is not in Raft has its own MISSING already.
        held = {record.name for record in records}
        for joined in ref.joined:
            if joined.row is not None and joined.entry is not None and joined.member.name not in held:
                found.append(_missing_from_truststore(node, joined, ref))
    rows = _first_by(ref.rows, lambda row: row.name)
    owners = _first_by(
        (row for row in ref.rows if row.certificate_fingerprint), lambda row: row.certificate_fingerprint
    )
    raft_only = {joined.member.address for joined in ref.joined if joined.row is None}
    misnamed: dict[str, list[MemberRecord]] = {}
    orphans: dict[Member, None] = {}
    for name, named in _group(records, lambda record: record.name).items():
        row = rows.get(name)
        if row is not None:
            found += _record_mismatches(node, row, named, ref)
            continue
        for record in named:
            owner = owners.get(record.certificate_fingerprint)
            if owner is not None:
                misnamed.setdefault(owner.name, []).append(record)
            # A Raft member without a row is still a member; its record here is evidence, not an orphan.
            elif ref.raft is not None and record.address not in raft_only:
                orphan = Member(record.name, record.certificate_fingerprint, record.address, record.node_id)
                orphans[orphan] = None
    found += [_name_mismatch(node, rows[owner], held, ref) for owner, held in misnamed.items()]
    return found + [_orphan(node, orphan, records, ref) for orphan in orphans]


def _heartbeat_rewrites(node: str, node_view: NodeView, found: list[Discrepancy]) -> list[Discrepancy]:
    """On microcluster, the leader's heartbeat replaces every member's truststore with the members table's rows, so a
    truststore that disagrees with the table is rewritten within an interval if the leader reaches the node. Said so,
    with the interval; still as severe: a node the leader does not reach keeps its drift, and the guard waits for
    the heartbeat rather than for a promise of it."""
    interval = node_view.role_adjustment_interval
    if node_view.backend != "microcluster" or interval is None:
        return found
    waiting = Remedy(
        f"Wait for microcluster's heartbeat, which rewrites {node}'s truststore from the members table every "
        f"{interval:g} s when the leader reaches {node}; check again after it.",
        _SAFE,
        (RemedyStep(RepairStepKind.WAIT, Source.TRUSTSTORE, node),),
    )
    return [
        replace(
            discrepancy,
            summary=f"{discrepancy.summary} microcluster's heartbeat rewrites this truststore every {interval:g} s.",
            remedies=(waiting, *discrepancy.remedies),
        )
        for discrepancy in found
    ]


def _missing_from_truststore(node: str, joined: _Joined, ref: _Reference) -> Discrepancy:
    member, row, entry = joined.member, joined.row, joined.entry
    assert row is not None and entry is not None  # a member only the table or only Raft holds need not be trusted
    shrink = RemedyStep(
        _DELETE,
        Source.RAFT_CONFIG,
        record=MemberRecord(address=entry.address, node_id=entry.node_id),
        evidence=Evidence(Source.RAFT_CONFIG, "", (entry,)),
    )
    return _discrepancy(
        DiscrepancyKind.MISSING,
        Severity.BLOCKING,
        f"{node}'s truststore has no record of {member.name}, which the members table and Raft both hold.",
        member=member,
        source=Source.TRUSTSTORE,
        node=node,
        evidence=_holdings(member, ref),
        remedies=(
            Remedy(
                f"Restore {member.name}'s record in {node}'s truststore from the members table.",
                _SAFE,
                (_restore_trust(node, row),),
            ),
            Remedy(
                f"Do not treat {member.name} as removed and shrink the Raft configuration: the members table and Raft "
                f"both hold it, and only {node}'s truststore lacks it.",
                _UNSAFE,
                (shrink,),
            ),
        ),
    )


def _record_mismatches(node: str, row: MemberRecord, held: list[MemberRecord], ref: _Reference) -> list[Discrepancy]:
    if all(r.address == row.address and r.certificate_fingerprint == row.certificate_fingerprint for r in held):
        return []
    member = ref.member_of(row)
    rewrite = Remedy(
        f"Rewrite {row.name}'s record in {node}'s truststore from the members table.",
        _SAFE,
        (_restore_trust(node, row),),
    )
    found = []
    addresses = sorted({record.address for record in held if record.address != row.address})
    if addresses:
        summary = (
            f"{node}'s truststore records {row.name} at {_words(addresses)}, but the members table at {row.address}."
        )
        found.append(
            _discrepancy(
                DiscrepancyKind.ADDRESS_MISMATCH,
                Severity.BLOCKING,
                summary,
                member=member,
                source=Source.TRUSTSTORE,
                node=node,
                evidence=_holdings(member, ref),
                remedies=(rewrite,),
            )
        )
    if any(record.certificate_fingerprint != row.certificate_fingerprint for record in held):
        found.append(
            _discrepancy(
                DiscrepancyKind.CERTIFICATE_MISMATCH,
                Severity.BLOCKING,
                f"{node}'s truststore holds another certificate for {row.name} than the members table does.",
                member=member,
                source=Source.TRUSTSTORE,
                node=node,
                evidence=_holdings(member, ref),
                remedies=(rewrite,),
            )
        )
    return found


def _name_mismatch(node: str, row: MemberRecord, held: list[MemberRecord], ref: _Reference) -> Discrepancy:
    member = ref.member_of(row)
    names = _labels(held)
    removals = [
        RemedyStep(
            _DELETE,
            Source.TRUSTSTORE,
            node,
            MemberRecord(name=alias),
            Evidence(Source.TRUSTSTORE, node, tuple(r for r in held if r.name == alias)),
        )
        for alias in dict.fromkeys(record.name for record in held)
    ]
    return _discrepancy(
        DiscrepancyKind.NAME_MISMATCH,
        Severity.BLOCKING,
        f"{node}'s truststore holds {member.name}'s certificate under the name {names}.",
        member=member,
        source=Source.TRUSTSTORE,
        node=node,
        evidence=_holdings(member, ref),
        remedies=(
            Remedy(
                f"Remove {names} from {node}'s truststore and restore {member.name}'s record from the members table.",
                _CONFIRM,
                (*removals, _restore_trust(node, row)),
            ),
        ),
    )


def _orphan(node: str, member: Member, records: tuple[MemberRecord, ...], ref: _Reference) -> Discrepancy:
    name = _label(member)
    held = Evidence(Source.TRUSTSTORE, node, tuple(r for r in records if r.name == member.name))
    row = MemberRecord(name=member.name, address=member.address, certificate_fingerprint=member.certificate_fingerprint)
    return _discrepancy(
        DiscrepancyKind.ORPHAN,
        Severity.BLOCKING,
        f"{node}'s truststore holds {name} ({member.address}), which neither the members table nor Raft holds.",
        member=member,
        source=Source.TRUSTSTORE,
        node=node,
        evidence=_holdings(member, ref),
        remedies=(
            Remedy(
                f"Remove {name}'s record from {node}'s truststore once no join for {name} is in flight.",
                _CONFIRM,
                (RemedyStep(_DELETE, Source.TRUSTSTORE, node, MemberRecord(name=member.name), held),),
            ),
            # A removed node keeps the cluster key and its own files; until it is wiped it can come back as a zombie.
            Remedy(
                f"Reset {name} (wipe its state) before it is added again.",
                _CONFIRM,
                (RemedyStep(RepairStepKind.RESET_NODE, Source.NODE_INFO, member.name),),
            ),
            Remedy(
                f"Do not restore a members-table row for {name} from its records or its own files: no record makes "
                "it a member, and a row would have every truststore trust it again.",
                _UNSAFE,
                (RemedyStep(_WRITE, Source.MEMBERS_TABLE, record=row, evidence=held),),
            ),
        ),
    )


def _raft_view(node: str, node_view: NodeView, report: SourceReport, ref: _Reference) -> list[Discrepancy]:
    """Compare a node's live or cached Raft configuration with the leader's.

    Both lag by design, so membership lag is only a warning once it is older than two role-adjustment ticks, and
    never for a spare, which gets no log at all. Roles alone are the role adjuster at work: never more than INFO.
    """
    if ref.raft is None:
        return []
    records = _sorted(report.records)
    age = report.age(ref.now)
    # Matched through an index by address: a check of N nodes' views of N members must stay O(N²), not O(N³).
    by_address: dict[str, list[MemberRecord]] = defaultdict(list)
    for entry in ref.raft:
        by_address[entry.address].append(entry)
    matches = {record: [e for e in by_address.get(record.address, ()) if _same_entry(record, e)] for record in records}
    matched = {id(entry) for found in matches.values() for entry in found}
    lacks = [entry for entry in ref.raft if id(entry) not in matched]
    extra = [record for record in records if not matches[record]]
    roles = [
        f"{_entry_label(record)} as {_role_name(record.role)} (Raft: {_role_name(entry.role)})"
        for record in records
        for entry in matches[record]
        if record.role is not None and record.role is not entry.role
    ]
    where = f"{node}'s {_NOUNS[report.source]}"
    if lacks or extra:
        interval = node_view.role_adjustment_interval
        young = age is not None and interval is not None and age < 2 * interval
        member = ref.member_named(node)
        spare = member is not None and member.role is Role.SPARE
        severity = Severity.INFO if young or spare else Severity.WARNING
        differences = [f"lacks {_labels(lacks)}"] if lacks else []
        differences += [f"still holds {_labels(extra)}, which the leader's does not"] if extra else []
        summary = f"{where} {' and '.join(differences)}."
    elif roles:
        severity = Severity.INFO
        summary = f"{where} lists {_words(roles)}: the role adjuster moves roles on its own."
    else:
        return []
    changed = "" if age is None else f"last changed {age:.0f}s ago"
    lagging = Evidence(report.source, node, records, changed)
    remedies = (
        (
            Remedy(
                f"If it does not catch up, restart {node}'s dqlite engine so that it reloads from the leader.",
                _CONFIRM,
                (RemedyStep(RepairStepKind.RESTART_ENGINE, report.source, node, evidence=lagging),),
            ),
        )
        if severity is Severity.WARNING
        else ()
    )
    return [
        _discrepancy(
            DiscrepancyKind.VIEW_DIFFERS,
            severity,
            summary,
            source=report.source,
            node=node,
            evidence=(Evidence(Source.RAFT_CONFIG, "", ref.raft), lagging),
            remedies=remedies,
            age=age,
        )
    ]


def _node_info(node: str, node_view: NodeView, report: SourceReport, ref: _Reference) -> list[Discrepancy]:
    """A node's info.yaml must name a Raft member at the address the table records for it. A node removed from Raft
    whose files were not wiped still believes it is a member and keeps dialling its peers (S7, S8)."""
    records = _sorted(report.records)
    row = ref.row_named(node)
    wrong = [
        record
        for record in records
        if (ref.raft is not None and not any(_same_entry(record, entry) for entry in ref.raft))
        or (row is not None and row.address != record.address)
    ]
    member = ref.member_named(node)
    if wrong:
        summary = (
            f"{node}'s info.yaml says it is {_labels(wrong)}, which is not its Raft entry or "
            "members-table address: it may still believe it is a member."
        )
        member = member or Member(node, node_view.certificate_fingerprint, wrong[0].address, wrong[0].node_id)
    elif member is not None and not records:
        summary = f"{node}'s info.yaml holds no identity, though {node} is a member."
    else:
        return []
    info = Evidence(Source.NODE_INFO, node, records)
    itself = wrong[0] if wrong else MemberRecord(address=member.address)
    from_files = MemberRecord(
        name=node, address=itself.address, certificate_fingerprint=node_view.certificate_fingerprint
    )
    return [
        _discrepancy(
            DiscrepancyKind.NODE_INFO_MISMATCH,
            Severity.BLOCKING,
            summary,
            member=member,
            source=Source.NODE_INFO,
            node=node,
            evidence=(info, *_holdings(member, ref)),
            remedies=(
                Remedy(
                    f"Reset {node} (wipe its state) before it joins again.",
                    _CONFIRM,
                    (RemedyStep(RepairStepKind.RESET_NODE, Source.NODE_INFO, node, evidence=info),),
                ),
                Remedy(
                    f"Do not restore a members-table row for {node} from its own files: its info.yaml may be what a "
                    "removal left behind, and a row made from it names a member the Raft configuration does not hold.",
                    _UNSAFE,
                    (RemedyStep(_WRITE, Source.MEMBERS_TABLE, record=from_files, evidence=info),),
                ),
            ),
        )
    ]


def _agent_certificate(node: str, node_view: NodeView, ref: _Reference) -> list[Discrepancy]:
    row = ref.row_named(node)
    if row is None or row.certificate_fingerprint == node_view.certificate_fingerprint:
        return []
    served = MemberRecord(name=node, certificate_fingerprint=row.certificate_fingerprint)
    return [
        _discrepancy(
            DiscrepancyKind.AGENT_CERTIFICATE_MISMATCH,
            Severity.BLOCKING,
            f"{node}'s agent serves another certificate than the members table records for {node}.",
            member=ref.member_of(row),
            source=Source.AGENT,
            node=node,
            evidence=(
                Evidence(Source.AGENT, node, detail=f"serves certificate {node_view.certificate_fingerprint}"),
                Evidence(Source.MEMBERS_TABLE, "", (row,)),
            ),
            remedies=(
                Remedy(
                    f"Make {node}'s agent serve the certificate its members-table row records.",
                    _CONFIRM,
                    (RemedyStep(RepairStepKind.BY_HAND, Source.AGENT, node, served, _read_row(row)),),
                ),
            ),
        )
    ]


def _unreadable(source: Source, node: str, error: str, severity: Severity) -> Discrepancy:
    return _discrepancy(
        DiscrepancyKind.SOURCE_UNREADABLE,
        severity,
        f"{node}'s {_NOUNS[source]} could not be read: {error}",
        source=source,
        node=node,
        evidence=(Evidence(source, node, detail=error),),
    )


def _invalid_entries(source: Source, node: str, entries: Iterable[InvalidEntry]) -> list[Discrepancy]:
    """One discrepancy per entry, so that each can be acknowledged or repaired on its own."""
    reasons: dict[str, list[str]] = {}
    for invalid in _sorted_invalid(entries):
        reasons.setdefault(invalid.entry, []).append(invalid.reason)
    where = f"{node}'s {_NOUNS[source]}" if node else f"the {_NOUNS[source]}"
    return [
        _discrepancy(
            DiscrepancyKind.INVALID_ENTRY,
            Severity.WARNING,
            f"{entry} in {where} is not a valid record: {'; '.join(why)}.",
            source=source,
            node=node,
            evidence=(evidence,),
            remedies=(
                Remedy(
                    f"Repair {entry} in {where}, or move it out of the way.",
                    _CONFIRM,
                    (RemedyStep(RepairStepKind.BY_HAND, source, node, MemberRecord(entry=entry), evidence),),
                ),
            ),
            entry=entry,
        )
        for entry, why in reasons.items()
        for evidence in [Evidence(source, node, detail=f"{entry}: {'; '.join(why)}")]
    ]


# --- building blocks ----------------------------------------------------------------------------------------------


def _discrepancy(
    kind: DiscrepancyKind,
    severity: Severity,
    summary: str,
    *,
    member: Member | None = None,
    source: Source | None = None,
    node: str = "",
    evidence: tuple[Evidence, ...] = (),
    remedies: tuple[Remedy, ...] = (),
    age: float | None = None,
    entry: str = "",
) -> Discrepancy:
    return Discrepancy(
        id=discrepancy_id(kind, member, source, node, entry=entry),
        kind=kind,
        severity=severity,
        member=member,
        source=source,
        node=node,
        summary=summary,
        evidence=evidence,
        remedies=remedies,
        age=age,
    )


def _restore_trust(node: str, row: MemberRecord) -> RemedyStep:
    """Writing a row's member into node's truststore, from the row: the SAFE write."""
    return RemedyStep(_WRITE, Source.TRUSTSTORE, node, _trust_record(row), _read_row(row))


def _trust_record(row: MemberRecord) -> MemberRecord:
    """A row's member as a truststore record: its identity (and certificate, when gathered), in <name>.yaml."""
    return MemberRecord(
        name=row.name,
        address=row.address,
        certificate_fingerprint=row.certificate_fingerprint,
        entry=f"{row.name}.yaml",
        certificate_pem=row.certificate_pem,
    )


def _read_row(row: MemberRecord) -> Evidence:
    return Evidence(Source.MEMBERS_TABLE, "", (row,))


def _read(source: Source, records: Iterable[MemberRecord]) -> Evidence:
    """What a cluster-wide source holds of the records, in canonical order."""
    return Evidence(source, "", _sorted(records))


def _truststore_deletions(name: str, ref: _Reference) -> list[RemedyStep]:
    """Deleting name's records from every readable truststore that holds one."""
    steps = []
    for node, node_view in ref.views:
        held = tuple(record for record in _readable_records(node_view, Source.TRUSTSTORE) if record.name == name)
        if held:
            steps.append(
                RemedyStep(
                    _DELETE, Source.TRUSTSTORE, node, MemberRecord(name=name), Evidence(Source.TRUSTSTORE, node, held)
                )
            )
    return steps


def _truststore_copy(address: str, ref: _Reference) -> Evidence | None:
    """The first truststore record at address, where it was read: the copy a row must not be rebuilt from."""
    for node, node_view in ref.views:
        for record in _readable_records(node_view, Source.TRUSTSTORE):
            if record.address == address:
                return Evidence(Source.TRUSTSTORE, node, (record,))
    return None


def _holdings(member: Member, ref: _Reference) -> tuple[Evidence, ...]:
    """What the members table, Raft and every readable truststore hold about a member: the evidence for most facts.
    A source that could not be read is left out, since an empty tuple would claim it holds nothing."""
    evidence = [
        _evidence(source, "", member, records)
        for source, records in ((Source.MEMBERS_TABLE, ref.rows), (Source.RAFT_CONFIG, ref.raft))
        if records is not None
    ]
    for node, node_view in ref.views:
        report = node_view.report(Source.TRUSTSTORE)
        if report is not None and not report.error:
            evidence.append(_evidence(Source.TRUSTSTORE, node, member, _sorted(report.records)))
    return tuple(evidence)


def _evidence(source: Source, node: str, member: Member, records: Iterable[MemberRecord]) -> Evidence:
    """The source's records of member, the ones under its own name first, at most MAX_EVIDENCE_RECORDS of them: many
    records that share one certificate or address would otherwise repeat in every discrepancy about each of them, and
    the diff would grow with the square of their number."""
    about = sorted(_about(member, records), key=lambda record: record.name != member.name)
    if len(about) <= MAX_EVIDENCE_RECORDS:
        return Evidence(source, node, tuple(about))
    left_out = len(about) - MAX_EVIDENCE_RECORDS
    detail = f"{left_out} more records share part of its identity (name, certificate, address or node ID)"
    return Evidence(source, node, tuple(about[:MAX_EVIDENCE_RECORDS]), detail)


def _about(member: Member, records: Iterable[MemberRecord]) -> tuple[MemberRecord, ...]:
    return tuple(record for record in records if same_member(record, member))


def _same_entry(record: MemberRecord, entry: MemberRecord) -> bool:
    # Node ID 0 means the record carries none: go-dqlite seeds cluster.yaml with bare join addresses.
    return record.address == entry.address and (record.node_id == entry.node_id or 0 in (record.node_id, entry.node_id))


def _row_role(row: MemberRecord) -> Role | None:
    return Role.from_text(row.role_text) or row.role


def _readable_records(node_view: NodeView, source: Source) -> tuple[MemberRecord, ...]:
    """For looking a member up: a source that is absent or unreadable contributes nothing to find."""
    report = node_view.report(source)
    return () if report is None or report.error else _sorted(report.records)


def _sorted(records: Iterable[MemberRecord]) -> tuple[MemberRecord, ...]:
    return tuple(sorted(records, key=_record_key))


def _record_key(record: MemberRecord) -> tuple[str, str, str, int, int, str, str]:
    role = 0 if record.role is None else record.role.value
    return (
        record.name,
        record.address,
        record.certificate_fingerprint,
        record.node_id,
        role,
        record.role_text,
        record.entry,
    )


def _sorted_invalid(entries: Iterable[InvalidEntry]) -> tuple[InvalidEntry, ...]:
    return tuple(sorted(set(entries), key=lambda invalid: (invalid.entry, invalid.reason)))


def _first_by(records: Iterable[MemberRecord], key: Callable[[MemberRecord], str]) -> dict[str, MemberRecord]:
    first: dict[str, MemberRecord] = {}
    for record in records:
        first.setdefault(key(record), record)
    return first


def _group(records: Iterable[MemberRecord], key: Callable[[MemberRecord], str]) -> dict[str, list[MemberRecord]]:
    groups: dict[str, list[MemberRecord]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def _identity(member: Member) -> _Identity:
    return member.name, member.certificate_fingerprint, member.address, member.node_id


def _record_identity(record: MemberRecord) -> _Identity:
    return record.name, record.certificate_fingerprint, record.address, record.node_id


def _label(member: Member) -> str:
    return member.name or member.address or f"node {member.node_id}"


def _labels(records: Iterable[MemberRecord]) -> str:
    return _words(dict.fromkeys(record.name or _entry_label(record) for record in records))


def _words(items: Iterable[str]) -> str:
    *rest, last = list(items) or [""]
    return f"{', '.join(rest)} and {last}" if rest else last


def _entry_label(record: MemberRecord) -> str:
    return f"node {record.node_id} at {record.address}" if record.node_id else record.address


def _role_name(role: Role | None) -> str:
    return "unknown" if role is None else role.name.lower().replace("_", "-")


def discrepancy_order(d: Discrepancy) -> tuple[int, int, str, str, str, str]:
    """The order a diff lists its discrepancies in: most severe first, then by kind, node, member and id."""
    member = d.member or Member()
    return -d.severity, d.kind, d.node, member.name, member.address, d.id


def _node_facts(observation: NodeObservation) -> tuple[str, str, str, tuple[_SourceFacts, ...]]:
    if observation.view is None:
        failure = observation.failure or AgentFailure.UNREACHABLE
        return observation.node, failure.name.lower(), "", ()
    sources = []
    for source in Source:
        report = observation.view.report(source)
        if report is not None and source not in _LAGGING:
            sources.append(_source_facts(report))
    # The certificate the agent serves is the node's identity as the coordinator sees it.
    return observation.node, "view", observation.view.certificate_fingerprint, tuple(sources)


def _source_facts(report: SourceReport) -> _SourceFacts:
    if report.error:
        return report.source.value, False, (), ()
    identities = tuple(sorted(_record_identity(record) for record in report.records))
    return report.source.value, True, identities, tuple(sorted(e.entry for e in report.invalid_entries))


def _digest(value: object) -> str:
    encoded = json.dumps(value, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode()).hexdigest()
