"""Whom the gather asks for certificates it has not seen: as few nodes as hold them all, not every node."""

from __future__ import annotations

from dataclasses import replace

from coordinator.core.model import ClusterView, NodeObservation, Source
from coordinator.learned_trust import LearnedTrust
from tests.core.views import add_records, consistent_view, edit_reports, trust


def _with_pems(view: ClusterView) -> tuple[NodeObservation, ...]:
    """view's observations as agents asked for certificates answer: every truststore record with its PEM."""
    with_pems = edit_reports(
        view,
        Source.TRUSTSTORE,
        lambda report: replace(
            report, records=tuple(replace(r, certificate_pem=f"PEM of {r.name}\n") for r in report.records)
        ),
    )
    return with_pems.nodes


def test_one_node_is_asked_when_every_truststore_agrees() -> None:
    view = consistent_view(5)
    learned = LearnedTrust()
    assert learned.learn(view.nodes)
    assert len(learned.holders(view.nodes)) == 1


def test_a_certificate_only_one_node_holds_is_asked_of_that_node_too() -> None:
    view = add_records(consistent_view(5), Source.TRUSTSTORE, [trust(6)], nodes=["n4"])
    learned = LearnedTrust()
    learned.learn(view.nodes)
    holders = learned.holders(view.nodes)
    assert "n4" in {o.node for o in holders} and len(holders) <= 2
    learned.learn(_with_pems(ClusterView(nodes=tuple(holders), now=view.now)))
    assert learned.holders(view.nodes) == [], "nothing left to ask once the holders' PEMs are learned"
    assert not any(learned.lacks_certificates(o) for o in view.nodes)
