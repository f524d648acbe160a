"""Starting a memberguard gRPC server: mutual TLS, the auth interceptor, health and reflection.

The coordinator and every agent start the same way; only their services and rules differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.auth import AuthInterceptor, Rules, Trust, server_credentials
from coordinator.pki import Identity

# Requests to memberguard servers are small; anything larger is a mistake or an attack, refused with
# RESOURCE_EXHAUSTED before a handler sees it.
MAX_REQUEST_BYTES = 1 << 20
# gRPC binds with SO_REUSEPORT by default: a second process started on a fixed port (a lab restart reuses its ports)
# would share it, and requests would reach either. A port is one server's.
_OPTIONS = [("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)]


async def start_join_listener(
    address: str, identity: Identity, add: Callable[[grpc.aio.Server], None]
) -> tuple[grpc.aio.Server, int]:
    """The join listener: TLS with the coordinator's certificate and no client certificate, because a joiner is not
    trusted yet (grpcio cannot ask for a client certificate without requiring a trusted one). The token in the
    request authorizes it; the joiner verifies this server by the fingerprint its token pins."""
    server = grpc.aio.server(options=_OPTIONS)
    add(server)
    port = server.add_secure_port(address, grpc.ssl_server_credentials([(identity.key_pem, identity.certificate_pem)]))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port


async def start_server(
    *,
    address: str,
    identity: Identity,
    trust: Trust,
    rules: Rules,
    services: Sequence[tuple[str, Callable[[grpc.aio.Server], None]]],
) -> tuple[grpc.aio.Server, int]:
    """Starts a server on address ("host:port", port 0 picks one) and returns it with its bound port.

    `services` pairs each full service name (for reflection and health) with a function that adds it.
    """
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(trust, rules)],
        options=_OPTIONS,
    )
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lack health.aio
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for _, add in services:
        add(server)
    names = [name for name, _ in services]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_secure_port(address, server_credentials(identity, trust))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port
