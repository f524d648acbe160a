"""A real dqlite cluster of the project's test node, laid out as a microcluster would keep it: the lab's `dqlite`
backend and the dqlite tests both start theirs here.

Each member has a microcluster-style state directory (server.crt/key, a truststore of every member, go-dqlite's
data in database/). The nodes speak TLS with their own certificates and trust the certificates in their own
truststore, re-read when it changes, as microcluster runs dqlite: a record written there admits a joiner from the
next handshake on, a record removed refuses its member. `core_cluster_members` lives in a dqlite database, with
one row per member.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator import pki
from coordinator.agent.dqlite_sources import ROLES
from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.truststore import write_truststore_entry
from coordinator.dqlite import Role, connect_leader
from coordinator.lab.dqlite_nodes import DqliteNode, NodeTls, start_node, stop_cluster, wait_ready

DATABASE = "memberguard"
READY_TIMEOUT = 20.0
# go-dqlite scales Raft's heartbeat and election timeouts from the latency hint: three voters form in ~0.15 s
# instead of ~2 s, and a new leader is elected quickly after a kill. A node left without quorum would spend the
# default 5 s of its hand-over looking for a leader when it is stopped.
NODE_ARGS = ("--network-latency", "5ms", "--handover-timeout", "1s")

# microcluster's members table (docs/design.md, "Backends").
MEMBERS_TABLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS core_cluster_members (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL,
    certificate TEXT NOT NULL UNIQUE,
    schema_internal INTEGER NOT NULL,
    schema_external INTEGER NOT NULL,
    heartbeat DATETIME NOT NULL,
    role TEXT NOT NULL,
    api_extensions TEXT NOT NULL DEFAULT '[]'
)
"""


@dataclass(frozen=True)
class MemberSpec:
    """A member to start: its name, dqlite address and state directory."""

    name: str
    address: str
    state_dir: Path


def lay_out_members(specs: Sequence[MemberSpec]) -> dict[str, NodeTls]:
    """Writes each member's identity and a truststore of every member, which its node trusts."""
    identities = {spec.name: pki.make_identity(spec.name) for spec in specs}
    tls = {}
    for spec in specs:
        cert, key = pki.write_identity(spec.state_dir, identities[spec.name])
        for peer in specs:
            pem = identities[peer.name].certificate_pem.decode()
            write_truststore_entry(spec.state_dir / "truststore", peer.name, peer.address, pem)
        tls[spec.name] = NodeTls(cert, key, spec.state_dir / "truststore")
    return tls


def start_members(
    specs: Sequence[MemberSpec],
    tls: dict[str, NodeTls],
    *,
    roles_interval: float = 1.0,
    join: Sequence[str] = (),
) -> list[DqliteNode]:
    """Starts the members one at a time (joins started together collide on Raft's one-change-at-a-time rule and
    retry a second later): without `join` the first bootstraps a new cluster and the others join it; with it,
    all join the cluster at those addresses. Stops what it started if any node fails to start."""
    nodes: list[DqliteNode] = []
    try:
        for spec in specs:
            node = start_node(
                name=spec.name,
                address=spec.address,
                data_dir=spec.state_dir / "database",
                join=join or ([nodes[0].address] if nodes else ()),
                roles_interval=roles_interval,
                tls=tls[spec.name],
                log=spec.state_dir / "node.log",
                extra_args=NODE_ARGS,
            )
            nodes.append(node)
            wait_ready(node, READY_TIMEOUT)
    except BaseException:
        stop_cluster(nodes)
        raise
    return nodes


async def record_members(
    nodes: Sequence[DqliteNode], certificates: dict[str, str], *, timeout: float = 20.0
) -> dict[str, Role]:
    """Waits until every node is in the leader's configuration and min(N, 3) of them vote, then creates
    `core_cluster_members` with one row per member, its role as the leader reports it. Returns the roles by
    address."""
    first = nodes[0]
    assert first.tls is not None
    context = client_ssl_context(first.tls.cert, first.tls.key, first.tls.truststore)
    addresses = [node.address for node in nodes]
    deadline = time.monotonic() + timeout
    async with await connect_leader(addresses, timeout=timeout, ssl=context) as connection:
        while True:
            roles = {info.address: info.role for info in await connection.cluster()}
            voting = sum(role is Role.VOTER for role in roles.values())
            if set(addresses) <= roles.keys() and voting >= min(len(nodes), 3):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not form within {timeout:g} s: {roles}")
            await asyncio.sleep(0.05)
        await connection.open(DATABASE)
        await connection.exec(MEMBERS_TABLE_SCHEMA)
        for node in nodes:
            await connection.exec(
                "INSERT INTO core_cluster_members"
                " (name, address, certificate, schema_internal, schema_external, heartbeat, role)"
                " VALUES (?, ?, ?, 0, 0, CURRENT_TIMESTAMP, ?)",
                (node.name, node.address, certificates[node.name], ROLES[roles[node.address]].text),
            )
    return roles
