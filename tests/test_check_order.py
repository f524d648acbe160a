"""Concurrent checks reach the watchers and the metrics in the order their gathers began: a check that read the agents
before another and finished after it is dropped there (its caller still gets its diff), or a watcher would be told the
cluster went back to a state it has left. Nor may answers of one agent that come back out of order mix up which
reading each check got."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

from memberguard.v1 import agent_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator.core.model import ClusterView, NodeView, Source
from coordinator.gather import Agents, _Link
from coordinator.journal import Journal
from coordinator.messages import view_to_proto
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


class _HeldAgent:
    """An agent's stub whose answers go back when, and in the order, the test says."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, asyncio.Future[agent_pb2.GetNodeViewResponse]]] = []

    async def GetNodeView(self, request: agent_pb2.GetNodeViewRequest, timeout: float) -> agent_pb2.GetNodeViewResponse:
        answer: asyncio.Future[agent_pb2.GetNodeViewResponse] = asyncio.get_running_loop().create_future()
        self.asked.append((request.known_digest, answer))
        return await answer


def _answer(view: NodeView | None, digest: str) -> agent_pb2.GetNodeViewResponse:
    if view is None:
        return agent_pb2.GetNodeViewResponse(view_digest=digest, unchanged=True)
    return agent_pb2.GetNodeViewResponse(view=view_to_proto(view), view_digest=digest)


async def _answered_out_of_order() -> tuple[NodeView, NodeView, NodeView]:
    clean, diverged = CLEAN.nodes[1].view, DIVERGED.nodes[1].view
    assert clean is not None and diverged is not None
    agent = _HeldAgent()
    link = _Link(cast(Any, None), b"", cast(Any, agent), cast(Any, None))
    first = asyncio.create_task(link.get_node_view(5.0, False))
    await asyncio.sleep(0)
    agent.asked[0][1].set_result(_answer(clean, "clean"))
    held = await first
    # Two checks ask at once, both holding the clean view; n2 diverges and comes back between their reads.
    before = asyncio.create_task(link.get_node_view(5.0, False))
    after = asyncio.create_task(link.get_node_view(5.0, False))
    await asyncio.sleep(0)
    assert [known for known, _ in agent.asked[1:]] == ["clean", "clean"]
    agent.asked[1][1].set_result(_answer(diverged, "diverged"))  # read while diverged, answered first
    await before
    agent.asked[2][1].set_result(_answer(None, "clean"))  # read after the repair: unchanged from what it was sent
    return held, await before, await after


def test_an_unchanged_answer_is_unchanged_from_what_its_own_request_held() -> None:
    held, before, after = asyncio.run(_answered_out_of_order())
    assert before == DIVERGED.nodes[1].view
    assert after is held, "the later answer said: as the clean view you sent, not as the diverged one since received"
