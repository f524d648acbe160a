"""The `dqlite` backend's readers: one node of a real dqlite cluster, read over the wire protocol and from its files.

Which record each source is, and why they may disagree (docs/design.md, "Backends"):

* MEMBERS_TABLE and RAFT_CONFIG come from the leader: the table is only readable there, and only the leader's
  CLUSTER answer is the cluster's configuration. They share one kept connection (`_Leader`), so one agent runs
  one leader discovery, however many of its sources need the leader.
* RAFT_NODE_VIEW is CLUSTER asked of this node itself, never redirected: its local copy of the configuration,
  which lags on followers and spares and stays frozen on a removed node.
* RAFT_CACHE (`cluster.yaml`, rewritten on each role-adjustment tick) and NODE_INFO (`info.yaml`, written once)
  are go-dqlite's files in the node's data directory; TRUSTSTORE is the state directory's truststore.

Every network read ends within the reader's timeout whatever the peer does: the client's own per-call timeouts
end it first, an outer asyncio timeout is the backstop (a peer stuck in a TLS handshake, a lock held by a read
that is itself timing out). A failure is an error report, never an exception (see sources.py).
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from coordinator.agent.members_table import MemberRows
from coordinator.agent.raft_files import NodeInfoReader, RaftConfigFileReader
from coordinator.agent.sources import SourceReader
from coordinator.agent.truststore import TruststoreReader
from coordinator.core.model import MemberRecord, Role, Source, SourceReport
from coordinator.dqlite import (
    Connection,
    ConnectionClosed,
    Dial,
    DqliteError,
    LeadershipLost,
    NodeInfo,
    NoLeader,
    NotLeader,
    ProtocolError,
    Rowset,
    Timeout,
    connect,
    connect_leader,
)
from coordinator.dqlite import Role as WireRole

T = TypeVar("T")

_MEMBERS = "SELECT id, name, address, certificate, role FROM core_cluster_members ORDER BY id"
ROLES = {WireRole.VOTER: Role.VOTER, WireRole.STANDBY: Role.STAND_BY, WireRole.SPARE: Role.SPARE}
# After these the kept connection is of no more use: it is closed, or talks to a node that no longer leads.
_STALE = (NotLeader, LeadershipLost, ConnectionClosed, Timeout, ProtocolError)

SslFactory = Callable[[], _ssl.SSLContext]
# (candidate addresses, timeout, dial) -> a connection to the leader
LeaderSearch = Callable[[Sequence[str], float, Dial], Awaitable[Connection]]


def dqlite_backend(
    *,
    state_dir: Path,
    data_dir: Path,
    address: str,
    database: str,
    ssl: SslFactory | None,
    timeout: float = 1.0,
) -> tuple[SourceReader, ...]:
    """The readers of one node of the `dqlite` backend.

    data_dir is the node's go-dqlite directory (info.yaml, cluster.yaml); address its dqlite address, spelled as
    the cluster spells it; database the database holding `core_cluster_members`; ssl makes the client context for
    TLS nodes, called at each dial, so that a context that follows the node's truststore reflects it as it is
    then. The network readers keep connections (dials are rare): `close_readers` ends them.
    """

    def dial(address: str, timeout: float) -> Awaitable[Connection]:
        return connect(address, timeout=timeout, ssl=None if ssl is None else ssl())

    return network_readers(
        lambda: address,
        dial,
        database,
        RaftConfigFileReader(data_dir / "cluster.yaml", Source.RAFT_CACHE),
        TruststoreReader(state_dir / "truststore"),
        NodeInfoReader(data_dir / "info.yaml"),
        timeout,
    )


def network_readers(
    address: Callable[[], str],
    dial: Dial,
    database: str,
    cache: RaftConfigFileReader,
    truststore: TruststoreReader,
    info: NodeInfoReader,
    timeout: float,
    search: LeaderSearch | None = None,
) -> tuple[SourceReader, ...]:
    """A node's six readers, the network ones reaching dqlite through dial(address, timeout): the members table and
    the leader's CLUSTER over one kept connection to the leader, the node's own CLUSTER over one to itself.
    address() is the node's own dqlite address, asked at each dial (a backend may read it from a file); search
    finds the leader among candidates (default find_leader, all at once)."""
    leader = _Leader(address, (cache, truststore), database, dial, search or find_leader)
    return (
        MembersTableReader(leader, timeout),
        truststore,
        RaftConfigReader(leader, timeout),
        NodeViewReader(_Link(address, dial), timeout),
        cache,
        info,
    )


async def close_readers(readers: Iterable[SourceReader]) -> None:
    """Closes the connections the network readers keep (the file readers hold none)."""
    for reader in readers:
        if isinstance(reader, _NetworkReader):
            await reader.aclose()


class _Link:
    """One kept connection to one node, (re)dialled on demand, used by one request at a time.

    A request that fails in a way that makes the connection useless drops it and is tried once more on a
    fresh one: a kept connection is the fast path (a CLUSTER over TLS costs ~1 ms here, a new TLS connection
    ~7 ms), and the second try is what turns a leadership change between two reads into no error at all.
    """

    def __init__(self, address: Callable[[], str], dial: Dial) -> None:
        self._address = address
        self.address = ""  # the address of the last dial
        self._connect = dial
        self._connection: Connection | None = None
        self._lock = asyncio.Lock()  # also keeps two reads from dialling twice

    async def _dial(self, timeout: float) -> Connection:
        self.address = self._address()
        return await self._connect(self.address, timeout)

    async def call(self, request: Callable[[Connection, float], Awaitable[T]], deadline: float) -> T:
        """request(connection, its deadline), finished before the loop time `deadline`."""
        async with self._lock:
            if self._connection is not None and not self._connection.closed:
                # A kept connection answers in about a millisecond or not at all (its node hangs, or lost
                # leadership without telling): it gets half the time, the other half is for finding a way again.
                try:
                    return await request(self._connection, (_now() + deadline) / 2)
                except _STALE:
                    await self._drop()
            self._connection = await self._dial(_left(deadline))
            try:
                return await request(self._connection, deadline)
            except _STALE:
                await self._drop()
                raise

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()


class _Leader(_Link):
    """The kept connection to the cluster's leader, shared by the members-table and Raft-configuration readers.

    Discovery asks the last leader, this node, every node in this node's cluster.yaml (go-dqlite keeps the known
    nodes there) and every member in its truststore (a member's address is its dqlite address, and a node whose
    engine died right after it started has a cluster.yaml that names only itself), following redirects; it runs
    again only when the kept connection fails.
    """

    def __init__(
        self,
        address: Callable[[], str],
        known: Sequence[RaftConfigFileReader | TruststoreReader],
        database: str,
        dial: Dial,
        search: LeaderSearch,
    ) -> None:
        super().__init__(address, dial)
        self._search = search
        self._known = known
        self._database = database
        self._leader = ""
        self._opened: Connection | None = None  # the connection on which the database is open

    async def _dial(self, timeout: float) -> Connection:
        # An unreadable source adds no candidate: at worst this node is asked alone.
        self.address = self._address()
        reports = [await reader.read(include_certificates=False) for reader in self._known]
        known = (record.address for report in reports for record in report.records)
        candidates = dict.fromkeys([self._leader, self.address, *known])
        candidates.pop("", None)
        connection = await self._search(list(candidates), timeout, self._connect)
        self._leader = connection.address
        return connection

    async def cluster(self, deadline: float) -> tuple[str, list[NodeInfo]]:
        """The leader's address and its configuration."""

        async def request(connection: Connection, until: float) -> tuple[str, list[NodeInfo]]:
            return connection.address, await connection.cluster(timeout=_left(until))

        return await self.call(request, deadline)

    async def members(self, deadline: float) -> Rowset:
        async def request(connection: Connection, until: float) -> Rowset:
            # Opened only when the table is first read, so that a database that cannot be opened does not
            # also cost the Raft configuration, which needs none.
            if self._opened is not connection:
                await connection.open(self._database, timeout=_left(until))
                self._opened = connection
            return await connection.query(_MEMBERS, timeout=_left(until))

        return await self.call(request, deadline)


