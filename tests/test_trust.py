"""Trust: who may call what, and a certificate taken out of its trust is refused without a restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from memberguard import Client, Endpoint, PermissionDenied, Unauthenticated, Unavailable
from memberguard.v1 import agent_pb2, agent_pb2_grpc
from memberguard.v1 import membership_pb2 as pb

from coordinator.lab import lab as labs
from coordinator.pki import make_identity


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    """A lab of its own: these tests change its trust in ways a restore would not undo."""
    running = labs.up(tmp_path / "lab", 3)
    yield running
    labs.down(running.dir)


def _endpoint_as(lab: labs.Lab, cert: Path, key: Path) -> Endpoint:
    base = lab.endpoint
    return Endpoint(base.address, base.ca, base.server_name, cert.read_bytes(), key.read_bytes())


def test_an_agent_certificate_may_not_call_operator_rpcs(lab: labs.Lab) -> None:
    state = Path(lab.node("n1")["state_dir"])
    with Client(_endpoint_as(lab, state / "server.crt", state / "server.key")) as as_agent:
        as_agent.ping()  # health is open to every trusted peer
        with pytest.raises(PermissionDenied) as refused:
            as_agent.check_membership(timeout=5)
    assert refused.value.reason == "ROLE_NOT_ALLOWED"


def test_an_unknown_certificate_reaches_no_handler(lab: labs.Lab, tmp_path: Path) -> None:
    stranger = make_identity("operator")  # the right name is not enough: the certificate is not pinned
    cert, key = tmp_path / "s.crt", tmp_path / "s.key"
    cert.write_bytes(stranger.certificate_pem)
    key.write_bytes(stranger.key_pem)
    with Client(_endpoint_as(lab, cert, key)) as client, pytest.raises(Unavailable):
        client.check_membership(timeout=5)


def test_the_coordinator_is_the_only_client_an_agent_answers(lab: labs.Lab) -> None:
    operator = lab.document["operator"]
    node = lab.node("n1")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(Path(node["state_dir"]) / "server.crt").read_bytes(),
        private_key=Path(operator["key"]).read_bytes(),
        certificate_chain=Path(operator["cert"]).read_bytes(),
    )
    with grpc.secure_channel(
        node["agent_address"], credentials, options=[("grpc.ssl_target_name_override", "n1")]
    ) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            agent_pb2_grpc.AgentServiceStub(channel).GetNodeView(agent_pb2.GetNodeViewRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # the handshake itself fails


def test_an_operator_removed_from_the_registry_is_refused_on_an_open_connection(own_lab: labs.Lab) -> None:
    registry = own_lab.dir / "coordinator" / "registry.json"
    with Client(own_lab.endpoint) as client:
        client.check_membership(timeout=5)
        document = json.loads(registry.read_text())
        document["identities"] = []
        registry.write_text(json.dumps(document))
        with pytest.raises(Unauthenticated):
            client.check_membership(timeout=5)
    with Client(own_lab.endpoint) as fresh, pytest.raises(Unavailable):
        fresh.check_membership(timeout=5)


def test_an_agent_that_stops_trusting_the_coordinator_is_reported_untrusted(own_lab: labs.Lab) -> None:
    pins = Path(own_lab.node("n2")["state_dir"]) / "coordinators.pem"
    with Client(own_lab.endpoint) as client:
        assert list(client.check_membership(timeout=5).diff.discrepancies) == []
        # The channel to n2 is open; n2's agent re-reads its pins and refuses the coordinator on it.
        pins.write_bytes(make_identity("someone-else").certificate_pem)
        diff = client.check_membership(timeout=5).diff
    assert [(x.kind, x.severity, x.node) for x in diff.discrepancies] == [
        (pb.DISCREPANCY_KIND_AGENT_UNTRUSTED, pb.SEVERITY_BLOCKING, "n2")
    ]


def test_an_agent_serving_another_certificate_is_not_trusted(own_lab: labs.Lab) -> None:
    registry = own_lab.dir / "coordinator" / "registry.json"
    document = json.loads(registry.read_text())
    impostor = make_identity("n3")
    for member in document["members"]:
        if member["name"] == "n3":
            member["certificate"] = impostor.certificate_pem.decode()
    registry.write_text(json.dumps(document))
    with Client(own_lab.endpoint) as client:
        diff = client.check_membership(timeout=5).diff
    assert [(x.kind, x.node) for x in diff.discrepancies] == [(pb.DISCREPANCY_KIND_AGENT_UNTRUSTED, "n3")]


def test_agents_are_trusted_by_what_the_truststores_record(own_lab: labs.Lab) -> None:
    """With no member certificate pinned in the registry, the coordinator trusts what the cluster trusts."""
    registry = own_lab.dir / "coordinator" / "registry.json"
    document = json.loads(registry.read_text())
    for member in document["members"]:
        del member["certificate"]
    registry.write_text(json.dumps(document))
    with Client(own_lab.endpoint) as client:
        assert list(client.check_membership(timeout=5).diff.discrepancies) == []
        # n2 disappears from every truststore: its agent's certificate is no longer vouched for by anyone.
        for node in ("n1", "n2", "n3"):
            (Path(own_lab.node(node)["state_dir"]) / "truststore" / "n2.yaml").unlink()
        diff = client.check_membership(timeout=5).diff
    found = sorted((pb.DiscrepancyKind.Name(x.kind), x.node) for x in diff.discrepancies)
    assert found == [
        ("DISCREPANCY_KIND_AGENT_UNTRUSTED", "n2"),
        ("DISCREPANCY_KIND_MISSING", "n1"),
        ("DISCREPANCY_KIND_MISSING", "n3"),
    ]
