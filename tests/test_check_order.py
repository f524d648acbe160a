"""Concurrent checks reach the watchers and the metrics in the order their gathers began: a check that read the agents
before another and finished after it is dropped there (its caller still gets its diff), or a watcher would be told the
cluster went back to a state it has left."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from memberguard.v1 import membership_pb2 as pb

from coordinator.core.model import ClusterView, Source
from coordinator.gather import Agents
from coordinator.journal import Journal
from coordinator.metrics import Metrics, Origin
from coordinator.service import CoordinatorServicer
from coordinator.watch import Watchers
from tests.core.views import address, consistent_view, drop_records

CLEAN = consistent_view(3)
DIVERGED = drop_records(CLEAN, Source.TRUSTSTORE, address(3), nodes=["n2"])  # n2 lost its record of n3


class _Gathers:
    """Agents whose gathers return what the test hands them, when it does."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[ClusterView]] = []

    async def gather(self, timeout: float) -> ClusterView:
        answer: asyncio.Future[ClusterView] = asyncio.get_running_loop().create_future()
        self.pending.append(answer)
        return await answer


def _kept(state_file: Path) -> pb.MembershipDiff:
    """The newest state the watchers were handed, as kept for a resume across a restart."""
    return pb.MembershipDiff.FromString(state_file.read_bytes())


async def _race(tmp_path: Path) -> tuple[list[Any], list[pb.MembershipDiff]]:
    gathers = _Gathers()
    watchers = Watchers(1.0, tmp_path / "watch.state")
    journal = Journal.open(tmp_path / "journal.db")
    servicer = CoordinatorServicer(
        "c", cast(Agents, gathers), cast(Any, None), journal, cast(Any, None), Metrics(), watchers
    )
    try:
        early = asyncio.create_task(servicer.check(5.0, Origin.BACKGROUND))  # reads the clean cluster...
        await asyncio.sleep(0)
        late = asyncio.create_task(servicer.check(5.0, Origin.CALLER))  # ...this one the divergence after it
        await asyncio.sleep(0)
        gathers.pending[1].set_result(DIVERGED)
        late_diff = await late
        published = _kept(tmp_path / "watch.state")
        gathers.pending[0].set_result(CLEAN)  # the early one finishes last
        early_diff = await early
        return [early_diff, late_diff], [published, _kept(tmp_path / "watch.state")]
    finally:
        journal.close()


def test_a_check_that_began_first_and_ended_last_reaches_only_its_caller(tmp_path: Path) -> None:
    (early, late), (after_late, after_both) = asyncio.run(_race(tmp_path))
    assert not early.discrepancies and late.discrepancies, "each caller is answered with what its gather read"
    assert after_late.fingerprint == late.fingerprint and after_late.discrepancies
    assert after_both == after_late, "the watchers keep the newer reading"
