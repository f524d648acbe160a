"""The `dqlite` backend's steps: rows and the Raft configuration through the leader, the truststore as files, and
the node's own engine started to join or stopped to fence (docs/design.md, "Operations" and "Backends").

Every step reads before it writes, on the leader, so that a step re-sent after a crash or a retry answers
changed=False; a write whose outcome is unknown (leadership lost under it) fails the step, and the retry reads again.

* Rows: `core_cluster_members` on the leader, with the statements the local backend uses.
* Removal from the configuration: right before REMOVE the leader's CLUSTER is read again, and the removal goes on
  only if the member is still there with the vote the guard decided on. A member that leads hands leadership to
  another voter first (a leader cannot remove itself cleanly). A configuration change still in flight (the role
  adjuster's, another node's join) makes the engine answer BUSY: the step backs off and tries again. The removal
  counts once the leader's CLUSTER no longer holds the entry.
* Engine join (sent to the joiner's own agent): its engine finds the cluster through its cluster.yaml (the members
  its truststore holds) and adds itself as a spare (go-dqlite's `join` flag). The commit point is confirmed, not
  assumed: (ID, address) in the leader's CLUSTER, then a query through that leader (a barrier: whatever the leader
  had appended is applied), then CLUSTER again on the same connection.
* Fence: the engine is killed and its data directory emptied, join flag included, so that nothing can start it
  again as a member (microcluster #774's zombie).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from memberguard.v1 import agent_pb2, membership_pb2

from coordinator.agent.dqlite_sources import ROLES, SslFactory, find_leader
from coordinator.agent.engine import JOIN_FLAG, Engine
from coordinator.agent.members_table import DELETE_MEMBER, UPSERT_MEMBER
from coordinator.agent.raft_files import NodeInfoReader, RaftConfigFileReader, write_raft_config
from coordinator.agent.steps import Applied, NodeSteps
from coordinator.agent.truststore import TruststoreReader
from coordinator.core.model import Role, Source
from coordinator.dqlite import Busy, Connection, DqliteError, FailureError, NodeInfo, connect
from coordinator.errors import (
    AlreadyExists,
    ConfigurationMoved,
    EngineUnavailable,
    FieldViolation,
    InvalidRequest,
)

# A step is answered within this, a little short of the coordinator's 5 s step deadline.
STEP_BUDGET = 4.5
_POLL = 0.05
_SQLITE_CONSTRAINT = 19  # the primary code; a UNIQUE violation's extended code is 2067


async def within(budget: float, step: Awaitable[tuple[bool, str]]) -> Applied:
    """What step applied, within budget seconds; a step dqlite fails or that runs out of time is EngineUnavailable:
    no answer from the engine, which the coordinator decides on from the sources."""
    try:
        async with asyncio.timeout(budget):
            return Applied(*await step)
    except TimeoutError:
        raise EngineUnavailable(f"the step did not finish within {budget:g} s") from None
    except DqliteError as error:
        raise EngineUnavailable(f"{type(error).__name__}: {error}") from None


class DqliteSteps(NodeSteps):
    """The steps of one node of the `dqlite` backend (the arguments are those of dqlite_backend, plus its engine)."""

    def __init__(
        self,
        *,
        state_dir: Path,
        address: str,
        database: str,
        ssl: SslFactory | None,
        engine: Engine,
        budget: float = STEP_BUDGET,
    ) -> None:
        self._address = address
        self._database = database
        self._ssl = ssl
        self._engine = engine
        self._budget = budget
        super().__init__(state_dir / "truststore")
        self._trusted = TruststoreReader(state_dir / "truststore")
        self._cache = RaftConfigFileReader(engine.data_dir / "cluster.yaml", Source.RAFT_CACHE)
        self._info = NodeInfoReader(engine.data_dir / "info.yaml")

    async def apply(self, request: agent_pb2.ApplyStepRequest) -> Applied:
        return await within(self._budget, self._step(request))

    @contextlib.asynccontextmanager
    async def _leader(self) -> AsyncIterator[Connection]:
        """A new connection to the leader, found through this node, its cluster.yaml and its truststore (a joiner's
        own engine may not run yet, a fenced one never again)."""
        known = [await reader.read(include_certificates=False) for reader in (self._cache, self._trusted)]
        candidates = dict.fromkeys([self._address, *(r.address for report in known for r in report.records)])
        context: _ssl.SSLContext | None = None if self._ssl is None else self._ssl()

        def dial(address: str, timeout: float) -> Awaitable[Connection]:
            return connect(address, timeout=timeout, ssl=context)

        connection = await find_leader(list(candidates), self._budget, dial)
        async with connection:
            yield connection

    # --- rows ----------------------------------------------------------------------------------------------------

    async def _rows_named(self, leader: Connection, name: str) -> list[tuple[object, ...]]:
        await leader.open(self._database)
        query = "SELECT address, certificate, role FROM core_cluster_members WHERE name = ?"
        return [tuple(row) for row in await leader.query(query, (name,))]

    async def _ensure_member_row(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        row = request.ensure_member_row
        async with self._leader() as leader:
            if await self._rows_named(leader, row.name) == [(row.address, row.certificate_pem, row.role)]:
                return False, f"the members table already holds {row.name}"
            try:
                await leader.exec(UPSERT_MEMBER, (row.name, row.address, row.certificate_pem, row.role))
            except FailureError as error:
                if error.code & 0xFF == _SQLITE_CONSTRAINT:
                    raise AlreadyExists(f"another row of the members table holds {row.name}'s certificate") from None
                raise
        return True, f"wrote {row.name}'s row ({row.role})"

    async def _remove_member_row(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        name = request.remove_member_row
        async with self._leader() as leader:
            if not await self._rows_named(leader, name):
                return False, f"the members table holds no {name}"
            await leader.exec(DELETE_MEMBER, (name,))
        return True, f"deleted {name}'s row"

    # --- the Raft configuration ----------------------------------------------------------------------------------

    async def _remove_raft_entry(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        return await remove_raft_entry(self._leader, request.remove_raft_entry)

    async def _ensure_raft_entry(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        entry = request.ensure_raft_entry
        info = await self._info.read(include_certificates=False)
        me = info.records[0] if info.records and not info.error else None
        if me is None or (me.node_id, me.address) != (entry.node_id, entry.address):
            held = "nothing" if me is None else f"node {me.node_id} at {me.address}"
            raise InvalidRequest(
                [FieldViolation("ensure_raft_entry", f"this node's info.yaml holds {held}, not the entry asked for")]
            )
        label = f"node {entry.node_id} at {entry.address}"
        async with self._leader() as leader:
            joined = _entry(await leader.cluster(), entry.node_id, entry.address) is not None
        started = False
        if self._engine.pid() is None:
            if not joined:
                await self._prepare_join()
            self._engine.start()
            started = True
        while not await self._confirmed(entry.node_id, entry.address):
            if self._engine.pid() is None:
                raise EngineUnavailable(
                    f"the engine stopped while joining: see {self._engine.data_dir.parent}/node.log"
                )
            await asyncio.sleep(_POLL)
        if joined:
            return started, f"{label} is in the configuration already" + ("; its engine started" if started else "")
        return True, f"{label} joined the Raft configuration (as a spare: the role adjuster promotes it)"

    async def _prepare_join(self) -> None:
        """Points the engine at the members its truststore holds and raises its join flag: a node that is not in
        the configuration has no configuration of its own worth keeping."""
        trusted = await self._trusted.read(include_certificates=False)
        peers = [r.address for r in trusted.records if r.address != self._address]
        write_raft_config(self._engine.data_dir / "cluster.yaml", [(0, address, Role.VOTER) for address in peers])
        (self._engine.data_dir / JOIN_FLAG).touch()

    async def _confirmed(self, node_id: int, address: str) -> bool:
        """(ID, address) in the leader's CLUSTER, then a barrier through that leader, then CLUSTER again there."""
        try:
            async with self._leader() as leader:
                if _entry(await leader.cluster(), node_id, address) is None:
                    return False
                await leader.open(self._database)
                await leader.query("SELECT 1")
                return _entry(await leader.cluster(), node_id, address) is not None
        except DqliteError:
            return False  # no leader yet, or it changed under us: ask again

    # --- fencing -------------------------------------------------------------------------------------------------

    async def _fence_node(self, request: agent_pb2.ApplyStepRequest) -> tuple[bool, str]:
        stopped = await asyncio.to_thread(self._engine.stop)
        removed = sorted(path.name for path in self._engine.data_dir.glob("*") if path.is_file())
        for name in removed:
            (self._engine.data_dir / name).unlink(missing_ok=True)
        if not stopped and not removed:
            return False, "the node is fenced already"
        done = (["stopped its engine"] if stopped else []) + ([f"removed {', '.join(removed)}"] if removed else [])
        return True, "fenced: " + "; ".join(done)


