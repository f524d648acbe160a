"""The contract: buf lint (STANDARD) is clean, the generated code is fresh, and the core's enums are the protos'."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
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
