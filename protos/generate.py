"""Regenerate the Python code for the protos: `python protos/generate.py [OUT_DIR]`.

The generated modules are committed under clients/memberguard/v1 so that an installed package needs no
protoc; tests/test_contract.py regenerates into a temporary directory and fails if the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
DEFAULT_OUT = PROTOS.parent / "clients"


def generate(out: Path = DEFAULT_OUT) -> list[Path]:
    """Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out; returns the files written."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "memberguard").rglob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    # mypy-protobuf's plugins sit beside this interpreter, whether or not its bin directory is on PATH.
    plugins = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugins / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugins / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out / "memberguard" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(target):
        print(path)
