"""Trust follows the truststore: the test node and the Python client trust the certificates in a member's
truststore directory as it is at each handshake, as microcluster runs dqlite. A record written there admits a
joiner without a restart; a record removed refuses its member from the next handshake on, while connections
already open go on (certificates are checked at the handshake only).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from coordinator import pki
from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.truststore import remove_truststore_entry, trusted_certificates, write_truststore_entry
from coordinator.dqlite import ConnectionClosed, NodeInfo, RemoteProtocolError, connect
from coordinator.lab.dqlite_cluster import NODE_ARGS, READY_TIMEOUT, MemberSpec, lay_out_members, start_members
from coordinator.lab.dqlite_nodes import DqliteNode, NodeError, NodeTls, start_node, stop_cluster, wait_ready
from coordinator.lab.ports import loopback_addresses

# A trusted joiner is ready in ~0.2 s (it retries every second): not ready after this long means refused.
REFUSED_FOR = 2.5
# What a refused client sees depends on who refuses: its own verification fails the dial; the node's fails the
# first request (with TLS 1.3 the client's handshake is over before the node has checked its certificate).
REFUSED = (ConnectionClosed, RemoteProtocolError)


@pytest.fixture
def started() -> Iterator[list[DqliteNode]]:
    """The nodes a test starts, stopped at its end."""
    nodes: list[DqliteNode] = []
    yield nodes
    stop_cluster(nodes)


def specs(root: Path, *names: str) -> list[MemberSpec]:
    return [MemberSpec(n, a, root / n) for n, a in zip(names, loopback_addresses(len(names)), strict=True)]


def start(spec: MemberSpec, tls: NodeTls, join: Sequence[str] = ()) -> DqliteNode:
    """Starts a node without waiting for it (start_members would fail at once on one that is refused)."""
    return start_node(
        name=spec.name,
        address=spec.address,
        data_dir=spec.state_dir / "database",
        join=join,
        tls=tls,
        log=spec.state_dir / "node.log",
        extra_args=NODE_ARGS,
    )


def trust(holder: MemberSpec, member: MemberSpec) -> None:
    """Writes member's record into holder's truststore, as memberguard's steps do."""
    certificate = (member.state_dir / "server.crt").read_text()
    write_truststore_entry(holder.state_dir / "truststore", member.name, member.address, certificate)


async def cluster_of(address: str, context: ssl.SSLContext) -> list[NodeInfo]:
    """The node's configuration, on a fresh connection."""
    async with await connect(address, timeout=5, ssl=context) as connection:
        return await connection.cluster()


def test_trusted_certificates_are_the_records_certificates(tmp_path: Path) -> None:
    directory = tmp_path / "truststore"
    assert trusted_certificates(directory) == [], "a missing truststore trusts nobody"
    n1, n2 = (pki.make_identity(name).certificate_pem.decode() for name in ("n1", "n2"))
    write_truststore_entry(directory, "n2", "127.0.0.1:2", n2)
    write_truststore_entry(directory, "n1", "127.0.0.1:1", n1)
    (directory / "broken.yaml").write_text("name: [unclosed\n")
    (directory / "no-certificate.yaml").write_text("name: n3\naddress: 127.0.0.1:3\n")
    (directory / "bad-certificate.yaml").write_text("name: n4\naddress: 127.0.0.1:4\ncertificate: nope\n")
    (directory / "list.yaml").write_text("- n5\n")
    (directory / "notes.txt").write_text(n1)
    (directory / "sub.yaml").mkdir()
    assert trusted_certificates(directory) == [n1, n2]


@pytest.mark.dqlite
@pytest.mark.parametrize("refuser", ["member", "joiner"])
async def test_a_joiner_is_admitted_once_its_record_is_written_without_a_restart(
    tmp_path: Path, started: list[DqliteNode], refuser: str
) -> None:
    """One side lacks the other's record: the member refuses the joiner's connections (the node's listen side),
    or the joiner refuses the member it dials (its dial side). Writing the record is all it takes."""
    member, joiner = specs(tmp_path, "n1", "n2")
    tls = lay_out_members([member, joiner])
    holder, missing = (member, joiner) if refuser == "member" else (joiner, member)
    remove_truststore_entry(holder.state_dir / "truststore", missing.name)
    started += start_members([member], tls)
    node = start(joiner, tls["n2"], join=[member.address])
    started.append(node)

    with pytest.raises(NodeError, match="not ready"):
        wait_ready(node, REFUSED_FOR)
    assert node.process.poll() is None, "a refused joiner keeps trying"
    assert "not in the truststore" in (holder.state_dir / "node.log").read_text()

    trust(holder, missing)
    wait_ready(node, READY_TIMEOUT)
    context = client_ssl_context(tls["n1"].cert, tls["n1"].key, tls["n1"].truststore)
    assert {info.address for info in await cluster_of(member.address, context)} == {member.address, joiner.address}


