"""Labs of their own for the CLI tests that change what they find."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3)
    yield running
    labs.down(running.dir)


@pytest.fixture
def parking_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[labs.Lab]:
    """A lab whose coordinator fails a removal's third step, after its commit point: the removal is parked."""
    monkeypatch.setenv(FAULT_ENV, "fail-step:2")
    running = labs.up(tmp_path / "lab", 3)
    yield running
    labs.down(running.dir)
