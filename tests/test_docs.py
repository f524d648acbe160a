"""The documentation in docs/ stays the repository's own and stays true to the tree it describes.

- Nothing in the repository points at material a user of the repository never sees: the engineers' shared folder
  beside the checkout, its research notes, or its design draft. The repository documents itself in docs/.
- Every scenario id a test or the code uses (S1, `test_s6_...`) has its entry in docs/scenarios.md, and every entry
  is one a test makes.
- Every relative link in docs/*.md and README.md resolves to a file in the repository, and every test, test file
  and repository path the docs name in backticks exists, so a rename that leaves the docs behind fails here.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCENARIOS = DOCS / "scenarios.md"

# Spelled as patterns so that this file does not match them itself.
_OUTSIDE = (
    re.compile(r"\.\./shared"),
    re.compile(r"/work/(?:shared)"),
    re.compile(r"\bresearch/[A-Za-z0-9_.-]+\.md"),
    re.compile(r"\bDESIGN\.md"),
)
_SCENARIO_ID = re.compile(r"\bS(\d+)\b")
_SCENARIO_TEST = re.compile(r"\btest_s(\d+)_")
_CATALOGUED = re.compile(r"^### S(\d+):", re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_BACKTICKED = re.compile(r"`([^`\s]+)`")
_REPOSITORY_PATH = re.compile(r"(?:coordinator|tests|clients|protos|docs)/[A-Za-z0-9_./-]*")
_TEST_NAME = re.compile(r"test_[a-z0-9_]+")
# Where scenario ids are used: the tests, the code whose comments cite them, and the demo.
_SCENARIO_USERS = ("tests", "coordinator", "Makefile")
_SKIPPED_DIRECTORIES = {".git", ".venv", "build", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def _repository_files() -> list[Path]:
    """The files a clone holds: tracked, plus new ones not ignored (work in progress counts too)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [ROOT / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        # Not a git checkout (an unpacked archive): every file outside the build and tool caches.
        paths = [
            path
            for path in ROOT.rglob("*")
            if not _SKIPPED_DIRECTORIES.intersection(path.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in path.relative_to(ROOT).parts)
        ]
    return sorted(path for path in paths if path.is_file())


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # a binary file cites nothing


def _lines(paths: list[Path]) -> Iterator[tuple[Path, int, str]]:
    for path in paths:
        text = _text(path)
        for number, line in enumerate((text or "").splitlines(), start=1):
            yield path, number, line


def _docs() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _where(path: Path, number: int) -> str:
    return f"{path.relative_to(ROOT)}:{number}"


def test_nothing_points_outside_the_repository() -> None:
    found = [
        f"{_where(path, number)}: {line.strip()}"
        for path, number, line in _lines(_repository_files())
        if any(pattern.search(line) for pattern in _OUTSIDE)
    ]
    assert found == [], "point these at docs/design.md or docs/scenarios.md instead:\n" + "\n".join(found)


def _scenario_ids_used() -> dict[int, str]:
    """Scenario number → where it is first used."""
    used: dict[int, str] = {}
    users = [path for path in _repository_files() if path.relative_to(ROOT).parts[0] in _SCENARIO_USERS]
    for path, number, line in _lines(users):
        for match in [*_SCENARIO_ID.finditer(line), *_SCENARIO_TEST.finditer(line)]:
            used.setdefault(int(match.group(1)), _where(path, number))
    return used


def test_every_scenario_a_test_uses_is_catalogued_and_every_entry_is_made() -> None:
    used = _scenario_ids_used()
    catalogued = {int(number) for number in _CATALOGUED.findall(SCENARIOS.read_text())}
    missing = {f"S{number}": where for number, where in sorted(used.items()) if number not in catalogued}
    assert missing == {}, "add a '### S<n>: ...' entry to docs/scenarios.md for each"
    unused = sorted(f"S{number}" for number in catalogued - set(used))
    assert unused == [], "docs/scenarios.md catalogues scenarios no test or code uses"


def test_every_relative_link_resolves_to_a_file_in_the_repository() -> None:
    broken = []
    for path in [*_docs(), ROOT / "README.md"]:
        for match in _LINK.finditer(path.read_text()):
            target = match.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_paths_and_tests_the_docs_name_exist() -> None:
    tests = "\n".join(_text(path) or "" for path in (ROOT / "tests").rglob("*.py"))
    defined = set(re.findall(r"^\s*(?:async )?def (test_[a-z0-9_]+)", tests, re.MULTILINE))
    stale = []
    for path in _docs():
        for quoted in _BACKTICKED.findall(path.read_text()):
            for name in _REPOSITORY_PATH.findall(quoted):
                if not (ROOT / name.rstrip(".")).exists():
                    stale.append(f"{path.name}: no {name}")
            if _TEST_NAME.fullmatch(quoted) and quoted not in defined:
                stale.append(f"{path.name}: no test {quoted}")
    assert stale == []
