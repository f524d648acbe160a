"""Shared fixtures: a real lab (a coordinator and agents as processes, mutual TLS on loopback) and a client; and the
split of the suite into the tests that start no process (marker `unit`, `make test-fast`) and the rest (`process`:
labs, engines, daemons, tools)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from memberguard import Client

from coordinator.lab import lab as labs

# The properties run beside labs and engines on two cores: how fast inputs are drawn, or an example runs, says nothing
# of the property. Every other health check stays on.
settings.register_profile("shared-machine", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("shared-machine")

# The test modules that start no process: the pure core, the codecs, the readers of files, the status table. One list,
# so a maintainer sees at a glance what `make test-fast` covers; everything else is marked `process`.
UNIT = (
    "tests/core/",
    "tests/agent/test_local_sources.py",
    "tests/agent/test_dirwatch.py",
    "tests/dqlite/test_wire.py",
    "tests/dqlite/test_truststore.py",
    "tests/test_registry.py",
    "tests/test_status.py",
    "tests/test_layout.py",
    "tests/test_check_order.py",
    "tests/test_observe_stream.py",
    "tests/test_messages.py",
    "tests/test_learned_trust.py",
)
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path.resolve().relative_to(ROOT).as_posix()
        item.add_marker(pytest.mark.unit if path.startswith(UNIT) else pytest.mark.process)


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
