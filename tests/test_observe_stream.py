"""The coordinator's side of ObserveNodeView, against a real gRPC server on loopback that answers as the test says:
a read whose time runs out closes the stream and the reads queued behind it are asked again on a new one; a stream
that ended fails the reads sent on it with its own error; and "unchanged" is read against the view its own request
named, not whatever view the link holds by the time the answer arrives. And the gather, over mutual TLS: a read whose
link a concurrent gather closes is asked again over the member's link as it is now."""

from __future__ import annotations

import asyncio
import gc
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from memberguard.v1 import agent_pb2, agent_pb2_grpc

from coordinator import pki
from coordinator.gather import Agents, _Link
from coordinator.learned_trust import LearnedTrust
from coordinator.messages import view_to_proto
from coordinator.registry import RegisteredMember, Registry
from tests.core.views import consistent_view

VIEWS = consistent_view(3).nodes[0].view, consistent_view(4).nodes[0].view
TIMEOUT = 5.0


NOTICE = "notice"


class _Agent(agent_pb2_grpc.AgentServiceServicer):
    """Answers the requests of its Nth stream in order with what the test puts in `answers[N]` (None ends that
    stream; NOTICE sends a notice, and the request waits for what comes next), and GetNodeView with `unary`. A stream
    closed under its handler may keep waiting on its own queue."""

    def __init__(self) -> None:
        self.answers: defaultdict[int, asyncio.Queue[agent_pb2.GetNodeViewResponse | str | None]] = defaultdict(
            asyncio.Queue
        )
        self.asked: list[agent_pb2.GetNodeViewRequest] = []
        self.streams = 0
        self.unary = agent_pb2.GetNodeViewResponse()
        self.steps: asyncio.Queue[agent_pb2.ApplyStepRequest] = asyncio.Queue()

    async def ObserveNodeView(
        self, requests: AsyncIterator[agent_pb2.ObserveNodeViewRequest], context: Any
    ) -> AsyncIterator[agent_pb2.ObserveNodeViewResponse]:
        self.streams += 1
        answers = self.answers[self.streams]
        async for message in requests:
            self.asked.append(message.read)
            while (answer := await answers.get()) == NOTICE:
                yield agent_pb2.ObserveNodeViewResponse(changed=True)
            if answer is None:
                return
            assert isinstance(answer, agent_pb2.GetNodeViewResponse)
            yield agent_pb2.ObserveNodeViewResponse(answer=answer)

    async def GetNodeView(self, request: agent_pb2.GetNodeViewRequest, context: Any) -> agent_pb2.GetNodeViewResponse:
        return self.unary

    async def ApplyStep(self, request: agent_pb2.ApplyStepRequest, context: Any) -> agent_pb2.ApplyStepResponse:
        await self.steps.put(request)
        await asyncio.Event().wait()  # never answers: the step is in flight until the call ends
        raise AssertionError("unreachable")


def _answer(index: int) -> agent_pb2.GetNodeViewResponse:
    return agent_pb2.GetNodeViewResponse(view=view_to_proto(VIEWS[index]), view_digest=f"digest-{index}")


@asynccontextmanager
async def _link(told: asyncio.Event | None = None) -> AsyncIterator[tuple[_Link, _Agent]]:
    agent = _Agent()
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    link = _Link(
        RegisteredMember("n1", f"127.0.0.1:{port}", ""),
        b"",
        agent_pb2_grpc.AgentServiceStub(channel),
        channel,
        (told or asyncio.Event()).set,
    )
    try:
        yield link, agent
    finally:
        await link.close()
        await server.stop(None)


async def _read(link: _Link, timeout: float = TIMEOUT) -> Any:
    return await link.get_node_view(timeout, False, {})


async def test_reads_queued_behind_one_that_timed_out_are_asked_again_on_a_new_stream() -> None:
    async with _link() as (link, agent):
        slow = asyncio.create_task(_read(link, timeout=0.3))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(_read(link))
        with pytest.raises(TimeoutError):
            await slow  # its answer never comes: the stream is closed under the queued read
        await agent.answers[2].put(_answer(1))
        assert await asyncio.wait_for(queued, TIMEOUT) == VIEWS[1]
        assert agent.streams == 2, "the queued read was asked again on a stream of its own"


async def test_a_notice_answers_no_read_and_tells_the_coordinator() -> None:
    told = asyncio.Event()
    async with _link(told) as (link, agent):
        first = asyncio.create_task(_read(link))
        await agent.answers[1].put(NOTICE)
        await asyncio.wait_for(told.wait(), TIMEOUT)
        assert not first.done(), "the notice was not taken for the read's answer"
        await agent.answers[1].put(_answer(0))
        assert await asyncio.wait_for(first, TIMEOUT) == VIEWS[0]
        second = asyncio.create_task(_read(link))
        await agent.answers[1].put(_answer(1))
        assert await asyncio.wait_for(second, TIMEOUT) == VIEWS[1], "answers still match their reads after a notice"
        assert agent.streams == 1


