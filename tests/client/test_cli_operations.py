"""`memberguard token`, `remove` and `ops` against a real lab: output, --json, and every exit status.

One lab serves the tests that change no membership (tokens, listings, errors); each removal gets its own.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf import json_format
from memberguard.v1 import coordinator_pb2, operation_pb2

from coordinator.cli import main
from coordinator.lab import lab as labs

from . import unused_address

Outcome = tuple[int, str, str]


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path_factory.mktemp("shared") / "lab", 3)
    yield running
    labs.down(running.dir)


def run(capsys: pytest.CaptureFixture[str], lab: labs.Lab, *argv: str) -> Outcome:
    status = main([*argv, "--lab", str(lab.dir)])
    out, err = capsys.readouterr()
    assert "PRIVATE KEY" not in out + err
    return status, out, err


def when(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def discrepancy_ids(capsys: pytest.CaptureFixture[str], lab: labs.Lab) -> tuple[str, list[str]]:
    """The fingerprint and discrepancy ids `check --json` reports."""
    _, out, _ = run(capsys, lab, "check", "--json")
    diff = json_format.Parse(out, coordinator_pb2.CheckMembershipResponse()).diff
    return diff.fingerprint, [d.id for d in diff.discrepancies]


def test_a_token_is_printed_alone_listed_without_its_secret_and_revoked(
    shared_lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, shared_lab, "token", "issue", "n4", "--ttl", "600")
    assert status == 0, err
    token = out.strip()
    assert token.startswith("mgt1.") and out == token + "\n"
    [line] = err.splitlines()
    assert line.startswith("token for n4 expires at ")
    expires = line.removeprefix("token for n4 expires at ")
    assert abs(when(expires) - (time.time() + 600)) < 30

    status, out, _ = run(capsys, shared_lab, "token", "list")
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "EXPIRES", "BOUND", "ISSUED", "BY"]
    assert row.split() == ["n4", expires, "-", "operator"]
    assert "mgt1." not in out

    status, out, _ = run(capsys, shared_lab, "token", "revoke", "n4")
    assert (status, out) == (0, f"revoked the token for n4 (it expired at {expires})\n")
    assert run(capsys, shared_lab, "token", "list") == (0, "no tokens\n", "")
    status, out, err = run(capsys, shared_lab, "token", "revoke", "n4")
    assert (status, out) == (3, "")
    [line] = err.splitlines()
    assert line.startswith("memberguard: error: coordinator ") and "NOT_FOUND" in line


def test_json_output_parses_back_and_ops_lists_the_issues(
    shared_lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, shared_lab, "token", "issue", "n5", "--json", "--request-id", "issue-n5")
    assert status == 0 and err.startswith("token for n5 expires at ")
    issued = json_format.Parse(out, operation_pb2.Operation())
    assert issued.kind == operation_pb2.OPERATION_KIND_ISSUE_TOKEN and issued.token.startswith("mgt1.")

    # A retry with the same request id gets the recorded operation back, but not the secret: nothing on stdout.
    status, out, err = run(capsys, shared_lab, "token", "issue", "n5", "--request-id", "issue-n5")
    assert (status, out) == (1, "")
    assert f"operation {issued.id} issued the token for n5 to an earlier request" in err

    status, out, _ = run(capsys, shared_lab, "token", "list", "--json")
    assert status == 0 and "mgt1." not in out
    assert [t.name for t in json_format.Parse(out, coordinator_pb2.ListTokensResponse()).tokens] == ["n5"]

    status, out, _ = run(capsys, shared_lab, "ops", "--json")
    listed = json_format.Parse(out, coordinator_pb2.ListOperationsResponse())
    assert status == 0 and issued.id in [op.id for op in listed.operations]
    status, out, _ = run(capsys, shared_lab, "ops")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "KIND", "MEMBER", "STATE", "REQUESTED", "BY", "CREATED"]
    assert [row.split()[:5] for row in rows if row.startswith(issued.id)] == [
        [issued.id, "issue-token", "n5", "succeeded", "operator"]
    ]
    status, out, _ = run(capsys, shared_lab, "ops", issued.id, "--json")
    shown = json_format.Parse(out, operation_pb2.Operation())
    assert status == 0 and shown.id == issued.id and shown.token == ""

    status, out, _ = run(capsys, shared_lab, "token", "revoke", "n5", "--json")
    assert status == 0 and json_format.Parse(out, operation_pb2.TokenInfo()).name == "n5"


def test_token_issue_in_a_shell_substitution(shared_lab: labs.Lab) -> None:
    """`TOKEN=$(memberguard token issue n6 --lab L)`: stdout is the token, stderr one line, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "token", "issue", "n6", "--lab", str(shared_lab.dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("mgt1.") and done.stdout.count("\n") == 1
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("token for n6 expires at ")
    assert main(["token", "revoke", "n6", "--lab", str(shared_lab.dir)]) == 0


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["token", "issue", "Not A Name"], "invalid request: INVALID_ARGUMENT"),
        (["token", "issue", "n4", "--ttl", "soon"], "not a number of seconds"),
        (["token", "issue", "n4", "--ttl", "999999999"], "issue_token.ttl"),
        (["token"], "argument COMMAND"),
        (["remove"], "a name, or an address, is required"),
        (["remove", "n3", "--ack"], "expected at least one argument"),
        (["ops", "--wait", "5"], "--wait needs an operation ID"),
        (["ops", "--limit", "0"], "--limit must be at least 1"),
    ],
    ids=["bad-name", "ttl-not-a-number", "ttl-too-long", "no-token-command", "remove-nobody", "ack-without-id",
         "wait-without-id", "no-limit"],
)  # fmt: skip
def test_usage_errors_exit_2(
    shared_lab: labs.Lab, capsys: pytest.CaptureFixture[str], argv: list[str], shown: str
) -> None:
    status, out, err = run(capsys, shared_lab, *argv)
    assert (status, out) == (2, "")
    assert shown in err.splitlines()[-1]


