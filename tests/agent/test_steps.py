"""The agent's steps on real files: each applied twice (the second changes nothing), read back through the readers
the node's view is built with; the epoch guard; and one step over real gRPC and mutual TLS in a running lab."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from memberguard import Client
from memberguard.v1 import agent_pb2, agent_pb2_grpc
from memberguard.v1 import membership_pb2 as pb

from coordinator import pki
from coordinator.agent.members_table import create_members_table, upsert_member
from coordinator.agent.node_state import lay_out_node
from coordinator.agent.raft_files import write_raft_config
from coordinator.agent.sources import local_backend
from coordinator.agent.steps import EPOCH_FILE, EpochGuard, LocalSteps
from coordinator.core.model import Role, Source, SourceReport
from coordinator.errors import AlreadyExists, InvalidRequest, SourceNotRewritable, StaleEpoch
from coordinator.lab import lab as labs

NAMES = ("n1", "n2", "n3")
ADDRESSES = {"n1": "10.0.0.1:9000", "n2": "10.0.0.2:9000", "n3": "10.0.0.3:9000", "n4": "10.0.0.4:9000"}
NODE_IDS = {"n1": 3297041220608546238, "n2": 22, "n3": 33, "n4": 44}


@pytest.fixture(scope="module")
def identities() -> dict[str, pki.Identity]:
    return {name: pki.make_identity(name) for name in (*NAMES, "n4")}


class Cluster:
    """A consistent 3-node local cluster, laid out as the lab lays one out, with a LocalSteps per node."""

    def __init__(self, root: Path, identities: dict[str, pki.Identity]) -> None:
        self.root = root
        self.identities = identities
        self.members_table = root / "members.db"
        self.raft_config = root / "raft.yaml"
        members = [(n, ADDRESSES[n], self.pem(n), NODE_IDS[n], Role.VOTER) for n in NAMES]
        create_members_table(self.members_table)
        for name in NAMES:
            upsert_member(self.members_table, name, ADDRESSES[name], self.pem(name), "voter")
            lay_out_node(self.state(name), identities[name], name, ADDRESSES[name], NODE_IDS[name], members)
        write_raft_config(self.raft_config, [(NODE_IDS[n], ADDRESSES[n], Role.VOTER) for n in NAMES])
        self.steps = {name: LocalSteps(self.state(name), self.members_table, self.raft_config) for name in NAMES}

    def state(self, name: str) -> Path:
        return self.root / name

    def pem(self, name: str) -> str:
        return self.identities[name].certificate_pem.decode()

    async def read(self, node: str, source: Source) -> SourceReport:
        """The source as the node's agent reports it, through a fresh reader."""
        reader = next(
            r for r in local_backend(self.state(node), self.members_table, self.raft_config) if r.source is source
        )
        return await reader.read(include_certificates=True)

    async def raft(self, node: str = "n1", source: Source = Source.RAFT_CONFIG) -> list[tuple[int, str, Role | None]]:
        report = await self.read(node, source)
        assert report.error == "" and report.invalid_entries == ()
        return [(r.node_id, r.address, r.role) for r in report.records]


@pytest.fixture
def cluster(tmp_path: Path, identities: dict[str, pki.Identity]) -> Cluster:
    return Cluster(tmp_path, identities)


def step(epoch: int = 1, **fields: Any) -> agent_pb2.ApplyStepRequest:
    return agent_pb2.ApplyStepRequest(operation_id="op-1", step_index=0, epoch=epoch, **fields)


async def twice(steps: LocalSteps, request: agent_pb2.ApplyStepRequest) -> str:
    """Applies the step twice: it changes the node once, and the repeat finds nothing to do. The first detail."""
    changed, detail, _ = await steps.apply(request)
    assert changed, detail
    again, repeated, _ = await steps.apply(request)
    assert not again, repeated
    return detail


# --- truststore ---------------------------------------------------------------------------------------------


async def test_ensure_truststore_record_writes_a_new_record_once(cluster: Cluster) -> None:
    record = agent_pb2.TruststoreRecord(name="n4", address=ADDRESSES["n4"], certificate_pem=cluster.pem("n4"))
    await twice(cluster.steps["n1"], step(ensure_truststore_record=record))
    report = await cluster.read("n1", Source.TRUSTSTORE)
    n4 = next(r for r in report.records if r.name == "n4")
    assert (n4.entry, n4.address, n4.certificate_pem) == ("n4.yaml", ADDRESSES["n4"], cluster.pem("n4"))
    assert n4.certificate_fingerprint == cluster.identities["n4"].fingerprint
    assert report.invalid_entries == ()


