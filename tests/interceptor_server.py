"""A real mTLS server with the coordinator's auth interceptor and one CoordinatorService method whose behaviour the test
gives: for answers no correct coordinator produces on demand (an unexpected exception, a refusal of any size)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from memberguard import Endpoint
from memberguard.v1 import coordinator_pb2

from coordinator.auth import Principal
from coordinator.pki import make_identity
from coordinator.registry import RegisteredIdentity, Registry, write_registry
from coordinator.serving import start_server

SERVICE = "memberguard.v1.CoordinatorService"

Behaviour = Callable[[Any, Any], Awaitable[Any]]


@asynccontextmanager
async def serving(directory: Path, method: str, behaviour: Behaviour) -> AsyncIterator[Endpoint]:
    """Serves `method` (GuardedOperation or CheckMembership) with behaviour, to the operator of the endpoint yielded;
    the trust is a real registry file in directory."""
    server_identity, operator = make_identity("coordinator"), make_identity("operator")
    registry = directory / "registry.json"
    pinned = RegisteredIdentity("operator", Principal.OPERATOR, operator.certificate_pem.decode())
    write_registry(registry, [], [pinned])
    request_type = getattr(coordinator_pb2, f"{method}Request")
    response_type = getattr(coordinator_pb2, f"{method}Response")
    handler = grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=request_type.FromString, response_serializer=response_type.SerializeToString
    )
    generic = grpc.method_handlers_generic_handler(SERVICE, {method: handler})
    server, port = await start_server(
        address="127.0.0.1:0",
        identity=server_identity,
        trust=Registry.open(registry),
        rules={f"/{SERVICE}/{method}": frozenset({Principal.OPERATOR})},
        services=[(SERVICE, lambda s: s.add_generic_rpc_handlers((generic,)))],
    )
    try:
        yield Endpoint(
            f"127.0.0.1:{port}",
            server_identity.certificate_pem,
            "coordinator",
            operator.certificate_pem,
            operator.key_pem,
        )
    finally:
        await server.stop(None)
