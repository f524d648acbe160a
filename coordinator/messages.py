"""Converts between the core's values (coordinator/core/model.py) and the protobuf messages of the contract.

Enums convert by number: the core's IntEnums carry the protobuf numbers, and 0 (UNSPECIFIED) is None.
"""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2
from memberguard.v1 import agent_pb2, operation_pb2, repair_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator import pki
from coordinator.core import model
from coordinator.core.operation import OperationRecord
from coordinator.core.plan import (
    Action,
    EnsureMemberRow,
    EnsureRaftEntry,
    EnsureTruststoreRecord,
    FenceNode,
    ForgetMember,
    IssueMicroclusterToken,
    JoinThroughMicrocluster,
    RegisterMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveThroughMicrocluster,
    RemoveTruststoreRecord,
    RevokeMicroclusterToken,
)
from coordinator.core.repair import RepairPlan, RepairStep
from coordinator.core.tokens import TokenRecord


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _seconds(message: duration_pb2.Duration, present: bool) -> float | None:
    return message.ToNanoseconds() / 1e9 if present else None


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _role(value: int) -> model.Role | None:
    return model.Role(value) if value else None


def record_to_proto(record: model.MemberRecord) -> pb.MemberRecord:
    return pb.MemberRecord(
        name=record.name,
        address=record.address,
        certificate_fingerprint=record.certificate_fingerprint,
        certificate_pem=record.certificate_pem,
        node_id=record.node_id,
        role=pb.Role.ValueType(record.role or 0),
        role_text=record.role_text,
        entry=record.entry,
    )


def record_from_proto(message: pb.MemberRecord) -> model.MemberRecord:
    return model.MemberRecord(
        name=message.name,
        address=message.address,
        certificate_fingerprint=message.certificate_fingerprint,
        certificate_pem=message.certificate_pem,
        node_id=message.node_id,
        role=_role(message.role),
        role_text=message.role_text,
        entry=message.entry,
    )


def view_to_proto(view: model.NodeView) -> pb.NodeView:
    return pb.NodeView(
        node=view.node,
        backend=view.backend,
        certificate_fingerprint=view.certificate_fingerprint,
        role_adjustment_interval=_duration(view.role_adjustment_interval),
        sources=[
            pb.SourceReport(
                source=pb.Source.ValueType(report.source),
                error=report.error,
                records=[record_to_proto(r) for r in report.records],
                invalid_entries=[pb.InvalidEntry(entry=e.entry, reason=e.reason) for e in report.invalid_entries],
                changed_at=_timestamp(report.changed_at) if report.changed_at is not None else None,
                leader_address=report.leader_address,
            )
            for report in view.sources
        ],
    )


def view_from_proto(message: pb.NodeView, seen: dict[bytes, model.MemberRecord] | None = None) -> model.NodeView:
    """The view in message. `seen` maps the records already converted, by their bytes, to what they became: the views
    of one gather hold each member's record once per node and source (N² records in all at N nodes), and converting
    each once costs a tenth as much; equal records are then one object, which the diff compares at once."""
    if seen is None:
        seen = {}

    def record(message: pb.MemberRecord) -> model.MemberRecord:
        key = message.SerializeToString()
        found = seen.get(key)
        if found is None:
            found = seen[key] = record_from_proto(message)
        return found

    return model.NodeView(
        node=message.node,
        backend=message.backend,
        certificate_fingerprint=message.certificate_fingerprint,
        role_adjustment_interval=_seconds(
            message.role_adjustment_interval, message.HasField("role_adjustment_interval")
        ),
        sources=tuple(
            model.SourceReport(
                source=model.Source(report.source),
                error=report.error,
                records=tuple(record(r) for r in report.records),
                invalid_entries=tuple(
                    model.InvalidEntry(entry=e.entry, reason=e.reason) for e in report.invalid_entries
                ),
                changed_at=report.changed_at.ToNanoseconds() / 1e9 if report.HasField("changed_at") else None,
                leader_address=report.leader_address,
            )
            for report in message.sources
            # A source this coordinator does not know (a newer agent) cannot be compared; skip it.
            if report.source in model.Source._value2member_map_
        ),
    )


def member_to_proto(member: model.Member) -> pb.Member:
    return pb.Member(
        name=member.name,
        certificate_fingerprint=member.certificate_fingerprint,
        address=member.address,
        node_id=member.node_id,
        role=pb.Role.ValueType(member.role or 0),
    )


def evidence_to_proto(evidence: model.Evidence) -> pb.Evidence:
    return pb.Evidence(
        source=pb.Source.ValueType(evidence.source),
        node=evidence.node,
        records=[record_to_proto(r) for r in evidence.records],
        detail=evidence.detail,
    )


