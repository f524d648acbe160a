"""The one error table, walked: every (reason, code) the coordinator can answer a caller with (coordinator/status.py) is
produced by a real path, and the client library decodes it into its own type, by reason; the CLI exits with the right
status and says what each one means.

The paths run against real labs (processes, mutual TLS, the join listener as a joiner reaches it): a shared one; one
whose coordinator fails a join's step after its commit point, so that the join is parked holding its bound token; and
one flooded with garbage. INTERNAL has no path in a correct coordinator: it is what the coordinator's interceptor
answers for a handler that raises something unexpected, so its path is a real mTLS server with that interceptor.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import memberguard
import pytest
from google.rpc import code_pb2
from memberguard import Client, Endpoint
from memberguard.v1 import coordinator_pb2, coordinator_pb2_grpc, operation_pb2

from coordinator import status
from coordinator.agent.truststore import write_truststore_entry
from coordinator.cli import EXIT_COORDINATOR, EXIT_REFUSED, main
from coordinator.core import tokens
from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from coordinator.pki import make_identity
from tests import join_listener
from tests.interceptor_server import serving

# What the client raises for each reason: its own type where it has one, else the one its code maps to.
EXPECTED: dict[str, type[memberguard.MemberguardError]] = {
    "INVALID_REQUEST": memberguard.InvalidArgument,
    "UNTRUSTED_CERTIFICATE": memberguard.Unauthenticated,
    "ROLE_NOT_ALLOWED": memberguard.PermissionDenied,
    "JOINER_NOT_VERIFIED": memberguard.PermissionDenied,
    "NOT_FOUND": memberguard.NotFound,
    "ALREADY_EXISTS": memberguard.AlreadyExists,
    "MEMBERSHIP_INCONSISTENT": memberguard.DirtyMembership,
    "OPERATION_PARKED": memberguard.OperationParked,
    "NOT_ABANDONABLE": memberguard.NotAbandonable,
    "FINGERPRINT_STALE": memberguard.StaleFingerprint,
    "DEADLINE_PASSED": memberguard.DeadlineExceeded,
    "TOO_MANY_FAILED_ATTEMPTS": memberguard.TooManyAttempts,
    "INTERNAL": memberguard.Internal,
    "TOKEN_EXPIRED": memberguard.TokenExpired,
    "TOKEN_IN_USE": memberguard.TokenInUse,
}


def expected_type(reason: str) -> type[memberguard.MemberguardError]:
    return EXPECTED.get(
        reason, memberguard.TokenRefused if reason.startswith("TOKEN_") else memberguard.MemberguardError
    )


# --- the labs ------------------------------------------------------------------------------------------------------


@dataclass
class Joins:
    """A lab's coordinator and its join listener; `token` is n4's, which its fixture joined with."""

    lab: labs.Lab
    endpoint: Endpoint
    token: str = ""

    def client(self) -> Client:
        return Client(self.endpoint)

    def join(self, token: str, name: str, *, agent_address: str = "127.0.0.1:9") -> None:
        """A join over the join listener, as a joiner sends it; raises the client's error for the refusal."""
        request = join_listener.join_request(token, name, agent_address=agent_address)
        with join_listener.channel(self.lab.document["coordinator"]) as channel:
            try:
                coordinator_pb2_grpc.CoordinatorServiceStub(channel).GuardedOperation(request, timeout=20)
            except grpc.RpcError as error:
                raise memberguard.error_from_rpc(error) from error


