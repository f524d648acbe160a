"""The contract: buf lint (STANDARD) is clean, buf breaking against the last commit is clean, the generated code is
fresh, and the core's enums are the protos'."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from memberguard.v1 import membership_pb2

from coordinator.core import model

ROOT = Path(__file__).resolve().parent.parent


def _generate_into(out: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.generate(out))


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = _generate_into(tmp_path)
    assert fresh, "protoc generated nothing"
    committed = ROOT / "clients" / "memberguard" / "v1"
    stale = [p.name for p in fresh if (committed / p.name).read_bytes() != p.read_bytes()]
    missing = [p.name for p in fresh if not (committed / p.name).exists()]
    extra = sorted(p.name for p in committed.glob("*_pb2*.py*") if p.name not in {f.name for f in fresh})
    assert not (stale or missing or extra), (
        f"generated code is stale (stale={stale}, missing={missing}, extra={extra}): run `make protos`"
    )


def test_buf_lint_standard_is_clean() -> None:
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf (PyPI buf-bin) is not installed in the virtual environment"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _buf_breaking(against: Path) -> list[dict[str, object]]:
    """buf breaking (buf.yaml's FILE rules) of the working tree's protos/ against a directory; its findings."""
    buf = shutil.which("buf", path=str(Path(sys.executable).parent))
    assert buf, "buf (PyPI buf-bin) is not installed in the virtual environment"
    result = subprocess.run(
        [buf, "breaking", "protos", "--against", str(against), "--error-format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    # 100 is buf's "findings printed" status; anything else but 0 is buf failing to run at all.
    assert result.returncode in (0, 100), result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _last_commit_protos(into: Path) -> Path:
    """protos/ as the last commit (HEAD) has it, extracted into `into`; skips when there is no such commit.

    git archive rather than buf's own git input: it works the same in a shallow clone, a worktree and a fresh clone.
    """
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: there is no previous commit to compare protos/ with")
    listed = subprocess.run([git, "ls-tree", "-d", "HEAD", "protos"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout.strip():
        pytest.skip("no previous commit holds protos/ (HEAD is missing or predates them)")
    archive = subprocess.run([git, "archive", "--format=tar", "HEAD", "protos"], cwd=ROOT, capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode(errors="replace")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    against = into / "protos"
    # An empty directory would compare clean: make sure there is a contract to compare with.
    assert list(against.rglob("*.proto")), "the last commit's protos/ holds no .proto file"
    return against


def test_buf_breaking_against_the_last_commit_is_clean(tmp_path: Path) -> None:
    """The working tree's protos break nothing the last commit's offered: additive changes (new RPCs, fields, enum
    values) pass; a removed or renumbered field, a removed RPC or a changed package fail.

    One finding is not a break: go_package set on a file that had none. Without it protoc-gen-go could only run with
    M flags, and those still override it, so no Go client generated from the old file can depend on its absence.
    """
    against = _last_commit_protos(tmp_path)
    findings = [
        finding
        for finding in _buf_breaking(against)
        if not (
            finding["type"] == "FILE_SAME_GO_PACKAGE"
            and "go_package" not in (against.parent / str(finding["path"])).read_text()
        )
    ]
    assert not findings, "breaking changes against HEAD:\n" + "\n".join(
        f"{f['path']}:{f.get('start_line', '?')}: {f['type']}: {f['message']}" for f in findings
    )


@pytest.mark.parametrize(
    ("edit", "breaks"),
    [
        # Against protos that had one more RPC, today's look like they removed it.
        (
            (
                "rpc GetOperation(",
                "rpc ProbeOperation(GetOperationRequest) returns (GetOperationResponse);\n  rpc GetOperation(",
            ),
            True,
        ),
        # Against protos that lacked a field and an enum value, today's only add them.
        (("  Severity minimum_severity = 2;\n", ""), False),
        (("  SEVERITY_BLOCKING = 3;\n", ""), False),
    ],
)
def test_buf_breaking_tells_a_removal_from_an_addition(tmp_path: Path, edit: tuple[str, str], breaks: bool) -> None:
    """The check above can fail: its comparison flags a removed RPC and passes added fields and enum values."""
    against = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", against)
    old, new = edit
    edited = [p for p in against.rglob("*.proto") if old in p.read_text()]
    assert len(edited) == 1, f"{old!r} should be in exactly one proto"
    edited[0].write_text(edited[0].read_text().replace(old, new, 1))
    assert bool(_buf_breaking(against)) is breaks


@pytest.mark.parametrize(
    ("core", "proto", "prefix"),
    [
        (model.Role, membership_pb2.Role, "ROLE_"),
        (model.Source, membership_pb2.Source, "SOURCE_"),
        (model.Severity, membership_pb2.Severity, "SEVERITY_"),
        (model.DiscrepancyKind, membership_pb2.DiscrepancyKind, "DISCREPANCY_KIND_"),
        (model.RemedySafety, membership_pb2.RemedySafety, "REMEDY_SAFETY_"),
    ],
)
def test_core_enums_match_the_protos(core: type, proto: object, prefix: str) -> None:
    proto_values = {
        name.removeprefix(prefix): number
        for name, number in proto.items()  # type: ignore[attr-defined]
        if number != 0
    }
    assert {member.name: member.value for member in core} == proto_values  # type: ignore[attr-defined]
