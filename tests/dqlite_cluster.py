"""Real TLS clusters of memberguard's Go dqlite test node, laid out as the `dqlite` backend's agents read them.

Plain functions: test modules register the fixtures they need. Each member has a microcluster-style state
directory (server.crt/key, a truststore of every member, go-dqlite's data in database/); each node trusts the
certificates in its own truststore, and an agent connects as its own member, trusting the same.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest

from coordinator import pki
from coordinator.agent.dqlite_sources import SslFactory, dqlite_backend
from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.sources import SourceReader
from coordinator.core.model import Source
from coordinator.lab.dqlite_cluster import (
    DATABASE,
    READY_TIMEOUT,
    MemberSpec,
    lay_out_members,
    record_members,
    start_members,
)
from coordinator.lab.dqlite_nodes import DqliteNode, NodeTls, node_binary, stop_cluster, stop_node
from coordinator.lab.ports import loopback_addresses

NAMES = ("n1", "n2", "n3")


@dataclass
class Member:
    name: str
    state_dir: Path
    identity: pki.Identity
    tls: NodeTls
    node: DqliteNode

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def node_id(self) -> int:
        return self.node.node_id

    def tls_context(self) -> ssl.SSLContext:
        """A context as this member's agent dials with: its own certificate, its truststore as it is now."""
        return client_ssl_context(self.tls.cert, self.tls.key, self.tls.truststore)

    def readers(
        self, *, timeout: float = 1.0, tls: bool = True, context: SslFactory | None = None
    ) -> dict[Source, SourceReader]:
        """This member's agent's readers, by source. `context` replaces the member's own TLS contexts; with
        tls=False they dial in plain TCP."""
        readers = dqlite_backend(
            state_dir=self.state_dir,
            data_dir=self.data_dir,
            address=self.address,
            database=DATABASE,
            ssl=(context or self.tls_context) if tls else None,
            timeout=timeout,
        )
        return {reader.source: reader for reader in readers}


@dataclass
class Cluster:
    root: Path
    members: dict[str, Member]

    @property
    def addresses(self) -> list[str]:
        return [member.address for member in self.members.values()]

    def by_address(self, address: str) -> Member:
        return next(member for member in self.members.values() if member.address == address)

    def stop(self) -> None:
        stop_cluster([member.node for member in self.members.values()])


def start_cluster(root: Path, names: tuple[str, ...] = NAMES) -> Cluster:
    """The package's cluster (coordinator/lab/dqlite_cluster.py), as the lab starts it. Fails the test with `make go`
    if the node is not built."""
    try:
        node_binary()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    specs = [MemberSpec(n, a, root / n) for n, a in zip(names, loopback_addresses(len(names)), strict=True)]
    tls = lay_out_members(specs)
    nodes = start_members(specs, tls)
    members = {
        spec.name: Member(
            spec.name, spec.state_dir, pki.read_identity(tls[spec.name].cert, tls[spec.name].key), tls[spec.name], node
        )
        for spec, node in zip(specs, nodes, strict=True)
    }
    return Cluster(root, members)


def kill(member: Member) -> None:
    """SIGKILL: no hand-over, the node just vanishes."""
    member.node.process.kill()
    stop_node(member.node)  # reaps it


def hang(member: Member) -> None:
    """SIGSTOP, and wait until every thread has stopped: the node keeps its sockets but never answers."""
    pid = member.node.process.pid
    member.node.process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5
    # The field after the parenthesised command name is the thread's state; "T" is stopped by a signal.
    while any(Path(stat).read_text().rpartition(")")[2].split()[0] != "T" for stat in glob(f"/proc/{pid}/task/*/stat")):
        assert time.monotonic() < deadline, f"{member.name} did not stop"
        time.sleep(0.005)


def resume(member: Member) -> None:
    member.node.process.send_signal(signal.SIGCONT)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> float:
    """Polls until check() holds; returns how long that took."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, f"condition not reached within {within}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def prepare(cluster: Cluster) -> None:
    """Waits for the cluster to form, then creates `core_cluster_members` with a row per member."""
    nodes = [member.node for member in cluster.members.values()]
    certificates = {name: member.identity.certificate_pem.decode() for name, member in cluster.members.items()}
    await record_members(nodes, certificates, timeout=READY_TIMEOUT)
