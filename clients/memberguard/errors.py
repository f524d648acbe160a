"""Typed errors raised by the memberguard clients.

Every failed call raises exactly one of these, decoded from the gRPC status and its rich details
(`google.rpc.ErrorInfo`, `BadRequest`, `PreconditionFailure`, `RetryInfo`, and the `memberguard.v1.MembershipDiff`).
The type is chosen by the ErrorInfo reason first (the coordinator's reasons, domain memberguard.v1), and by the
status code only when the reason is one this client has no type for:

    MemberguardError                 code, message, reason, metadata, diff
    ├── InvalidArgument              INVALID_ARGUMENT: field_violations [(field, description)]
    ├── PermissionDenied             PERMISSION_DENIED: this certificate may not call this RPC
    ├── Unauthenticated              UNAUTHENTICATED
    ├── NotFound                     NOT_FOUND
    ├── AlreadyExists                ALREADY_EXISTS
    ├── FailedPrecondition           FAILED_PRECONDITION with a reason this client has no type for
    ├── Aborted                      ABORTED, likewise
    ├── MembershipRefused            the guard refused a change: diff (the diff it decided on), violations
    │   │                            [(type, subject, description)], discrepancies_left_out
    │   ├── DirtyMembership          MEMBERSHIP_INCONSISTENT: blocking discrepancies, one violation each; fix the
    │   │                            state (or acknowledge them, where the policy allows) first
    │   ├── OperationParked          OPERATION_PARKED: a parked operation must be finished first; operation_ids
    │   ├── NotAbandonable           NOT_ABANDONABLE: the operation is not parked, or may be past its commit point
    │   │                            (force it, with its discrepancies acknowledged)
    │   └── StaleFingerprint         FINGERPRINT_STALE: the fingerprint sent is not the current one; re-read, retry
    ├── TokenRefused                 TOKEN_*: a join token cannot be used, or changed, as asked
    │   ├── TokenExpired             TOKEN_EXPIRED: issue a new one
    │   └── TokenInUse               TOKEN_IN_USE: a join in flight is bound to it, so it cannot be revoked now
    ├── Unavailable                  UNAVAILABLE: the coordinator is unreachable (connection refused, TLS
    │                                handshake failed) or not serving
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: the call's timeout passed, or the request's deadline passed
    │                                before it ran (DEADLINE_PASSED)
    ├── Unimplemented                UNIMPLEMENTED
    ├── ResourceExhausted            RESOURCE_EXHAUSTED
    │   └── TooManyAttempts          TOO_MANY_FAILED_ATTEMPTS: this address failed too often; retry_after seconds
    └── Internal                     INTERNAL: error_id, which the coordinator's log line carries too

Any other status code raises MemberguardError itself. `reason` is the ErrorInfo reason (UPPER_SNAKE), empty
when the status carried none; a client-side argument check raises InvalidArgument with the reason
CLIENT_VALIDATION before anything is sent. `diff` is set on whichever error carried a MembershipDiff, None
otherwise; a refusal too large to send whole carries a diff with its fingerprint and only the first discrepancies,
and `discrepancies_left_out` says how many it left out (CheckMembership has them all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.rpc import status_pb2

from memberguard.v1 import membership_pb2


class MemberguardError(Exception):
    """A call failed; the base of every error the memberguard clients raise."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        diff: membership_pb2.MembershipDiff | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.diff = diff
        # The google.rpc.Status as the server sent it, every detail included (error_from_rpc sets it); None for an
        # error the client raised itself.
        self.status: status_pb2.Status | None = None

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


class InvalidArgument(MemberguardError):
    """The request was malformed; field_violations names each bad field (dotted path) and what is wrong."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        field_violations: Sequence[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
        diff: membership_pb2.MembershipDiff | None = None,
    ) -> None:
        super().__init__(code, message, reason, metadata=metadata, diff=diff)
        self.field_violations: list[tuple[str, str]] = list(field_violations)


class PermissionDenied(MemberguardError):
    """The caller's certificate is known but may not call this RPC."""


class Unauthenticated(MemberguardError):
    """The caller's certificate is not one the coordinator accepts."""


class NotFound(MemberguardError):
    """The thing named in the request does not exist."""


