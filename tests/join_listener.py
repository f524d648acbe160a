"""The coordinator's join listener as a joiner reaches it: TLS rooted in the coordinator's certificate, no client
certificate, and join requests of the joiner's own making."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
from memberguard.v1 import coordinator_pb2, operation_pb2

from coordinator.pki import make_identity

GUARDED = "/memberguard.v1.CoordinatorService/GuardedOperation"


def channel(coordinator: dict[str, Any]) -> grpc.Channel:
    """A channel to the join listener of lab.json's `coordinator` entry."""
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(coordinator["ca"]).read_bytes())
    options = [("grpc.ssl_target_name_override", coordinator["server_name"])]
    return grpc.secure_channel(coordinator["join_address"], credentials, options=options)


def join_request(
    token: str, name: str, *, request_id: str = "", agent_address: str = "127.0.0.1:9"
) -> coordinator_pb2.GuardedOperationRequest:
    """A join of `name` with a fresh certificate for it (a new request id unless given); nothing listens at the
    default agent address."""
    return coordinator_pb2.GuardedOperationRequest(
        request_id=request_id or os.urandom(8).hex(),
        join=operation_pb2.JoinOperation(
            token=token,
            name=name,
            address="127.0.0.1:9999",
            certificate_pem=make_identity(name).certificate_pem.decode(),
            agent_address=agent_address,
        ),
    )
