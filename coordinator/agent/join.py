"""A joining node's side of a join: its agent asks the coordinator, presenting its token.

The joiner trusts nothing yet but its token, which pins the coordinator's certificate fingerprint. So it fetches the
certificate a join address presents, checks it against the pin (trust on first use, pinned by the token), pins it
for its own agent (which then answers that coordinator), and calls GuardedOperation(join) over TLS rooted in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import ssl
from pathlib import Path

import grpc
from memberguard.v1 import coordinator_pb2, coordinator_pb2_grpc, operation_pb2

from coordinator.core import tokens
from coordinator.files import write_atomically
from coordinator.pki import dns_names


class CoordinatorNotVerified(Exception):
    """No join address presented the certificate the token pins."""


def _presented_certificate(address: str, timeout: float) -> str:
    host, _, port = address.rpartition(":")
    return ssl.get_server_certificate((host, int(port)), timeout=timeout)


async def verified_coordinator(token: tokens.JoinToken, timeout: float) -> tuple[str, str]:
    """(join address, certificate PEM) of the first join address whose certificate the token pins."""
    for address in token.join_addresses:
        try:
            pem = await asyncio.to_thread(_presented_certificate, address, timeout)
        except OSError:
            continue
        der = ssl.PEM_cert_to_DER_cert(pem)
        if tokens.verify_coordinator(token, hashlib.sha256(der).hexdigest()):
            return address, pem
    raise CoordinatorNotVerified("no join address presented the coordinator certificate the token pins")


async def request_join(
    token_text: str,
    *,
    name: str,
    address: str,
    certificate_pem: str,
    agent_address: str,
    pins: Path,
    timeout: float = 60.0,
) -> operation_pb2.Operation:
    """Joins the cluster the token is for; returns the finished (or rolled back) operation.

    pins is the file of coordinator certificates the joiner's agent answers: the verified coordinator is written
    there first, so that the coordinator can reach the agent to check the joiner's key and apply its steps. The
    request id is new for every call: a join that rolled back released its token, and the same token may then join
    again (a join that did succeed is not run twice either way: the name is a member by then).
    """
    token = tokens.decode_token(token_text)
    join_address, coordinator_pem = await verified_coordinator(token, min(timeout, 10.0))
    write_atomically(pins, coordinator_pem.encode())
    server_name = (dns_names(coordinator_pem) or [""])[0]
    credentials = grpc.ssl_channel_credentials(root_certificates=coordinator_pem.encode())
    request = coordinator_pb2.GuardedOperationRequest(
        request_id=f"join-{name}-{secrets.token_hex(8)}",
        join=operation_pb2.JoinOperation(
            token=token_text,
            name=name,
            address=address,
            certificate_pem=certificate_pem,
            agent_address=agent_address,
        ),
    )
    async with grpc.aio.secure_channel(
        join_address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    ) as channel:
        response = await coordinator_pb2_grpc.CoordinatorServiceStub(channel).GuardedOperation(request, timeout=timeout)
    return response.operation