class AlreadyExists(MemberguardError):
    """The thing the request would create exists already."""


class FailedPrecondition(MemberguardError):
    """The state must change before this request can succeed (a reason this client has no own type for)."""


class Aborted(MemberguardError):
    """The request lost a race (a reason this client has no own type for): re-read, then retry."""


class MembershipRefused(MemberguardError):
    """The guard refused a membership change; `diff` is the diff it decided on, if the coordinator sent it.

    violations holds one (type, subject, description) per thing in the way, from PreconditionFailure;
    discrepancies_left_out counts the discrepancies the coordinator left out of `diff` to keep the refusal within
    gRPC's size limit (0 when the diff is whole).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        violations: Sequence[tuple[str, str, str]] = (),
        metadata: Mapping[str, str] | None = None,
        diff: membership_pb2.MembershipDiff | None = None,
    ) -> None:
        super().__init__(code, message, reason, metadata=metadata, diff=diff)
        self.violations: list[tuple[str, str, str]] = list(violations)
        left_out = self.metadata.get("discrepancies_left_out", "0")
        self.discrepancies_left_out = int(left_out) if left_out.isdigit() else 0


class DirtyMembership(MembershipRefused):
    """Blocking discrepancies stand: repair them (or acknowledge them, where the policy allows) first; one violation
    per blocking discrepancy."""


class OperationParked(MembershipRefused):
    """An operation that could not finish is parked and blocks every change until it is finished (see `memberguard
    ops ID`); one violation (PARKED_OPERATION, its id, its error and plan) per parked operation."""

    @property
    def operation_ids(self) -> list[str]:
        return [subject for kind, subject, _ in self.violations if kind == "PARKED_OPERATION"]


class NotAbandonable(MembershipRefused):
    """The operation asked to be abandoned is not parked, or may be past its commit point: abandoning it then needs
    force and its discrepancies acknowledged (one violation each)."""


class StaleFingerprint(MembershipRefused):
    """The membership changed since the caller's CheckMembership: re-read the diff, then retry."""


class TokenRefused(MemberguardError):
    """A join token cannot be used (a join), or changed (a revocation), as asked; `reason` says why: TOKEN_REVOKED,
    TOKEN_CONSUMED, TOKEN_UNKNOWN, TOKEN_WRONG_CLUSTER, TOKEN_NAME_MISMATCH, TOKEN_BOUND_TO_ANOTHER_CERTIFICATE, ..."""


class TokenExpired(TokenRefused):
    """The token's time is up: issue a new one."""


class TokenInUse(TokenRefused):
    """A join in flight is bound to the token: it cannot be revoked until that join consumes it (it succeeded) or
    releases it (it rolled back)."""


class Unavailable(MemberguardError):
    """The coordinator could not be reached (connection refused, TLS handshake failed) or is not serving."""


class DeadlineExceeded(MemberguardError):
    """The call's timeout passed before the coordinator answered."""


class Unimplemented(MemberguardError):
    """The coordinator does not implement this RPC (yet)."""


class ResourceExhausted(MemberguardError):
    """The coordinator is out of some resource (a queue, a quota); retry later."""


class TooManyAttempts(ResourceExhausted):
    """The coordinator's join listener refuses this address for now: too many of its token attempts failed.
    retry_after is how many seconds until it may try again (from RetryInfo; 0 if the status carried none)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        retry_after: float = 0.0,
        metadata: Mapping[str, str] | None = None,
        diff: membership_pb2.MembershipDiff | None = None,
    ) -> None:
        super().__init__(code, message, reason, metadata=metadata, diff=diff)
        self.retry_after = retry_after


class Internal(MemberguardError):
    """The coordinator failed unexpectedly; error_id is the id its log line carries, with the details."""

    @property
    def error_id(self) -> str:
        return self.metadata.get("error_id", "")


__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "DirtyMembership",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "MemberguardError",
    "MembershipRefused",
    "NotAbandonable",
    "NotFound",
    "OperationParked",
    "PermissionDenied",
    "ResourceExhausted",
    "StaleFingerprint",
    "TokenExpired",
    "TokenInUse",
    "TokenRefused",
    "TooManyAttempts",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
