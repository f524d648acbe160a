"""The gather: ask every registered member's agent for its view, concurrently, within one deadline.

All of the coordinator's knowledge of the sources comes through here; it opens no source file itself.
Channels are persistent (a new mTLS channel per call would cost more than the whole check) and each pins
exactly one certificate: the member's own, with its name as the TLS server name.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
from memberguard.v1 import agent_pb2, agent_pb2_grpc

from coordinator.core.model import AgentFailure, ClusterView, NodeObservation
from coordinator.messages import view_from_proto
from coordinator.pki import Identity
from coordinator.registry import RegisteredMember, Registry

_CHANNEL_OPTIONS = [
    # A report lists every member of a large cluster; allow far more than the 4 MiB default.
    ("grpc.max_receive_message_length", 64 << 20),
    # A restarted agent must be seen again at the next check, not after gRPC's default 2-minute backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class _Link:
    member: RegisteredMember
    channel: grpc.aio.Channel
    stub: agent_pb2_grpc.AgentServiceAsyncStub


class Agents:
    """Persistent channels to the agents of the registered members, kept in step with the registry."""

    def __init__(self, identity: Identity, registry: Registry) -> None:
        self._identity = identity
        self._registry = registry
        self._links: dict[str, _Link] = {}

    def _link(self, member: RegisteredMember) -> _Link:
        link = self._links.get(member.name)
        if link is not None and link.member == member:
            return link
        if link is not None:
            # The member moved or its pinned certificate changed: the old channel trusts the wrong thing.
            asyncio.get_running_loop().create_task(link.channel.close(None))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=member.certificate_pem.encode(),
            private_key=self._identity.key_pem,
            certificate_chain=self._identity.certificate_pem,
        )
        channel = grpc.aio.secure_channel(
            member.agent_address,
            credentials,
            options=[*_CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", member.name)],
        )
        link = _Link(member, channel, agent_pb2_grpc.AgentServiceStub(channel))
        self._links[member.name] = link
        return link

    async def gather(self, timeout: float) -> ClusterView:
        """Every registered member's observation; an agent that does not answer in time is UNREACHABLE."""
        members = self._registry.members()
        for gone in set(self._links) - {m.name for m in members}:
            await self._links.pop(gone).channel.close(None)
        observations = await asyncio.gather(*(self._observe(self._link(m), timeout) for m in members))
        return ClusterView(nodes=tuple(observations), now=time.time())

    async def _observe(self, link: _Link, timeout: float) -> NodeObservation:
        member = link.member
        try:
            response = await link.stub.GetNodeView(agent_pb2.GetNodeViewRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            failure, detail = _classify(error)
            return NodeObservation(member.name, member.agent_address, failure=failure, detail=detail)
        view = view_from_proto(response.view)
        if view.node != member.name:
            return NodeObservation(
                member.name,
                member.agent_address,
                failure=AgentFailure.UNTRUSTED,
                detail=f"the agent at {member.agent_address} reports for {view.node!r}",
            )
        return NodeObservation(member.name, member.agent_address, view=view)

    async def close(self) -> None:
        for link in self._links.values():
            await link.channel.close(None)
        self._links.clear()


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