class _NetworkReader:
    """A reader that asks a node and turns every failure into an error report."""

    source: Source

    def __init__(self, link: _Link, timeout: float) -> None:
        self._link = link
        self._timeout = timeout

    async def read(self, *, include_certificates: bool, within: float | None = None) -> SourceReport:
        timeout = self._timeout if within is None else max(0.0, min(self._timeout, within))
        # The client's timeouts aim a little short of the read's, so that they, with their clearer messages,
        # normally fire before the backstop.
        deadline = _now() + timeout - min(0.05, timeout / 10)
        try:
            async with asyncio.timeout(timeout):
                return await self._read(deadline, include_certificates)
        except (DqliteError, TimeoutError) as exc:
            return SourceReport(self.source, error=self._reason(exc, timeout))

    async def _read(self, deadline: float, include_certificates: bool) -> SourceReport:
        raise NotImplementedError

    def _reason(self, exc: DqliteError | TimeoutError, timeout: float) -> str:
        if isinstance(exc, NoLeader):
            tried = "; ".join(f"{address}: {why}" for address, why in exc.attempts.items())
            return f"no leader within {timeout:.2f} s: {tried or exc}"
        if isinstance(exc, TimeoutError | Timeout):
            return f"timeout after {timeout:.2f} s: {str(exc) or 'no answer'}"
        return f"{type(exc).__name__}: {exc}"

    async def aclose(self) -> None:
        await self._link.aclose()


