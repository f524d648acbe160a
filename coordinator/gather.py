"""The gather: ask every registered member's agent for its view, concurrently, within one deadline.

All of the coordinator's knowledge of the sources comes through here; it opens no source file itself.
Channels are persistent (a new mTLS channel per call would cost more than the whole check) and each trusts only the
certificates `LearnedTrust.roots` gives for its member (learned_trust.py), with the member's name as the TLS server
name. `Agents` is the transport to the agents: the gather, the steps and the joiner's probe go through it.
Every gather and step also tells which agents went silent; `Agents.reconnected` is set when one of them answers
again, the reconciler's cue that an operation parked for want of that agent may now finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import grpc
from memberguard.v1 import agent_pb2, agent_pb2_grpc

from coordinator.core.model import AgentFailure, ClusterView, MemberRecord, NodeObservation, NodeView
from coordinator.learned_trust import LearnedTrust
from coordinator.messages import view_from_proto
from coordinator.pki import Identity
from coordinator.registry import RegisteredMember, Registry

_CHANNEL_OPTIONS = [
    # A report lists every member of a large cluster; allow far more than the 4 MiB default.
    ("grpc.max_receive_message_length", 64 << 20),
    # A restarted agent must be seen again at the next check, not after gRPC's default 2-minute backoff. Not
    # grpc.min_reconnect_backoff_ms: gRPC reads it as the shortest time a connection attempt is given (20 s by
    # default), and at 100 ms a loaded machine's TLS handshake with a restarted agent never finished in time, so the
    # agent stayed unreachable while it served (the dqlite crash matrix's killed-agent cases).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


_Response = TypeVar("_Response")


class _Closed(Exception):
    """The stream was closed on this side while a read waited on it (another read's time ran out)."""


class _Observer:
    """One ObserveNodeView stream to an agent: a read is a message on it, not a call of its own. The agent answers in
    the order it was asked, so answers are matched to their requests by order. A read whose time runs out closes the
    stream, as a call's deadline cancels the call: the agent then drops the read it is making and every request
    queued behind it, where answering them all would leave a slow agent further behind at every check; the reads
    that were waiting on it raise _Closed, to be asked again on a new stream. When the stream ends on the agent's side
    (it restarted, or refused the coordinator), every read waiting on it fails with the stream's error, and the next
    read opens a new one. A notice that the agent's files changed answers no read: it calls `told`."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceAsyncStub, told: Callable[[], None]) -> None:
        self._call = stub.ObserveNodeView()  # type: ignore[call-arg]  # no iterator: requests go by write()
        self._told = told
        self._waiting: deque[asyncio.Future[agent_pb2.GetNodeViewResponse]] = deque()
        self._writing = asyncio.Lock()  # writes in the order of self._waiting
        self.ended = False
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def read(
        self, request: agent_pb2.GetNodeViewRequest, timeout: float, notify: bool
    ) -> agent_pb2.GetNodeViewResponse:
        """The agent's answer to request. Raises TimeoutError when none comes within timeout, _Closed when another
        read closed the stream first, and a grpc.aio.AioRpcError when the agent ended it."""
        answer: asyncio.Future[agent_pb2.GetNodeViewResponse] = asyncio.get_running_loop().create_future()
        message = agent_pb2.ObserveNodeViewRequest(read=request, notify=notify)
        message.answer_within.FromTimedelta(timedelta(seconds=timeout))
        try:
            async with asyncio.timeout(timeout):
                async with self._writing:
                    if self.ended:
                        raise _Closed
                    self._waiting.append(answer)
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        # The stream ended before its reader saw it: the reader fails every waiting read, this one
                        # too, with the stream's own error.
                        await self._call.write(message)
                return await answer
        except TimeoutError:
            if answer in self._waiting:  # asked, and not answered: not when the time ran out before it was sent
                self.close()
            raise

    async def _read(self) -> None:
        error: Exception
        try:
            async for response in self._call:
                if not response.HasField("answer"):
                    self._told()
                    continue
                answer = self._waiting.popleft()
                if not answer.done():
                    answer.set_result(response.answer)
            error = _error(await self._call.code(), await self._call.details() or "the agent ended the stream")
        except grpc.aio.AioRpcError as ended:
            error = ended
        except asyncio.CancelledError:
            error = _Closed()
        self.ended = True
        for answer in self._waiting:
            if not answer.done():
                answer.set_exception(error)
        self._waiting.clear()

    def close(self) -> None:
        self.ended = True
        self._call.cancel()


async def _answer(call: Awaitable[_Response]) -> _Response:
    """A unary call's response. Closing its channel cancels a call in flight, and awaiting it then raises
    CancelledError in a task nobody cancelled: that is raised as the UsageError a call made on a closed channel
    raises, so one handler covers both."""
    try:
        return await call
    except asyncio.CancelledError:
        if own_cancellation():
            raise
        raise grpc.aio.UsageError("Channel is closed.") from None


def own_cancellation() -> bool:
    """Whether the running task is being cancelled. gRPC raises CancelledError too, in a task that is not, for a call
    whose channel was closed under it: that is a failed call, not the end of the task."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


@dataclass
class _Link:
    member: RegisteredMember
    roots: bytes
    stub: agent_pb2_grpc.AgentServiceAsyncStub
    channel: grpc.aio.Channel
    told: Callable[[], None]  # what a notice from the agent calls (Agents.changed.set)
    # The last view and its digest: the agent leaves out a view the coordinator already holds, and the same
    # NodeView object coming back lets the coordinator skip the diff of an unchanged cluster (service.py).
    view: NodeView | None = None
    digest: str = ""
    observer: _Observer | None = None
    epoch: int | None = None  # the newest journal epoch the agent said it admitted, in its last answer

    async def get_node_view(
        self, timeout: float, include_certificates: bool, seen: dict[bytes, MemberRecord], notify: bool = False
    ) -> NodeView:
        # "Unchanged" means unchanged from the digest this request sent. Checks run concurrently over the one link,
        # and their answers may come back in another order than they were asked: by the time this one arrives, another
        # may have moved self.view to a reading this agent has since gone back from.
        known, digest = self.view, "" if include_certificates else self.digest
        request = agent_pb2.GetNodeViewRequest(include_certificates=include_certificates, known_digest=digest)
        if include_certificates:
            response = await _answer(self.stub.GetNodeView(request, timeout=timeout))  # only to fetch new PEMs
        else:
            response = await self._observe(request, timeout, notify)
        self.epoch = response.epoch
        if known is not None and response.unchanged:
            return known
        view = view_from_proto(response.view, seen)
        self.view, self.digest = view, "" if include_certificates else response.view_digest
        return view

    async def _observe(
        self, request: agent_pb2.GetNodeViewRequest, timeout: float, notify: bool
    ) -> agent_pb2.GetNodeViewResponse:
        """request, answered over this link's stream; asked again on a new one, in the time left, when another read
        closed the stream under it."""
        deadline = time.monotonic() + timeout
        while True:
            if self.observer is None or self.observer.ended:
                self.observer = _Observer(self.stub, self.told)
            try:
                return await self.observer.read(request, max(0.0, deadline - time.monotonic()), notify)
            except _Closed:
                if time.monotonic() >= deadline:
                    raise TimeoutError from None

    async def close(self) -> None:
        if self.observer is not None:
            self.observer.close()
        await self.channel.close(None)


class Agents:
    """Persistent channels to the agents of the registered members, kept in step with the registry and with what
    `trust` learns from each gather."""

    def __init__(
        self,
        identity: Identity,
        registry: Registry,
        trust: LearnedTrust,
        wants_notices: Callable[[], bool] = lambda: False,
    ) -> None:
        self._identity = identity
        # Whether the reads ask the agents to tell of a change (someone watches): a notice costs a message on each
        # agent's stream for every write to its files, steps included, which nobody needs while nobody watches.
        self._wants_notices = wants_notices
        self._registry = registry
        self._trust = trust
        self._links: dict[str, _Link] = {}
        self._learned_from: tuple[NodeView | None, ...] = ()  # the views trust last learned from
        self._registered: frozenset[str] = frozenset()  # the registry's members at the last gather
        self._unanswered: set[str] = set()  # members whose agent did not answer the last gather or step sent to it
        # The records this gather's views were converted to, by their bytes: each record is converted once, not once
        # per node that holds it (messages.view_from_proto). Started afresh by each gather, so it never grows.
        self._seen: dict[bytes, MemberRecord] = {}
        # Set when one of those answers again: the reconciler waits on it, since what parked an operation may be
        # an agent that was away. Whoever waits clears it.
        self.reconnected = asyncio.Event()
        # Set when an agent tells, on its stream, that its files changed: the background check's cue while anyone
        # watches. A hint only: what changed is known from a check, as ever. Whoever waits clears it.
        self.changed = asyncio.Event()
        self._closed = False  # set by close(): a read asked again after it would dial a channel nobody closes

    def _link(self, member: RegisteredMember) -> _Link | None:
        roots = self._trust.roots(member)
        link = self._links.get(member.name)
        if link is not None and link.member == member and link.roots == roots:
            return link
        if link is not None:
            # The member moved or its trusted certificates changed: the old channel trusts the wrong thing.
            asyncio.get_running_loop().create_task(self._links.pop(member.name).close())
        if not roots:
            return None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=self._identity.key_pem,
            certificate_chain=self._identity.certificate_pem,
        )
        channel = grpc.aio.secure_channel(
            member.agent_address,
            credentials,
            options=[*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", member.name)],
        )
        link = _Link(member, roots, agent_pb2_grpc.AgentServiceStub(channel), channel, self.changed.set)
        self._links[member.name] = link
        return link

    async def gather(self, timeout: float) -> ClusterView:
        """Every registered member's observation; an agent that does not answer in time is UNREACHABLE."""
        members = self._registry.members()
        names = frozenset(m.name for m in members)
        # Only a member that left the registry loses its channel. A joiner is not registered until its join is done,
        # and closing the channel its steps go over would cancel the step in flight.
        for gone in self._registered - names:
            link = self._links.pop(gone, None)
            if link is not None:
                await link.close()
        self._registered = names
        self._seen = {}
        started = time.monotonic()
        roots = {m.name: self._trust.roots(m) for m in members}
        observations = list(await asyncio.gather(*(self._observe(m, timeout) for m in members)))
        for observation in observations:
            self._heard(observation.node, observation.view is not None)
        views = tuple(o.view for o in observations)
        if views == self._learned_from:
            # Every agent answered with the view it gave last time: nothing new to trust. Equal views that are other
            # objects (sent anew, as after the PEMs were fetched) are kept, so that the next comparison is by
            # identity, not field by field through every record.
            self._learned_from = views
            return ClusterView(nodes=tuple(observations), now=time.time())
        if self._trust.learn(observations) or any(self._trust.roots(m) != roots[m.name] for m in members):
            # Truststores hold a certificate not seen before: fetch its PEM once, from as few of the nodes that hold
            # it as name them all, and ask again the agents whose trusted certificates just changed.
            remaining = max(0.0, timeout - (time.monotonic() - started))
            holders = {id(o) for o in self._trust.holders(observations)}
            observations = list(
                await asyncio.gather(
                    *(
                        self._observe(m, remaining, include_certificates=id(o) in holders)
                        if id(o) in holders or self._trust.roots(m) != roots[m.name]
                        else _same(o)
                        for m, o in zip(members, observations, strict=True)
                    )
                )
            )
            self._trust.learn(observations)
        self._learned_from = tuple(o.view for o in observations)
        return ClusterView(nodes=tuple(observations), now=time.time())

    def epochs(self) -> dict[str, int]:
        """The newest journal epoch each agent admitted a step of, as it said in its answer to the last gather or
        step; agents that did not answer then are left out."""
        return {
            name: link.epoch
            for name, link in self._links.items()
            if link.epoch is not None and name not in self._unanswered
        }

    def _heard(self, name: str, answered: bool) -> None:
        if not answered:
            self._unanswered.add(name)
        elif name in self._unanswered:
            self._unanswered.discard(name)
            self.reconnected.set()

    async def _observe(
        self, member: RegisteredMember, timeout: float, *, include_certificates: bool = False
    ) -> NodeObservation:
        deadline = time.monotonic() + timeout
        while not self._closed and (link := self._link(member)) is not None:
            try:
                return await self._ask(link, timeout, deadline, include_certificates)
            except grpc.aio.UsageError:
                # A concurrent gather closed the link under this read (the member left the registry, moved, or its
                # certificates changed): ask again over the link it has now, in the time left.
                continue
        if self._closed:
            detail = "the coordinator is shutting down"
            return NodeObservation(member.name, member.agent_address, failure=AgentFailure.UNREACHABLE, detail=detail)
        detail = "no certificate is pinned for it or recorded under its name in a reachable truststore"
        return NodeObservation(member.name, member.agent_address, failure=AgentFailure.UNTRUSTED, detail=detail)

    async def _ask(self, link: _Link, timeout: float, deadline: float, include_certificates: bool) -> NodeObservation:
        member = link.member
        try:
            view = await link.get_node_view(
                max(0.0, deadline - time.monotonic()), include_certificates, self._seen, self._wants_notices()
            )
        except grpc.aio.AioRpcError as error:
            failure, detail = _classify(error)
            return NodeObservation(member.name, member.agent_address, failure=failure, detail=detail)
        except TimeoutError:
            detail = f"DEADLINE_EXCEEDED: no answer within {timeout:.3g} s"
            return NodeObservation(member.name, member.agent_address, failure=AgentFailure.UNREACHABLE, detail=detail)
        if view.node != member.name:
            return NodeObservation(
                member.name,
                member.agent_address,
                failure=AgentFailure.UNTRUSTED,
                detail=f"the agent at {member.agent_address} reports for {view.node!r}",
            )
        return NodeObservation(member.name, member.agent_address, view=view)

    async def apply_step(
        self, member: RegisteredMember, request: agent_pb2.ApplyStepRequest, timeout: float
    ) -> agent_pb2.ApplyStepResponse:
        """Has `member`'s agent apply one step; returns its answer. Raises grpc.aio.AioRpcError when it refuses or
        does not answer, and KeyError when no certificate is known to trust its agent with."""
        if self._closed:
            raise _error(grpc.StatusCode.UNAVAILABLE, "the coordinator is shutting down")
        link = self._link(member)
        if link is None:
            raise KeyError(f"{member.name}: no certificate to trust its agent with")
        try:
            response = await _answer(link.stub.ApplyStep(request, timeout=timeout))
        except grpc.aio.AioRpcError as error:
            # A refusal is an answer; only silence makes the agent one to wait for.
            self._heard(member.name, error.code() not in _SILENT)
            raise
        except grpc.aio.UsageError:
            # A gather closed the link under the step (the member moved, or its certificates changed): whether the
            # agent applied it is as unknown as after silence.
            self._heard(member.name, False)
            raise _error(grpc.StatusCode.UNAVAILABLE, "the channel to its agent was replaced during the step") from None
        self._heard(member.name, True)
        return response

    async def joiner_view(self, member: RegisteredMember, timeout: float) -> NodeView | None:
        """What a joiner's agent reports of its node, asked over a channel pinned to the certificate the joiner
        submitted; None when it does not answer as that certificate's holder."""
        if member.name not in self._registered and (stale := self._links.pop(member.name, None)) is not None:
            # A joiner's channel from an earlier attempt may be backing off from an agent that was away: dial anew.
            await stale.close()
        return (await self._observe(member, timeout)).view

    async def close(self) -> None:
        self._closed = True
        for link in self._links.values():
            await link.close()
        self._links.clear()


_SILENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def _same(observation: NodeObservation) -> NodeObservation:
    return observation


def _classify(error: grpc.aio.AioRpcError) -> tuple[AgentFailure, str]:
    code = error.code()
    details = error.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AgentFailure.UNTRUSTED, f"the agent refused the coordinator: {details}"
    # gRPC reports a failed TLS handshake as UNAVAILABLE; only its text tells it from a dead peer.
    if code is grpc.StatusCode.UNAVAILABLE and any(
        word in details.lower() for word in ("handshake", "certificate", "ssl", "tls")
    ):
        return AgentFailure.UNTRUSTED, f"the agent's certificate is not the pinned one: {details}"
    return AgentFailure.UNREACHABLE, f"{code.name}: {details}"
