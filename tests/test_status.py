"""The error table's statuses: within gRPC's metadata limit whatever they quote, and nothing unexpected leaks.

The bound is checked on the status itself (hypothesis, any mix of sizes and characters) and end to end: a real mTLS
server with the coordinator's interceptor answers a real client with a refusal that quotes a huge parked error and a
diff of thousands of discrepancies, and the client gets the refusal's type, reason and fingerprint, not
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import memberguard
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from memberguard import AsyncClient, Endpoint
from memberguard.v1 import coordinator_pb2, membership_pb2

from coordinator import status
from coordinator.errors import (
    DirtyMembership,
    FieldViolation,
    InvalidRequest,
    MemberguardError,
    MembershipRefused,
    NotFound,
    OperationParked,
    PreconditionViolation,
    TokenNotAccepted,
    TooManyAttempts,
    quoted,
)
from tests.interceptor_server import serving


def _diff(discrepancies: int, summary: str = "s" * 200) -> membership_pb2.MembershipDiff:
    diff = membership_pb2.MembershipDiff(
        fingerprint="f" * 64,
        nodes=[f"n{i}" for i in range(20)],
        members=[membership_pb2.Member(name=f"n{i}", address=f"10.0.0.{i}:9000", node_id=i + 1) for i in range(20)],
    )
    diff.discrepancies.extend(
        membership_pb2.Discrepancy(
            id=f"d{i:05}",
            kind=membership_pb2.DISCREPANCY_KIND_MISSING,
            severity=membership_pb2.SEVERITY_BLOCKING,
            node=f"n{i % 20}",
            summary=summary,
        )
        for i in range(discrepancies)
    )
    return diff


def _sent(error: MemberguardError) -> status_pb2.Status:
    """The google.rpc.Status that to_status puts in the trailers."""
    rich = dict(status.to_status(error).trailing_metadata)["grpc-status-details-bin"]
    return status_pb2.Status.FromString(rich)


def _info(sent: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in sent.details)
    return info


text = st.text(st.characters(codec="utf-8"), max_size=3000)


@settings(max_examples=60, deadline=None)
@given(
    message=text,
    descriptions=st.lists(text, max_size=80),
    discrepancies=st.integers(0, 3000),
    summary=text,
)
def test_every_refusal_fits_the_budget_and_keeps_its_fingerprint(
    message: str, descriptions: list[str], discrepancies: int, summary: str
) -> None:
    violations = [PreconditionViolation("PARKED_OPERATION", f"op{i}", d) for i, d in enumerate(descriptions)]
    diff = _diff(discrepancies, summary)
    sent = _sent(OperationParked(message, diff, violations))
    assert status.trailer_size(sent) <= status.TRAILER_BUDGET
    assert sent.code == code_pb2.FAILED_PRECONDITION and _info(sent).reason == "OPERATION_PARKED"
    shown = membership_pb2.MembershipDiff()
    assert any(detail.Unpack(shown) for detail in sent.details)
    assert shown.fingerprint == diff.fingerprint
    left_out = int(_info(sent).metadata.get("discrepancies_left_out", "0"))
    assert len(shown.discrepancies) + left_out == discrepancies
    assert list(shown.discrepancies) == list(diff.discrepancies[: len(shown.discrepancies)]), "the first ones, whole"


@settings(max_examples=40, deadline=None)
@given(fields=st.lists(st.tuples(text, text), min_size=1, max_size=100), name=text)
def test_every_other_status_fits_the_budget(fields: list[tuple[str, str]], name: str) -> None:
    for error in (
        InvalidRequest([FieldViolation(f, d) for f, d in fields]),
        NotFound(f"no operation {name}"),
        TokenNotAccepted(name, "TOKEN_EXPIRED"),
    ):
        assert status.trailer_size(_sent(error)) <= status.TRAILER_BUDGET


def test_quoted_cuts_and_escapes() -> None:
    assert quoted("n1") == "'n1'"
    long = quoted("x" * 10_000 + "\n")
    assert long.startswith("'" + "x" * 64 + "'") and "9937 more characters" in long and "\n" not in long


def test_a_token_refusal_carries_the_tokens_reason_and_an_unknown_one_is_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _info(_sent(TokenNotAccepted("expired", "TOKEN_EXPIRED"))).reason == "TOKEN_EXPIRED"
    with caplog.at_level(logging.ERROR, "memberguard.status"):
        sent = _sent(TokenNotAccepted("secret words", "MADE_UP"))
    assert sent.code == code_pb2.INTERNAL and "secret words" not in sent.message
    assert _info(sent).metadata["error_id"] in caplog.text


def test_the_table_covers_every_error_type() -> None:
    def every(kind: type[MemberguardError]) -> set[type[MemberguardError]]:
        return {kind}.union(*(every(sub) for sub in kind.__subclasses__()))

    # The two bases are never raised themselves; every other type must have its entry.
    concrete = every(MemberguardError) - {MemberguardError, MembershipRefused}
    assert concrete <= set(status.TABLE), concrete - set(status.TABLE)


# --- end to end: a real server with the coordinator's interceptor, a real client ----------------------------------


Behaviour = Callable[[coordinator_pb2.GuardedOperationRequest, Any], Any]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Endpoint, list[Behaviour]]]:
    """GuardedOperation answered with whatever the test puts in the list, behind the coordinator's interceptor."""
    behaviours: list[Behaviour] = []

    async def guarded(request: coordinator_pb2.GuardedOperationRequest, context: Any) -> Any:
        return behaviours[0](request, context)

    async with serving(tmp_path, "GuardedOperation", guarded) as endpoint:
        yield endpoint, behaviours


