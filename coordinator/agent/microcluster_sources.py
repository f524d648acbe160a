"""The `microcluster` backend's readers: one member of a real microcluster cluster, read from its state directory
and through its daemon, as microcluster's own members read them.

The files are the state directory's, as microd keeps them: `truststore/*.yaml`, `database/info.yaml` and
`database/cluster.yaml` (go-dqlite's cache of the configuration, rewritten on every heartbeat), and `daemon.yaml`,
which says who the member is and where its daemon listens (read at each dial, see microcluster_dial.py).

dqlite is reached through the daemons' upgrade endpoint, and read by the dqlite backend's readers: the members table
`core_cluster_members` (in microcluster's database, db.bin) and the leader's CLUSTER share one kept connection to the
leader; this member's own CLUSTER has a kept connection to its own daemon. The role column is text: microcluster's
PENDING until the heartbeat writes go-dqlite's role name, and "" for a row the heartbeat found no Raft member for;
the text is kept verbatim in role_text, and the role is what it names.

The heartbeat: every heartbeat interval the leader writes each row's role from its Raft configuration, replaces its
own truststore with the table's rows and sends every other member it trusts the rows to replace theirs with, so a
truststore drift on a member the leader reaches lasts about one interval. The interval is microd's `--heartbeat`
flag, which no file records; microcluster's default is HEARTBEAT_INTERVAL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from memberguard.v1 import agent_pb2

from coordinator.agent.dqlite_sources import network_readers
from coordinator.agent.microcluster_control import issue_token, join_cluster, remove_member, revoke_token
from coordinator.agent.microcluster_dial import MemberDial
from coordinator.agent.microcluster_writes import DirectWrites
from coordinator.agent.raft_files import NodeInfoReader, RaftConfigFileReader
from coordinator.agent.sources import SourceReader
from coordinator.agent.steps import Applied, checked_step
from coordinator.agent.truststore import TruststoreReader
from coordinator.core.model import Source
from coordinator.dqlite import Connection, Dial, connect_leader
from coordinator.errors import FieldViolation, InvalidRequest

# microcluster's DefaultHeartbeatInterval (internal/db/dqlite.go), also the default of the example microd's
# `--heartbeat` flag; seconds.
HEARTBEAT_INTERVAL = 10.0
DATABASE = "db.bin"


def microcluster_backend(state_dir: Path, *, timeout: float = 1.0) -> tuple[SourceReader, ...]:
    """The readers of the member whose state directory is `state_dir`. The network readers keep connections:
    dqlite_sources.close_readers ends them."""
    database = state_dir / "database"
    member = MemberDial(state_dir)
    return network_readers(
        lambda: member.daemon_config().address,
        member.dial,
        DATABASE,
        RaftConfigFileReader(database / "cluster.yaml", Source.RAFT_CACHE),
        TruststoreReader(state_dir / "truststore"),
        NodeInfoReader(database / "info.yaml"),
        timeout,
        search=_one_by_one,
    )


async def _one_by_one(candidates: Sequence[str], timeout: float, dial: Dial) -> Connection:
    """The leader, asking the candidates in turn, as microcluster's own lookup does. Not all at once: the losers of a
    parallel search are given up on mid-upgrade, which go-dqlite's upgrade does not survive (microcluster_dial.py).
    Each dial gets half the time left, so a daemon that accepts and then hangs costs at most half of a read's time."""

    async def halved(address: str, left: float) -> Connection:
        return await dial(address, left / 2)

    return await connect_leader(list(candidates), timeout=timeout, dial=halved)


class MicroclusterSteps:
    """The backend's steps: requests to microcluster. microcluster changes its membership through its own API, and its
    heartbeat rewrites every truststore from the members table, so the agent asks this member's daemon
    (microcluster_control.py) and writes into dqlite only what microcluster has no flow for (microcluster_writes.py).
    A step of another backend is checked (a malformed one is refused as such), then refused."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        database = state_dir / "database"
        self._direct = DirectWrites(
            MemberDial(state_dir),
            RaftConfigFileReader(database / "cluster.yaml", Source.RAFT_CACHE),
            TruststoreReader(state_dir / "truststore"),
            DATABASE,
            _one_by_one,
        )

    async def apply(self, request: agent_pb2.ApplyStepRequest) -> Applied:
        match checked_step(request):
            case "remove_through_microcluster":
                removal = request.remove_through_microcluster
                if not await remove_member(self._state_dir, removal.name, removal.address, force=removal.force):
                    return Applied(False, f"microcluster holds no member at {removal.address}")
                return Applied(True, f"microcluster removed {removal.name}" + (" (forced)" if removal.force else ""))
            case "issue_microcluster_token":
                name = request.issue_microcluster_token.name
                expire_after = request.issue_microcluster_token.expire_after.ToNanoseconds() / 1e9
                # One token per name, as the coordinator keeps its own: a repeated step replaces the first token.
                await revoke_token(self._state_dir, name)
                token = await issue_token(self._state_dir, name, expire_after)
                return Applied(True, f"microcluster issued a join token for {name}", token)
            case "revoke_microcluster_token":
                name = request.revoke_microcluster_token
                if not await revoke_token(self._state_dir, name):
                    return Applied(False, f"microcluster holds no join token for {name}")
                return Applied(True, f"microcluster revoked {name}'s join token")
            case "join_through_microcluster":
                join = request.join_through_microcluster
                if not join.token:
                    raise InvalidRequest([FieldViolation("join_through_microcluster.token", "is required")])
                if not await join_cluster(self._state_dir, join.name, join.address, join.token):
                    return Applied(False, f"microcluster has already joined this daemon as {join.name}")
                return Applied(True, f"microcluster joined {join.name} at {join.address}")
            case "fence_node":
                # A join is rolled back only when no source holds the joiner (recovery.commit_effect), and
                # microcluster lets a daemon in again only with a token, which the rollback revokes.
                return Applied(False, "microcluster admits this daemon only with a join token: nothing to fence")
            case "ensure_member_row" | "remove_raft_entry":
                return await self._direct.apply(request)
            case step:
                raise InvalidRequest([FieldViolation("step", f"the microcluster backend applies no {step} step")])