@pytest.fixture(scope="module")
def shared(lab: labs.Lab) -> Iterator[Joins]:
    """The module's lab, with n4 joined through its token (so that the token is consumed)."""
    node = labs.start_joining_node(lab, "n4")
    try:
        with Client(lab.endpoint) as client:
            token = client.issue_token("n4").token
        assert node.join(token).state == operation_pb2.OPERATION_STATE_SUCCEEDED
        yield Joins(lab, lab.endpoint, token)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def parked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Joins]:
    """A lab whose coordinator fails step 9 of every operation: n4's join passes its commit point (step 8) and is
    parked there, its token bound to n4's certificate."""
    saved = os.environ.get(FAULT_ENV)
    os.environ[FAULT_ENV] = "fail-step:9"
    try:
        lab = labs.up(tmp_path_factory.mktemp("parked") / "lab", 3)
    finally:
        if saved is None:
            del os.environ[FAULT_ENV]
        else:
            os.environ[FAULT_ENV] = saved
    node = labs.start_joining_node(lab, "n4")
    try:
        with Client(lab.endpoint) as client:
            token = client.issue_token("n4").token
        assert node.join(token).state == operation_pb2.OPERATION_STATE_PARKED
        yield Joins(lab, lab.endpoint, token)
    finally:
        node.stop()
        labs.down(lab.dir)


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Joins]:
    lab = labs.up(tmp_path_factory.mktemp("flooded") / "lab", 3)
    try:
        yield Joins(lab, lab.endpoint)
    finally:
        labs.down(lab.dir)


# --- the paths -------------------------------------------------------------------------------------------------


def _issue(joins: Joins, name: str, **kwargs: Any) -> str:
    with joins.client() as client:
        return client.issue_token(name, **kwargs).token


def invalid_request(request: pytest.FixtureRequest) -> None:
    with request.getfixturevalue("shared").client() as client:
        client.guarded_operation(coordinator_pb2.GuardedOperationRequest(), timeout=10)


def untrusted_certificate(request: pytest.FixtureRequest) -> None:
    """The operator is taken out of the registry while its connection is open: its next call is refused."""
    joins: Joins = request.getfixturevalue("shared")
    registry = joins.lab.dir / "coordinator" / "registry.json"
    intact = registry.read_bytes()
    document = json.loads(intact)
    document["identities"] = []
    with joins.client() as client:
        client.ping()
        registry.write_bytes(json.dumps(document).encode())
        try:
            client.check_membership(timeout=10)
        finally:
            registry.write_bytes(intact)


