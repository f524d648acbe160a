"""The rooms of the tree and the direction of their imports, read from the source with `ast` (nothing is imported).

- the pure core (coordinator/core) imports only the standard library's pure parts and itself: no gRPC, no event
  loop, no database, no sockets, no files;
- the dqlite client (coordinator/dqlite) is a leaf: nothing of the project but its own modules;
- the product (all of coordinator/ outside coordinator/lab) never imports the lab, except the CLI's one entry point.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "coordinator"

# I/O, concurrency and the outside world, none of which the core may reach.
CORE_FORBIDDEN = frozenset(
    {
        "asyncio",
        "concurrent",
        "glob",
        "grpc",
        "google",
        "io",
        "memberguard",
        "os",
        "pathlib",
        "select",
        "selectors",
        "shutil",
        "socket",
        "sqlite3",
        "ssl",
        "subprocess",
        "tempfile",
        "threading",
        "time",
    }
)
CLI_LAB_ENTRY = "coordinator.lab.lab"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    return _imports_in(path.read_text(), _module_name(path), is_package=path.name == "__init__.py")


def _imports_in(source: str, module: str, *, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in a module's source, relative ones resolved."""
    tree = ast.parse(source)
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            # `from coordinator import lab` names a module through its package.
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _sources(under: Path) -> list[Path]:
    return sorted(path for path in under.rglob("*.py") if "__pycache__" not in path.parts)


def _opens_files(source: str) -> list[int]:
    tree = ast.parse(source)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"
    ]


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_the_rooms_exist() -> None:
    # The rules below would pass vacuously on a tree that lost a room.
    for room in ("core", "dqlite", "agent", "lab"):
        assert _sources(PACKAGE / room), f"coordinator/{room} has no modules"
    assert (PACKAGE / "lab" / "__init__.py").is_file()


@pytest.mark.parametrize("path", _sources(PACKAGE / "core"), ids=lambda p: p.name)
def test_the_core_is_pure(path: Path) -> None:
    bad = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if module.split(".")[0] in CORE_FORBIDDEN
        or (_in(module, "coordinator") and not _in(module, "coordinator.core"))
    ]
    bad += [f"line {line}: open()" for line in _opens_files(path.read_text())]
    assert not bad, f"{path.relative_to(ROOT)} reaches outside the pure core: {bad}"


@pytest.mark.parametrize("path", _sources(PACKAGE / "dqlite"), ids=lambda p: p.name)
def test_the_dqlite_client_is_a_leaf(path: Path) -> None:
    bad = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if _in(module, "coordinator") and not _in(module, "coordinator.dqlite")
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports the project outside coordinator.dqlite: {bad}"


@pytest.mark.parametrize(
    "path",
    [p for p in _sources(PACKAGE) if not p.is_relative_to(PACKAGE / "lab")],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_the_product_does_not_import_the_lab(path: Path) -> None:
    allowed = {CLI_LAB_ENTRY} if path == PACKAGE / "cli.py" else set()
    bad = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if _in(module, "coordinator.lab") and module not in allowed and module != "coordinator.lab"
    ]
    assert not bad, f"{path.relative_to(ROOT)} imports the lab: {bad}"


def test_the_cli_reaches_the_lab_through_its_entry_point() -> None:
    reached = {module for _, module in _imports(PACKAGE / "cli.py") if _in(module, "coordinator.lab")}
    assert reached <= {"coordinator.lab", CLI_LAB_ENTRY}
    assert CLI_LAB_ENTRY in reached


def test_the_reader_sees_every_form_of_import() -> None:
    # The rules are only as good as the import reader: a relative import, a module named through its package, a
    # plain import and an open() must all show.
    source = "from .. import lab\nfrom ..agent import steps\nimport socket\nopen('x')\n"
    modules = {module for _, module in _imports_in(source, "coordinator.core.probe", is_package=False)}
    assert {"coordinator.lab", "coordinator.agent.steps", "socket"} <= modules
    assert _opens_files(source) == [4]