async def test_ensure_truststore_record_leaves_an_equal_record_and_replaces_a_different_one(cluster: Cluster) -> None:
    same = agent_pb2.TruststoreRecord(name="n2", address=ADDRESSES["n2"], certificate_pem=cluster.pem("n2"))
    assert await cluster.steps["n1"].apply(step(ensure_truststore_record=same)) == (
        False,
        "the truststore already holds n2",
        "",
    )
    moved = agent_pb2.TruststoreRecord(name="n2", address="10.0.9.2:9000", certificate_pem=cluster.pem("n2"))
    await twice(cluster.steps["n1"], step(ensure_truststore_record=moved))
    report = await cluster.read("n1", Source.TRUSTSTORE)
    assert [r.address for r in report.records if r.name == "n2"] == ["10.0.9.2:9000"]


async def test_ensure_truststore_record_rewrites_a_file_that_does_not_parse(cluster: Cluster) -> None:
    (cluster.state("n1") / "truststore" / "n2.yaml").write_text("name: [unclosed")
    record = agent_pb2.TruststoreRecord(name="n2", address=ADDRESSES["n2"], certificate_pem=cluster.pem("n2"))
    await twice(cluster.steps["n1"], step(ensure_truststore_record=record))
    report = await cluster.read("n1", Source.TRUSTSTORE)
    assert report.invalid_entries == ()
    assert sorted(r.name for r in report.records) == ["n1", "n2", "n3"]


async def test_remove_truststore_record_removes_the_record_and_misnamed_copies(cluster: Cluster) -> None:
    store = cluster.state("n1") / "truststore"
    (store / "old-n3.yaml").write_bytes((store / "n3.yaml").read_bytes())
    detail = await twice(cluster.steps["n1"], step(remove_truststore_record="n3"))
    assert "n3.yaml" in detail and "old-n3.yaml" in detail
    report = await cluster.read("n1", Source.TRUSTSTORE)
    assert sorted(r.name for r in report.records) == ["n1", "n2"]
    assert report.invalid_entries == ()
    assert sorted(r.name for r in (await cluster.read("n2", Source.TRUSTSTORE)).records) == ["n1", "n2", "n3"]


# --- members table ------------------------------------------------------------------------------------------


async def test_ensure_member_row_inserts_then_updates_by_name(cluster: Cluster) -> None:
    steps = cluster.steps["n1"]
    row = agent_pb2.MemberRow(name="n4", address=ADDRESSES["n4"], certificate_pem=cluster.pem("n4"), role="PENDING")
    await twice(steps, step(ensure_member_row=row))
    row.role = "spare"
    await twice(steps, step(ensure_member_row=row))
    report = await cluster.read("n2", Source.MEMBERS_TABLE)  # one shared table: every node reads the row
    assert [(r.name, r.role_text, r.role) for r in report.records][-1] == ("n4", "spare", Role.SPARE)
    assert [r.name for r in report.records] == ["n1", "n2", "n3", "n4"]


async def test_ensure_member_row_with_another_rows_certificate_is_already_exists(cluster: Cluster) -> None:
    row = agent_pb2.MemberRow(name="n4", address=ADDRESSES["n4"], certificate_pem=cluster.pem("n2"), role="PENDING")
    with pytest.raises(AlreadyExists):
        await cluster.steps["n1"].apply(step(ensure_member_row=row))
    assert [r.name for r in (await cluster.read("n1", Source.MEMBERS_TABLE)).records] == ["n1", "n2", "n3"]


async def test_remove_member_row_deletes_the_row_once(cluster: Cluster) -> None:
    await twice(cluster.steps["n1"], step(remove_member_row="n3"))
    assert [r.name for r in (await cluster.read("n1", Source.MEMBERS_TABLE)).records] == ["n1", "n2"]


# --- Raft configuration -------------------------------------------------------------------------------------


