"""The coordinator's Prometheus metrics: what the last membership check found, how checks go, and the journal's
operations; served over plain HTTP on the coordinator's `metrics_listen` address (service.py).

Each coordinator has a registry of its own, never prometheus_client's global one, which also carries the Python
process's own collectors and whatever else in the process registers there.

What the last check found (and, at each background check, what the journal holds) is a snapshot that replaces the
previous one whole, in one assignment, and a collector renders it at scrape time. The scrape runs in the server's
thread: it sees one check's findings, never half of one, and a discrepancy that cleared drops to 0 at once. Until the
first check there is no snapshot and those gauges are absent: nothing is known yet, which 0 would misstate. Every
label value that can occur is rendered (0 when none was found), so an alert sees a series go to 0 rather than vanish.

Label values are spelled as `memberguard check` prints them: lowercase, words joined by "-".
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_wsgi_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from coordinator.core.model import AgentFailure, ClusterView, DiscrepancyKind, MembershipDiff, Severity
from coordinator.core.operation import OperationKind, OperationState

_AGENT_GAUGES = {
    AgentFailure.UNREACHABLE: (
        "memberguard_agents_unreachable",
        "Registered members whose agent did not answer the last check in time: what their node holds is unknown.",
    ),
    AgentFailure.UNTRUSTED: (
        "memberguard_agents_untrusted",
        "Registered members whose agent the last check could not trust: no certificate pinned or learned for it, a "
        "refused handshake, or an agent answering for another member.",
    ),
}

OperationCounts = Mapping[tuple[OperationKind, OperationState], int]


class Origin(StrEnum):
    """Who asked for a check."""

    CALLER = "caller"  # CheckMembership
    BACKGROUND = "background"  # the coordinator itself, every metrics_interval seconds


@dataclass(frozen=True)
class _Findings:
    discrepancies: Mapping[tuple[Severity, DiscrepancyKind], int]
    agent_failures: Mapping[AgentFailure, int]


def _label(value: Enum) -> str:
    return value.name.lower().replace("_", "-")


class _Snapshots:
    """The collector of the gauges that describe the cluster, from the latest snapshots."""

    def __init__(self) -> None:
        self.findings: _Findings | None = None
        self.operations: OperationCounts | None = None

    def collect(self) -> Iterator[Metric]:
        findings, operations = self.findings, self.operations
        if findings is not None:
            yield from _findings(findings)
        if operations is not None:
            yield from _operations(operations)


def _findings(findings: _Findings) -> Iterator[Metric]:
    discrepancies = GaugeMetricFamily(
        "memberguard_discrepancies",
        "Discrepancies the last membership check found, by severity and kind (those an operation in flight explains "
        "are INFO).",
        labels=("severity", "kind"),
    )
    for severity in Severity:
        for kind in DiscrepancyKind:
            discrepancies.add_metric((_label(severity), _label(kind)), findings.discrepancies.get((severity, kind), 0))
    yield discrepancies
    for failure, (name, documentation) in _AGENT_GAUGES.items():
        yield GaugeMetricFamily(name, documentation, value=findings.agent_failures.get(failure, 0))


def _operations(operations: OperationCounts) -> Iterator[Metric]:
    counts = GaugeMetricFamily(
        "memberguard_operations",
        "Operations in the journal at the last background check, by kind and state.",
        labels=("kind", "state"),
    )
    for kind in OperationKind:
        for state in OperationState:
            counts.add_metric((_label(kind), _label(state)), operations.get((kind, state), 0))
    yield counts
    yield GaugeMetricFamily(
        "memberguard_operations_parked",
        "Operations parked in the journal at the last background check: each blocks every guarded change until it "
        "finishes or an operator abandons it.",
        value=sum(n for (_, state), n in operations.items() if state is OperationState.PARKED),
    )


class Metrics:
    """One coordinator's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._checks = Counter(
            "memberguard_checks",
            "Membership checks completed, by origin: caller (CheckMembership) or background (the coordinator's own).",
            ("origin",),
            registry=self.registry,
        )
        self._durations = Histogram(
            "memberguard_check_duration_seconds",
            "How long a membership check took, from the gather to the diff, by origin.",
            ("origin",),
            registry=self.registry,
        )
        for origin in Origin:
            self._checks.labels(origin)
            self._durations.labels(origin)
        self._snapshots = _Snapshots()
        self.registry.register(self._snapshots)

    def checked(self, origin: Origin, seconds: float) -> None:
        """Counts a check that took seconds."""
        self._checks.labels(origin).inc()
        self._durations.labels(origin).observe(seconds)

    def found(self, view: ClusterView, diff: MembershipDiff) -> None:
        """Replaces what the last check found with what view and its diff say."""
        self._snapshots.findings = _Findings(
            discrepancies=collections.Counter((d.severity, d.kind) for d in diff.discrepancies),
            agent_failures=collections.Counter(o.failure for o in view.nodes if o.failure is not None),
        )

    def journaled(self, operations: OperationCounts) -> None:
        """Replaces the journal's operation counts."""
        self._snapshots.operations = operations


def serve(metrics: Metrics, host: str, port: int) -> WSGIServer:
    """Serves metrics on host and port (0 picks one) from a daemon thread; the server's `server_port` is the port it
    bound. Stop it with shutdown() and server_close()."""
    server, _ = start_wsgi_server(port, host, metrics.registry)
    return server
