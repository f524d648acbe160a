"""Typed errors raised by the memberguard clients.

Every failed call raises exactly one of these, decoded from the gRPC status and its rich details
(`google.rpc.ErrorInfo`, `BadRequest`, `PreconditionFailure`, and the `memberguard.v1.MembershipDiff`):

    MemberguardError                 code, message, reason, metadata, diff
    ├── InvalidArgument              INVALID_ARGUMENT: field_violations [(field, description)]
    ├── PermissionDenied             PERMISSION_DENIED: this certificate may not call this RPC
    ├── Unauthenticated              UNAUTHENTICATED
    ├── NotFound                     NOT_FOUND
    ├── AlreadyExists                ALREADY_EXISTS
    ├── MembershipRefused            the guard refused a change; diff is the diff it decided on
    │   ├── DirtyMembership          FAILED_PRECONDITION: blocking discrepancies; violations
    │   │                            [(type, subject, description)], one per discrepancy; fix the state first
    │   └── StaleFingerprint         ABORTED: the fingerprint sent is not the current one; re-read, then retry
    ├── Unavailable                  UNAVAILABLE: the coordinator is unreachable (connection refused, TLS
    │                                handshake failed) or not serving
    ├── DeadlineExceeded             DEADLINE_EXCEEDED: the call's timeout passed
    ├── Unimplemented                UNIMPLEMENTED
    └── ResourceExhausted            RESOURCE_EXHAUSTED

Any other status code raises MemberguardError itself. `reason` is the ErrorInfo reason (UPPER_SNAKE), empty
when the status carried none; a client-side argument check raises InvalidArgument with the reason
CLIENT_VALIDATION before anything is sent. `diff` is set on whichever error carried a MembershipDiff, None
otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

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


class MembershipRefused(MemberguardError):
    """The guard refused a membership change; `diff` is the diff it decided on, if the coordinator sent it."""


class DirtyMembership(MembershipRefused):
    """Blocking discrepancies stand: repair them (or acknowledge them, where the policy allows) first.

    violations holds one (type, subject, description) per blocking discrepancy, from PreconditionFailure.
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


class StaleFingerprint(MembershipRefused):
    """The membership changed since the caller's CheckMembership: re-read the diff, then retry."""


class Unavailable(MemberguardError):
    """The coordinator could not be reached (connection refused, TLS handshake failed) or is not serving."""


class DeadlineExceeded(MemberguardError):
    """The call's timeout passed before the coordinator answered."""


class Unimplemented(MemberguardError):
    """The coordinator does not implement this RPC (yet)."""


class ResourceExhausted(MemberguardError):
    """The coordinator is out of some resource (a queue, a quota); retry later."""


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "DirtyMembership",
    "InvalidArgument",
    "MemberguardError",
    "MembershipRefused",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StaleFingerprint",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
