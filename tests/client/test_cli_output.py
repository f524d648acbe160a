"""The CLI's one output style, on real labs: `-o table|json|yaml` (and `--json`) on every command that prints a result,
the JSON being what the Python client returns for the same call in the proto3 JSON mapping, the YAML the same
document; a failed call's status on stdout in json or yaml; `version`; and a command's own usage for an unknown option.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from memberguard import (
    Client,
    DirtyMembership,
    MemberguardError,
    NotAbandonable,
    NotFound,
    StaleFingerprint,
    error_from_rpc,
)
from memberguard.v1 import coordinator_pb2, membership_pb2, operation_pb2

from coordinator.agent.join import request_join
from coordinator.cli import main
from coordinator.journal import Journal
from coordinator.lab import lab as labs

Outcome = tuple[int, str, str]


def run(capsys: pytest.CaptureFixture[str], *argv: str, lab: labs.Lab | None = None) -> Outcome:
    status = main([*argv, *(["--lab", str(lab.dir)] if lab else [])])
    out, err = capsys.readouterr()
    assert "PRIVATE KEY" not in out + err
    return status, out, err


def printed(capsys: pytest.CaptureFixture[str], lab: labs.Lab, *argv: str) -> Any:
    """The document a command that succeeds prints with -o json."""
    status, out, err = run(capsys, *argv, "-o", "json", lab=lab)
    assert status == 0, err
    return json.loads(out)


def as_json(message: Message) -> Any:
    return json.loads(json_format.MessageToJson(message))


def unstamped(document: dict[str, Any]) -> dict[str, Any]:
    """A response without its header: two answers to the same question differ only in when each was served."""
    assert "servedAt" in document.pop("header")
    return document


def unpacked(detail: dict[str, Any], message: Message) -> Message:
    """A printed rich-status detail parsed back into its message (its "@type" must name that message)."""
    packed = json_format.ParseDict(detail, any_pb2.Any())
    assert packed.Unpack(message), detail["@type"]
    return message


def details_by_type(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {detail["@type"].rsplit("/", 1)[1]: detail for detail in document["details"]}


def refusal(lab: labs.Lab, call: Callable[[Client], object]) -> MemberguardError:
    """What the Python client raises for the same call."""
    with Client(lab.endpoint) as client, pytest.raises(MemberguardError) as raised:
        call(client)
    return raised.value


# --- results -------------------------------------------------------------------------------------------------


def test_check_in_json_is_the_clients_response_in_the_json_mapping(
    lab: labs.Lab, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "check", "-o", "json", lab=lab)
    assert (status, err) == (0, "")
    shown = json_format.Parse(out, coordinator_pb2.CheckMembershipResponse())
    # Exactly MessageToJson's style: lowerCamelCase names, enums by name, int64 as strings, defaults left out.
    assert out == json_format.MessageToJson(shown) + "\n"
    member = json.loads(out)["diff"]["members"][0]
    assert (
        isinstance(member["nodeId"], str) and member["role"].startswith("ROLE_") and "certificateFingerprint" in member
    )

    fresh = client.check_membership(timeout=10)
    # Only when each was answered differs.
    for response in (shown, fresh):
        response.ClearField("header")
        response.diff.ClearField("observed_at")
    assert shown == fresh


def test_tokens_and_operations_in_json_are_what_the_client_returns(
    lab: labs.Lab, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    issued = printed(capsys, lab, "token", "issue", "n7")
    assert issued["token"].startswith("mgt1.") and issued["kind"] == "OPERATION_KIND_ISSUE_TOKEN"
    # The journal keeps no secret: the operation as the coordinator shows it again is the rest of what was printed.
    assert {name: value for name, value in issued.items() if name != "token"} == as_json(
        client.get_operation(issued["id"])
    )
    listed = client.list_tokens()
    assert printed(capsys, lab, "token", "list") == as_json(coordinator_pb2.ListTokensResponse(tokens=listed))
    assert unstamped(printed(capsys, lab, "ops")) == unstamped(as_json(client.list_operations(page_size=50)))
    assert printed(capsys, lab, "ops", issued["id"]) == as_json(client.get_operation(issued["id"]))
    assert printed(capsys, lab, "ops", issued["id"], "--wait", "1") == as_json(client.get_operation(issued["id"]))

    [n7] = [token for token in listed if token.name == "n7"]
    revoked = printed(capsys, lab, "token", "revoke", "n7")
    assert revoked["name"] == "n7" and revoked["expiresAt"] == as_json(n7)["expiresAt"]
    assert "n7" not in [token.name for token in client.list_tokens()]


def test_yaml_is_the_json_document_in_block_style_and_its_order(
    lab: labs.Lab, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    operation = client.issue_token("n8")
    try:
        for argv in (["ops", operation.id], ["ops"], ["token", "list"]):
            _, in_json, _ = run(capsys, *argv, "-o", "json", lab=lab)
            status, in_yaml, err = run(capsys, *argv, "-o", "yaml", lab=lab)
            assert (status, err) == (0, ""), argv
            document, read_back = json.loads(in_json), yaml.safe_load(in_yaml)
            # Block style: each top-level key opens a line of its own.
            assert [line.split(":")[0] for line in in_yaml.splitlines() if not line.startswith((" ", "-"))] == list(
                document
            ), argv
            if argv == ["ops"]:
                document, read_back = unstamped(document), unstamped(read_back)
            # Dumped again, the two are the same text: the same values, and the keys in the same order.
            assert json.dumps(read_back) == json.dumps(document), argv
    finally:
        client.revoke_token("n8")


def test_json_is_an_alias_of_o_json_and_not_to_be_combined_with_o(
    lab: labs.Lab, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    operation = client.list_operations(page_size=1).operations[0]
    assert run(capsys, "ops", operation.id, "--json", lab=lab) == run(
        capsys, "ops", operation.id, "-o", "json", lab=lab
    )
    for given in (["-o", "yaml", "--json"], ["--json", "-o", "json"]):
        status, out, err = run(capsys, "ops", operation.id, *given, lab=lab)
        assert (status, out) == (2, "")
        assert err.startswith("usage: memberguard ops ")
        assert "not allowed with argument" in err.splitlines()[-1]


def test_table_stays_the_default(lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "check", lab=lab) == run(capsys, "check", "-o", "table", lab=lab)
    status, out, _ = run(capsys, "check", lab=lab)
    assert status == 0 and out.startswith("consistent\nfingerprint ")


def test_a_join_and_a_removal_print_the_operation_the_client_shows(
    own_lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    joiner = labs.start_joining_node(own_lab)
    try:
        with Client(own_lab.endpoint) as client:
            token = client.issue_token(joiner.name).token
        certificate = joiner.state_dir / "server.crt"
        argv = ["--token", token, "--address", joiner.address, "--cert", str(certificate)]
        argv += ["--agent-address", joiner.agent_address, "--pins", str(joiner.pins)]

        # Under a name the token was not issued for, the join listener refuses: its status, as for any other call.
        status, out, err = run(capsys, "join", *argv, "--name", "n9", "-o", "json")
        assert status == 3 and err.startswith("memberguard: error: the join: ")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            asyncio.run(
                request_join(
                    token,
                    name="n9",
                    address=joiner.address,
                    certificate_pem=certificate.read_text(),
                    agent_address=joiner.agent_address,
                    pins=joiner.pins,
                )
            )
        expected = error_from_rpc(raised.value)
        refused = json.loads(out)
        assert (refused["code"], refused["message"]) == (expected.code.name, expected.message)
        error_info = unpacked(details_by_type(refused)["google.rpc.ErrorInfo"], error_details_pb2.ErrorInfo())
        assert error_info.reason == expected.reason and expected.reason.startswith("TOKEN_")

        status, out, err = run(capsys, "join", *argv, "--name", joiner.name, "-o", "json")
        assert (status, err) == (0, "")
        joined = json.loads(out)
        assert joined["state"] == "OPERATION_STATE_SUCCEEDED" and joined["member"]["name"] == joiner.name

        status, out, err = run(capsys, "remove", joiner.name, "-o", "yaml", lab=own_lab)
        assert (status, err) == (0, "")
        removed = yaml.safe_load(out)
        with Client(own_lab.endpoint) as client:
            assert joined == as_json(client.get_operation(joined["id"]))
            assert removed == as_json(client.get_operation(removed["id"]))
        assert removed["kind"] == "OPERATION_KIND_REMOVE" and removed["state"] == "OPERATION_STATE_SUCCEEDED"
    finally:
        joiner.stop()


def test_abandon_prints_the_abandoned_operation_and_its_refusals(
    parking_lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "remove", "n3", "-o", "json", lab=parking_lab)
    parked = json.loads(out)
    assert (status, parked["state"]) == (1, "OPERATION_STATE_PARKED")

    # Past its commit point, forced, it still needs the discrepancies about n3 acknowledged: one violation each.
    status, out, err = run(
        capsys, "abandon", parked["id"], "--reason", "n3 is gone", "--force", "--json", lab=parking_lab
    )
    assert status == 4 and err.startswith("memberguard: error: the guard refused: FAILED_PRECONDITION")
    refused = json.loads(out)
    expected = refusal(parking_lab, lambda client: client.abandon_operation(parked["id"], "n3 is gone", force=True))
    assert isinstance(expected, NotAbandonable)
    assert refused["code"] == "FAILED_PRECONDITION" and refused["message"] == expected.message
    found = details_by_type(refused)
    assert unpacked(found["google.rpc.ErrorInfo"], error_details_pb2.ErrorInfo()).reason == expected.reason
    violations = unpacked(found["google.rpc.PreconditionFailure"], error_details_pb2.PreconditionFailure()).violations
    assert [(v.type, v.subject, v.description) for v in violations] == expected.violations
    acknowledged = [subject for _, subject, _ in expected.violations]

    argv = ["abandon", parked["id"], "--reason", "n3 is gone", "--force", "-o", "json"]
    status, out, err = run(capsys, *argv, *[part for i in acknowledged for part in ("--ack", i)], lab=parking_lab)
    assert (status, err) == (0, "")
    abandoned = json.loads(out)
    assert abandoned["state"] == "OPERATION_STATE_ABANDONED"
    with Client(parking_lab.endpoint) as client:
        assert abandoned == as_json(client.get_operation(parked["id"]))


def test_journal_recover_prints_the_recovery_the_new_journal_records(
    own_lab: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    labs.add_node(own_lab.dir)  # so that every agent has admitted an epoch
    pid = labs.Lab.load(own_lab.dir).document["coordinator"]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(pid):
        assert time.monotonic() < deadline, "the coordinator survived SIGKILL"
        time.sleep(0.01)
    journal = own_lab.dir / "coordinator" / "journal.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)

    status, out, err = run(capsys, "journal", "recover", "-o", "json", lab=own_lab)
    assert (status, err) == (0, "")
    shown = json.loads(out)
    with contextlib.closing(Journal.open(journal)) as reopened:
        [recovery] = reopened.recoveries()
    assert shown["journal"] == str(journal) and "recoveredAt" in shown
    recovered_at = timestamp_pb2.Timestamp()
    recovered_at.FromJsonString(shown["recoveredAt"])
    assert abs(recovered_at.ToNanoseconds() / 1e9 - recovery.recovered_at) < 1e-6
    assert (shown["requestedBy"], shown["damage"]) == (recovery.requested_by, recovery.damage)
    assert (shown["movedTo"], shown["moved"]) == (recovery.moved_to, list(recovery.moved))
    assert [(a["name"], int(a["epoch"]), a["how"]) for a in shown["agents"]] == [
        (a.name, a.epoch, a.how) for a in recovery.agents
    ]
    assert shown["epoch"] == str(recovery.epoch)


def _alive(pid: int) -> bool:
    """Whether pid still runs; the lab started it from this process, so a dead one is a zombie until waited for."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- refusals and errors ---------------------------------------------------------------------------------------


