"""A stand-in coordinator for the client and CLI tests.

It is a real grpc server on 127.0.0.1:0 with real mutual TLS (self-signed identities pinned both ways, client
certificates required) and the standard health service, whose CoordinatorService answers with whatever
behaviour the test sets: a diff, an abort with a rich status, or a stall past the deadline.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from memberguard import Endpoint
from memberguard.v1 import coordinator_pb2, coordinator_pb2_grpc, membership_pb2

from coordinator import pki

SERVER_NAME = "coordinator.memberguard.test"
COORDINATOR_ID = "fake-coordinator"
FINGERPRINT = "ab" * 32

# What the fake does with a request: return the diff to answer with, or abort through the context.
Behaviour = Callable[[Message, grpc.ServicerContext], membership_pb2.MembershipDiff]


def respond(diff: membership_pb2.MembershipDiff) -> Behaviour:
    return lambda request, context: diff


def abort(code: grpc.StatusCode, message: str, *details: Message) -> Behaviour:
    """Fails the call with a google.rpc.Status carrying the details, as the real coordinator's status.py does."""

    def behave(request: Message, context: grpc.ServicerContext) -> membership_pb2.MembershipDiff:
        packed = []
        for detail in details:
            item = any_pb2.Any()
            item.Pack(detail)
            packed.append(item)
        status = status_pb2.Status(code=code.value[0], message=message, details=packed)
        context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort_with_status returned")

    return behave


def stall(request: Message, context: grpc.ServicerContext) -> membership_pb2.MembershipDiff:
    """Answers only after the caller has given up (bounded, so a broken client cannot hang the server)."""
    give_up = time.monotonic() + 30
    while context.is_active() and time.monotonic() < give_up:
        time.sleep(0.01)
    return membership_pb2.MembershipDiff(fingerprint=FINGERPRINT)


def consistent_diff() -> membership_pb2.MembershipDiff:
    return membership_pb2.MembershipDiff(
        fingerprint=FINGERPRINT,
        members=[membership_pb2.Member(name="n1", address="127.0.0.1:9001", node_id=1)],
        nodes=["n1"],
    )


def discrepancy(
    severity: membership_pb2.Severity.ValueType,
    kind: membership_pb2.DiscrepancyKind.ValueType,
    *,
    member: membership_pb2.Member | None = None,
    source: membership_pb2.Source.ValueType = membership_pb2.SOURCE_UNSPECIFIED,
    node: str = "",
    summary: str = "",
    remedies: tuple[membership_pb2.Remedy, ...] = (),
) -> membership_pb2.Discrepancy:
    return membership_pb2.Discrepancy(
        id=f"d-{kind}-{node or 'all'}",
        kind=kind,
        severity=severity,
        member=member,
        source=source,
        node=node,
        summary=summary,
        remedies=remedies,
    )


def inconsistent_diff() -> membership_pb2.MembershipDiff:
    """One blocking, one warning and one info discrepancy, naming members by name, address and id."""
    diff = consistent_diff()
    diff.discrepancies.extend(
        [
            discrepancy(
                membership_pb2.SEVERITY_BLOCKING,
                membership_pb2.DISCREPANCY_KIND_MISSING,
                member=membership_pb2.Member(name="n3", address="127.0.0.1:9003"),
                source=membership_pb2.SOURCE_TRUSTSTORE,
                node="n2",
                summary="n2's truststore has no record of n3",
                remedies=(
                    membership_pb2.Remedy(
                        action="Restore n3's truststore record on n2 from the members table",
                        safety=membership_pb2.REMEDY_SAFETY_SAFE,
                    ),
                ),
            ),
            discrepancy(
                membership_pb2.SEVERITY_WARNING,
                membership_pb2.DISCREPANCY_KIND_ADDRESS_MISMATCH,
                member=membership_pb2.Member(address="127.0.0.1:9004"),
                source=membership_pb2.SOURCE_MEMBERS_TABLE,
                summary="the members table and Raft disagree on n4's address",
            ),
            discrepancy(
                membership_pb2.SEVERITY_INFO,
                membership_pb2.DISCREPANCY_KIND_VIEW_DIFFERS,
                member=membership_pb2.Member(node_id=77),
                source=membership_pb2.SOURCE_RAFT_CACHE,
                node="n2",
                summary="n2's cluster.yaml lags by one role adjustment",
            ),
        ]
    )
    return diff