async def test_ensure_raft_entry_adds_then_updates_in_place_and_catches_the_cache_up(cluster: Cluster) -> None:
    steps = cluster.steps["n1"]
    entry = agent_pb2.RaftEntry(node_id=NODE_IDS["n4"], address=ADDRESSES["n4"], role=pb.ROLE_SPARE)
    detail = await twice(steps, step(ensure_raft_entry=entry))
    assert detail.startswith("added") and "cluster.yaml caught up" in detail
    expected = [(NODE_IDS[n], ADDRESSES[n], Role.VOTER) for n in NAMES] + [
        (NODE_IDS["n4"], ADDRESSES["n4"], Role.SPARE)
    ]
    assert await cluster.raft() == expected
    assert await cluster.raft("n1", Source.RAFT_CACHE) == expected

    # An unset role is a voter; the entry of that ID keeps its place.
    promoted = agent_pb2.RaftEntry(node_id=NODE_IDS["n2"], address="10.0.9.2:9000")
    assert (await twice(steps, step(ensure_raft_entry=promoted))).startswith("updated")
    expected[1] = (NODE_IDS["n2"], "10.0.9.2:9000", Role.VOTER)
    assert await cluster.raft() == expected


async def test_remove_raft_entry_takes_out_exactly_that_id_at_that_address(cluster: Cluster) -> None:
    steps = cluster.steps["n1"]
    elsewhere = agent_pb2.RaftEntry(node_id=NODE_IDS["n3"], address="10.0.9.3:9000")
    assert (await steps.apply(step(remove_raft_entry=elsewhere)))[0] is False
    await twice(steps, step(remove_raft_entry=agent_pb2.RaftEntry(node_id=NODE_IDS["n3"], address=ADDRESSES["n3"])))
    expected = [(NODE_IDS[n], ADDRESSES[n], Role.VOTER) for n in ("n1", "n2")]
    assert await cluster.raft() == expected
    assert await cluster.raft("n1", Source.RAFT_CACHE) == expected
    # The other nodes' caches catch up when their agents next apply a step, except the removed node's: its engine
    # is told nothing more, so it goes on believing it is a member.
    assert len(await cluster.raft("n2", Source.RAFT_CACHE)) == 3
    changed, detail, _ = await cluster.steps["n2"].apply(step(remove_member_row="nobody"))
    assert not changed and "cluster.yaml caught up" in detail
    assert await cluster.raft("n2", Source.RAFT_CACHE) == expected
    changed, detail, _ = await cluster.steps["n3"].apply(step(remove_member_row="nobody"))
    assert "caught up" not in detail
    assert len(await cluster.raft("n3", Source.RAFT_CACHE)) == 3


async def test_a_lagging_cache_catches_up_when_its_agent_starts_unless_the_node_left(cluster: Cluster) -> None:
    """An agent killed between a step's write of the Raft configuration and its cache's catch-up: the write is there,
    the catch-up is not, and no later step may come to the node. Its next start is the engine's, which catches up."""
    entries = [(NODE_IDS[n], ADDRESSES[n], Role.VOTER) for n in NAMES]
    write_raft_config(cluster.raft_config, [*entries, (NODE_IDS["n4"], ADDRESSES["n4"], Role.VOTER)])
    assert len(await cluster.raft("n2", Source.RAFT_CACHE)) == 3
    await cluster.steps["n2"].started()
    assert len(await cluster.raft("n2", Source.RAFT_CACHE)) == 4
    write_raft_config(cluster.raft_config, entries[:2])  # n3 removed, and its agent restarted after
    await cluster.steps["n3"].started()
    assert len(await cluster.raft("n3", Source.RAFT_CACHE)) == 3, "a node out of the configuration is told nothing"


async def test_a_raft_configuration_that_does_not_parse_is_not_rewritten(cluster: Cluster) -> None:
    cluster.raft_config.write_text(cluster.raft_config.read_text() + "- {ID: x, Address: '', Role: 9}\n")
    before = cluster.raft_config.read_bytes()
    entry = agent_pb2.RaftEntry(node_id=NODE_IDS["n4"], address=ADDRESSES["n4"])
    with pytest.raises(SourceNotRewritable, match="entry 4"):
        await cluster.steps["n1"].apply(step(ensure_raft_entry=entry))
    assert cluster.raft_config.read_bytes() == before


# --- fencing ------------------------------------------------------------------------------------------------


