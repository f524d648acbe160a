"""`memberguard check` against a real mTLS server: output, --json, and every exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from memberguard.v1 import coordinator_pb2, membership_pb2

from coordinator.cli import main

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
