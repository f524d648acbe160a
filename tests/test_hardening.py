"""An unauthenticated caller learns nothing, errors neither leak nor overflow, trust is read by content.

Each test is one of issue 9's findings, against a real lab (a coordinator and agents as processes, mutual TLS on
loopback; the join listener over TLS without a client certificate, as a joiner reaches it).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import memberguard
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from memberguard import Client
from memberguard.v1 import coordinator_pb2_grpc

from coordinator.agent.truststore import write_truststore_entry
from coordinator.core import tokens
from coordinator.lab import lab as labs
from coordinator.pki import make_identity
from tests import join_listener
from tests.restarts import start_coordinator


def _join_channel(lab: labs.Lab) -> grpc.Channel:
    return join_listener.channel(lab.document["coordinator"])


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    return str(info.reason)


def _log(lab: labs.Lab) -> str:
    return (lab.dir / "logs" / "coordinator.log").read_text()


# --- the join listener authenticates first ---------------------------------------------------------------------


@pytest.mark.parametrize("token", ["garbage", "forged"])
def test_the_join_listener_returns_no_operation_before_the_token_is_verified(lab: labs.Lab, token: str) -> None:
    with Client(lab.endpoint) as client:
        issued = client.issue_token("n9", request_id=f"known-{token}")
    if token == "forged":
        # Decodes, names this cluster and member, and holds another secret.
        token = tokens.encode_token(replace(tokens.decode_token(issued.token), secret=os.urandom(32)))
    with _join_channel(lab) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GuardedOperation(
                join_listener.join_request(token, "n9", request_id=issued.audit.request_id), timeout=10
            )
    assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)  # type: ignore[attr-defined]
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    assert issued.id not in status.SerializeToString().decode(errors="replace"), "nothing about the operation"
    with Client(lab.endpoint) as client:
        client.revoke_token("n9")


def test_garbage_on_the_join_listener_is_invalid_argument_without_a_traceback(lab: labs.Lab) -> None:
    logged = len(_log(lab))
    with _join_channel(lab) as channel:
        raw = channel.unary_unary(join_listener.GUARDED)
        for garbage in (b"\xff\xff\xff\xff\x0f", b"\x0a\x05abc"):
            with pytest.raises(grpc.RpcError) as refused:
                raw(garbage, timeout=5)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert _reason(refused.value) == "INVALID_REQUEST"
    assert "Traceback" not in _log(lab)[logged:]


@pytest.fixture
def throttled_lab(tmp_path: Path) -> Iterator[tuple[labs.Lab, memberguard.Endpoint]]:
    """A lab whose coordinator allows a source 5 failed token attempts, then one every 5 s."""
    lab = labs.up(tmp_path / "lab", 3)
    try:
        os.kill(lab.document["coordinator"]["pid"], signal.SIGTERM)
        process, endpoint = start_coordinator(lab, {}, {"join_attempts": {"burst": 5, "per_second": 0.2}})
        try:
            join_port = (lab.dir / "coordinator" / "join.port").read_text()
            document = {**lab.document, "coordinator": {**lab.document["coordinator"], "address": endpoint.address}}
            document["coordinator"]["join_address"] = f"127.0.0.1:{join_port}"
            yield labs.Lab(lab.dir, document), endpoint
        finally:
            process.terminate()
            process.wait(10)
    finally:
        labs.down(lab.dir)


def test_failed_attempts_are_limited_per_source_and_the_operator_sees_it(
    throttled_lab: tuple[labs.Lab, memberguard.Endpoint],
) -> None:
    lab, endpoint = throttled_lab
    with Client(endpoint) as client:
        token = client.issue_token("n9").token
    codes = []
    with _join_channel(lab) as channel:
        raw = channel.unary_unary(join_listener.GUARDED)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        for _ in range(8):
            with pytest.raises(grpc.RpcError) as refused:
                raw(b"\xff\xff\xff\xff\x0f", timeout=5)
            codes.append(refused.value.code())  # type: ignore[attr-defined]
        last = refused.value
        # Throttled, the source is refused whatever it sends, a good token included: no work is done for it.
        with pytest.raises(grpc.RpcError) as good_but_refused:
            stub.GuardedOperation(join_listener.join_request(token, "n9"), timeout=5)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert good_but_refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert _reason(last) == "TOO_MANY_FAILED_ATTEMPTS"
    log = (lab.dir / "logs" / "coordinator-restarts.log").read_text()
    warnings = [line for line in log.splitlines() if "refusing 127.0.0.1" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], "once per episode, not once per request"
    assert "in all: 5 failed, 1 refused" in warnings[0]
    with Client(endpoint) as client:
        assert client.check_membership(timeout=10).diff.fingerprint, "the operators' listener is not affected"
    # The bucket refills: once the wait the refusal named is over, the source has one attempt again.
    refusal = memberguard.error_from_rpc(good_but_refused.value)
    assert isinstance(refusal, memberguard.TooManyAttempts) and 0 < refusal.retry_after <= 5
    time.sleep(refusal.retry_after)
    with _join_channel(lab) as channel, pytest.raises(grpc.RpcError) as again:
        channel.unary_unary(join_listener.GUARDED)(b"\xff\xff\xff\xff\x0f", timeout=5)
    assert again.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


# --- errors that neither leak nor overflow ---------------------------------------------------------------------


def _page_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "seq", ["9" * 19, str(2**63), "0", "-1", "+5", " 5", "1_0", "05", "\u0661"], ids=lambda s: repr(s)
)
def test_a_page_token_outside_the_journals_range_is_invalid_argument(lab: labs.Lab, seq: str) -> None:
    with Client(lab.endpoint) as client, pytest.raises(memberguard.InvalidArgument) as refused:
        client.list_operations(page_token=_page_token(f"before:{seq}"), timeout=5)
    assert [field for field, _ in refused.value.field_violations] == ["page_token"]
    assert "SQLite" not in str(refused.value) and "int" not in refused.value.message


def test_an_echoed_name_or_id_never_overflows_the_status(lab: labs.Lab) -> None:
    huge = "x" * 900_000
    with Client(lab.endpoint) as client:
        with pytest.raises(memberguard.NotFound) as unknown_operation:
            client.get_operation(huge, timeout=10)
        with pytest.raises(memberguard.NotFound) as unknown_token:
            client.revoke_token(huge, timeout=10)
        with pytest.raises(memberguard.MemberguardError) as unknown_member:
            client.remove_member(huge, timeout=10)
    for refused in (unknown_operation.value, unknown_token.value):
        assert len(refused.message) < 300 and "more characters" in refused.message
    assert type(unknown_member.value) in (memberguard.NotFound, memberguard.InvalidArgument), unknown_member.value


def test_a_refusal_that_quotes_hundreds_of_discrepancies_reaches_the_caller(pristine: labs.Lab) -> None:
    """300 orphan records in n1's truststore: 300 blocking discrepancies, each a violation and in the diff."""
    directory = Path(pristine.node("n1")["state_dir"]) / "truststore"
    for i in range(300):
        certificate = make_identity(f"stray{i}").certificate_pem.decode()
        write_truststore_entry(directory, f"stray{i}", f"127.0.0.9:{10000 + i}", certificate)
    with Client(pristine.endpoint) as client:
        diff = client.check_membership(timeout=10).diff
        assert len(diff.discrepancies) >= 300
        with pytest.raises(memberguard.DirtyMembership) as refused:
            client.issue_token("n9", timeout=30)
    error = refused.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION and error.reason == "MEMBERSHIP_INCONSISTENT"
    assert error.diff is not None and error.diff.fingerprint == diff.fingerprint, "what a retry needs"
    assert len(error.diff.discrepancies) + error.discrepancies_left_out == len(diff.discrepancies)
    assert error.discrepancies_left_out > 0
    assert len(error.violations) + int(error.metadata.get("violations_left_out", "0")) >= 300


