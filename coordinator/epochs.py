"""The journal epochs the agents have admitted, as evidence about the journal (coordinator/journal.py, `diagnose`).

Every agent keeps the newest epoch it has admitted a step of in its state directory and reports it with its view
(GetNodeViewResponse.epoch). A coordinator asks the registered members' agents before it opens its journal, and
`memberguard journal recover` before it starts a new one above them all. Each agent is dialled over its own channel,
pinned to the certificate the registry holds for its member, and closed at once: this runs once per start, before the
gather's persistent channels exist.

An agent that does not answer is not evidence: its epoch is None, with what went wrong.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import grpc
from memberguard.v1 import agent_pb2, agent_pb2_grpc

from coordinator.agent.steps import EPOCH_FILE
from coordinator.journal import AgentEpoch
from coordinator.pki import Identity
from coordinator.registry import RegisteredMember


async def ask_agents(identity: Identity, members: Sequence[RegisteredMember], timeout: float) -> list[AgentEpoch]:
    """Each member's agent's newest admitted epoch, asked concurrently within timeout, in the members' order."""
    return list(await asyncio.gather(*(_ask(identity, member, timeout) for member in members)))


async def _ask(identity: Identity, member: RegisteredMember, timeout: float) -> AgentEpoch:
    if not member.certificate_pem:
        return AgentEpoch(member.name, None, "not asked: the registry pins no certificate for it")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=member.certificate_pem.encode(),
        private_key=identity.key_pem,
        certificate_chain=identity.certificate_pem,
    )
    options = [("grpc.ssl_target_name_override", member.name)]
    async with grpc.aio.secure_channel(member.agent_address, credentials, options=options) as channel:
        try:
            response = await agent_pb2_grpc.AgentServiceStub(channel).GetNodeView(
                agent_pb2.GetNodeViewRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            return AgentEpoch(
                member.name, None, f"its agent at {member.agent_address} did not answer ({error.code().name})"
            )
    return AgentEpoch(member.name, response.epoch, f"its agent at {member.agent_address} answered")


def read_epoch_file(name: str, state_dir: Path) -> AgentEpoch:
    """What a stopped agent's state directory says (the file its EpochGuard keeps; a missing file is 0)."""
    path = state_dir / EPOCH_FILE
    try:
        return AgentEpoch(name, int(path.read_text()), f"read from {path}")
    except FileNotFoundError:
        return AgentEpoch(name, 0, f"read from {state_dir}: no {EPOCH_FILE}, no step admitted")
    except (OSError, ValueError) as error:
        return AgentEpoch(name, None, f"{path} is unreadable: {error}")
