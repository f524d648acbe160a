"""The failures memberguard's servers report, one class per failure; coordinator/status.py maps them to gRPC.

MemberguardError
├── InvalidRequest      a field is malformed (carries every field violation)
├── Unauthenticated     the peer's certificate is not trusted (any more)
├── PermissionDenied    the peer's role may not call this method
│   └── TokenNotAccepted    a join token that is expired, revoked, used, forged, or from another cluster
├── NotFound            the operation, token or member named does not exist
├── AlreadyExists       the name is taken
├── MembershipRefused   the guard refused a membership change (carries the fresh diff)
│   ├── DirtyMembership     blocking discrepancies remain (and their violations)
│   └── StaleFingerprint    the caller decided on another diff than the current one
├── OperationInFlight   an operation in flight holds what the request would change
├── StaleEpoch          a step from an older journal epoch than the agent has seen
├── SourceNotRewritable a step's source holds what the agent cannot parse, so it is not rewritten
└── NotImplementedYet   the RPC is declared in the contract but not built yet
"""

from __future__ import annotations

from dataclasses import dataclass


class MemberguardError(Exception):
    """Base of every failure a handler reports to its caller."""

    reason = "INTERNAL"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequest(MemberguardError):
    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


class Unauthenticated(MemberguardError):
    reason = "UNTRUSTED_CERTIFICATE"


class PermissionDenied(MemberguardError):
    reason = "ROLE_NOT_ALLOWED"


class TokenNotAccepted(PermissionDenied):
    """The token's own refusal reason (TOKEN_EXPIRED, TOKEN_REVOKED, ...) is the ErrorInfo reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotFound(MemberguardError):
    reason = "NOT_FOUND"


class AlreadyExists(MemberguardError):
    reason = "ALREADY_EXISTS"


@dataclass(frozen=True)
class PreconditionViolation:
    """One reason a change may not proceed: type (the discrepancy kind, or QUORUM), subject (the discrepancy id
    or member), description."""

    type: str
    subject: str
    description: str


class MembershipRefused(MemberguardError):
    """The guard's refusal. `diff` is the fresh diff it decided on, as a memberguard.v1.MembershipDiff message
    (status.py packs it into the status details)."""

    def __init__(self, message: str, diff: object) -> None:
        super().__init__(message)
        self.diff = diff


class DirtyMembership(MembershipRefused):
    reason = "MEMBERSHIP_INCONSISTENT"

    def __init__(self, message: str, diff: object, violations: list[PreconditionViolation]) -> None:
        super().__init__(message, diff)
        self.violations = violations


class StaleFingerprint(MembershipRefused):
    reason = "FINGERPRINT_STALE"


class OperationInFlight(MemberguardError):
    reason = "OPERATION_IN_FLIGHT"


class StaleEpoch(MemberguardError):
    reason = "STALE_EPOCH"


class SourceNotRewritable(MemberguardError):
    """Rewriting the source would silently drop what the agent cannot parse in it, so the step is not applied;
    the diff shows the source as it is."""

    reason = "SOURCE_NOT_REWRITABLE"


class ConfigurationMoved(MemberguardError):
    """Right before a removal, the leader's configuration no longer holds the member as the guard decided on it (its
    vote changed): the decision is void, the caller re-reads and asks again."""

    reason = "CONFIGURATION_MOVED"


class EngineUnavailable(MemberguardError):
    """The dqlite engine a step needs did not answer, found no leader, or kept refusing within the step's time."""

    reason = "ENGINE_UNAVAILABLE"


class NotImplementedYet(MemberguardError):
    reason = "NOT_IMPLEMENTED"