def role_not_allowed(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    state = Path(joins.lab.node("n1")["state_dir"])
    as_agent = replace(
        joins.endpoint, cert=(state / "server.crt").read_bytes(), key=(state / "server.key").read_bytes()
    )
    with Client(as_agent) as client:
        client.check_membership(timeout=10)


def joiner_not_verified(request: pytest.FixtureRequest) -> None:
    """A good token, but nothing answers at the agent address the joiner gave."""
    joins: Joins = request.getfixturevalue("shared")
    joins.join(_issue(joins, "n11"), "n11", agent_address="127.0.0.1:9")


def not_found(request: pytest.FixtureRequest) -> None:
    with request.getfixturevalue("shared").client() as client:
        client.get_operation("no-such-operation", timeout=10)


def already_exists(request: pytest.FixtureRequest) -> None:
    _issue(request.getfixturevalue("shared"), "n1")


def membership_inconsistent(request: pytest.FixtureRequest) -> None:
    lab: labs.Lab = request.getfixturevalue("pristine")
    request.getfixturevalue("shared")
    directory = Path(lab.node("n1")["state_dir"]) / "truststore"
    write_truststore_entry(directory, "stray", "127.0.0.9:1", make_identity("stray").certificate_pem.decode())
    _issue(Joins(lab, lab.endpoint), "n12")


def operation_parked(request: pytest.FixtureRequest) -> None:
    _issue(request.getfixturevalue("parked"), "n12")


def not_abandonable(request: pytest.FixtureRequest) -> None:
    """A finished operation is not parked: there is nothing to abandon."""
    with request.getfixturevalue("shared").client() as client:
        finished = client.list_operations(timeout=10).operations[0]
        client.abandon_operation(finished.id, "walking the error table", timeout=10)


def fingerprint_stale(request: pytest.FixtureRequest) -> None:
    with request.getfixturevalue("shared").client() as client:
        client.remove_member("n3", expected_fingerprint="00" * 32, timeout=30)


def deadline_passed(request: pytest.FixtureRequest) -> None:
    """A deadline shorter than the coordinator's margin: it passes before the request runs, and nothing runs. The
    answer races the client's own deadline; the coordinator's reason is what is looked for."""
    with request.getfixturevalue("shared").client() as client:
        for _ in range(20):
            try:
                client.issue_token("n13", timeout=0.04)
            except memberguard.DeadlineExceeded as error:
                if error.reason:
                    raise
        assert "n13" not in [t.name for t in client.list_tokens(timeout=10)], "nothing ran"


def too_many_failed_attempts(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("flooded")
    for _ in range(100):
        try:
            joins.join("garbage", "n9")
        except memberguard.InvalidArgument:
            continue


def internal(request: pytest.FixtureRequest) -> None:
    async def broken(request: Any, context: Any) -> Any:
        raise KeyError("a bug")

    async def go() -> None:
        async with (
            serving(request.getfixturevalue("tmp_path"), "CheckMembership", broken) as endpoint,
            memberguard.AsyncClient(endpoint) as client,
        ):
            await client.check_membership(timeout=10)

    asyncio.run(go())


def token_wrong_cluster(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    token = tokens.decode_token(_issue(joins, "n14"))
    joins.join(tokens.encode_token(replace(token, cluster_id="another-cluster")), "n14")


def token_unknown(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    token = tokens.decode_token(_issue(joins, "n14"))
    joins.join(tokens.encode_token(replace(token, secret=os.urandom(32))), "n14")


def token_revoked(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    token = _issue(joins, "n15")
    with joins.client() as client:
        client.revoke_token("n15", timeout=10)
    joins.join(token, "n15")


def token_expired(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    token = _issue(joins, "n16", ttl=0.05)
    time.sleep(0.1)
    joins.join(token, "n16")


def token_name_mismatch(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    joins.join(_issue(joins, "n17"), "n18")


def token_consumed_by_a_join(request: pytest.FixtureRequest) -> None:
    joins: Joins = request.getfixturevalue("shared")
    joins.join(joins.token, "n4")


def token_consumed_by_a_revocation(request: pytest.FixtureRequest) -> None:
    with request.getfixturevalue("shared").client() as client:
        client.revoke_token("n4", timeout=10)


def token_bound_to_another_certificate(request: pytest.FixtureRequest) -> None:
    """The parked join holds n4's token bound to n4's certificate; another certificate for n4 presents it."""
    joins: Joins = request.getfixturevalue("parked")
    joins.join(joins.token, "n4")


def token_in_use(request: pytest.FixtureRequest) -> None:
    with request.getfixturevalue("parked").client() as client:
        client.revoke_token("n4", timeout=10)


PATHS: dict[tuple[str, int], Callable[[pytest.FixtureRequest], None]] = {
    ("INVALID_REQUEST", code_pb2.INVALID_ARGUMENT): invalid_request,
    ("UNTRUSTED_CERTIFICATE", code_pb2.UNAUTHENTICATED): untrusted_certificate,
    ("ROLE_NOT_ALLOWED", code_pb2.PERMISSION_DENIED): role_not_allowed,
    ("JOINER_NOT_VERIFIED", code_pb2.PERMISSION_DENIED): joiner_not_verified,
    ("NOT_FOUND", code_pb2.NOT_FOUND): not_found,
    ("ALREADY_EXISTS", code_pb2.ALREADY_EXISTS): already_exists,
    ("MEMBERSHIP_INCONSISTENT", code_pb2.FAILED_PRECONDITION): membership_inconsistent,
    ("OPERATION_PARKED", code_pb2.FAILED_PRECONDITION): operation_parked,
    ("NOT_ABANDONABLE", code_pb2.FAILED_PRECONDITION): not_abandonable,
    ("FINGERPRINT_STALE", code_pb2.ABORTED): fingerprint_stale,
    ("DEADLINE_PASSED", code_pb2.DEADLINE_EXCEEDED): deadline_passed,
    ("TOO_MANY_FAILED_ATTEMPTS", code_pb2.RESOURCE_EXHAUSTED): too_many_failed_attempts,
    ("INTERNAL", code_pb2.INTERNAL): internal,
    ("TOKEN_WRONG_CLUSTER", code_pb2.PERMISSION_DENIED): token_wrong_cluster,
    ("TOKEN_UNKNOWN", code_pb2.PERMISSION_DENIED): token_unknown,
    ("TOKEN_REVOKED", code_pb2.PERMISSION_DENIED): token_revoked,
    ("TOKEN_EXPIRED", code_pb2.PERMISSION_DENIED): token_expired,
    ("TOKEN_NAME_MISMATCH", code_pb2.PERMISSION_DENIED): token_name_mismatch,
    ("TOKEN_CONSUMED", code_pb2.PERMISSION_DENIED): token_consumed_by_a_join,
    ("TOKEN_CONSUMED", code_pb2.FAILED_PRECONDITION): token_consumed_by_a_revocation,
    ("TOKEN_BOUND_TO_ANOTHER_CERTIFICATE", code_pb2.PERMISSION_DENIED): token_bound_to_another_certificate,
    ("TOKEN_IN_USE", code_pb2.FAILED_PRECONDITION): token_in_use,
}


def test_every_reason_the_coordinator_can_send_has_a_path() -> None:
    assert set(PATHS) == set(status.coordinator_statuses())


@pytest.mark.parametrize(("reason", "code"), sorted(PATHS), ids=[f"{r}-{c}" for r, c in sorted(PATHS)])
def test_the_path_raises_the_reason_and_the_client_decodes_it(
    request: pytest.FixtureRequest, reason: str, code: int
) -> None:
    with pytest.raises(memberguard.MemberguardError) as raised:
        PATHS[(reason, code)](request)
    error = raised.value
    assert (error.reason, error.code.value[0]) == (reason, code), error
    assert type(error) is expected_type(reason), f"{type(error).__name__} for {reason}"


# --- the CLI ---------------------------------------------------------------------------------------------------


def _endpoint_flags(joins: Joins) -> list[str]:
    lab = joins.lab
    return [
        "--address",
        joins.endpoint.address,
        "--ca",
        lab.document["coordinator"]["ca"],
        "--server-name",
        lab.document["coordinator"]["server_name"],
        "--cert",
        lab.document["operator"]["cert"],
        "--key",
        lab.document["operator"]["key"],
    ]


def test_revoking_a_bound_token_is_not_a_refused_guard(parked: Joins, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "revoke", "n4", *_endpoint_flags(parked)]) == EXIT_COORDINATOR
    err = capsys.readouterr().err
    assert "the guard refused" not in err
    assert err.startswith("memberguard: error: ") and "the token is in use" in err and "TOKEN_IN_USE" in err


def test_a_parked_operation_refuses_a_change_and_names_it(parked: Joins, capsys: pytest.CaptureFixture[str]) -> None:
    with parked.client() as client:
        [parked_id] = [
            op.id
            for op in client.list_operations(timeout=10).operations
            if op.kind == operation_pb2.OPERATION_KIND_JOIN
        ]
    assert main(["token", "issue", "n19", *_endpoint_flags(parked)]) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "a parked operation must be finished first" in err
    assert f"memberguard ops {parked_id}" in err


def test_an_expired_token_says_so(shared: Joins, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = _issue(shared, "n20", ttl=0.05)
    time.sleep(0.1)
    certificate = tmp_path / "n20.crt"
    certificate.write_bytes(make_identity("n20").certificate_pem)
    argv = ["join", "--token", token, "--name", "n20", "--address", "127.0.0.1:9999", "--cert", str(certificate)]
    argv += ["--agent-address", "127.0.0.1:9", "--pins", str(tmp_path / "pins.pem"), "--timeout", "20"]
    assert main(argv) == EXIT_COORDINATOR
    err = capsys.readouterr().err
    assert "the token has expired: issue a new one" in err and "TOKEN_EXPIRED" in err
