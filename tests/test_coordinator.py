"""The coordinator as a server: bad input, deadlines with dead and stalled agents, where its knowledge comes from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from memberguard import Client, InvalidArgument, PermissionDenied
from memberguard.v1 import coordinator_pb2, coordinator_pb2_grpc, operation_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator.lab import lab as labs

SERVICE = "/memberguard.v1.CoordinatorService"


@pytest.fixture
def channel(lab: labs.Lab) -> Iterator[grpc.Channel]:
    """A raw operator channel, for requests the client library would refuse to build."""
    endpoint = lab.endpoint
    credentials = grpc.ssl_channel_credentials(endpoint.ca, endpoint.key, endpoint.cert)
    with grpc.secure_channel(
        endpoint.address, credentials, options=[("grpc.ssl_target_name_override", endpoint.server_name)]
    ) as opened:
        yield opened


def _field_violations(error: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


def _assert_healthy(channel: grpc.Channel) -> None:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"agent_timeout": duration_pb2.Duration(seconds=-1)}, {"agent_timeout"}),
        ({"agent_timeout": duration_pb2.Duration(seconds=61)}, {"agent_timeout"}),
        ({"agent_timeout": duration_pb2.Duration(nanos=2_000_000_000)}, {"agent_timeout.nanos"}),
        ({"minimum_severity": 99}, {"minimum_severity"}),
        (
            {"agent_timeout": duration_pb2.Duration(seconds=-5), "minimum_severity": 7},
            {"agent_timeout", "minimum_severity"},
        ),
    ],
)
def test_malformed_requests_get_every_field_violation(
    channel: grpc.Channel, request_fields: dict[str, object], fields: set[str]
) -> None:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.CheckMembership(coordinator_pb2.CheckMembershipRequest(**request_fields), timeout=5)  # type: ignore[arg-type]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert set(_field_violations(refused.value)) == fields
    _assert_healthy(channel)


def test_oversized_and_garbage_requests_are_refused_and_the_server_stays_up(channel: grpc.Channel) -> None:
    raw = channel.unary_unary(f"{SERVICE}/CheckMembership")
    with pytest.raises(grpc.RpcError) as oversized:
        raw(b"\x00" * (2 << 20), timeout=5)
    assert oversized.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as garbage:
        raw(b"\xff\xff\xff\xff\x0f", timeout=5)
    assert garbage.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert list(_field_violations(garbage.value)) == [""]
    _assert_healthy(channel)
    answer = coordinator_pb2_grpc.CoordinatorServiceStub(channel).CheckMembership(
        coordinator_pb2.CheckMembershipRequest(), timeout=5
    )
    assert answer.diff.fingerprint


def test_a_malformed_guarded_operation_names_every_bad_field(client: Client) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.guarded_operation(coordinator_pb2.GuardedOperationRequest(), timeout=5)
    assert sorted(field for field, _ in refused.value.field_violations) == ["operation", "request_id"]


def test_a_join_is_not_accepted_on_the_operators_listener(client: Client) -> None:
    request = coordinator_pb2.GuardedOperationRequest(request_id="j1", join=operation_pb2.JoinOperation(name="n9"))
    with pytest.raises(PermissionDenied):
        client.guarded_operation(request, timeout=5)


def test_minimum_severity_filters_the_answer_not_the_fingerprint(lab: labs.Lab, client: Client) -> None:
    full = client.check_membership(timeout=5).diff
    filtered = client.check_membership(minimum_severity=pb.SEVERITY_BLOCKING, timeout=5).diff
    assert filtered.fingerprint == full.fingerprint


def _unreachable(diff: pb.MembershipDiff) -> set[str]:
    return {x.node for x in diff.discrepancies if x.kind == pb.DISCREPANCY_KIND_AGENT_UNREACHABLE}


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3)
    yield running
    for pid in running.pids():
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    labs.down(running.dir)


def test_a_stalled_agent_costs_its_deadline_not_a_hang(own_lab: labs.Lab) -> None:
    stalled = own_lab.node("n2")["pid"]
    with Client(own_lab.endpoint) as client:
        # Warm: the lab's first check dials every agent and fetches whole views, which a loaded machine may not fit
        # into the 0.5 s below for the agents that run.
        assert list(client.check_membership(timeout=10).diff.discrepancies) == []
        os.kill(stalled, signal.SIGSTOP)
        started = time.monotonic()
        diff = client.check_membership(agent_timeout=0.5, timeout=10).diff
        elapsed = time.monotonic() - started
        assert _unreachable(diff) == {"n2"}
        assert elapsed < 2.0, f"a 0.5 s agent deadline took {elapsed:.2f} s"
        # A caller's deadline shorter than the agent timeout still gets an answer, not DEADLINE_EXCEEDED.
        started = time.monotonic()
        diff = client.check_membership(agent_timeout=30, timeout=1.0).diff
        assert _unreachable(diff) == {"n2"} and time.monotonic() - started < 1.0
        os.kill(stalled, signal.SIGCONT)
        assert list(client.check_membership(timeout=10).diff.discrepancies) == []


def test_a_killed_agent_is_unreachable_and_seen_again_when_it_returns(own_lab: labs.Lab) -> None:
    node = own_lab.node("n3")
    os.kill(node["pid"], signal.SIGKILL)
    with Client(own_lab.endpoint) as client:
        diff = client.check_membership(agent_timeout=0.5, timeout=10).diff
        assert _unreachable(diff) == {"n3"}
        unreachable = next(x for x in diff.discrepancies if x.node == "n3")
        assert unreachable.severity == pb.SEVERITY_WARNING
        # Nothing else is inferred about n3's sources: unknown is not absent.
        assert [x.node for x in diff.discrepancies] == ["n3"]

        config_path = Path(node["state_dir"]) / "agent.json"
        config = json.loads(config_path.read_text())
        config["listen"] = node["agent_address"]
        config_path.write_text(json.dumps(config))
        (Path(node["state_dir"]) / "agent.port").unlink()
        revived = subprocess.Popen(
            [sys.executable, "-m", "coordinator.agent", str(config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 15
            while _unreachable(client.check_membership(agent_timeout=0.5, timeout=10).diff):
                assert time.monotonic() < deadline, "the restarted agent was not seen again"
                time.sleep(0.1)
        finally:
            revived.terminate()
            revived.wait(10)


_AUDITED = """
import runpy, sys
log = open(sys.argv[1], "a", buffering=1)
def hook(event, args):
    if event in ("open", "sqlite3.connect", "os.listdir", "os.scandir") and args and args[0] is not None:
        log.write(f"{event} {args[0]}\\n")
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_module("coordinator.service", run_name="__main__")
"""


def test_the_coordinator_opens_no_source_file(lab: labs.Lab, tmp_path: Path) -> None:
    """A second coordinator over the same lab, with an audit hook logging every file it opens or lists."""
    config = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
    config["port_file"] = str(tmp_path / "port")
    config["journal"] = str(tmp_path / "journal.db")  # the lab's coordinator holds the lab's journal
    # The lab pins its coordinator's ports (a restart keeps them); a port is one server's, so this one picks its own.
    host = config["listen"].rpartition(":")[0]
    config["listen"], config["join_listen"], config["metrics_listen"] = f"{host}:0", f"{host}:0", f"{host}:0"
    del config["metrics_port_file"]  # the lab's coordinator owns DIR/coordinator/metrics.port
    config_path = tmp_path / "coordinator.json"
    config_path.write_text(json.dumps(config))
    audit = tmp_path / "audit.log"
    process = subprocess.Popen(
        [sys.executable, "-c", _AUDITED, str(audit), str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "port").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        endpoint = lab.endpoint
        address = f"127.0.0.1:{(tmp_path / 'port').read_text()}"
        with Client(type(endpoint)(address, endpoint.ca, endpoint.server_name, endpoint.cert, endpoint.key)) as c:
            diff = c.check_membership(timeout=10).diff
    finally:
        process.terminate()
        process.wait(10)
    assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3"], "it learned the members from the agents"
    opened = audit.read_text().splitlines()
    assert any("registry.json" in line for line in opened), "the audit hook saw nothing: the test is blind"
    sources = (str(lab.dir / "sources"), str(lab.dir / "nodes"))
    assert [line for line in opened if any(s in line for s in sources)] == []