async def test_fence_node_clears_the_engine_files_once_and_nothing_brings_them_back(cluster: Cluster) -> None:
    database = cluster.state("n3") / "database"
    (database / "join").touch()
    detail = await twice(cluster.steps["n3"], step(fence_node=True))
    assert all(name in detail for name in ("info.yaml", "cluster.yaml", "join"))
    assert list(database.iterdir()) == []
    assert (await cluster.read("n3", Source.NODE_INFO)).error
    # A fenced node's cache is not caught up: no engine would write it.
    entry = agent_pb2.RaftEntry(node_id=NODE_IDS["n4"], address=ADDRESSES["n4"])
    await cluster.steps["n3"].apply(step(ensure_raft_entry=entry))
    assert not (database / "cluster.yaml").exists()
    assert len(await cluster.raft()) == 4


# --- malformed steps ----------------------------------------------------------------------------------------

_PEM = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("fields", "paths"),
    [
        ({}, {"step"}),
        (
            {"ensure_truststore_record": agent_pb2.TruststoreRecord()},
            {
                "ensure_truststore_record.name",
                "ensure_truststore_record.address",
                "ensure_truststore_record.certificate_pem",
            },
        ),
        (
            {
                "ensure_truststore_record": agent_pb2.TruststoreRecord(
                    name="../n4", address="10.0.0.4", certificate_pem=_PEM
                )
            },
            {
                "ensure_truststore_record.name",
                "ensure_truststore_record.address",
                "ensure_truststore_record.certificate_pem",
            },
        ),
        ({"remove_truststore_record": ""}, {"remove_truststore_record"}),
        ({"remove_truststore_record": "a/b"}, {"remove_truststore_record"}),
        ({"remove_truststore_record": ".."}, {"remove_truststore_record"}),
        (
            {"ensure_member_row": agent_pb2.MemberRow(name="n4", address="10.0.0.4:9000", role="leader")},
            {"ensure_member_row.certificate_pem", "ensure_member_row.role"},
        ),
        (
            {"ensure_member_row": agent_pb2.MemberRow()},
            {
                "ensure_member_row.name",
                "ensure_member_row.address",
                "ensure_member_row.certificate_pem",
                "ensure_member_row.role",
            },
        ),
        ({"remove_member_row": ""}, {"remove_member_row"}),
        ({"ensure_raft_entry": agent_pb2.RaftEntry()}, {"ensure_raft_entry.node_id", "ensure_raft_entry.address"}),
        (
            {"ensure_raft_entry": agent_pb2.RaftEntry(node_id=4, address="10.0.0.4:9000", role=pb.ROLE_PENDING)},
            {"ensure_raft_entry.role"},
        ),
        ({"remove_raft_entry": agent_pb2.RaftEntry(address="10.0.0.4:9000")}, {"remove_raft_entry.node_id"}),
        ({"remove_raft_entry": agent_pb2.RaftEntry(node_id=4)}, {"remove_raft_entry.address"}),
        ({"fence_node": False}, {"fence_node"}),
    ],
)
async def test_malformed_steps_get_every_field_violation_and_change_nothing(
    cluster: Cluster, fields: dict[str, Any], paths: set[str]
) -> None:
    files = {p: p.read_bytes() for p in cluster.root.rglob("*") if p.is_file()}
    with pytest.raises(InvalidRequest) as refused:
        await cluster.steps["n1"].apply(step(**fields))
    assert {v.field for v in refused.value.violations} == paths
    assert {p: p.read_bytes() for p in cluster.root.rglob("*") if p.is_file()} == files


# --- epochs -------------------------------------------------------------------------------------------------


async def test_an_older_epoch_is_refused_and_a_newer_one_survives_a_restart(tmp_path: Path) -> None:
    guard = EpochGuard(tmp_path)
    assert guard.newest() == 0  # no file yet
    await guard.admit(0)
    await guard.admit(5)
    assert (tmp_path / EPOCH_FILE).read_text() == "5\n"
    with pytest.raises(StaleEpoch):
        await guard.admit(4)
    await guard.admit(5)  # the same coordinator's next step

    restarted = EpochGuard(tmp_path)
    with pytest.raises(StaleEpoch):
        await restarted.admit(4)
    await restarted.admit(7)
    assert EpochGuard(tmp_path).newest() == 7