def test_an_unknown_operation_or_member_exits_3(shared_lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, shared_lab, "ops", "no-such-operation")
    assert (status, out) == (3, "") and "NOT_FOUND" in err
    status, out, err = run(capsys, shared_lab, "remove", "n9")
    assert (status, out) == (3, "") and "no member 'n9'" in err


def test_an_unreachable_coordinator_exits_3(shared_lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    document = shared_lab.document
    address = unused_address()
    endpoint = ["--address", address, "--ca", document["coordinator"]["ca"]]
    endpoint += ["--server-name", document["coordinator"]["server_name"]]
    endpoint += ["--cert", document["operator"]["cert"], "--key", document["operator"]["key"]]
    assert main(["token", "list", *endpoint, "--timeout", "5"]) == 3
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"memberguard: error: coordinator {address}: UNAVAILABLE")
    assert len(err.splitlines()) == 1


def test_remove_prints_the_operation_and_ops_shows_it(own_lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    fingerprint, _ = discrepancy_ids(capsys, own_lab)
    # A stale fingerprint is refused (4) with the current one, and changes nothing.
    status, out, err = run(capsys, own_lab, "remove", "n3", "--fingerprint", "0" * 64)
    assert (status, out) == (4, "")
    assert "ABORTED" in err.splitlines()[0] and err.splitlines()[-1] == f"fingerprint {fingerprint}"

    status, removed, err = run(capsys, own_lab, "remove", "n3", "--fingerprint", fingerprint)
    assert (status, err) == (0, "")
    lines = removed.splitlines()
    operation_id = lines[0].split()[1]
    assert lines[0:4] == [
        f"operation    {operation_id}",
        "kind         remove",
        "member       n3",
        "state        succeeded",
    ]
    assert f"fingerprint  {fingerprint}" in lines
    steps = lines[lines.index("steps") + 1 :]
    assert steps[0] == "  ✓ remove n3 from the Raft configuration  [commit point]"
    assert len(steps) > 1 and all(step.startswith("  ✓ ") for step in steps)

    status, out, _ = run(capsys, own_lab, "check", "--json")
    diff = json_format.Parse(out, coordinator_pb2.CheckMembershipResponse()).diff
    assert status == 0 and list(diff.discrepancies) == [] and [m.name for m in diff.members] == ["n1", "n2"]

    status, out, _ = run(capsys, own_lab, "ops")
    assert status == 0 and out.splitlines()[1].split()[:5] == [operation_id, "remove", "n3", "succeeded", "operator"]
    assert run(capsys, own_lab, "ops", operation_id) == (0, removed, "")
    assert run(capsys, own_lab, "ops", operation_id, "--wait", "1") == (0, removed, "")
    status, out, _ = run(capsys, own_lab, "ops", operation_id, "--json")
    shown = json_format.Parse(out, operation_pb2.Operation())
    assert shown.steps[0].commit_point and shown.audit.fingerprint == fingerprint


def test_a_dirty_diff_is_refused_until_forced_with_acknowledgements(
    own_lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    (Path(own_lab.node("n2")["state_dir"]) / "truststore" / "n3.yaml").unlink()
    fingerprint, ids = discrepancy_ids(capsys, own_lab)
    assert len(ids) == 1

    status, out, err = run(capsys, own_lab, "remove", "n3")
    assert (status, out) == (4, "")
    first, header, violation, last = err.splitlines()
    assert first.startswith("memberguard: error: the guard refused: FAILED_PRECONDITION")
    assert header.split() == ["TYPE", "SUBJECT", "DESCRIPTION"]
    assert violation.split()[:2] == ["MISSING", ids[0]]
    assert last == f"fingerprint {fingerprint}"

    status, out, err = run(capsys, own_lab, "remove", "n3", "--force", "--ack", *ids, "--json")
    assert (status, err) == (0, "")
    operation = json_format.Parse(out, operation_pb2.Operation())
    assert operation.kind == operation_pb2.OPERATION_KIND_FORCE_REMOVE
    assert operation.state == operation_pb2.OPERATION_STATE_SUCCEEDED
    assert list(operation.audit.acknowledged_discrepancy_ids) == ids
    assert run(capsys, own_lab, "check")[0] == 0


def test_a_parked_removal_exits_1_with_its_plan(parking_lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, parking_lab, "remove", "n3")
    assert (status, err) == (1, "")
    lines = out.splitlines()
    assert "state        parked" in lines
    assert [line for line in lines if line.startswith("error ")] == [
        "error        remove n3 from n1's truststore: failure injected by the fault hook"
    ]
    assert "  · remove n3 from n1's truststore" in lines
    assert lines[-1].startswith("plan         finish it: remove n3 from n1's truststore")
    operation_id = lines[0].split()[1]
    assert run(capsys, parking_lab, "ops", operation_id) == (1, out, "")
