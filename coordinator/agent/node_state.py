"""Lays out a consistent node of the `local` backend, as microcluster would leave it after joining."""

from __future__ import annotations

from pathlib import Path

from coordinator import pki
from coordinator.agent.raft_files import write_node_info, write_raft_config
from coordinator.agent.truststore import write_truststore_entry
from coordinator.core.model import Role

# (name, address, certificate PEM, dqlite node ID, role)
LaidOutMember = tuple[str, str, str, int, Role]


def lay_out_node(
    state_dir: Path,
    identity: pki.Identity,
    name: str,
    address: str,
    node_id: int,
    members: list[LaidOutMember],
) -> None:
    """Writes server.crt/key, a truststore entry per member, and database/info.yaml and cluster.yaml.

    The node must be among members (its role comes from there). Existing truststore entries of other names
    are left alone: on a fresh directory the result is consistent.
    """
    role = next((m_role for m_name, _, _, _, m_role in members if m_name == name), None)
    if role is None:
        raise ValueError(f"{name} is not among the members it should be laid out with")
    pki.write_identity(state_dir, identity)
    for m_name, m_address, m_certificate, _, _ in members:
        write_truststore_entry(state_dir / "truststore", m_name, m_address, m_certificate)
    database = state_dir / "database"
    write_node_info(database / "info.yaml", node_id, address, role)
    write_raft_config(
        database / "cluster.yaml", [(m_id, m_address, m_role) for _, m_address, _, m_id, m_role in members]
    )
