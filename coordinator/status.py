"""The only place that knows gRPC status codes: typed errors in, rich statuses out.

Every refusal carries a google.rpc.ErrorInfo (reason, domain) and, where the error has them, field
violations (google.rpc.BadRequest). Anything unmapped is INTERNAL, with no detail that could leak.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from coordinator.errors import (
    AlreadyExists,
    ConfigurationMoved,
    DirtyMembership,
    EngineUnavailable,
    InvalidRequest,
    MemberguardError,
    MembershipRefused,
    NotFound,
    NotImplementedYet,
    OperationInFlight,
    PermissionDenied,
    SourceNotRewritable,
    StaleEpoch,
    StaleFingerprint,
    Unauthenticated,
)

DOMAIN = "memberguard.v1"

_CODES: dict[type[MemberguardError], int] = {
    InvalidRequest: code_pb2.INVALID_ARGUMENT,
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    NotImplementedYet: code_pb2.UNIMPLEMENTED,
    NotFound: code_pb2.NOT_FOUND,
    AlreadyExists: code_pb2.ALREADY_EXISTS,
    # gRPC's status-code guide: the state must be fixed first → FAILED_PRECONDITION; a test-and-set lost → ABORTED.
    DirtyMembership: code_pb2.FAILED_PRECONDITION,
    StaleFingerprint: code_pb2.ABORTED,
    StaleEpoch: code_pb2.FAILED_PRECONDITION,
    OperationInFlight: code_pb2.FAILED_PRECONDITION,
    SourceNotRewritable: code_pb2.FAILED_PRECONDITION,
    ConfigurationMoved: code_pb2.FAILED_PRECONDITION,
    EngineUnavailable: code_pb2.UNAVAILABLE,
}


def to_status(error: MemberguardError) -> grpc.Status:
    code = next((c for kind, c in _CODES.items() if isinstance(error, kind)), code_pb2.INTERNAL)
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)]
    if isinstance(error, InvalidRequest):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in error.violations
                ]
            )
        )
    if isinstance(error, DirtyMembership):
        details.append(
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=v.type, subject=v.subject, description=v.description
                    )
                    for v in error.violations
                ]
            )
        )
    if isinstance(error, MembershipRefused):
        details.append(error.diff)
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    message = str(error) if code != code_pb2.INTERNAL else "internal error"
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=packed))


async def abort_with(context: Any, error: MemberguardError) -> NoReturn:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # grpc.aio's abort raises; this keeps the NoReturn honest