def only(diff: membership_pb2.MembershipDiff, severity: membership_pb2.Severity.ValueType) -> None:
    """Keeps only the discrepancies of one severity."""
    kept = [d for d in diff.discrepancies if d.severity == severity]
    del diff.discrepancies[:]
    diff.discrepancies.extend(kept)


@dataclass
class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    behaviour: Behaviour = field(default_factory=lambda: respond(consistent_diff()))
    requests: list[Message] = field(default_factory=list)

    def CheckMembership(
        self, request: coordinator_pb2.CheckMembershipRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.CheckMembershipResponse:
        self.requests.append(request)
        diff = self.behaviour(request, context)
        return coordinator_pb2.CheckMembershipResponse(header=_header(), diff=diff)

    def GuardedOperation(
        self, request: coordinator_pb2.GuardedOperationRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.GuardedOperationResponse:
        self.requests.append(request)
        self.behaviour(request, context)
        return coordinator_pb2.GuardedOperationResponse(header=_header())


def _header() -> coordinator_pb2.ResponseHeader:
    header = coordinator_pb2.ResponseHeader(coordinator_id=COORDINATOR_ID)
    header.served_at.GetCurrentTime()
    return header


@dataclass
class Lab:
    """A running fake coordinator and everything needed to reach it, on disk (lab.json) and in memory."""

    directory: Path
    address: str
    fake: FakeCoordinator
    health: health.HealthServicer
    server_identity: pki.Identity
    operator: pki.Identity
    ca_path: Path
    cert_path: Path
    key_path: Path

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(
            address=self.address,
            ca=self.server_identity.certificate_pem,
            server_name=SERVER_NAME,
            cert=self.operator.certificate_pem,
            key=self.operator.key_pem,
        )

    def reset(self) -> None:
        self.fake.behaviour = respond(consistent_diff())
        self.fake.requests.clear()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def check_requests(self) -> list[coordinator_pb2.CheckMembershipRequest]:
        """The CheckMembership requests the fake received, in order."""
        return [r for r in self.fake.requests if isinstance(r, coordinator_pb2.CheckMembershipRequest)]

    def endpoint_args(self) -> list[str]:
        """The CLI's explicit endpoint options for this lab."""
        return [
            "--address",
            self.address,
            "--ca",
            str(self.ca_path),
            "--server-name",
            SERVER_NAME,
            "--cert",
            str(self.cert_path),
            "--key",
            str(self.key_path),
        ]


@contextmanager
def running_coordinator(directory: Path) -> Iterator[Lab]:
    server_identity = pki.make_identity(SERVER_NAME)
    operator = pki.make_identity("operator")
    ca_path, _ = pki.write_identity(directory / "coordinator", server_identity)
    cert_path, key_path = pki.write_identity(directory / "operator", operator, stem="operator")

    fake = FakeCoordinator()
    health_servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_identity.key_pem, server_identity.certificate_pem)],
        root_certificates=operator.certificate_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    lab = Lab(
        directory=directory,
        address=f"127.0.0.1:{port}",
        fake=fake,
        health=health_servicer,
        server_identity=server_identity,
        operator=operator,
        ca_path=ca_path,
        cert_path=cert_path,
        key_path=key_path,
    )
    lab.reset()
    write_lab_json(directory, lab.address, ca=ca_path, cert=cert_path, key=key_path)
    try:
        yield lab
    finally:
        server.stop(grace=None).wait()


def write_lab_json(directory: Path, address: str, *, ca: Path, cert: Path, key: Path) -> Path:
    lab: dict[str, Any] = {
        "backend": "local",
        "coordinator": {"address": address, "ca": str(ca), "server_name": SERVER_NAME, "pid": 0},
        "operator": {"cert": str(cert), "key": str(key)},
        "sources": {"members_table": str(directory / "members.sqlite"), "raft_config": str(directory / "raft.yaml")},
        "nodes": [],
    }
    path = directory / "lab.json"
    path.write_text(json.dumps(lab, indent=2))
    return path


def unused_address() -> str:
    """An address nothing listens on: a port the kernel just handed out and that was closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"
