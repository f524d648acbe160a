"""The `microcluster` backend's readers against canonical/microcluster's own microd: three members on loopback, each
read by the readers an agent configured with `"backend": "microcluster"` builds, compared with what `microctl` and
the state directories say, diffed, and then diverged for real.

One cluster serves the module, and the tests run in file order: the read-only ones first, then the truststore drift
that microcluster's heartbeat repairs, then the deleted row that it does not, and last the cluster stopped.
Each test makes its own readers and closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import yaml

from coordinator import pki
from coordinator.agent.dqlite_sources import close_readers
from coordinator.agent.microcluster_dial import DaemonConfig, MemberDial, upgrade
from coordinator.agent.microcluster_sources import HEARTBEAT_INTERVAL
from coordinator.agent.service import AgentConfig
from coordinator.core.diff import compute_diff
from coordinator.core.model import (
    ClusterView,
    DiscrepancyKind,
    MembershipDiff,
    NodeObservation,
    NodeView,
    Role,
    Severity,
    Source,
    SourceReport,
)
from coordinator.dqlite import DqliteError
from coordinator.lab import microcluster
from tests.dqlite_cluster import eventually
from tests.microcluster_members import copy_member, heartbeat_after

pytestmark = pytest.mark.microcluster

# The readers' own timeout (microcluster_backend's default); a read may overrun it by the loop's reaction time.
TIMEOUT = 1.0
SLACK = 0.15
ROLES_TIMEOUT = 30.0

Reports = dict[Source, SourceReport]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[microcluster.Cluster]:
    with microcluster.running(tmp_path_factory.mktemp("microcluster"), 3) as running:
        # `running` returns once no member is PENDING; dqlite makes the joiners voters a heartbeat or two later.
        deadline = time.monotonic() + ROLES_TIMEOUT
        while [row.role for row in running.cluster_list()] != ["voter"] * 3:
            assert time.monotonic() < deadline, running.cluster_list()
            time.sleep(0.5)
        yield running


def agent_config(state_dir: Path, name: str, directory: Path, **extra: object) -> AgentConfig:
    """The configuration an agent of this member loads, written to and loaded from a file as the agent does."""
    path = directory / f"{name}-agent.json"
    settings = {
        "name": name,
        "listen": "127.0.0.1:0",
        "state_dir": str(state_dir),
        "backend": "microcluster",
        "trusted_coordinators": str(directory / "coordinators.pem"),
        **extra,
    }
    path.write_text(json.dumps(settings))
    return AgentConfig.load(path)


@asynccontextmanager
async def agents(cluster: microcluster.Cluster, directory: Path) -> AsyncIterator[dict[str, AgentConfig]]:
    """Every member's agent configuration, with the lab's heartbeat; their connections closed afterwards."""
    configs = {
        member.name: agent_config(
            member.state_dir, member.name, directory, role_adjustment_interval=microcluster.HEARTBEAT
        )
        for member in cluster.members
    }
    try:
        yield configs
    finally:
        for config in configs.values():
            await close_readers(config.readers)


async def read_all(config: AgentConfig) -> Reports:
    reports = await asyncio.gather(*(reader.read(include_certificates=False) for reader in config.readers))
    return {report.source: report for report in reports}


async def node_view(config: AgentConfig) -> NodeView:
    """The view the agent serves: its reports, and the certificate it serves, the member's server.crt."""
    served = pki.fingerprint((config.state_dir / "server.crt").read_bytes())
    reports = tuple((await read_all(config)).values())
    return NodeView(config.name, config.backend, served, reports, config.role_adjustment_interval)


async def diff_of(cluster: microcluster.Cluster, configs: dict[str, AgentConfig]) -> MembershipDiff:
    observations = [
        NodeObservation(member.name, member.address, view=await node_view(configs[member.name]))
        for member in cluster.members
    ]
    return compute_diff(ClusterView(tuple(observations), now=time.time()))