def test_a_torn_registry_keeps_the_last_good_one_and_the_log_says_so(lab: labs.Lab) -> None:
    registry = lab.dir / "coordinator" / "registry.json"
    intact = registry.read_bytes()
    logged = len(_log(lab))
    try:
        with Client(lab.endpoint) as client:
            registry.write_bytes(intact[: len(intact) // 2])  # a writer that does not replace the file atomically
            assert client.check_membership(timeout=10).diff.fingerprint
            assert client.list_tokens(timeout=10) is not None
    finally:
        registry.write_bytes(intact)
    log = _log(lab)[logged:]
    errors = [line for line in log.splitlines() if " ERROR " in line and "registry.json: not JSON" in line]
    assert len(errors) == 1, log
    assert "Traceback" not in log
    with Client(lab.endpoint) as client:
        assert client.check_membership(timeout=10).diff.fingerprint


def test_a_coordinator_refuses_to_start_on_a_registry_that_does_not_parse(lab: labs.Lab, tmp_path: Path) -> None:
    config = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
    torn = tmp_path / "registry.json"
    torn.write_bytes((lab.dir / "coordinator" / "registry.json").read_bytes()[:100])
    config.update(
        registry=str(torn),
        journal=str(tmp_path / "journal.db"),
        port_file=str(tmp_path / "port"),
        join_port_file=str(tmp_path / "join.port"),
    )
    (tmp_path / "coordinator.json").write_text(json.dumps(config))
    started = subprocess.run(
        [sys.executable, "-m", "coordinator.service", str(tmp_path / "coordinator.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 1
    assert f"not starting: {torn}: not JSON" in started.stderr and "Traceback" not in started.stderr
    assert not (tmp_path / "port").exists()


# --- trust read by content -------------------------------------------------------------------------------------


def test_an_operator_removed_by_a_same_size_rewrite_that_keeps_the_mtime_is_refused_at_once(lab: labs.Lab) -> None:
    registry = lab.dir / "coordinator" / "registry.json"
    intact = registry.read_bytes()
    document = json.loads(intact)
    document["identities"] = [i for i in document["identities"] if i["name"] != "operator"]
    stripped = json.dumps(document, indent=2).encode()
    before = os.stat(registry)

    def rewrite(data: bytes) -> None:
        with open(registry, "r+b") as handle:  # the same inode
            handle.write(data + b" " * (len(intact) - len(data)))  # the same size
        os.utime(registry, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same mtime

    with Client(lab.endpoint) as client:
        assert client.check_membership(timeout=10).diff.fingerprint
        try:
            rewrite(stripped)
            assert (os.stat(registry).st_ino, os.stat(registry).st_size, os.stat(registry).st_mtime_ns) == (
                before.st_ino,
                before.st_size,
                before.st_mtime_ns,
            )
            with pytest.raises(memberguard.Unauthenticated):
                client.check_membership(timeout=10)
        finally:
            rewrite(intact)
        assert client.check_membership(timeout=10).diff.fingerprint, "trusted again once the rewrite is undone"
