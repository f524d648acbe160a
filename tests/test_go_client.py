"""The contract from a second language: a Go client generated from protos/ reads a lab's diff and decodes a refusal.

The Go code is generated here, never committed: protoc from grpcio-tools (with its bundled google/protobuf
includes) runs protoc-gen-go and protoc-gen-go-grpc, built at the versions tests/go_client/go.mod pins, with no M
flags (the protos' go_package names every import path). It lands in build/go-client/gen, the module that
tests/go_client/go.mod's replace directive points at, and tests/go_client/main.go is built against it. Every Go
command runs with -mod=readonly, so go.sum is never rewritten;
GOCACHE is Go's own (outside the checkout, so a fresh clone builds warm), and with the modules in GOMODCACHE a
re-run builds offline from cache. By hand, from the repository root:

    .venv/bin/pytest -q tests/test_go_client.py     # builds build/go-client/bin/memberguard-go-client
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_tools import protoc
from memberguard import Client, DirtyMembership
from memberguard.v1 import membership_pb2

from coordinator.lab.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "tests" / "go_client"
OUT = ROOT / "build" / "go-client"
# The module path every go_package in protos/ starts with; the generated files go below it by package.
GENERATED_MODULE = "github.com/memberguard/memberguard/gen/go"
PLUGINS = {
    "protoc-gen-go": "google.golang.org/protobuf/cmd/protoc-gen-go",
    "protoc-gen-go-grpc": "google.golang.org/grpc/cmd/protoc-gen-go-grpc",
}
# A cold build compiles grpc-go and its dependencies on a shared 2-core machine.
BUILD_TIMEOUT = 900


def _go() -> str | None:
    # As coordinator/lab/go/build.sh: an older Debian go may come first on PATH.
    if os.access("/usr/local/go/bin/go", os.X_OK):
        return "/usr/local/go/bin/go"
    return shutil.which("go")


def _run(command: list[str], cwd: Path, environment: dict[str, str]) -> None:
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"


def _build(go: str) -> Path:
    """Generates the Go code from protos/ and builds the client; returns the binary."""
    environment = {
        **os.environ,
        # go.mod's go line names the toolchain it needs; never fetch another one.
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "-mod=readonly -trimpath -buildvcs=false",
        # Pure Go: no C compiler needed, and the binary runs anywhere.
        "CGO_ENABLED": "0",
    }
    generated = OUT / "gen"
    # From scratch each time, so a proto removed from protos/ leaves no Go file behind; the build cache keys on
    # content, so regenerating identical files costs no rebuild.
    shutil.rmtree(generated, ignore_errors=True)
    generated.mkdir(parents=True)
    # The replace directive's target must be a module; its requirements are the client module's own.
    (generated / "go.mod").write_text(f"module {GENERATED_MODULE}\n\ngo 1.24\n")
    bin_dir = OUT / "bin"
    _run([go, "build", "-o", f"{bin_dir}{os.sep}", *PLUGINS.values()], MODULE, environment)

    include = Path(protoc.__file__).resolve().parent / "_proto"
    protos = ROOT / "protos"
    sources = sorted(str(p.relative_to(protos)) for p in (protos / "memberguard").rglob("*.proto"))
    assert sources, "no .proto file under protos/memberguard"
    _run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{protos}",
            f"-I{include}",
            *(f"--plugin={name}={bin_dir / name}" for name in PLUGINS),
            # module= only strips the common prefix from the output paths; the import paths are go_package's.
            f"--go_out={generated}",
            f"--go_opt=module={GENERATED_MODULE}",
            f"--go-grpc_out={generated}",
            f"--go-grpc_opt=module={GENERATED_MODULE}",
            *sources,
        ],
        ROOT,
        environment,
    )
    binary = bin_dir / "memberguard-go-client"
    _run([go, "vet", "."], MODULE, environment)
    _run([go, "build", "-o", str(binary), "."], MODULE, environment)
    return binary


@pytest.fixture(scope="module")
def go_client() -> Path:
    go = _go()
    if go is None:
        pytest.skip(
            "Go is not installed (looked for /usr/local/go/bin/go and go on PATH): the Go client needs Go 1.24+"
        )
    return _build(go)


def _steady(diff: membership_pb2.MembershipDiff) -> membership_pb2.MembershipDiff:
    """The diff without what changes from one gather to the next (when it was observed, how old each finding is)."""
    steady = membership_pb2.MembershipDiff()
    steady.CopyFrom(diff)
    steady.ClearField("observed_at")
    for discrepancy in steady.discrepancies:
        discrepancy.ClearField("age")
    return steady


def test_a_go_client_reads_the_diff_and_decodes_a_refused_guard(pristine: Lab, go_client: Path) -> None:
    # Scenario S9 (docs/), as `make demo` makes it: n2 no longer trusts n3.
    (Path(pristine.node("n2")["state_dir"]) / "truststore" / "n3.yaml").unlink()
    with Client(pristine.endpoint) as client:
        checked = client.check_membership().diff
        with pytest.raises(DirtyMembership) as python_refused:
            client.issue_token("n9", request_id="python-client-1")
        coordinator, operator = pristine.document["coordinator"], pristine.document["operator"]
        result = subprocess.run(
            [
                str(go_client),
                "-address",
                coordinator["address"],
                "-ca",
                coordinator["ca"],
                "-server-name",
                coordinator["server_name"],
                "-cert",
                operator["cert"],
                "-key",
                operator["key"],
                "-token-name",
                "n9",
                "-request-id",
                "go-client-1",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # Neither refusal changed anything: no token was issued.
        assert "n9" not in {token.name for token in client.list_tokens()}
    report = json.loads(result.stdout)
    refused = python_refused.value
    blocking = [d for d in checked.discrepancies if d.severity == membership_pb2.SEVERITY_BLOCKING]
    assert blocking, "deleting a truststore record should leave a blocking discrepancy"

    assert report["check"] == {"fingerprint": checked.fingerprint, "discrepancies": len(checked.discrepancies)}

    refusal = report["refusal"]
    assert refusal["code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert refusal["message"] == refused.message
    assert refusal["other_details"] == []
    error_info = refusal["error_info"]
    assert error_info["reason"] == refused.reason == "MEMBERSHIP_INCONSISTENT"
    assert error_info.get("metadata", {}) == refused.metadata

    violations = [(v["type"], v["subject"], v["description"]) for v in refusal["violations"]]
    assert violations == refused.violations
    assert [subject for _, subject, _ in violations] == [d.id for d in blocking]

    # Parsed strictly (an unknown field name fails), so Go's JSON and Python's messages must agree field by field.
    go_diff = json_format.ParseDict(refusal["diff"], membership_pb2.MembershipDiff())
    assert refused.diff is not None
    assert go_diff.fingerprint == refused.diff.fingerprint == checked.fingerprint
    assert _steady(go_diff) == _steady(refused.diff) == _steady(checked)
