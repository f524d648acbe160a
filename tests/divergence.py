"""Making a lab's sources disagree, for real, with the same writers the agents' backends use.

Each function models what the real system leaves behind in one situation (docs/scenarios.md); the
scenario tests name the situation and the discrepancies it must produce.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from coordinator.agent.members_table import delete_member, upsert_member
from coordinator.agent.raft_files import write_raft_config
from coordinator.agent.truststore import remove_truststore_entry, write_truststore_entry
from coordinator.core.model import Role
from coordinator.lab.lab import Lab
from coordinator.pki import make_identity

RaftEntry = tuple[int, str, Role]


@dataclass(frozen=True)
class Snapshot:
    directory: Path


def members_table(lab: Lab) -> Path:
    return Path(lab.document["sources"]["members_table"])


def raft_config_path(lab: Lab) -> Path:
    return Path(lab.document["sources"]["raft_config"])


def state_dir(lab: Lab, node: str) -> Path:
    return Path(lab.node(node)["state_dir"])


def truststore(lab: Lab, node: str) -> Path:
    return state_dir(lab, node) / "truststore"


def raft_entries(lab: Lab) -> list[RaftEntry]:
    import yaml

    document = yaml.safe_load(raft_config_path(lab).read_text())
    return [(item["ID"], item["Address"], Role((item["Role"] or 0) + 1)) for item in document]


def set_raft(lab: Lab, entries: list[RaftEntry], *, caches: list[str] | None = None) -> None:
    """Writes the authoritative Raft configuration and, as the engine would within a tick, the cluster.yaml
    of the nodes in caches (all nodes when None)."""
    write_raft_config(raft_config_path(lab), entries)
    for node in [n["name"] for n in lab.document["nodes"]] if caches is None else caches:
        write_raft_config(state_dir(lab, node) / "database" / "cluster.yaml", entries)


def new_member(name: str, address: str) -> tuple[str, str, str]:
    """A member that does not exist yet: (name, address, certificate PEM)."""
    return name, address, make_identity(name).certificate_pem.decode()


def add_row(lab: Lab, name: str, address: str, certificate: str, role_text: str) -> None:
    upsert_member(members_table(lab), name, address, certificate, role_text)


def delete_row(lab: Lab, name: str) -> None:
    delete_member(members_table(lab), name)


def trust(lab: Lab, node: str, name: str, address: str, certificate: str) -> None:
    write_truststore_entry(truststore(lab, node), name, address, certificate)


def distrust(lab: Lab, node: str, name: str) -> None:
    remove_truststore_entry(truststore(lab, node), name)


def age(path: Path, seconds: float) -> None:
    """Makes a file look last written `seconds` ago."""
    stat = path.stat()
    os.utime(path, (stat.st_atime - seconds, stat.st_mtime - seconds))


def snapshot(lab: Lab, into: Path) -> Snapshot:
    into.mkdir(parents=True)
    shutil.copy2(members_table(lab), into / "members.db")
    shutil.copy2(raft_config_path(lab), into / "raft.yaml")
    for node in lab.document["nodes"]:
        for part in ("truststore", "database"):
            shutil.copytree(Path(node["state_dir"]) / part, into / node["name"] / part)
    return Snapshot(into)


def restore(lab: Lab, saved: Snapshot) -> None:
    # The agents keep the members table open: restore its rows in place rather than replacing the file.
    with sqlite3.connect(members_table(lab)) as connection:
        connection.execute("ATTACH DATABASE ? AS saved", (str(saved.directory / "members.db"),))
        connection.execute("DELETE FROM core_cluster_members")
        connection.execute("INSERT INTO core_cluster_members SELECT * FROM saved.core_cluster_members")
    connection.close()
    shutil.copy2(saved.directory / "raft.yaml", raft_config_path(lab))
    for node in lab.document["nodes"]:
        for part in ("truststore", "database"):
            target = Path(node["state_dir"]) / part
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(saved.directory / node["name"] / part, target)