def remedy_step_to_proto(step: model.RemedyStep) -> pb.RepairStep:
    message = pb.RepairStep(
        kind=pb.RepairStepKind.ValueType(step.kind),
        node=step.node,
        source=pb.Source.ValueType(step.source or 0),
    )
    if step.record is not None:
        message.record.CopyFrom(record_to_proto(step.record))
    if step.evidence is not None:
        message.evidence.CopyFrom(evidence_to_proto(step.evidence))
    return message


def remedy_to_proto(remedy: model.Remedy) -> pb.Remedy:
    return pb.Remedy(
        action=remedy.action,
        safety=pb.RemedySafety.ValueType(remedy.safety),
        steps=[remedy_step_to_proto(step) for step in remedy.steps],
    )


def discrepancy_to_proto(discrepancy: model.Discrepancy) -> pb.Discrepancy:
    message = pb.Discrepancy(
        id=discrepancy.id,
        kind=pb.DiscrepancyKind.ValueType(discrepancy.kind),
        severity=pb.Severity.ValueType(discrepancy.severity),
        source=pb.Source.ValueType(discrepancy.source or 0),
        node=discrepancy.node,
        summary=discrepancy.summary,
        evidence=[evidence_to_proto(e) for e in discrepancy.evidence],
        remedies=[remedy_to_proto(r) for r in discrepancy.remedies],
        age=_duration(discrepancy.age),
        explained_by_operation_id=discrepancy.explained_by,
    )
    if discrepancy.member is not None:
        message.member.CopyFrom(member_to_proto(discrepancy.member))
    return message


def operation_to_proto(record: OperationRecord, token: str = "") -> operation_pb2.Operation:
    """The journaled operation as a message; `token` is the issued token's text, for the one answer that carries it."""
    return operation_pb2.Operation(
        id=record.id,
        kind=operation_pb2.OperationKind.ValueType(record.kind),
        member=member_to_proto(record.member),
        state=operation_pb2.OperationState.ValueType(record.state),
        steps=[
            operation_pb2.Step(
                name=step.name,
                state=operation_pb2.StepState.ValueType(step.state),
                commit_point=step.commit_point,
                finished_at=_timestamp(step.finished_at) if step.finished_at is not None else None,
                deferred=step.deferred,
            )
            for step in record.steps
        ],
        error=record.error,
        token=token,
        plan=record.plan,
        audit=operation_pb2.Audit(
            requested_by=record.audit.requested_by,
            certificate_fingerprint=record.audit.certificate_fingerprint,
            request_id=record.audit.request_id,
            verdict=record.audit.verdict,
            fingerprint=record.audit.fingerprint,
            acknowledged_discrepancy_ids=list(record.audit.acknowledged),
        ),
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        attempts=record.attempts,
    )


def token_to_proto(record: TokenRecord) -> operation_pb2.TokenInfo:
    """What ListTokens shows of a token: never its secret or digest."""
    return operation_pb2.TokenInfo(
        name=record.name,
        expires_at=_timestamp(record.expires_at),
        bound_certificate_fingerprint=record.bound_fingerprint,
        issued_by=record.issued_by,
    )


def diff_to_proto(diff: model.MembershipDiff, minimum: model.Severity | None = None) -> pb.MembershipDiff:
    """The diff as a message; discrepancies below `minimum` are left out (the fingerprint still covers them)."""
    return pb.MembershipDiff(
        fingerprint=diff.fingerprint,
        discrepancies=[discrepancy_to_proto(d) for d in diff.discrepancies if minimum is None or d.severity >= minimum],
        members=[member_to_proto(m) for m in diff.members],
        nodes=list(diff.nodes),
        observed_at=_timestamp(diff.observed_at),
    )