def listed(cluster: microcluster.Cluster, member: microcluster.Member) -> set[tuple[str, str, str, str]]:
    """`microctl cluster list` on MEMBER: (name, address, certificate fingerprint, role text) per member."""
    rows = json.loads(cluster.microctl(member, "cluster", "list", "--format", "json"))
    return {(row["name"], row["address"], pki.fingerprint(row["certificate"]), row["role"]) for row in rows}


def truststore_files(member: microcluster.Member) -> set[tuple[str, str, str]]:
    files = []
    for path in (member.state_dir / "truststore").glob("*.yaml"):
        try:
            files.append(yaml.safe_load(path.read_text()))
        except FileNotFoundError:
            continue  # the heartbeat deleted it between the listing and the read: it is not there
    return {(record["name"], record["address"], pki.fingerprint(record["certificate"])) for record in files}


def trusted_names(member: microcluster.Member) -> set[str]:
    return {name for name, _, _ in truststore_files(member)}


def raft_file(path: Path) -> set[tuple[int, str, Role]]:
    document = yaml.safe_load(path.read_text())
    nodes = document if isinstance(document, list) else [document]
    roles = {0: Role.VOTER, 1: Role.STAND_BY, 2: Role.SPARE}
    return {(node["ID"], node["Address"], roles[node["Role"]]) for node in nodes}


def raft_facts(report: SourceReport) -> set[tuple[int, str, Role | None]]:
    assert not report.error, report.error
    return {(record.node_id, record.address, record.role) for record in report.records}


def kinds(diff: MembershipDiff) -> list[tuple[str, str, str, str, str]]:
    return [
        (d.kind.name, d.severity.name, d.source.name if d.source else "", d.node, d.member.name if d.member else "")
        for d in diff.discrepancies
    ]