async def test_an_unreadable_epoch_refuses_every_step(tmp_path: Path) -> None:
    (tmp_path / EPOCH_FILE).write_text("garbage")
    with pytest.raises(ValueError):
        await EpochGuard(tmp_path).admit(1_000)


async def test_concurrent_steps_never_run_an_older_epoch_after_a_newer_one(tmp_path: Path) -> None:
    guard = EpochGuard(tmp_path)
    ran: list[int] = []

    async def run(epoch: int) -> None:
        async with guard.admitted(epoch):
            await asyncio.sleep(0)  # a step's own awaits: nothing else may be admitted meanwhile
            ran.append(epoch)

    epochs = [random.randrange(1, 20) for _ in range(200)]
    outcomes = await asyncio.gather(*(run(e) for e in epochs), return_exceptions=True)
    assert all(o is None or isinstance(o, StaleEpoch) for o in outcomes)
    assert ran == sorted(ran)
    assert sum(o is None for o in outcomes) == len(ran)
    assert ran[-1] == max(epochs) == EpochGuard(tmp_path).newest()


# --- over the wire ------------------------------------------------------------------------------------------


def _agent_stub(
    lab: labs.Lab, node: str, cert: Path, key: Path
) -> tuple[grpc.Channel, agent_pb2_grpc.AgentServiceStub]:
    entry = lab.node(node)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(Path(entry["state_dir"]) / "server.crt").read_bytes(),  # pinned: the agent's own
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    channel = grpc.secure_channel(
        entry["agent_address"], credentials, options=[("grpc.ssl_target_name_override", node)]
    )
    return channel, agent_pb2_grpc.AgentServiceStub(channel)


def _discrepancies(client: Client) -> list[tuple[str, str, str]]:
    diff = client.check_membership(timeout=10).diff
    return [
        (
            pb.DiscrepancyKind.Name(x.kind).removeprefix("DISCREPANCY_KIND_"),
            pb.Source.Name(x.source).removeprefix("SOURCE_"),
            x.node,
        )
        for x in diff.discrepancies
    ]


def test_apply_step_over_mutual_tls(tmp_path: Path) -> None:
    lab = labs.up(tmp_path / "lab", 3)
    try:
        coordinator = lab.dir / "coordinator"
        channel, agent = _agent_stub(lab, "n1", coordinator / "server.crt", coordinator / "server.key")
        with channel, Client(lab.endpoint) as client:
            n3 = lab.node("n3")
            removed = agent.ApplyStep(step(epoch=7, remove_truststore_record="n3"), timeout=10)
            assert removed.changed
            assert _discrepancies(client) == [("MISSING", "TRUSTSTORE", "n1")]

            record = agent_pb2.TruststoreRecord(
                name="n3", address=n3["address"], certificate_pem=(Path(n3["state_dir"]) / "server.crt").read_text()
            )
            assert agent.ApplyStep(step(epoch=7, ensure_truststore_record=record), timeout=10).changed
            assert not agent.ApplyStep(step(epoch=7, ensure_truststore_record=record), timeout=10).changed
            assert _discrepancies(client) == []

            with pytest.raises(grpc.RpcError) as stale:
                agent.ApplyStep(step(epoch=6, remove_truststore_record="n3"), timeout=10)
            assert stale.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            status = rpc_status.from_call(stale.value)  # type: ignore[arg-type]
            assert status is not None
            reasons = []
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reasons.append(info.reason)
            assert reasons == ["STALE_EPOCH"]
            assert _discrepancies(client) == []

            with pytest.raises(grpc.RpcError) as malformed:
                agent.ApplyStep(step(epoch=7), timeout=10)
            assert malformed.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        operator = lab.dir / "operator"
        channel, as_operator = _agent_stub(lab, "n1", operator / "operator.crt", operator / "operator.key")
        with channel, pytest.raises(grpc.RpcError) as refused:
            as_operator.ApplyStep(step(epoch=8, remove_truststore_record="n3"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE  # no handshake
        assert (Path(lab.node("n1")["state_dir"]) / "truststore" / "n3.yaml").exists()
        assert (Path(lab.node("n1")["state_dir"]) / EPOCH_FILE).read_text() == "7\n"
    finally:
        labs.down(lab.dir)
