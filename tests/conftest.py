"""Shared fixtures: a real lab (a coordinator and agents as processes, mutual TLS on loopback) and a client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from memberguard import Client

from coordinator import lab as labs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    """A consistent 3-node lab shared by one test module; tests that change it restore it (see `pristine`)."""
    running = labs.up(tmp_path_factory.mktemp("lab"), 3)
    yield running
    labs.down(running.dir)


@pytest.fixture
def client(lab: labs.Lab) -> Iterator[Client]:
    with Client(lab.endpoint) as connected:
        yield connected


@pytest.fixture
def pristine(lab: labs.Lab, tmp_path: Path) -> Iterator[labs.Lab]:
    """The module's lab, restored to its state before the test when the test ends."""
    from tests.divergence import restore, snapshot

    saved = snapshot(lab, tmp_path / "snapshot")
    yield lab
    restore(lab, saved)