def by_role(cluster: microcluster.Cluster, reports: Reports) -> tuple[microcluster.Member, list[microcluster.Member]]:
    """The leader, and the other members, as the leader's CLUSTER names them."""
    leader = reports[Source.RAFT_CONFIG].leader_address
    assert leader, reports[Source.RAFT_CONFIG]
    return (
        next(member for member in cluster.members if member.address == leader),
        [member for member in cluster.members if member.address != leader],
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- what the readers report ----------------------------------------------------------------------------------------


async def test_each_member_reads_what_microctl_and_its_files_say(cluster: microcluster.Cluster, tmp_path: Path) -> None:
    infos = {raft_file(member.state_dir / "database" / "info.yaml").pop() for member in cluster.members}
    async with agents(cluster, tmp_path) as configs:
        leaders = set()
        for member in cluster.members:
            config = configs[member.name]
            assert config.role_adjustment_interval == microcluster.HEARTBEAT
            assert MemberDial(member.state_dir).daemon_config() == DaemonConfig(member.name, member.address)
            database = member.state_dir / "database"
            # The member rewrites its cluster.yaml on its own heartbeat tick, which may fall during the read.
            cache_before = raft_file(database / "cluster.yaml")
            start = time.monotonic()
            reports = await read_all(config)
            assert time.monotonic() - start < TIMEOUT
            cache_after = raft_file(database / "cluster.yaml")

            table = reports[Source.MEMBERS_TABLE]
            assert not table.error and not table.invalid_entries
            assert {(r.name, r.address, r.certificate_fingerprint, r.role_text) for r in table.records} == listed(
                cluster, member
            )
            assert {r.role for r in table.records} == {Role.VOTER}

            trust = reports[Source.TRUSTSTORE]
            assert not trust.error and not trust.invalid_entries
            held = {(r.name, r.address, r.certificate_fingerprint) for r in trust.records}
            assert held == truststore_files(member) == {(n, a, f) for n, a, f, _ in listed(cluster, member)}

            config_facts = raft_facts(reports[Source.RAFT_CONFIG])
            assert config_facts == infos and {role for _, _, role in config_facts} == {Role.VOTER}
            leaders.add(reports[Source.RAFT_CONFIG].leader_address)
            assert raft_facts(reports[Source.RAFT_NODE_VIEW]) == config_facts
            assert raft_facts(reports[Source.RAFT_CACHE]) in (cache_before, cache_after)
            assert raft_facts(reports[Source.NODE_INFO]) == raft_file(database / "info.yaml")
        assert len(leaders) == 1 and leaders <= {member.address for member in cluster.members}


def test_the_heartbeat_interval_defaults_to_microds(tmp_path: Path) -> None:
    """An agent told nothing assumes microd's own default, which its --help states."""
    usage = subprocess.run([str(microcluster.MICROD), "--help"], capture_output=True, text=True, check=True).stdout
    flag = next(line for line in usage.splitlines() if "--heartbeat" in line)
    assert f"(default {HEARTBEAT_INTERVAL:g}s)" in flag
    assert agent_config(tmp_path, "c1", tmp_path).role_adjustment_interval == HEARTBEAT_INTERVAL


async def test_the_three_members_views_diff_clean(cluster: microcluster.Cluster, tmp_path: Path) -> None:
    """Clean, once every member's cluster.yaml has caught up with the roles dqlite gave the joiners (each member
    rewrites its own on its heartbeat tick); until then the lag is only INFO."""
    async with agents(cluster, tmp_path) as configs:
        diffs: list[MembershipDiff] = []

        async def clean() -> bool:
            diffs.append(await diff_of(cluster, configs))
            assert diffs[-1].consistent, kinds(diffs[-1])
            return not diffs[-1].discrepancies

        await eventually(clean, within=3 * microcluster.HEARTBEAT)
    lagging = {d.summary for diff in diffs for d in diff.discrepancies}
    print(f"\nclean after {len(diffs)} diffs; the lag seen before: {sorted(lagging)}")
    assert {d.kind for diff in diffs for d in diff.discrepancies} <= {DiscrepancyKind.VIEW_DIFFERS}
    members = diffs[-1].members
    assert {(m.name, m.address, m.role) for m in members} == {(c.name, c.address, Role.VOTER) for c in cluster.members}


async def test_upgrades_given_up_at_any_moment_never_take_a_daemon_down(cluster: microcluster.Cluster) -> None:
    """go-dqlite v3.0.4 panics, and microd with it, when it writes its 101 to a connection the client has already
    closed. Dials cut short by tiny timeouts and by cancellation, at whatever moment they are at, leave every
    daemon up: a stream given up on before its answer lingers until the answer arrives (microcluster_dial.py)."""
    member = MemberDial(cluster.members[0].state_dir)
    context = member.context()
    rng = random.Random(515)
    for attempt in range(120):
        address = cluster.members[attempt % 3].address
        task = asyncio.create_task(upgrade(address, rng.uniform(0.0001, 0.004), context))
        if attempt % 2:
            await asyncio.sleep(rng.uniform(0, 0.003))
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, DqliteError):
            connection = await task
            await connection.close()
    await asyncio.sleep(0.5)  # the daemons answered the lingering streams meanwhile
    for m in cluster.members:
        assert cluster_process_alive(cluster, m), f"{m.name}'s microd died: {m.log_tail()[-600:]}"
    assert [row.role for row in cluster.cluster_list()] == ["voter"] * 3


def cluster_process_alive(cluster: microcluster.Cluster, member: microcluster.Member) -> bool:
    try:
        os.kill(cluster.pid(member), 0)
    except ProcessLookupError:
        return False
    return True


# --- bad input: each a report error naming the path or the member, never an exception -------------------------------


async def read_directory(state_dir: Path, directory: Path) -> Reports:
    config = agent_config(state_dir, "c1", directory)
    try:
        start = time.monotonic()
        reports = await read_all(config)
        assert time.monotonic() - start < TIMEOUT + SLACK
        return reports
    finally:
        await close_readers(config.readers)


