"""canonical/microcluster's own daemon, three of them on loopback: what a real microcluster writes, as memberguard
reads it (the members table through `microctl cluster list`, the truststore and dqlite's files in each state dir)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from coordinator.lab import microcluster

pytestmark = pytest.mark.microcluster

# With three members dqlite promotes all of them to voter, a heartbeat or two after the last join.
ROLES_TIMEOUT = 30.0


def _all_voters(cluster: microcluster.Cluster) -> list[microcluster.ListedMember]:
    deadline = time.monotonic() + ROLES_TIMEOUT
    while True:
        listed = cluster.cluster_list()
        if [row.role for row in listed] == ["voter"] * len(cluster.members) or time.monotonic() > deadline:
            return listed
        time.sleep(0.5)


def test_three_members_agree_on_the_members_table_truststore_and_raft(tmp_path: Path) -> None:
    with microcluster.running(tmp_path, 3) as cluster:
        expected = [microcluster.ListedMember(m.name, m.address, "voter", "ONLINE") for m in cluster.members]
        assert _all_voters(cluster) == expected
        # Every member answers from the same replicated table.
        for member in cluster.members[1:]:
            assert cluster.cluster_list(member) == expected

        addresses = {member.name: member.address for member in cluster.members}
        for member in cluster.members:
            truststore = member.state_dir / "truststore"
            records = {path.stem: yaml.safe_load(path.read_text()) for path in truststore.glob("*.yaml")}
            assert {name: (record["name"], record["address"]) for name, record in records.items()} == {
                name: (name, address) for name, address in addresses.items()
            }
            assert all("BEGIN CERTIFICATE" in record["certificate"] for record in records.values())

            info = yaml.safe_load((member.state_dir / "database" / "info.yaml").read_text())
            assert info["Address"] == member.address
            # go-dqlite rewrites cluster.yaml, its cache of the configuration, on its own schedule: a member's may
            # still lag the last join for a moment.
            deadline = time.monotonic() + ROLES_TIMEOUT
            while True:
                raft = yaml.safe_load((member.state_dir / "database" / "cluster.yaml").read_text())
                if sorted(node["Address"] for node in raft) == sorted(addresses.values()):
                    break
                assert time.monotonic() < deadline, f"{member.name}'s cluster.yaml: {raft}"
                time.sleep(0.2)
            assert info["ID"] in {node["ID"] for node in raft}

        pids = [cluster.pid(member) for member in cluster.members]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
