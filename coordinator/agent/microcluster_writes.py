"""What the microcluster backend's agent writes into dqlite itself: only what microcluster has no flow for
(docs/design.md, "Repair").

- A live Raft member's missing row. microcluster writes a row only in its own join, which a member already in the
  Raft configuration cannot go through again; the row is restored from the member's own agent's report.
- A ghost Raft member's entry. microcluster removes members by name, running the product's removal hooks for them,
  and no row names a ghost.

Both go through the cluster's leader, reached as this member's daemon reaches it (microcluster_dial.py), and read
before they write, so that a replayed step answers changed=False. Everything else changes through microcluster's
own API (microcluster_control.py), and every truststore through the leader's heartbeat.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from memberguard.v1 import agent_pb2

from coordinator.agent.dqlite_sources import LeaderSearch
from coordinator.agent.dqlite_steps import STEP_BUDGET, remove_raft_entry, within
from coordinator.agent.microcluster_dial import MemberDial
from coordinator.agent.raft_files import RaftConfigFileReader
from coordinator.agent.steps import Applied
from coordinator.agent.truststore import TruststoreReader
from coordinator.dqlite import Connection, FailureError
from coordinator.errors import AlreadyExists, SourceNotRewritable

# The columns memberguard does not know are copied from the row of the member the step is applied through: its
# daemon's schema versions and API extensions, which every member of a healthy cluster shares (a row behind them
# would make a restarting daemon wait for an upgrade). The heartbeat is the zero time microcluster's join writes, so
# that the leader's next round reaches the member at once; the role is the heartbeat's to rewrite from Raft.
# Parameters: (name, address, certificate, role text, the applying member's name).
_RESTORE_ROW = (
    "INSERT INTO core_cluster_members"
    " (name, address, certificate, schema_internal, schema_external, api_extensions, heartbeat, role)"
    " SELECT ?, ?, ?, schema_internal, schema_external, api_extensions, '0001-01-01T00:00:00Z', ?"
    " FROM core_cluster_members WHERE name = ?"
)
_SQLITE_CONSTRAINT = 19  # the primary code; a UNIQUE violation's extended code is 2067


class DirectWrites:
    """The two steps, for the member whose daemon `member` dials; database is microcluster's (db.bin), search finds
    the leader among candidate addresses."""

    def __init__(
        self,
        member: MemberDial,
        cache: RaftConfigFileReader,
        truststore: TruststoreReader,
        database: str,
        search: LeaderSearch,
        budget: float = STEP_BUDGET,
    ) -> None:
        self._member = member
        self._known = (cache, truststore)
        self._database = database
        self._search = search
        self._budget = budget

    async def apply(self, request: agent_pb2.ApplyStepRequest) -> Applied:
        """Applies an ensure_member_row or remove_raft_entry step (checked already)."""
        if request.WhichOneof("step") == "ensure_member_row":
            return await within(self._budget, self._restore_row(request.ensure_member_row))
        return await within(self._budget, remove_raft_entry(self._leader, request.remove_raft_entry))

    @contextlib.asynccontextmanager
    async def _leader(self) -> AsyncIterator[Connection]:
        """A new connection to the leader, searched from this member's daemon, its cluster.yaml and its truststore."""
        known = [await reader.read(include_certificates=False) for reader in self._known]
        candidates = dict.fromkeys(
            [self._member.daemon_config().address, *(r.address for report in known for r in report.records)]
        )
        connection = await self._search(list(candidates), self._budget, self._member.dial)
        async with connection:
            yield connection

    async def _restore_row(self, row: agent_pb2.MemberRow) -> tuple[bool, str]:
        """Inserts the row unless one of that name holds this address and certificate already (whatever its role: the
        heartbeat rewrites it). A row of that name that holds another, or another row holding the certificate, is
        microcluster's: AlreadyExists, and nothing is rewritten."""
        me = self._member.daemon_config().name
        async with self._leader() as leader:
            await leader.open(self._database)
            query = "SELECT address, certificate FROM core_cluster_members WHERE name = ?"
            held = [tuple(r) for r in await leader.query(query, (row.name,))]
            if held == [(row.address, row.certificate_pem)]:
                return False, f"the members table already holds {row.name}"
            if held:
                raise AlreadyExists(f"the members table holds another row named {row.name}, which is not rewritten")
            try:
                result = await leader.exec(_RESTORE_ROW, (row.name, row.address, row.certificate_pem, row.role, me))
            except FailureError as error:
                if error.code & 0xFF == _SQLITE_CONSTRAINT:
                    raise AlreadyExists(f"another row of the members table holds {row.name}'s certificate") from None
                raise
        if result.rows_affected == 0:
            raise SourceNotRewritable(
                f"{me}, through which the row was to be written, has no row to take microcluster's schema versions "
                "from: write it through another member"
            )
        return True, f"restored {row.name}'s row ({row.role}), with {me}'s schema versions and API extensions"
