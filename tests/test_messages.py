"""The diff's remedies and a repair plan's steps through the contract: core values to messages, to bytes and to
proto3 JSON and back, with every typed field of a step where the core put it."""

from __future__ import annotations

from dataclasses import replace

import pytest
from google.protobuf import json_format
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import repair_pb2

from coordinator import pki
from coordinator.core import model
from coordinator.core.diff import compute_diff
from coordinator.core.repair import plan_repair
from coordinator.messages import (
    diff_to_proto,
    evidence_to_proto,
    record_from_proto,
    repair_plan_to_proto,
    view_from_proto,
    view_to_proto,
)

from .core.test_diff import (
    UNSAFE_SENTENCES,
    invalid_truststore_entries,
    pending_row_trusted_by_leader,
    stale_cache,
    truststore_file_deleted,
)
from .core.views import address, consistent_view, edit_reports, name

VIEWS = [
    *UNSAFE_SENTENCES,
    ("stalled join trusted by the leader", pending_row_trusted_by_leader()),
    ("invalid entries", invalid_truststore_entries()),
    ("stale cache", stale_cache(60.0)),
]


def step_from_proto(message: pb.RepairStep) -> model.RemedyStep:
    """The step the message carries, as the core has it (only this test reads steps back into the core)."""
    evidence = message.evidence
    return model.RemedyStep(
        kind=model.RepairStepKind(message.kind),
        source=model.Source(message.source) if message.source else None,
        node=message.node,
        record=record_from_proto(message.record) if message.HasField("record") else None,
        evidence=model.Evidence(
            model.Source(evidence.source),
            evidence.node,
            tuple(record_from_proto(r) for r in evidence.records),
            evidence.detail,
        )
        if message.HasField("evidence")
        else None,
    )


@pytest.mark.parametrize("view", [pytest.param(v, id=i) for i, v in VIEWS])
def test_remedies_keep_their_typed_steps_through_bytes_and_json(view: model.ClusterView) -> None:
    diff = compute_diff(view)
    message = diff_to_proto(diff)
    assert pb.MembershipDiff.FromString(message.SerializeToString()) == message
    assert json_format.Parse(json_format.MessageToJson(message), pb.MembershipDiff()) == message
    sent = [(r.action, r.safety, r.steps) for d in diff.discrepancies for r in d.remedies]
    received = [
        (r.action, model.RemedySafety(r.safety), tuple(step_from_proto(s) for s in r.steps))
        for d in message.discrepancies
        for r in d.remedies
    ]
    assert received == sent
    # A remedy's step has no name of its own: its remedy's sentence says what all its steps do.
    assert all(not s.name for d in message.discrepancies for r in d.remedies for s in r.steps)


def test_the_json_names_a_steps_kind_and_record() -> None:
    message = diff_to_proto(compute_diff(truststore_file_deleted()))
    document = json_format.MessageToDict(message)
    restore = document["discrepancies"][0]["remedies"][0]
    assert restore["steps"] == [
        {
            "node": "n3",
            "source": "SOURCE_TRUSTSTORE",
            "kind": "REPAIR_STEP_KIND_WRITE_RECORD",
            "record": {
                "name": "n2",
                "address": address(2),
                "certificateFingerprint": message.discrepancies[0].member.certificate_fingerprint,
                "entry": "n2.yaml",
            },
            "evidence": json_format.MessageToDict(message.discrepancies[0].remedies[0].steps[0].evidence),
        }
    ]


def test_a_repair_plans_steps_are_the_same_message_with_their_kind_and_record() -> None:
    """S9 with real certificates: the plan writes n2's record into n3's truststore, and says so in typed form."""
    identities = {name(i): pki.make_identity(name(i)) for i in (1, 2, 3)}

    def real(record: model.MemberRecord) -> model.MemberRecord:
        identity = identities.get(record.name)
        if identity is None:
            return record
        return replace(
            record, certificate_fingerprint=identity.fingerprint, certificate_pem=identity.certificate_pem.decode()
        )

    view = truststore_file_deleted()
    for source in (model.Source.MEMBERS_TABLE, model.Source.TRUSTSTORE):
        view = edit_reports(view, source, lambda report: replace(report, records=tuple(map(real, report.records))))
    view = replace(
        view,
        nodes=tuple(
            replace(o, view=replace(o.view, certificate_fingerprint=identities[o.node].fingerprint))
            if o.view is not None
            else o
            for o in view.nodes
        ),
    )
    diff = compute_diff(view)
    plan = plan_repair(view, diff, now=view.now, grace=300.0)
    (action,) = plan.actions
    (step,) = action.steps
    message = repair_plan_to_proto(plan)
    assert repair_pb2.RepairPlan.FromString(message.SerializeToString()) == message
    (sent,) = message.actions[0].steps
    assert (sent.name, sent.node, sent.source) == (step.planned.name, "n3", pb.SOURCE_TRUSTSTORE)
    assert sent.kind == pb.REPAIR_STEP_KIND_WRITE_RECORD
    n2 = identities["n2"]
    assert (sent.record.name, sent.record.address, sent.record.entry) == ("n2", address(2), "n2.yaml")
    assert sent.record.certificate_fingerprint == n2.fingerprint
    assert sent.record.certificate_pem == n2.certificate_pem.decode()
    assert step.evidence is not None and sent.evidence == evidence_to_proto(step.evidence)
    # The diff's own remedy for the same fact writes the same record from the same row.
    (remedy_step,) = diff_to_proto(diff).discrepancies[0].remedies[0].steps
    assert (remedy_step.kind, remedy_step.node, remedy_step.source) == (sent.kind, sent.node, sent.source)
    assert remedy_step.record == sent.record


def test_views_converted_together_share_each_record_and_equal_those_converted_alone() -> None:
    views = [o.view for o in consistent_view(3).nodes]
    assert all(v is not None for v in views)
    messages = [view_to_proto(v) for v in views if v is not None]
    seen: dict[bytes, model.MemberRecord] = {}
    together = [view_from_proto(m, seen) for m in messages]
    assert together == [view_from_proto(m) for m in messages] == views
    first, second = (v.report(model.Source.TRUSTSTORE) for v in together[:2])
    assert first is not None and second is not None
    assert all(a is b for a, b in zip(first.records, second.records, strict=True))
    assert len(seen) == len({r for v in together for report in v.sources for r in report.records})
