"""The failures memberguard's servers report, one class per failure. coordinator/status.py alone maps each to its gRPC
code and ErrorInfo reason (the one error table) and bounds what a status may quote.

MemberguardError
├── InvalidRequest        a field is malformed (carries every field violation)
├── Unauthenticated       the peer's certificate is not trusted (any more)
├── PermissionDenied      the peer's role may not call this method
│   ├── JoinerNotVerified     the joiner's agent did not answer as the holder of the certificate it submitted
│   └── TokenNotAccepted      a join's token is expired, revoked, used, unknown, or for another name or cluster
├── TokenNotRevocable     the token asked to be revoked is held by a join in flight, or used by a finished one
├── NotFound              the operation, token or member named does not exist
├── AlreadyExists         the name is taken
├── MembershipRefused     the guard refused a membership change (carries the fresh diff and the violations)
│   ├── DirtyMembership       blocking discrepancies remain
│   ├── OperationParked       a parked operation must be finished first
│   ├── NotAbandonable        the operation asked to be abandoned is not parked, or is past its commit point
│   └── StaleFingerprint      the caller decided on another diff than the current one
├── DeadlineExceeded      the request's deadline passed before it ran
├── TooManyAttempts       the caller's source failed too many token attempts on the join listener: retry later
├── Internal              anything unexpected: the caller gets only the error id that the log line carries
├── StaleEpoch            (agents) a step from an older journal epoch than the agent has seen
├── SourceNotRewritable   (agents) a step's source holds what the agent cannot parse, so it is not rewritten
├── ConfigurationMoved    (agents) the member's vote changed since the guard decided on its removal
├── EngineUnavailable     (agents) the dqlite engine a step needs did not answer in time
└── EngineRefused         (agents) microcluster refused the change a step asked it for

Messages quote what a caller sent only through `quoted`, which cuts it to a bounded length: an echoed 1 MiB name
must not turn a NOT_FOUND into a status too large for the caller to receive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# What `quoted` keeps of a caller's string: enough to recognise it, short enough that a message quoting a few stays
# far below gRPC's metadata limit.
QUOTE_LIMIT = 64


def quoted(value: str, limit: int = QUOTE_LIMIT) -> str:
    """value as a message quotes what a caller sent: repr-escaped (no control character reaches a log line or a
    terminal) and cut to `limit` characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value) - limit} more characters)"


class MemberguardError(Exception):
    """Base of every failure a handler reports to its caller."""


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequest(MemberguardError):
    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" if v.field else v.description for v in violations))
        self.violations = violations


class Unauthenticated(MemberguardError):
    pass


class PermissionDenied(MemberguardError):
    pass


class JoinerNotVerified(PermissionDenied):
    pass


class TokenNotAccepted(PermissionDenied):
    """`refusal` is the token's own refusal reason (TOKEN_EXPIRED, TOKEN_REVOKED, ...: coordinator/core/tokens.py),
    which becomes the ErrorInfo reason."""

    def __init__(self, message: str, refusal: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class TokenNotRevocable(MemberguardError):
    """`refusal` is TOKEN_IN_USE (a join in flight is bound to it) or TOKEN_CONSUMED (a finished join used it)."""

    def __init__(self, message: str, refusal: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class NotFound(MemberguardError):
    pass


class AlreadyExists(MemberguardError):
    pass


@dataclass(frozen=True)
class PreconditionViolation:
    """One reason a change may not proceed: type (the discrepancy kind, QUORUM, PARKED_OPERATION), subject (the
    discrepancy id, member or operation id), description."""

    type: str
    subject: str
    description: str


class MembershipRefused(MemberguardError):
    """The guard's refusal. `diff` is the fresh diff it decided on, as a memberguard.v1.MembershipDiff message
    (status.py packs it into the status details); `violations` say what stands in the way."""

    def __init__(self, message: str, diff: object, violations: Sequence[PreconditionViolation] = ()) -> None:
        super().__init__(message)
        self.diff = diff
        self.violations = list(violations)


class DirtyMembership(MembershipRefused):
    pass


class OperationParked(MembershipRefused):
    """One violation (PARKED_OPERATION, its id, its error and plan) per parked operation."""


class StaleFingerprint(MembershipRefused):
    pass


class NotAbandonable(MembershipRefused):
    """An operation an operator asked to abandon is not parked, or may be past its commit point without force and
    acknowledgements (one violation each)."""


class DeadlineExceeded(MemberguardError):
    pass


class TooManyAttempts(MemberguardError):
    """`retry_after` is how long (seconds) until the source may try again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Internal(MemberguardError):
    """An unexpected failure. The caller learns only `error_id`; the log line that carries the same id has the
    traceback."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error {error_id}: the server's log has the details under this id")
        self.error_id = error_id


class StaleEpoch(MemberguardError):
    pass


class SourceNotRewritable(MemberguardError):
    """Rewriting the source would silently drop what the agent cannot parse in it, so the step is not applied;
    the diff shows the source as it is."""


class ConfigurationMoved(MemberguardError):
    """Right before a removal, the leader's configuration no longer holds the member as the guard decided on it (its
    vote changed): the decision is void, the caller re-reads and asks again."""


class EngineUnavailable(MemberguardError):
    """The dqlite engine a step needs did not answer, found no leader, or kept refusing within the step's time."""


class EngineRefused(MemberguardError):
    """microcluster answered the change a step delegated to it with an error (its words are the message): nothing
    is known to have changed, and the diff shows what did."""