def _raise(error: Exception) -> Behaviour:
    def behave(request: coordinator_pb2.GuardedOperationRequest, context: Any) -> Any:
        raise error

    return behave


REQUEST = coordinator_pb2.GuardedOperationRequest(request_id="r1")


async def test_a_huge_parked_refusal_reaches_the_client_as_itself(served: tuple[Endpoint, list[Behaviour]]) -> None:
    endpoint, behaviours = served
    diff = _diff(3000)
    error = "n4 was not fenced (the agent did not answer); " * 2000  # ~90 KB, as a parked join's error grew
    behaviours.append(
        _raise(OperationParked("1 parked operation", diff, [PreconditionViolation("PARKED_OPERATION", "op1", error)]))
    )
    async with AsyncClient(endpoint) as client:
        with pytest.raises(memberguard.OperationParked) as refused:
            await client.guarded_operation(REQUEST, timeout=10)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION and refused.value.reason == "OPERATION_PARKED"
    assert refused.value.operation_ids == ["op1"]
    (_, _, description), *_ = refused.value.violations
    assert description.startswith("n4 was not fenced") and len(description) < status.DESCRIPTION_LIMIT + 40
    assert refused.value.diff is not None and refused.value.diff.fingerprint == diff.fingerprint
    assert refused.value.discrepancies_left_out > 0
    assert len(refused.value.diff.discrepancies) + refused.value.discrepancies_left_out == 3000


async def test_many_violations_are_counted_not_listed(served: tuple[Endpoint, list[Behaviour]]) -> None:
    endpoint, behaviours = served
    violations = [PreconditionViolation("DISCREPANCY_KIND_MISSING", f"d{i}", "x" * 300) for i in range(5000)]
    behaviours.append(_raise(DirtyMembership("5000 violations", _diff(5000), violations)))
    async with AsyncClient(endpoint) as client:
        with pytest.raises(memberguard.DirtyMembership) as refused:
            await client.guarded_operation(REQUEST, timeout=10)
    listed = len(refused.value.violations)
    assert 0 < listed <= status.VIOLATION_LIMIT
    assert int(refused.value.metadata["violations_left_out"]) == 5000 - listed


async def test_an_unexpected_exception_is_internal_with_the_id_the_log_carries(
    served: tuple[Endpoint, list[Behaviour]], caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, behaviours = served
    behaviours.append(_raise(json.JSONDecodeError("Expecting ',' delimiter", "{secret: 1}", 3)))
    with caplog.at_level(logging.ERROR, "memberguard.status"):
        async with AsyncClient(endpoint) as client:
            with pytest.raises(memberguard.Internal) as failed:
                await client.guarded_operation(REQUEST, timeout=10)
    assert failed.value.code is grpc.StatusCode.INTERNAL and failed.value.reason == "INTERNAL"
    assert "Expecting" not in failed.value.message and "secret" not in failed.value.message
    error_id = failed.value.error_id
    assert len(error_id) == 32 and error_id in failed.value.message
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None, "the traceback is logged under the id"


async def test_too_many_attempts_says_when_to_retry(served: tuple[Endpoint, list[Behaviour]]) -> None:
    endpoint, behaviours = served
    behaviours.append(_raise(TooManyAttempts("slow down", 2.5)))
    async with AsyncClient(endpoint) as client:
        with pytest.raises(memberguard.TooManyAttempts) as refused:
            await client.guarded_operation(REQUEST, timeout=10)
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.retry_after == 2.5
