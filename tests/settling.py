"""Waiting for a lab to settle after a change: the one definition the operation tests share."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from memberguard import Client
from memberguard.v1 import membership_pb2 as pb
from memberguard.v1 import operation_pb2 as o

FINISHED = (o.OPERATION_STATE_SUCCEEDED, o.OPERATION_STATE_ROLLED_BACK)


def settled(
    client: Client, within: float, *, parked: Callable[[o.Operation], None] = lambda _: None
) -> pb.MembershipDiff:
    """The diff once every operation is finished, nothing is WARNING or worse and no member is PENDING (the engine's
    own lag is INFO); fails after `within` seconds with what was left. A parked operation must say why; `parked` is
    shown each one seen on the way."""
    deadline = time.monotonic() + within
    while True:
        unfinished = [op for op in client.list_operations().operations if op.state not in FINISHED]
        diff = client.check_membership(timeout=10).diff
        loud = [d for d in diff.discrepancies if d.severity != pb.SEVERITY_INFO]
        pending = [m.name for m in diff.members if m.role == pb.ROLE_PENDING]
        for operation in unfinished:
            if operation.state == o.OPERATION_STATE_PARKED:
                assert operation.error, "a parked operation must say why"
                parked(operation)
        if not (unfinished or loud or pending):
            return diff
        if time.monotonic() > deadline:
            pytest.fail(
                f"not settled within {within:g} s: unfinished "
                f"{[(op.id, o.OperationState.Name(op.state), op.error, op.plan) for op in unfinished]}, "
                f"discrepancies {[(pb.DiscrepancyKind.Name(d.kind), d.summary) for d in loud]}, pending {pending}"
            )
        time.sleep(0.1)