async def test_a_stream_the_agent_ended_fails_its_reads_with_its_own_error_and_the_next_read_opens_another() -> None:
    lost: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: lost.append(context))
    async with _link() as (link, agent):
        await agent.answers[1].put(_answer(0))
        assert await _read(link) == VIEWS[0]
        first = link.observer
        assert first is not None
        await agent.answers[1].put(None)  # the agent ends the stream at the next request, as a restart would
        pending = asyncio.create_task(_read(link))
        while not first._call.done():  # the call's end, before the stream's reader has seen it
            await asyncio.sleep(0)
        assert not first.ended, "this read is written to a stream that has ended and does not know it yet"
        with pytest.raises(grpc.aio.AioRpcError, match="the agent ended the stream"):
            await _read(link)
        with pytest.raises(grpc.aio.AioRpcError):
            await pending
        await agent.answers[2].put(_answer(1))
        assert await _read(link) == VIEWS[1]
        assert link.observer is not first and agent.streams == 2
    gc.collect()
    await asyncio.sleep(0)
    assert not lost, "every read's error was delivered to the read"


async def test_unchanged_means_unchanged_from_the_view_the_request_named() -> None:
    async with _link() as (link, agent):
        await agent.answers[1].put(_answer(0))
        assert await _read(link) == VIEWS[0]
        stale = asyncio.create_task(_read(link))  # names digest-0
        while len(agent.asked) < 2:
            await asyncio.sleep(0.01)
        assert agent.asked[-1].known_digest == "digest-0"
        agent.unary = _answer(1)
        assert await link.get_node_view(TIMEOUT, True, {}) == VIEWS[1]  # the link now holds the newer view...
        await agent.answers[1].put(agent_pb2.GetNodeViewResponse(view_digest="digest-0", unchanged=True))
        assert await stale == VIEWS[0], "...and the earlier request's 'unchanged' still means the view it named"


@asynccontextmanager
async def _gathered(tmp_path: Path) -> AsyncIterator[tuple[Agents, Registry, _Agent]]:
    """Agents over mutual TLS to one agent, n1, pinned in the registry."""
    served = pki.make_identity("n1")
    agent = _Agent()
    agent.unary = _answer(0)  # the gather asks for the PEMs of the certificates its truststore names
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(agent, server)
    credentials = grpc.ssl_server_credentials([(served.key_pem, served.certificate_pem)])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    (tmp_path / "registry.json").write_text("{}")
    registry = Registry.open(tmp_path / "registry.json")
    registry.register(RegisteredMember("n1", f"127.0.0.1:{port}", served.certificate_pem.decode()))
    agents = Agents(pki.make_identity("coordinator"), registry, LearnedTrust())
    try:
        yield agents, registry, agent
    finally:
        await agents.close()
        await server.stop(None)


async def test_a_read_whose_link_a_concurrent_gather_closes_is_asked_again_over_a_new_one(tmp_path: Path) -> None:
    async with _gathered(tmp_path) as (agents, registry, agent):
        first = asyncio.create_task(agents.gather(TIMEOUT))
        while not agent.asked:  # the first gather's read is at the agent, unanswered
            await asyncio.sleep(0.01)
        registry.forget("n1")
        assert not (await agents.gather(TIMEOUT)).nodes, "the second gather closed n1's link: n1 left the registry"
        await agent.answers[2].put(_answer(0))
        (observed,) = (await asyncio.wait_for(first, TIMEOUT)).nodes
        assert observed.view == VIEWS[0] and agent.streams == 2, observed.detail


async def test_a_step_whose_link_a_gather_closes_fails_as_unavailable(tmp_path: Path) -> None:
    async with _gathered(tmp_path) as (agents, registry, agent):
        (member,) = registry.members()
        await agents.gather(0.2)  # n1 is registered with this gather, and its link is dialled
        step = asyncio.create_task(agents.apply_step(member, agent_pb2.ApplyStepRequest(), TIMEOUT))
        await asyncio.wait_for(agent.steps.get(), TIMEOUT)
        registry.forget("n1")
        await agents.gather(TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(step, TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_read_in_flight_when_the_links_close_dials_no_new_one(tmp_path: Path) -> None:
    async with _gathered(tmp_path) as (agents, _, agent):
        first = asyncio.create_task(agents.gather(TIMEOUT))
        while not agent.asked:
            await asyncio.sleep(0.01)
        await agents.close()  # the coordinator stopping: its read is cut, and it is not asked again anywhere
        (observed,) = (await asyncio.wait_for(first, TIMEOUT)).nodes
        assert (observed.view, agent.streams) == (None, 1), observed.detail
        assert "shutting down" in observed.detail
        (again,) = (await agents.gather(TIMEOUT)).nodes
        assert (again.view, agent.streams) == (None, 1), again.detail
