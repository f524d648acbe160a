"""Builders for ClusterViews: a consistent cluster, and small pure edits that break it one fact at a time.

Member i is named n<i>, listens on 127.0.0.1:<7000 + i>, has dqlite node ID i and a certificate whose fingerprint is the
SHA-256 of its name. n1 is the Raft leader. Every edit returns a new view; none changes its argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from coordinator.core.model import (
    AgentFailure,
    ClusterView,
    MemberRecord,
    NodeObservation,
    NodeView,
    Role,
    Source,
    SourceReport,
)

NOW = 1_700_000_000.0
ROLE_ADJUSTMENT_INTERVAL = 5.0  # seconds; a cluster.yaml younger than two of these may lag without warning
RAFT_SOURCES = (Source.RAFT_CONFIG, Source.RAFT_NODE_VIEW, Source.RAFT_CACHE)


def name(i: int) -> str:
    return f"n{i}"


def address(i: int) -> str:
    return f"127.0.0.1:{7000 + i}"


def fingerprint_of(member_name: str) -> str:
    return hashlib.sha256(member_name.encode()).hexdigest()


# --- one record of member i, as each source holds it ---------------------------------------------------------------


def row(i: int, role: Role = Role.VOTER, role_text: str | None = None) -> MemberRecord:
    text = role.text if role_text is None else role_text
    return replace(trust(i), role=role, role_text=text, entry=str(i))


def trust(i: int) -> MemberRecord:
    return MemberRecord(
        name=name(i), address=address(i), certificate_fingerprint=fingerprint_of(name(i)), entry=f"{name(i)}.yaml"
    )


def raft_entry(i: int, role: Role = Role.VOTER) -> MemberRecord:
    return MemberRecord(address=address(i), node_id=i, role=role)


# --- a consistent cluster ------------------------------------------------------------------------------------------


def consistent_view(n_members: int = 3, roles: Sequence[Role] | None = None, cache_age: float = 1.0) -> ClusterView:
    """Every source on every node holds the same members; roles default to all voters."""
    roles = list(roles) if roles is not None else [Role.VOTER] * n_members
    members = range(1, n_members + 1)
    rows = tuple(row(i, roles[i - 1]) for i in members)
    truststore = tuple(trust(i) for i in members)
    raft = tuple(raft_entry(i, roles[i - 1]) for i in members)
    observations = []
    for i in members:
        sources = (
            SourceReport(Source.MEMBERS_TABLE, rows),
            SourceReport(Source.TRUSTSTORE, truststore),
            SourceReport(Source.RAFT_CONFIG, raft, leader_address=address(1)),
            SourceReport(Source.RAFT_NODE_VIEW, raft),
            SourceReport(Source.RAFT_CACHE, raft, changed_at=NOW - cache_age),
            SourceReport(Source.NODE_INFO, (raft_entry(i, roles[i - 1]),)),
        )
        node_view = NodeView(name(i), "dqlite", fingerprint_of(name(i)), sources, ROLE_ADJUSTMENT_INTERVAL)
        observations.append(NodeObservation(name(i), address(i), view=node_view))
    return ClusterView(tuple(observations), NOW)


# --- edits ---------------------------------------------------------------------------------------------------------


def edit_reports(
    view: ClusterView, source: Source, edit: Callable[[SourceReport], SourceReport], nodes: Iterable[str] | None = None
) -> ClusterView:
    """Apply edit to source's report on the given nodes (every node with a view when nodes is None).

    The members table and the Raft configuration are one record read by every node, so changing the record itself
    means editing every node's reading of it: leave nodes as None for that.
    """
    chosen = None if nodes is None else set(nodes)

    def edit_observation(observation: NodeObservation) -> NodeObservation:
        if observation.view is None or (chosen is not None and observation.node not in chosen):
            return observation
        sources = tuple(edit(report) if report.source is source else report for report in observation.view.sources)
        return replace(observation, view=replace(observation.view, sources=sources))

    return replace(view, nodes=tuple(edit_observation(observation) for observation in view.nodes))


def drop_records(
    view: ClusterView, source: Source, member_address: str, nodes: Iterable[str] | None = None
) -> ClusterView:
    """Remove every record at member_address; the address identifies a member in every source."""
    return edit_reports(
        view,
        source,
        lambda report: replace(report, records=tuple(r for r in report.records if r.address != member_address)),
        nodes,
    )


def add_records(
    view: ClusterView, source: Source, records: Iterable[MemberRecord], nodes: Iterable[str] | None = None
) -> ClusterView:
    added = tuple(records)
    return edit_reports(view, source, lambda report: replace(report, records=report.records + added), nodes)


def replace_records(
    view: ClusterView, source: Source, old: MemberRecord, new: MemberRecord, nodes: Iterable[str] | None = None
) -> ClusterView:
    return edit_reports(
        view,
        source,
        lambda report: replace(report, records=tuple(new if r == old else r for r in report.records)),
        nodes,
    )


def set_report(view: ClusterView, source: Source, nodes: Iterable[str] | None = None, **changes: object) -> ClusterView:
    """Change fields of a report, e.g. error="permission denied", or age=600.0 (last changed 600 s before now)."""
    if "age" in changes:
        changes["changed_at"] = view.now - float(changes.pop("age"))  # type: ignore[arg-type]
    return edit_reports(view, source, lambda report: replace(report, **changes), nodes)


def edit_node_view(view: ClusterView, node: str, **changes: object) -> ClusterView:
    """Change fields of one node's NodeView, e.g. certificate_fingerprint."""
    return replace(
        view,
        nodes=tuple(
            replace(o, view=replace(o.view, **changes)) if o.node == node and o.view is not None else o
            for o in view.nodes
        ),
    )


def fail_agent(view: ClusterView, node: str, failure: AgentFailure = AgentFailure.UNREACHABLE) -> ClusterView:
    return replace(
        view,
        nodes=tuple(
            replace(o, view=None, failure=failure, detail="deadline exceeded") if o.node == node else o
            for o in view.nodes
        ),
    )


def drop_node(view: ClusterView, node: str) -> ClusterView:
    """Forget a node's observation entirely: the coordinator did not know to ask it."""
    return replace(view, nodes=tuple(o for o in view.nodes if o.node != node))


def add_raft_member(
    view: ClusterView, i: int, role: Role = Role.VOTER, nodes: Iterable[str] | None = None
) -> ClusterView:
    """Add member i to every Raft source: the leader's configuration and each node's live and cached view of it."""
    for source in RAFT_SOURCES:
        view = add_records(view, source, [raft_entry(i, role)], nodes)
    return view


def remove_raft_member(view: ClusterView, i: int, nodes: Iterable[str] | None = None) -> ClusterView:
    for source in RAFT_SOURCES:
        view = drop_records(view, source, address(i), nodes)
    return view


def on_microcluster(view: ClusterView) -> ClusterView:
    """The same cluster, every agent reporting the microcluster backend."""
    for node in [o.node for o in view.nodes if o.view is not None]:
        view = edit_node_view(view, node, backend="microcluster")
    return view
