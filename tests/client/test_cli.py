"""`memberguard check` against a real mTLS server: output, --json, a failed call's status, and every exit status."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from memberguard.v1 import coordinator_pb2, membership_pb2

from coordinator.cli import main
from coordinator.core.diff import compute_diff
from coordinator.messages import diff_to_proto
from tests.core.test_diff import truststore_file_deleted

from . import (
    COORDINATOR_ID,
    FINGERPRINT,
    Behaviour,
    Lab,
    abort,
    inconsistent_diff,
    only,
    respond,
    running_coordinator,
    stall,
    unused_address,
    write_lab_json,
)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_coordinator(tmp_path_factory.mktemp("lab")) as lab:
        yield lab


@pytest.fixture
def lab(running: Lab) -> Lab:
    running.reset()
    return running


def check(lab: Lab, *options: str) -> list[str]:
    return ["check", "--lab", str(lab.directory), *options]


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line check wrote to stderr (and nothing to stdout)."""
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "PRIVATE KEY" not in err
    return lines[0]


def test_consistent(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(check(lab)) == 0
    out, err = capsys.readouterr()
    assert out == f"consistent\nfingerprint {FINGERPRINT}\n"
    assert err == ""


def test_inconsistent_prints_a_table(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    lab.fake.behaviour = respond(inconsistent_diff())
    assert main(check(lab)) == 1
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["SEVERITY", "KIND", "MEMBER", "SOURCE", "NODE", "SUMMARY"]
    assert lines[1].split()[:5] == ["blocking", "missing", "n3", "truststore", "n2"]
    assert lines[1].endswith("n2's truststore has no record of n3")
    assert lines[2] == "    remedy (safe): Restore n3's truststore record on n2 from the members table"
    # A member known only by its address, then only by its node id; cluster-wide sources have no node.
    assert lines[3].split()[:5] == ["warning", "address-mismatch", "127.0.0.1:9004", "members-table", "-"]
    assert lines[4].split()[:6] == ["info", "view-differs", "id", "77", "raft-cache", "n2"]
    # Columns line up: every summary starts where the header's does.
    column = lines[0].index("SUMMARY")
    assert {lines[i][column - 2 : column] for i in (1, 3, 4)} == {"  "}
    assert lines[5] == f"fingerprint {FINGERPRINT}  3 discrepancies: 1 blocking, 1 warning, 1 info"
    assert len(lines) == 6


def test_a_discrepancy_explained_by_an_operation_in_flight_says_which(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    diff = inconsistent_diff()
    diff.discrepancies[0].severity = membership_pb2.SEVERITY_INFO
    diff.discrepancies[0].explained_by_operation_id = "op-7"
    lab.fake.behaviour = respond(diff)
    assert main(check(lab)) == 1, "the warning still counts"
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["info", "missing"]
    assert lines[2] == "    explained by operation op-7, in flight"
    assert lines[3].startswith("    remedy (safe): ")


def test_a_remedys_typed_steps_are_shown_briefly_and_in_full_in_json(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    diff = diff_to_proto(compute_diff(truststore_file_deleted()))
    lab.fake.behaviour = respond(diff)
    assert main(check(lab)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:6] == [
        "    remedy (safe): Restore n2's record in n3's truststore from the members table.",
        "      - write n2 to n3's truststore, from the members-table",
        "    remedy (unsafe): Do not treat n2 as removed and shrink the Raft configuration: the members table and Raft "
        "both hold it, and only n3's truststore lacks it.",
        "      - delete node 2 at 127.0.0.1:7002 from the raft-config",
    ]
    assert main(check(lab, "-o", "json")) == 1
    (shown,) = json.loads(capsys.readouterr().out)["diff"]["discrepancies"]
    assert shown["remedies"] == json_format.MessageToDict(diff.discrepancies[0])["remedies"]
    assert shown["remedies"][0]["steps"][0]["kind"] == "REPAIR_STEP_KIND_WRITE_RECORD"


@pytest.mark.parametrize(
    ("severity", "status"),
    [(membership_pb2.SEVERITY_INFO, 0), (membership_pb2.SEVERITY_WARNING, 1), (membership_pb2.SEVERITY_BLOCKING, 1)],
)
def test_exit_status_follows_the_worst_severity(
    lab: Lab, capsys: pytest.CaptureFixture[str], severity: membership_pb2.Severity.ValueType, status: int
) -> None:
    diff = inconsistent_diff()
    only(diff, severity)
    lab.fake.behaviour = respond(diff)
    assert main(check(lab)) == status
    out, _ = capsys.readouterr()
    assert "1 discrepancies" in out


def test_json_is_the_response(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    lab.fake.behaviour = respond(inconsistent_diff())
    assert main(check(lab, "--json")) == 1
    out, _ = capsys.readouterr()
    response = json_format.Parse(out, coordinator_pb2.CheckMembershipResponse())
    assert response.diff == inconsistent_diff()
    assert response.header.coordinator_id == COORDINATOR_ID
    assert json.loads(out)["diff"]["discrepancies"][0]["severity"] == "SEVERITY_BLOCKING"


def test_a_failed_call_in_json_prints_every_detail_even_of_an_unknown_type(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    error_info = any_pb2.Any()
    error_info.Pack(error_details_pb2.ErrorInfo(reason="ROLE_NOT_ALLOWED", domain="memberguard.v1"))
    # A detail of a type no module of this process defines, as a newer coordinator might send.
    unknown = any_pb2.Any(type_url="type.googleapis.com/memberguard.v9.Future", value=b"\x08\x2a")

    def refuse(request: Message, context: grpc.ServicerContext) -> membership_pb2.MembershipDiff:
        status = status_pb2.Status(
            code=grpc.StatusCode.PERMISSION_DENIED.value[0],
            message="operator role required",
            details=[error_info, unknown],
        )
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort_with_status returned")

    lab.fake.behaviour = refuse
    assert main(check(lab, "-o", "json")) == 3
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and "PERMISSION_DENIED [ROLE_NOT_ALLOWED]" in err
    assert json.loads(out) == {
        "code": "PERMISSION_DENIED",
        "message": "operator role required",
        "details": [
            json_format.MessageToDict(error_info),
            {"@type": unknown.type_url, "value": base64.b64encode(unknown.value).decode()},
        ],
    }


def test_a_request_the_client_refuses_in_json_prints_its_reason_and_violations(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(check(lab, "--agent-timeout", "61", "--json")) == 2
    out, err = capsys.readouterr()
    assert err.startswith("memberguard: error: invalid request: INVALID_ARGUMENT [CLIENT_VALIDATION]")
    document = json.loads(out)
    assert document["code"] == "INVALID_ARGUMENT" and "agent_timeout" in document["message"]
    error_info, bad_request = (json_format.ParseDict(d, any_pb2.Any()) for d in document["details"])
    reason = error_details_pb2.ErrorInfo()
    violations = error_details_pb2.BadRequest()
    assert error_info.Unpack(reason) and reason.reason == "CLIENT_VALIDATION"
    assert bad_request.Unpack(violations) and [v.field for v in violations.field_violations] == ["agent_timeout"]
    assert lab.fake.requests == [], "nothing was sent"


def test_an_unreachable_coordinator_in_yaml_prints_a_status_without_details(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lab_json(tmp_path, unused_address(), ca=lab.ca_path, cert=lab.cert_path, key=lab.key_path)
    assert main(["check", "--lab", str(tmp_path), "--timeout", "5", "-o", "yaml"]) == 3
    out, err = capsys.readouterr()
    document = yaml.safe_load(out)
    assert list(document) == ["code", "message"] and document["code"] == "UNAVAILABLE"
    assert err.splitlines()[0].endswith(document["message"])


def test_explicit_endpoint_and_request_options(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    options = ["--agent-timeout", "1.5", "--min-severity", "warning", "--timeout", "5", "--json"]
    assert main(["check", *lab.endpoint_args(), *options]) == 0
    capsys.readouterr()
    (request,) = lab.check_requests()
    assert request.agent_timeout.ToNanoseconds() == 1_500_000_000
    assert request.minimum_severity == membership_pb2.SEVERITY_WARNING


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["check"],
        ["check", "--address", "127.0.0.1:1"],
        ["check", "--lab", "LAB", "--address", "127.0.0.1:1"],
        ["check", "--lab", "LAB", "--timeout", "-1"],
        ["check", "--lab", "LAB", "--timeout", "soon"],
        ["check", "--lab", "LAB", "--min-severity", "fatal"],
        ["check", "--lab", "LAB", "--agent-timeout", "61"],
    ],
    ids=["nothing", "unknown-command", "no-endpoint", "partial-endpoint", "lab-and-address", "negative-timeout",
         "timeout-not-a-number", "unknown-severity", "agent-timeout-too-long"],
)  # fmt: skip
def test_usage_errors_exit_2(lab: Lab, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    argv = [str(lab.directory) if arg == "LAB" else arg for arg in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "error:" in err
    assert lab.fake.requests == []


def test_a_missing_certificate_exits_2(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = lab.endpoint_args()
    args[args.index("--cert") + 1] = str(tmp_path / "absent.crt")
    assert main(["check", *args]) == 2
    assert error_line(capsys) == f"memberguard check: error: cannot read {tmp_path / 'absent.crt'}: " + (
        "No such file or directory"
    )


def test_a_file_that_is_not_a_key_exits_2(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = lab.endpoint_args()
    args[args.index("--key") + 1] = str(lab.ca_path)
    assert main(["check", *args]) == 2
    assert error_line(capsys) == "memberguard check: error: key is not an unencrypted PEM private key"


def test_a_broken_lab_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--lab", str(tmp_path)]) == 2
    assert "lab.json" in error_line(capsys)
    (tmp_path / "lab.json").write_text("[]")
    assert main(["check", "--lab", str(tmp_path)]) == 2
    assert "coordinator.address is missing" in error_line(capsys)


def test_an_unreachable_coordinator_exits_3(lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    address = unused_address()
    write_lab_json(tmp_path, address, ca=lab.ca_path, cert=lab.cert_path, key=lab.key_path)
    assert main(["check", "--lab", str(tmp_path), "--timeout", "5"]) == 3
    assert error_line(capsys).startswith(f"memberguard: error: coordinator {address}: UNAVAILABLE")


@pytest.mark.parametrize(
    ("behaviour", "shown"),
    [
        (
            abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "operator role required",
                error_details_pb2.ErrorInfo(reason="ROLE_NOT_ALLOWED", domain="memberguard.v1"),
            ),
            "PERMISSION_DENIED [ROLE_NOT_ALLOWED]: operator role required",
        ),
        (stall, "DEADLINE_EXCEEDED"),
    ],
    ids=["refused", "deadline"],
)
def test_a_refusing_or_slow_coordinator_exits_3(
    lab: Lab, capsys: pytest.CaptureFixture[str], behaviour: Behaviour, shown: str
) -> None:
    lab.fake.behaviour = behaviour
    assert main(check(lab, "--timeout", "0.3")) == 3
    assert shown in error_line(capsys)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--help"]) == 0
    assert "--min-severity" in capsys.readouterr().out


def test_as_a_module(lab: Lab) -> None:
    lab.fake.behaviour = respond(inconsistent_diff())
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *check(lab)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[0].split()[0] == "SEVERITY"
    assert f"fingerprint {FINGERPRINT}" in done.stdout
