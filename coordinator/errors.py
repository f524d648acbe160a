"""The failures memberguard's servers report, one class per failure; coordinator/status.py maps them to gRPC.

MemberguardError
├── InvalidRequest      a field is malformed (carries every field violation)
├── Unauthenticated     the peer's certificate is not trusted (any more)
├── PermissionDenied    the peer's role may not call this method
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


class NotImplementedYet(MemberguardError):
    reason = "NOT_IMPLEMENTED"