NETWORK = (Source.MEMBERS_TABLE, Source.RAFT_CONFIG, Source.RAFT_NODE_VIEW)
REFUSED = f"[Errno {errno.ECONNREFUSED}]"


async def test_a_directory_that_is_not_a_state_dir(tmp_path: Path) -> None:
    directory = tmp_path / "not-a-state-dir"
    directory.mkdir()
    (directory / "notes.txt").write_text("not microcluster's")
    reports = await read_directory(directory, tmp_path)
    for source in NETWORK:
        assert str(directory / "daemon.yaml") in reports[source].error and not reports[source].records
    assert str(directory / "truststore") in reports[Source.TRUSTSTORE].error
    assert str(directory / "database" / "cluster.yaml") in reports[Source.RAFT_CACHE].error
    assert str(directory / "database" / "info.yaml") in reports[Source.NODE_INFO].error


async def test_the_state_dir_of_an_uninitialised_daemon(tmp_path: Path) -> None:
    with microcluster.uninitialised(tmp_path / "fresh", tmp_path / "fresh.log") as state_dir:
        reports = await read_directory(state_dir, tmp_path)
    for source in NETWORK:
        assert str(state_dir / "daemon.yaml") in reports[source].error
        assert "not an initialised member" in reports[source].error
    assert str(state_dir / "database" / "info.yaml") in reports[Source.NODE_INFO].error
    # microd made the directory, and nobody is trusted yet: an empty truststore, not an unreadable one.
    trust = reports[Source.TRUSTSTORE]
    assert not trust.error and not trust.records and not trust.invalid_entries


async def test_a_member_whose_daemon_is_down(cluster: microcluster.Cluster, tmp_path: Path) -> None:
    """Its own dqlite view names the address nothing answers at; the table is still read, through the members its
    truststore and cluster.yaml name, which trust its certificate."""
    member = cluster.members[0]
    copy = copy_member(member, tmp_path)
    down = f"127.0.0.1:{free_port()}"
    (copy / "daemon.yaml").write_text((copy / "daemon.yaml").read_text().replace(member.address, down))
    reports = await read_directory(copy, tmp_path)
    own = reports[Source.RAFT_NODE_VIEW]
    assert down in own.error and REFUSED in own.error and not own.records
    table = reports[Source.MEMBERS_TABLE]
    assert {(r.name, r.address, r.certificate_fingerprint, r.role_text) for r in table.records} == listed(
        cluster, member
    )


async def test_a_cluster_certificate_that_does_not_match(cluster: microcluster.Cluster, tmp_path: Path) -> None:
    member = cluster.members[0]
    copy = copy_member(member, tmp_path)
    (copy / "cluster.crt").write_bytes(pki.make_identity(member.name).certificate_pem)
    reports = await read_directory(copy, tmp_path)
    for source in NETWORK:
        assert "certificate verify failed" in reports[source].error and member.address in reports[source].error
    # Every member was tried, and each failed the same way: nothing else was wrong.
    for other in cluster.members:
        assert f"{other.address}: Unreachable" in reports[Source.MEMBERS_TABLE].error