async def remove_raft_entry(
    leader_of: Callable[[], contextlib.AbstractAsyncContextManager[Connection]], entry: agent_pb2.RaftEntry
) -> tuple[bool, str]:
    """The Raft removal step through the leader that leader_of() connects to (this backend's, and microcluster's for
    a ghost Raft member)."""
    decided = None if entry.role == membership_pb2.ROLE_UNSPECIFIED else Role(entry.role)
    label = f"node {entry.node_id} at {entry.address}"
    backoff = _POLL
    handed = ""
    while True:
        async with leader_of() as leader:
            nodes = await leader.cluster()
            held = _entry(nodes, entry.node_id, entry.address)
            if held is None:
                return False, f"the leader's configuration holds no {label}"
            role = ROLES[held.role]
            if decided is not None and (role is Role.VOTER) != (decided is Role.VOTER):
                raise ConfigurationMoved(
                    f"{label} is a {role.text} now, not the {decided.text} the removal was decided on"
                )
            if leader.address == entry.address:
                handed = f"; it led: handed leadership to node {await _hand_over(leader, nodes, entry.node_id)} first"
                continue  # and find the new leader
            try:
                await leader.remove(entry.node_id)
            except Busy:
                # Raft allows one configuration change at a time: another is still being committed.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            if _entry(await leader.cluster(), entry.node_id, entry.address) is None:
                return True, f"removed {label} from the Raft configuration ({role.text}){handed}"


def _entry(nodes: list[NodeInfo], node_id: int, address: str) -> NodeInfo | None:
    return next((node for node in nodes if (node.id, node.address) == (node_id, address)), None)


async def _hand_over(leader: Connection, nodes: list[NodeInfo], leaving: int) -> int:
    """Transfers leadership to another voter, trying each until one takes it; the new leader's ID."""
    failures = []
    for node in nodes:
        if node.id != leaving and ROLES[node.role] is Role.VOTER:
            try:
                await leader.transfer(node.id)
                return node.id
            except FailureError as error:
                failures.append(f"{node.address}: {error}")
    raise EngineUnavailable(f"no other voter took leadership: {'; '.join(failures) or 'there is none'}")
