"""The only place that knows gRPC status codes: typed errors in, rich statuses out.

`TABLE` is the one error table: every failure a memberguard server reports is a typed error (coordinator/errors.py)
with its code and its google.rpc.ErrorInfo reason here, and nowhere else. The token refusals carry the token's own
reason (coordinator/core/tokens.py), from the sets below. Where the error has them, a status also carries field
violations (BadRequest), precondition violations (PreconditionFailure), the diff the guard decided on
(memberguard.v1.MembershipDiff) or when to retry (RetryInfo).

`answering` wraps every handler: a typed error becomes its status, and anything else is INTERNAL with a fresh error id
that the log line (with the traceback) carries too, so no exception text ever reaches a caller.

A status travels in trailing metadata, and gRPC's Python client refuses more than 8 KiB of it: a refusal it cannot
receive becomes RESOURCE_EXHAUSTED, and the caller never learns why it was refused. So `to_status` keeps every status
within TRAILER_BUDGET, whatever the error quotes: the message and each violation are cut, violations beyond
VIOLATION_LIMIT are counted instead of listed, and a diff too large to fit is replaced by a copy that keeps its
fingerprint (what a retry needs) and as many discrepancies as fit; ErrorInfo's metadata says how many were left out.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from memberguard.v1 import membership_pb2

from coordinator.core import tokens
from coordinator.core.limits import cut
from coordinator.errors import (
    QUOTE_LIMIT,
    AlreadyExists,
    ConfigurationMoved,
    DeadlineExceeded,
    DirtyMembership,
    EngineRefused,
    EngineUnavailable,
    Internal,
    InvalidRequest,
    JoinerNotVerified,
    MemberguardError,
    MembershipRefused,
    NotAbandonable,
    NotFound,
    OperationParked,
    PermissionDenied,
    SourceNotRewritable,
    StaleEpoch,
    StaleFingerprint,
    TokenNotAccepted,
    TokenNotRevocable,
    TooManyAttempts,
    Unauthenticated,
)

log = logging.getLogger("memberguard.status")

DOMAIN = "memberguard.v1"

# The one error table. gRPC's status-code guide draws the line between FAILED_PRECONDITION (the state must be fixed
# first) and ABORTED (a test-and-set lost: re-read, then retry).
# A reason of None is the token's own refusal, one of REFUSALS[the error's type].
TABLE: dict[type[MemberguardError], tuple[int, str | None]] = {
    InvalidRequest: (code_pb2.INVALID_ARGUMENT, "INVALID_REQUEST"),
    Unauthenticated: (code_pb2.UNAUTHENTICATED, "UNTRUSTED_CERTIFICATE"),
    PermissionDenied: (code_pb2.PERMISSION_DENIED, "ROLE_NOT_ALLOWED"),
    JoinerNotVerified: (code_pb2.PERMISSION_DENIED, "JOINER_NOT_VERIFIED"),
    TokenNotAccepted: (code_pb2.PERMISSION_DENIED, None),
    TokenNotRevocable: (code_pb2.FAILED_PRECONDITION, None),
    NotFound: (code_pb2.NOT_FOUND, "NOT_FOUND"),
    AlreadyExists: (code_pb2.ALREADY_EXISTS, "ALREADY_EXISTS"),
    DirtyMembership: (code_pb2.FAILED_PRECONDITION, "MEMBERSHIP_INCONSISTENT"),
    OperationParked: (code_pb2.FAILED_PRECONDITION, "OPERATION_PARKED"),
    NotAbandonable: (code_pb2.FAILED_PRECONDITION, "NOT_ABANDONABLE"),
    StaleFingerprint: (code_pb2.ABORTED, "FINGERPRINT_STALE"),
    DeadlineExceeded: (code_pb2.DEADLINE_EXCEEDED, "DEADLINE_PASSED"),
    TooManyAttempts: (code_pb2.RESOURCE_EXHAUSTED, "TOO_MANY_FAILED_ATTEMPTS"),
    Internal: (code_pb2.INTERNAL, "INTERNAL"),
    # Sent by agents, to the coordinator's steps.
    StaleEpoch: (code_pb2.FAILED_PRECONDITION, "STALE_EPOCH"),
    SourceNotRewritable: (code_pb2.FAILED_PRECONDITION, "SOURCE_NOT_REWRITABLE"),
    ConfigurationMoved: (code_pb2.FAILED_PRECONDITION, "CONFIGURATION_MOVED"),
    EngineUnavailable: (code_pb2.UNAVAILABLE, "ENGINE_UNAVAILABLE"),
    EngineRefused: (code_pb2.FAILED_PRECONDITION, "ENGINE_REFUSED"),
}

REFUSALS: dict[type[MemberguardError], frozenset[str]] = {
    # What tokens.check_join can refuse once the token has decoded and the certificate names the member (a malformed
    # token, or a certificate for another name, is a bad field: InvalidRequest).
    TokenNotAccepted: frozenset(
        kind.reason
        for kind in (
            tokens.WrongCluster,
            tokens.UnknownToken,
            tokens.Revoked,
            tokens.Consumed,
            tokens.Expired,
            tokens.NameMismatch,
            tokens.BoundToAnotherCertificate,
        )
    ),
    # What tokens.revoke can refuse.
    TokenNotRevocable: frozenset({tokens.TokenInUse.reason, tokens.Consumed.reason}),
}

# The errors only agents report (to the coordinator's steps); every other entry is the coordinator's.
AGENT_ONLY = frozenset({StaleEpoch, SourceNotRewritable, ConfigurationMoved, EngineUnavailable, EngineRefused})


def statuses(kinds: Iterable[type[MemberguardError]]) -> frozenset[tuple[str, int]]:
    """Every (ErrorInfo reason, code) pair that errors of these types are answered with."""
    pairs = set()
    for kind in kinds:
        code, reason = TABLE[kind]
        pairs |= {(refusal, code) for refusal in REFUSALS[kind]} if reason is None else {(reason, code)}
    return frozenset(pairs)


def coordinator_statuses() -> frozenset[tuple[str, int]]:
    """Every (ErrorInfo reason, code) pair the coordinator can answer a caller with."""
    return statuses(kind for kind in TABLE if kind not in AGENT_ONLY)


# gRPC Python's default grpc.max_metadata_size is 8 KiB for all of a response's trailing metadata. A status keeps to
# this much (grpc-message percent-encoded, plus grpc-status-details-bin in base64), leaving the rest for the entries'
# names, gRPC's own entries and whatever a proxy adds.
TRAILER_BUDGET = 6 * 1024
MESSAGE_LIMIT = 512  # characters
FIELD_LIMIT = 256  # characters of a violation's field, type or subject
# A description carries advice (NO_LEADER's recovery procedure is about 600 characters); the budget still bounds the
# whole status.
DESCRIPTION_LIMIT = 1024
VIOLATION_LIMIT = 32  # listed; the rest are counted


def _code_and_reason(error: MemberguardError) -> tuple[int, str]:
    for kind in type(error).__mro__:
        if kind in TABLE:
            code, reason = TABLE[kind]
            break
    else:
        raise TypeError(f"{type(error).__name__} is not in the error table")
    if reason is not None:
        return code, reason
    refusal = getattr(error, "refusal", None)
    if refusal not in REFUSALS[kind]:
        raise TypeError(f"{refusal} is not a refusal {kind.__name__} can carry")
    return code, refusal


def to_status(error: MemberguardError) -> grpc.Status:
    try:
        code, reason = _code_and_reason(error)
    except TypeError:
        return to_status(_internal("to_status"))
    violations: list[Message] = []
    if isinstance(error, InvalidRequest):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=cut(v.field, FIELD_LIMIT), description=cut(v.description, DESCRIPTION_LIMIT)
            )
            for v in error.violations
        ]
    elif isinstance(error, MembershipRefused):
        violations = [
            error_details_pb2.PreconditionFailure.Violation(
                type=cut(v.type, FIELD_LIMIT),
                subject=cut(v.subject, FIELD_LIMIT),
                description=cut(v.description, DESCRIPTION_LIMIT),
            )
            for v in error.violations
        ]
    metadata = {"error_id": error.error_id} if isinstance(error, Internal) else {}
    extra: list[Message] = []
    if isinstance(error, TooManyAttempts):
        extra.append(error_details_pb2.RetryInfo(retry_delay=_duration(error.retry_after)))
    diff = getattr(error, "diff", None)
    if not isinstance(diff, membership_pb2.MembershipDiff):
        diff = None

    def build(
        message: str, listed: Sequence[Message], shown: membership_pb2.MembershipDiff | None
    ) -> status_pb2.Status:
        counted = dict(metadata)
        if len(listed) < len(violations):
            counted["violations_left_out"] = str(len(violations) - len(listed))
        if shown is not None and diff is not None and len(shown.discrepancies) < len(diff.discrepancies):
            counted["discrepancies_left_out"] = str(len(diff.discrepancies) - len(shown.discrepancies))
        details: list[Message] = [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=counted)]
        if isinstance(error, InvalidRequest):
            details.append(error_details_pb2.BadRequest(field_violations=listed))
        elif isinstance(error, MembershipRefused):
            details.append(error_details_pb2.PreconditionFailure(violations=listed))
        details += extra
        if shown is not None:
            details.append(shown)
        return _proto(code, message, details)

    message = cut(str(error), MESSAGE_LIMIT)
    listed = violations[:VIOLATION_LIMIT]
    status = build(message, listed, diff)
    if _fits(status):
        return rpc_status.to_status(status)
    # The violations say why, so they go first: halved until they leave room for the diff's fingerprint (what a retry
    # needs); then the message, whose text is sent twice, for one that only percent-encoding made too large.
    bare = None if diff is None else membership_pb2.MembershipDiff(fingerprint=diff.fingerprint)
    while listed and not _fits(build(message, listed, bare)):
        listed = listed[: len(listed) // 2]
    if not _fits(build(message, listed, bare)):
        message = cut(message, QUOTE_LIMIT)
    if diff is None or bare is None:
        return rpc_status.to_status(build(message, listed, None))
    # Then as many discrepancies as fit (most severe first: the diff lists them so), with the diff's members and nodes
    # if those fit too.
    for frame in (_frame(diff), bare):
        if not _fits(build(message, listed, frame)):
            continue
        low, high = 0, len(diff.discrepancies)  # frame + discrepancies[:low] fits
        while low < high:
            middle = (low + high + 1) // 2
            if _fits(build(message, listed, _with_discrepancies(frame, diff, middle))):
                low = middle
            else:
                high = middle - 1
        return rpc_status.to_status(build(message, listed, _with_discrepancies(frame, diff, low)))
    return rpc_status.to_status(build(message, listed, bare))


def _frame(diff: membership_pb2.MembershipDiff) -> membership_pb2.MembershipDiff:
    """The diff without its discrepancies."""
    frame = membership_pb2.MembershipDiff(fingerprint=diff.fingerprint, nodes=diff.nodes, members=diff.members)
    frame.observed_at.CopyFrom(diff.observed_at)
    return frame


def _with_discrepancies(
    frame: membership_pb2.MembershipDiff, diff: membership_pb2.MembershipDiff, count: int
) -> membership_pb2.MembershipDiff:
    shown = membership_pb2.MembershipDiff()
    shown.CopyFrom(frame)
    shown.discrepancies.extend(diff.discrepancies[:count])
    return shown


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(max(0, math.ceil(seconds * 1e9)))
    return duration


def _proto(code: int, message: str, details: Sequence[Message]) -> status_pb2.Status:
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code, message=message, details=packed)


def trailer_size(status: status_pb2.Status) -> int:
    """What the status costs in trailing metadata: grpc-message percent-encoded (every byte outside printable ASCII,
    and %, takes three) and grpc-status-details-bin in base64."""
    encoded = status.message.encode()
    message = sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in encoded)
    return message + 4 * math.ceil(int(status.ByteSize()) / 3)


def _fits(status: status_pb2.Status) -> bool:
    return trailer_size(status) <= TRAILER_BUDGET


async def abort_with(context: Any, error: MemberguardError) -> NoReturn:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # grpc.aio's abort raises; this keeps the NoReturn honest


Unary = Callable[[Any, Any], Awaitable[Any]]
Streaming = Callable[[Any, Any], AsyncIterator[Any]]


def _internal(method: str) -> Internal:
    error_id = uuid.uuid4().hex
    log.exception("internal error %s in %s", error_id, method)
    return Internal(error_id)


def answering(behaviour: Unary, method: str) -> Unary:
    """The handler, its failures answered from the table: a typed error with its status, anything else as INTERNAL
    with an error id that the log line, with the traceback, carries too."""

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise  # the handler answered already
        except MemberguardError as error:
            await abort_with(context, error)
        except Exception:
            await abort_with(context, _internal(method))

    return handle


def answering_stream(behaviour: Streaming, method: str) -> Streaming:
    """`answering` for a handler that streams its answer."""

    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for item in behaviour(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except MemberguardError as error:
            await abort_with(context, error)
        except Exception:
            await abort_with(context, _internal(method))

    return handle