async def test_a_member_the_daemons_do_not_trust_is_refused_the_upgrade(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    """TLS succeeds (the server holds the cluster's key), but no truststore holds this certificate: microd answers
    the upgrade with 403."""
    member = cluster.members[0]
    copy = copy_member(member, tmp_path)
    pki.write_identity(copy, pki.make_identity(member.name))
    reports = await read_directory(copy, tmp_path)
    for source in NETWORK:
        error = reports[source].error
        assert f"{member.address} refused the dqlite upgrade: HTTP 403 Forbidden" in error, error


# --- real divergences, and what microcluster's heartbeat does next --------------------------------------------------


async def test_a_removed_truststore_record_is_missing_until_the_heartbeat_restores_it(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    async with agents(cluster, tmp_path) as configs:
        _, (holder, removed) = by_role(cluster, await read_all(configs[cluster.members[0].name]))
        record = holder.state_dir / "truststore" / f"{removed.name}.yaml"
        # A loaded machine may read the diff after the next heartbeat already put the record back: try again then.
        for _ in range(3):
            heartbeat_after(holder)
            record.unlink()
            gone = time.monotonic()
            diff = await diff_of(cluster, configs)
            if not record.exists():
                break
        assert not record.exists(), "the heartbeat came back before the diff was read, three times"
        assert kinds(diff) == [("MISSING", "BLOCKING", "TRUSTSTORE", holder.name, removed.name)]

        async def restored() -> bool:
            return record.exists()

        back = await eventually(restored, within=3 * microcluster.HEARTBEAT)
        heartbeats = (time.monotonic() - gone) / microcluster.HEARTBEAT
        print(f"\n{removed.name}.yaml removed on {holder.name} was back after {back:.2f}s, {heartbeats:.1f} heartbeats")
        assert heartbeats <= 3
        assert (await diff_of(cluster, configs)).discrepancies == ()


async def test_a_deleted_row_is_missing_and_the_heartbeat_spreads_it_to_the_truststores(
    cluster: microcluster.Cluster, tmp_path: Path
) -> None:
    """microcluster's #515 scenario: a row deleted by hand while the member is still in Raft. The heartbeat
    replaces the truststores from the table, so the member is dropped from every truststore the leader reaches,
    but not from its own, which the leader no longer heartbeats; the table and Raft stay apart."""
    async with agents(cluster, tmp_path) as configs:
        leader, (victim, other) = by_role(cluster, await read_all(configs[cluster.members[0].name]))
        heartbeat_after(leader)
        cluster.microctl(leader, "sql", f"DELETE FROM core_cluster_members WHERE name='{victim.name}'")
        deleted = time.monotonic()
        diff = await diff_of(cluster, configs)
        missing = [d for d in diff.discrepancies if d.kind is DiscrepancyKind.MISSING]
        assert [(d.source, d.severity, d.member and d.member.name) for d in missing] == [
            (Source.MEMBERS_TABLE, Severity.BLOCKING, victim.name)
        ], kinds(diff)

        async def dropped() -> bool:
            return all(victim.name not in trusted_names(member) for member in (leader, other))

        await eventually(dropped, within=4 * microcluster.HEARTBEAT)
        heartbeats = (time.monotonic() - deleted) / microcluster.HEARTBEAT
        print(f"\n{victim.name} left {leader.name}'s and {other.name}'s truststores within {heartbeats:.1f} heartbeats")
        assert victim.name in trusted_names(victim)

        after = await diff_of(cluster, configs)
        print("the diff once the truststores followed the table:", kinds(after))
        assert ("MISSING", "BLOCKING", "MEMBERS_TABLE", "", victim.name) in kinds(after)

        try:
            cluster.microctl(leader, "tokens", "add", "c9")
            refused = ""
        except microcluster.MicroclusterError as exc:
            refused = str(exc).splitlines()[0]
        print(f"microcluster's `tokens add` on the same state: {refused or 'issued'}")
        assert "consistency" in refused.lower()


async def test_a_stopped_cluster_is_named_member_by_member(cluster: microcluster.Cluster, tmp_path: Path) -> None:
    cluster.stop()
    reports = await read_directory(cluster.members[0].state_dir, tmp_path)
    for member in cluster.members:
        assert f"{member.address}: Unreachable" in reports[Source.MEMBERS_TABLE].error
    own = reports[Source.RAFT_NODE_VIEW].error
    assert cluster.members[0].address in own and REFUSED in own
    # The files stay readable: the member's truststore still says whom it trusted last.
    held = {(r.name, r.address, r.certificate_fingerprint) for r in reports[Source.TRUSTSTORE].records}
    assert held == truststore_files(cluster.members[0])