@pytest.mark.dqlite
async def test_a_member_removed_from_a_truststore_is_refused_at_the_next_handshake(
    tmp_path: Path, started: list[DqliteNode]
) -> None:
    """n2's record leaves n1's truststore: a new connection with n2's certificate to n1 is refused, one opened
    before goes on (the node checks certificates at the handshake only); the record back, n2 is accepted again."""
    n1, n2 = specs(tmp_path, "n1", "n2")
    tls = lay_out_members([n1, n2])
    started += start_members([n1, n2], tls)

    def as_n2() -> ssl.SSLContext:
        return client_ssl_context(tls["n2"].cert, tls["n2"].key, tls["n2"].truststore)

    async with await connect(n1.address, timeout=5, ssl=as_n2()) as kept:
        addresses = {n1.address, n2.address}
        assert {info.address for info in await kept.cluster()} == addresses

        remove_truststore_entry(n1.state_dir / "truststore", "n2")
        with pytest.raises(REFUSED):
            await cluster_of(n1.address, as_n2())
        # The node logs why after the handshake has failed: the client may hear of it first.
        deadline = time.monotonic() + 5
        while "not in the truststore" not in (n1.state_dir / "node.log").read_text():
            assert time.monotonic() < deadline, "n1 did not log why it refused n2"
            await asyncio.sleep(0.02)
        assert {info.address for info in await kept.cluster()} == addresses

        trust(n1, n2)
        assert {info.address for info in await cluster_of(n1.address, as_n2())} == addresses


@pytest.mark.dqlite
async def test_the_client_context_trusts_its_truststore_as_it_is_now(tmp_path: Path, started: list[DqliteNode]) -> None:
    """The client presents n1's own certificate, which n1 trusts; what changes is whom the client trusts."""
    [n1] = specs(tmp_path, "n1")
    tls = lay_out_members([n1])["n1"]
    started += start_members([n1], {"n1": tls})
    directory = tmp_path / "client-truststore"

    def attempt() -> ssl.SSLContext:
        return client_ssl_context(tls.cert, tls.key, directory)

    with pytest.raises(ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
        await cluster_of(n1.address, attempt())  # no truststore yet: nobody is trusted
    stranger = pki.make_identity("n1").certificate_pem.decode()  # the right name is not enough
    write_truststore_entry(directory, "n1", n1.address, stranger)
    (directory / "junk.yaml").write_text("certificate: nope\n")
    with pytest.raises(ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
        await cluster_of(n1.address, attempt())

    write_truststore_entry(directory, "n1", n1.address, tls.cert.read_text())
    assert [info.address for info in await cluster_of(n1.address, attempt())] == [n1.address]

    remove_truststore_entry(directory, "n1")
    with pytest.raises(ConnectionClosed, match="CERTIFICATE_VERIFY_FAILED"):
        await cluster_of(n1.address, attempt())


@pytest.mark.dqlite
def test_a_node_without_a_truststore_runs_trusting_nobody_until_one_is_written(
    tmp_path: Path, started: list[DqliteNode]
) -> None:
    """A bootstrapping node talks to itself over TLS to become ready: with no truststore it cannot, and waits
    (rather than exiting) until its own record appears."""
    [n1] = specs(tmp_path, "n1")
    tls = lay_out_members([n1])["n1"]
    remove_truststore_entry(tls.truststore, "n1")
    tls.truststore.rmdir()
    node = start(n1, tls)
    started.append(node)
    with pytest.raises(NodeError, match="not ready"):
        wait_ready(node, REFUSED_FOR)
    assert node.process.poll() is None
    assert "truststore unreadable" in node.log_tail()

    trust(n1, n1)
    wait_ready(node, READY_TIMEOUT)