class MembersTableReader(_NetworkReader):
    """`core_cluster_members` as the leader holds it; the rows become records as the local backend's do."""

    source = Source.MEMBERS_TABLE

    def __init__(self, leader: _Leader, timeout: float) -> None:
        super().__init__(leader, timeout)
        self._leader = leader
        self._rows = MemberRows()

    async def _read(self, deadline: float, include_certificates: bool) -> SourceReport:
        rows = await self._leader.members(deadline)
        records, invalid = self._rows.records(rows, include_certificates=include_certificates)
        return SourceReport(self.source, records=records, invalid_entries=invalid)


class RaftConfigReader(_NetworkReader):
    """The leader's CLUSTER answer: the authoritative Raft configuration."""

    source = Source.RAFT_CONFIG

    def __init__(self, leader: _Leader, timeout: float) -> None:
        super().__init__(leader, timeout)
        self._leader = leader

    async def _read(self, deadline: float, include_certificates: bool) -> SourceReport:
        address, nodes = await self._leader.cluster(deadline)
        return SourceReport(self.source, records=_records(nodes), leader_address=address)


class NodeViewReader(_NetworkReader):
    """This node's own CLUSTER answer, over a direct connection: its local copy of the configuration."""

    source = Source.RAFT_NODE_VIEW

    async def _read(self, deadline: float, include_certificates: bool) -> SourceReport:
        async def request(connection: Connection, until: float) -> list[NodeInfo]:
            return await connection.cluster(timeout=_left(until))

        return SourceReport(self.source, records=_records(await self._link.call(request, deadline)))


async def find_leader(addresses: Sequence[str], timeout: float, dial: Dial) -> Connection:
    """Leader discovery from every address at once; the first leader found wins.

    connect_leader asks its addresses in turn and gives each the time that is left, so a node that accepts and
    then hangs (stopped, cut off) would spend a whole read's budget, on every read, while the others have long
    elected a new leader.
    """
    searches = [asyncio.create_task(connect_leader([address], timeout=timeout, dial=dial)) for address in addresses]
    found: Connection | None = None
    try:
        pending = set(searches)
        while pending and found is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            found = next((task.result() for task in done if task.exception() is None), None)
    finally:
        for task in searches:
            task.cancel()  # a cancelled search closes what it had opened
        try:
            outcomes = await asyncio.gather(*searches, return_exceptions=True)
        except BaseException:
            if found is not None:
                await found.close()
            raise
        for outcome in outcomes:
            if isinstance(outcome, Connection) and outcome is not found:  # won in the same round
                await outcome.close()
    if found is not None:
        return found
    attempts: dict[str, str] = {}
    for address, outcome in zip(addresses, outcomes, strict=True):
        if isinstance(outcome, NoLeader):
            attempts.update(outcome.attempts)
        elif isinstance(outcome, BaseException):
            attempts[address] = f"{type(outcome).__name__}: {outcome}"
    raise NoLeader(f"no leader found among {list(addresses)} within {timeout}s", attempts)


def _records(nodes: Iterable[NodeInfo]) -> tuple[MemberRecord, ...]:
    # Entries are numbered as in cluster.yaml, which holds the same list.
    return tuple(
        MemberRecord(address=node.address, node_id=node.id, role=ROLES[node.role], entry=f"entry {index}")
        for index, node in enumerate(nodes, start=1)
    )


def _now() -> float:
    return asyncio.get_running_loop().time()


def _left(deadline: float) -> float:
    """Seconds until the loop time `deadline`; never zero, so a call with no time left fails as a timeout."""
    return max(deadline - _now(), 0.001)
