"""The sync and asyncio clients against a real mTLS server: requests, typed errors with their details, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import memberguard
import pytest
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2
from memberguard import AsyncClient, Client, Endpoint
from memberguard.v1 import coordinator_pb2, membership_pb2

from coordinator import pki

from . import (
    COORDINATOR_ID,
    Lab,
    abort,
    inconsistent_diff,
    respond,
    running_coordinator,
    stall,
    unused_address,
)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_coordinator(tmp_path_factory.mktemp("lab")) as lab:
        yield lab


@pytest.fixture
def lab(running: Lab) -> Lab:
    running.reset()
    return running


# call(endpoint, method, *args, **kwargs): one fresh client of the parametrized kind, one call, then close.
Call = Callable[..., Any]


def _call_sync(endpoint: Endpoint, method: str, *args: Any, **kwargs: Any) -> Any:
    with Client(endpoint) as client:
        return getattr(client, method)(*args, **kwargs)


def _call_async(endpoint: Endpoint, method: str, *args: Any, **kwargs: Any) -> Any:
    async def go() -> Any:
        async with AsyncClient(endpoint) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(go())


@pytest.fixture(params=[_call_sync, _call_async], ids=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Call:
    function: Call = request.param
    return function


def test_check_membership_returns_the_diff(lab: Lab, call: Call) -> None:
    lab.fake.behaviour = respond(inconsistent_diff())
    response = call(lab.endpoint, "check_membership")
    assert isinstance(response, coordinator_pb2.CheckMembershipResponse)
    assert response.header.coordinator_id == COORDINATOR_ID
    assert response.diff == inconsistent_diff()


def test_check_membership_sends_its_arguments(lab: Lab, call: Call) -> None:
    call(lab.endpoint, "check_membership", agent_timeout=2.5, minimum_severity=membership_pb2.SEVERITY_WARNING)
    call(lab.endpoint, "check_membership")
    given, default = lab.check_requests()
    assert given.agent_timeout.ToNanoseconds() == 2_500_000_000
    assert given.minimum_severity == membership_pb2.SEVERITY_WARNING
    assert not default.HasField("agent_timeout")
    assert default.minimum_severity == membership_pb2.SEVERITY_UNSPECIFIED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"agent_timeout": 0}, "agent_timeout"),
        ({"agent_timeout": -1.0}, "agent_timeout"),
        ({"agent_timeout": 60.5}, "agent_timeout"),
        ({"agent_timeout": math.nan}, "agent_timeout"),
        ({"minimum_severity": 99}, "minimum_severity"),
        ({"minimum_severity": True}, "minimum_severity"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
    ],
)
def test_bad_arguments_fail_before_sending(lab: Lab, call: Call, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(memberguard.InvalidArgument) as caught:
        call(lab.endpoint, "check_membership", **kwargs)
    assert caught.value.reason == "CLIENT_VALIDATION"
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [name for name, _ in caught.value.field_violations] == [field]
    assert lab.fake.requests == []


ERROR_TYPES = [
    (grpc.StatusCode.INVALID_ARGUMENT, memberguard.InvalidArgument),
    (grpc.StatusCode.PERMISSION_DENIED, memberguard.PermissionDenied),
    (grpc.StatusCode.UNAUTHENTICATED, memberguard.Unauthenticated),
    (grpc.StatusCode.NOT_FOUND, memberguard.NotFound),
    (grpc.StatusCode.ALREADY_EXISTS, memberguard.AlreadyExists),
    # A reason the client has no type for is decoded by its code alone: not as a refused guard.
    (grpc.StatusCode.FAILED_PRECONDITION, memberguard.FailedPrecondition),
    (grpc.StatusCode.ABORTED, memberguard.Aborted),
    (grpc.StatusCode.UNAVAILABLE, memberguard.Unavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, memberguard.DeadlineExceeded),
    (grpc.StatusCode.UNIMPLEMENTED, memberguard.Unimplemented),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, memberguard.ResourceExhausted),
    (grpc.StatusCode.INTERNAL, memberguard.Internal),
    (grpc.StatusCode.UNKNOWN, memberguard.MemberguardError),
    (grpc.StatusCode.CANCELLED, memberguard.MemberguardError),
]


@pytest.mark.parametrize(("code", "error_type"), ERROR_TYPES, ids=[code.name for code, _ in ERROR_TYPES])
def test_every_status_code_becomes_its_error(
    lab: Lab, call: Call, code: grpc.StatusCode, error_type: type[memberguard.MemberguardError]
) -> None:
    info = error_details_pb2.ErrorInfo(reason="SOMETHING_WRONG", domain="memberguard", metadata={"member": "n3"})
    # A detail type the client does not know is skipped, not an error.
    unknown = error_details_pb2.Help()
    lab.fake.behaviour = abort(code, f"the coordinator says {code.name}", info, unknown)
    with pytest.raises(memberguard.MemberguardError) as caught:
        call(lab.endpoint, "check_membership")
    error = caught.value
    assert type(error) is error_type
    assert error.code == code
    assert error.message == f"the coordinator says {code.name}"
    assert error.reason == "SOMETHING_WRONG"
    assert error.metadata == {"member": "n3"}
    assert error.diff is None
    assert isinstance(error.__cause__, grpc.RpcError)
    assert str(error) == f"{code.name} [SOMETHING_WRONG]: the coordinator says {code.name}"


def test_a_status_without_details_still_has_its_type(lab: Lab, call: Call) -> None:
    lab.fake.behaviour = abort(grpc.StatusCode.NOT_FOUND, "no such operation")
    with pytest.raises(memberguard.NotFound) as caught:
        call(lab.endpoint, "check_membership")
    assert (caught.value.reason, caught.value.message, caught.value.metadata) == ("", "no such operation", {})


def test_invalid_argument_carries_field_violations(lab: Lab, call: Call) -> None:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="agent_timeout", description="at most 60 s"),
            error_details_pb2.BadRequest.FieldViolation(field="request_id", description="required"),
        ]
    )
    info = error_details_pb2.ErrorInfo(reason="INVALID_REQUEST", domain="memberguard.v1")
    lab.fake.behaviour = abort(grpc.StatusCode.INVALID_ARGUMENT, "2 invalid fields", bad_request, info)
    with pytest.raises(memberguard.InvalidArgument) as caught:
        call(lab.endpoint, "check_membership")
    assert caught.value.reason == "INVALID_REQUEST"
    assert caught.value.field_violations == [("agent_timeout", "at most 60 s"), ("request_id", "required")]


def test_dirty_membership_carries_violations_and_diff(lab: Lab, call: Call) -> None:
    diff = inconsistent_diff()
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="DISCREPANCY_KIND_MISSING", subject=diff.discrepancies[0].id, description="n2 lacks n3"
            )
        ]
    )
    info = error_details_pb2.ErrorInfo(reason="MEMBERSHIP_INCONSISTENT", domain="memberguard.v1")
    lab.fake.behaviour = abort(grpc.StatusCode.FAILED_PRECONDITION, "1 blocking discrepancy", info, failure, diff)
    request = coordinator_pb2.GuardedOperationRequest(request_id="r1", expected_fingerprint=diff.fingerprint)
    with pytest.raises(memberguard.MembershipRefused) as caught:
        call(lab.endpoint, "guarded_operation", request)
    error = caught.value
    assert isinstance(error, memberguard.DirtyMembership)
    assert error.reason == "MEMBERSHIP_INCONSISTENT"
    assert error.violations == [("DISCREPANCY_KIND_MISSING", diff.discrepancies[0].id, "n2 lacks n3")]
    assert error.diff == diff
    assert lab.fake.requests == [request]
    # The status as sent, every detail in order, for a caller that wants what the typed error does not decode.
    assert error.status is not None and error.status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert [d.type_url.rpartition("/")[2] for d in error.status.details] == [
        "google.rpc.ErrorInfo",
        "google.rpc.PreconditionFailure",
        "memberguard.v1.MembershipDiff",
    ]


def test_stale_fingerprint_carries_the_new_diff(lab: Lab, call: Call) -> None:
    diff = inconsistent_diff()
    info = error_details_pb2.ErrorInfo(reason="FINGERPRINT_STALE", domain="memberguard.v1")
    lab.fake.behaviour = abort(grpc.StatusCode.ABORTED, "the membership changed", info, diff)
    request = coordinator_pb2.GuardedOperationRequest(request_id="r2", expected_fingerprint="00" * 32)
    with pytest.raises(memberguard.StaleFingerprint) as caught:
        call(lab.endpoint, "guarded_operation", request)
    assert isinstance(caught.value, memberguard.MembershipRefused)
    assert caught.value.reason == "FINGERPRINT_STALE"
    assert caught.value.diff == diff


def test_guarded_operation_passes_the_answer_through(lab: Lab, call: Call) -> None:
    response = call(lab.endpoint, "guarded_operation", coordinator_pb2.GuardedOperationRequest(request_id="r3"))
    assert isinstance(response, coordinator_pb2.GuardedOperationResponse)
    assert response.header.coordinator_id == COORDINATOR_ID


def test_deadline_is_exceeded_quickly(lab: Lab, call: Call) -> None:
    lab.fake.behaviour = stall
    started = time.monotonic()
    with pytest.raises(memberguard.DeadlineExceeded) as caught:
        call(lab.endpoint, "check_membership", timeout=0.3)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3


def test_unreachable_coordinator_is_unavailable(lab: Lab, call: Call) -> None:
    endpoint = dataclasses.replace(lab.endpoint, address=unused_address())
    started = time.monotonic()
    with pytest.raises(memberguard.Unavailable):
        call(endpoint, "check_membership", timeout=5)
    assert time.monotonic() - started < 4


def test_a_coordinator_certificate_not_pinned_fails_the_handshake(lab: Lab, call: Call) -> None:
    stranger = pki.make_identity("coordinator.memberguard.test")
    endpoint = dataclasses.replace(lab.endpoint, ca=stranger.certificate_pem)
    started = time.monotonic()
    with pytest.raises(memberguard.Unavailable):
        call(endpoint, "check_membership", timeout=5)
    assert time.monotonic() - started < 4
    assert lab.fake.requests == []


def test_a_client_certificate_the_server_does_not_trust_is_refused(lab: Lab, call: Call) -> None:
    stranger = pki.make_identity("operator")
    endpoint = dataclasses.replace(lab.endpoint, cert=stranger.certificate_pem, key=stranger.key_pem)
    with pytest.raises(memberguard.Unavailable):
        call(endpoint, "check_membership", timeout=5)
    assert lab.fake.requests == []


def test_ping(lab: Lab, call: Call) -> None:
    assert call(lab.endpoint, "ping") is None


def test_ping_fails_when_not_serving(lab: Lab, call: Call) -> None:
    lab.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(memberguard.Unavailable) as caught:
        call(lab.endpoint, "ping")
    assert caught.value.reason == "NOT_SERVING"


async def test_async_client_shares_one_channel_between_concurrent_calls(lab: Lab) -> None:
    lab.fake.behaviour = respond(inconsistent_diff())
    async with AsyncClient(lab.endpoint) as client:
        checks = asyncio.gather(*(client.check_membership() for _ in range(5)))
        responses, pong = await asyncio.gather(checks, client.ping())
    assert [r.diff for r in responses] == [inconsistent_diff()] * 5
    assert pong is None
    with pytest.raises(RuntimeError, match="is closed"):
        await client.ping()
    await client.close()


def test_sync_client_reuses_its_channel_and_closes_twice(lab: Lab) -> None:
    client = Client(lab.endpoint)
    for _ in range(3):
        client.check_membership()
        client.ping()
    client.close()
    client.close()
    assert len(lab.fake.requests) == 3
    with pytest.raises(RuntimeError, match="is closed"):
        client.check_membership()


def test_endpoint_from_lab(lab: Lab) -> None:
    endpoint = Endpoint.from_lab(lab.directory)
    assert endpoint == lab.endpoint
    assert "PRIVATE KEY" not in repr(endpoint)
    assert "PRIVATE KEY" not in repr(Client(endpoint))


def test_endpoint_from_lab_reports_bad_files(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Endpoint.from_lab(tmp_path)
    (tmp_path / "lab.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        Endpoint.from_lab(tmp_path)
    (tmp_path / "lab.json").write_text(json.dumps({"coordinator": {"address": "127.0.0.1:1"}}))
    with pytest.raises(ValueError, match=r"coordinator\.ca"):
        Endpoint.from_lab(tmp_path)
    lab = {
        "coordinator": {"address": "127.0.0.1:1", "ca": "ca.crt", "server_name": "c"},
        "operator": {"cert": "missing.crt", "key": "missing.key"},
    }
    (tmp_path / "lab.json").write_text(json.dumps(lab))
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(FileNotFoundError):
        Endpoint.from_lab(tmp_path)


def test_endpoint_refuses_bad_tls_material(lab: Lab) -> None:
    good = lab.endpoint
    other = pki.make_identity("operator")
    cases = [
        ({"ca": b"not a certificate"}, "ca is not a PEM certificate"),
        ({"cert": b""}, "cert is not a PEM certificate"),
        ({"key": b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"}, "key is not an unencrypted"),
        ({"key": other.key_pem}, "key is not the private key of cert"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(good, **change)


def test_public_names() -> None:
    for name in memberguard.__all__:
        assert getattr(memberguard, name) is not None
    others = {"Client", "AsyncClient", "Endpoint", "error_from_rpc", "MembershipWatch", "AsyncMembershipWatch"}
    others |= {"MAX_AGENT_TIMEOUT", "DEFAULT_HEARTBEAT_INTERVAL", "MIN_HEARTBEAT_INTERVAL", "MAX_HEARTBEAT_INTERVAL"}
    errors = {getattr(memberguard, n) for n in memberguard.__all__ if n not in others}
    assert all(issubclass(e, memberguard.MemberguardError) for e in errors)
    assert len(errors) == 22
    assert callable(memberguard.error_from_rpc)