def test_a_refused_removal_prints_its_status_with_the_diff(
    pristine: labs.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    (Path(pristine.node("n2")["state_dir"]) / "truststore" / "n3.yaml").unlink()
    status, out, err = run(capsys, "remove", "n3", "--json", lab=pristine)
    assert status == 4
    # The error line and the violations stay on stderr, as without --json.
    assert err.startswith("memberguard: error: the guard refused: FAILED_PRECONDITION [MEMBERSHIP_INCONSISTENT]")
    document = json.loads(out)
    expected = refusal(pristine, lambda client: client.remove_member("n3"))
    assert isinstance(expected, DirtyMembership) and expected.diff is not None
    assert list(document) == ["code", "message", "details"]
    assert (document["code"], document["message"]) == ("FAILED_PRECONDITION", expected.message)
    found = details_by_type(document)
    error_info = unpacked(found["google.rpc.ErrorInfo"], error_details_pb2.ErrorInfo())
    assert (error_info.reason, error_info.domain) == (expected.reason, "memberguard.v1")
    violations = unpacked(found["google.rpc.PreconditionFailure"], error_details_pb2.PreconditionFailure()).violations
    assert [(v.type, v.subject, v.description) for v in violations] == expected.violations
    diff = unpacked(found["memberguard.v1.MembershipDiff"], membership_pb2.MembershipDiff())
    assert diff.fingerprint == expected.diff.fingerprint
    assert list(diff.discrepancies) == list(expected.diff.discrepancies) and len(diff.discrepancies) == 1


def test_a_stale_fingerprint_prints_its_status_in_yaml(lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "remove", "n3", "--fingerprint", "0" * 64, "-o", "yaml", lab=lab)
    assert status == 4 and "ABORTED [FINGERPRINT_STALE]" in err.splitlines()[0]
    document = yaml.safe_load(out)
    expected = refusal(lab, lambda client: client.remove_member("n3", expected_fingerprint="0" * 64))
    assert isinstance(expected, StaleFingerprint) and expected.diff is not None
    assert (document["code"], document["message"]) == ("ABORTED", expected.message)
    found = details_by_type(document)
    assert unpacked(found["google.rpc.ErrorInfo"], error_details_pb2.ErrorInfo()).reason == expected.reason
    diff = unpacked(found["memberguard.v1.MembershipDiff"], membership_pb2.MembershipDiff())
    assert diff.fingerprint == expected.diff.fingerprint


def test_an_unknown_operation_prints_not_found(lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "ops", "no-such-operation", "-o", "json", lab=lab)
    assert status == 3 and len(err.splitlines()) == 1 and "NOT_FOUND" in err
    document = json.loads(out)
    expected = refusal(lab, lambda client: client.get_operation("no-such-operation"))
    assert isinstance(expected, NotFound)
    assert (document["code"], document["message"]) == ("NOT_FOUND", expected.message)
    error_info = unpacked(details_by_type(document)["google.rpc.ErrorInfo"], error_details_pb2.ErrorInfo())
    assert error_info.reason == expected.reason


def test_a_table_failure_prints_nothing_on_stdout(lab: labs.Lab, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "ops", "no-such-operation", lab=lab)
    assert (status, out) == (3, "") and "NOT_FOUND" in err


# --- version, usage ------------------------------------------------------------------------------------------


def test_version_names_the_package_and_the_api(capsys: pytest.CaptureFixture[str]) -> None:
    package = importlib.metadata.version("memberguard")
    api = operation_pb2.DESCRIPTOR.package
    status, out, err = run(capsys, "version")
    assert (status, err) == (0, "")
    assert [line.split() for line in out.splitlines()] == [["version", package], ["api", api]]
    for given, read in ((["-o", "json"], json.loads), (["--json"], json.loads), (["-o", "yaml"], yaml.safe_load)):
        status, out, _ = run(capsys, "version", *given)
        assert status == 0 and read(out) == {"version": package, "apiVersion": api}, given


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["check", "--lab", "L", "--bogus"], "check"),
        (["token", "list", "--bogus", "value"], "token list"),
        (["remove", "n3", "--bogus"], "remove"),
        (["lab", "down", "--dir", "L", "--bogus"], "lab down"),
    ],
)
def test_an_unknown_option_shows_the_commands_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], command: str
) -> None:
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    unknown = " ".join(argv[argv.index("--bogus") :])
    assert err.startswith(f"usage: memberguard {command} ")
    assert err.splitlines()[-1] == f"memberguard {command}: error: unrecognized arguments: {unknown}"
    # The usage shown is the one the command's --help opens with.
    usage = err.splitlines()[:-1]
    assert main([*command.split(), "--help"]) == 0
    assert capsys.readouterr().out.splitlines()[: len(usage)] == usage