def step_to_proto(action: Action) -> agent_pb2.ApplyStepRequest:
    """The request that has an agent apply action (the coordinator's own steps have none)."""
    match action:
        case EnsureTruststoreRecord(name=name, address=address, certificate_pem=pem):
            return agent_pb2.ApplyStepRequest(
                ensure_truststore_record=agent_pb2.TruststoreRecord(name=name, address=address, certificate_pem=pem)
            )
        case RemoveTruststoreRecord(name=name):
            return agent_pb2.ApplyStepRequest(remove_truststore_record=name)
        case EnsureMemberRow(name=name, address=address, certificate_pem=pem, role=role):
            return agent_pb2.ApplyStepRequest(
                ensure_member_row=agent_pb2.MemberRow(name=name, address=address, certificate_pem=pem, role=role)
            )
        case RemoveMemberRow(name=name):
            return agent_pb2.ApplyStepRequest(remove_member_row=name)
        case EnsureRaftEntry(node_id=node_id, address=address, role=role):
            return agent_pb2.ApplyStepRequest(
                ensure_raft_entry=agent_pb2.RaftEntry(node_id=node_id, address=address, role=pb.Role.ValueType(role))
            )
        case RemoveRaftEntry(node_id=node_id, address=address, role=role):
            entry = agent_pb2.RaftEntry(node_id=node_id, address=address)
            if role is not None:
                entry.role = pb.Role.ValueType(role)
            return agent_pb2.ApplyStepRequest(remove_raft_entry=entry)
        case RemoveThroughMicrocluster(name=name, address=address, force=force):
            removal = agent_pb2.MicroclusterRemoval(name=name, address=address, force=force)
            return agent_pb2.ApplyStepRequest(remove_through_microcluster=removal)
        case IssueMicroclusterToken(name=name, ttl=ttl):
            token = agent_pb2.MicroclusterToken(name=name)
            token.expire_after.FromNanoseconds(int(ttl * 1e9))
            return agent_pb2.ApplyStepRequest(issue_microcluster_token=token)
        case RevokeMicroclusterToken(name=name):
            return agent_pb2.ApplyStepRequest(revoke_microcluster_token=name)
        case JoinThroughMicrocluster(name=name, address=address):
            # The token is the runner's to add (plan.JoinThroughMicrocluster).
            join = agent_pb2.MicroclusterJoin(name=name, address=address)
            return agent_pb2.ApplyStepRequest(join_through_microcluster=join)
        case FenceNode():
            return agent_pb2.ApplyStepRequest(fence_node=True)
        case ForgetMember() | RegisterMember():
            raise AssertionError("the coordinator applies its own steps itself")


def _typed(action: Action) -> tuple[model.RepairStepKind, model.MemberRecord | None]:
    """What a planned step does, in the terms of a remedy's step: its kind, and the record it writes or deletes."""
    write, delete = model.RepairStepKind.WRITE_RECORD, model.RepairStepKind.DELETE_RECORD
    match action:
        case EnsureTruststoreRecord(name=name, address=address, certificate_pem=pem):
            fingerprint = pki.fingerprint(pem)
            return write, model.MemberRecord(name, address, fingerprint, entry=f"{name}.yaml", certificate_pem=pem)
        case EnsureMemberRow(name=name, address=address, certificate_pem=pem, role=role):
            row = model.MemberRecord(
                name,
                address,
                pki.fingerprint(pem),
                role=model.Role.from_text(role),
                role_text=role,
                certificate_pem=pem,
            )
            return write, row
        case RemoveTruststoreRecord(name=name) | RemoveMemberRow(name=name):
            return delete, model.MemberRecord(name=name)
        case RemoveRaftEntry(node_id=node_id, address=address, role=role):
            return delete, model.MemberRecord(address=address, node_id=node_id, role=role)
        case RemoveThroughMicrocluster(name=name, address=address, node_id=node_id):
            return delete, model.MemberRecord(name=name, address=address, node_id=node_id)
        case FenceNode():
            return model.RepairStepKind.RESET_NODE, None
        case ForgetMember(name=name):
            return model.RepairStepKind.FORGET_MEMBER, model.MemberRecord(name=name)
        case _:
            raise AssertionError(f"no repair plans {type(action).__name__}")


def repair_step_to_proto(step: RepairStep) -> pb.RepairStep:
    """A planned step as the contract has it: a remedy's step, with the name of what it does and the agent that
    applies it."""
    kind, record = _typed(step.planned.action)
    message = remedy_step_to_proto(model.RemedyStep(kind, step.source, step.planned.target, record, step.evidence))
    message.name = step.planned.name
    return message


def repair_plan_to_proto(plan: RepairPlan) -> repair_pb2.RepairPlan:
    return repair_pb2.RepairPlan(
        fingerprint=plan.fingerprint,
        actions=[
            repair_pb2.RepairAction(
                id=action.id,
                clears=action.clears,
                member=member_to_proto(action.member),
                safety=pb.RemedySafety.ValueType(action.safety),
                reason=action.reason,
                steps=[repair_step_to_proto(step) for step in action.steps],
                remainder=action.remainder,
            )
            for action in plan.actions
        ],
        unplanned=[
            repair_pb2.UnplannedDiscrepancy(
                discrepancy_id=u.discrepancy,
                reason=u.reason,
                eligible_at=_timestamp(u.eligible_at) if u.eligible_at is not None else None,
            )
            for u in plan.unplanned
        ],
    )
