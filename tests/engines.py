"""A lab node's dqlite engine as a supervisor sees it: found by its pid file, killed, started again the way the
node's daemon would (its agent.json says how), and the cluster asked who leads and what it holds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.engine import Engine
from coordinator.dqlite import NodeInfo, connect_leader
from coordinator.lab import lab as labs
from coordinator.lab.dqlite_cluster import DATABASE

INFO = "info.yaml"


def engine_of(state_dir: Path) -> Engine:
    """The node's engine, as its agent.json describes it (command, environment, data directory)."""
    settings = json.loads((state_dir / "agent.json").read_text())["dqlite"]
    engine = settings["engine"]
    return Engine(state_dir, Path(settings["data_dir"]), engine["command"], engine["environment"])


def engine_pid(state_dir: Path) -> int | None:
    """The pid of the node's running engine (its pid file names a live engine process), or None."""
    return engine_of(state_dir).pid()


def kill_engine(state_dir: Path) -> int | None:
    """kill -9 the node's engine if it runs, and returns its pid once it is dead (reaped, if this process started
    it through the lab); None if no engine ran."""
    pid = engine_pid(state_dir)
    if pid is None:
        return None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while engine_pid(state_dir) == pid:
        assert time.monotonic() < deadline, f"engine {pid} survived SIGKILL"
        time.sleep(0.005)
    child = labs._children.pop(pid, None)
    if child is not None:
        child.wait()
    return pid


def restart_engine(state_dir: Path) -> Engine | None:
    """Starts the node's engine again as its daemon would: only if its data still has an identity (info.yaml; a
    fenced node's daemon starts no engine), with its agent.json's command and environment, writing engine.pid.
    The Engine, which the caller reaps (`reap`) once the lab is down; None if it did not start one."""
    engine = engine_of(state_dir)
    if not (engine.data_dir / INFO).exists():
        return None
    engine.start()
    return engine


def reap(engine: Engine) -> None:
    """Waits for an engine this process started, killing it first if it still runs: one that its agent fenced, or a
    case killed, would otherwise stay a zombie child of the test process."""
    child = engine._child
    if child is not None:
        child.kill()  # nothing, if it was reaped already
        child.wait()


@dataclass(frozen=True)
class LeaderView:
    """The leader's address, its Raft configuration, and the names in its members table."""

    address: str
    nodes: list[NodeInfo]
    rows: list[str]

    def holds(self, address: str) -> bool:
        return address in (node.address for node in self.nodes)


def leader_view(addresses: list[str], as_node: Path, timeout: float = 10.0) -> LeaderView:
    """Asks the cluster (any of addresses) for its leader's view, connecting with the certificate of the node whose
    state directory is as_node (it must be trusted: a member that stays)."""

    async def read() -> LeaderView:
        context = client_ssl_context(as_node / "server.crt", as_node / "server.key", as_node / "truststore")
        async with await connect_leader(addresses, timeout=timeout, ssl=context) as leader:
            nodes = await leader.cluster()
            await leader.open(DATABASE)
            rows = await leader.query("SELECT name FROM core_cluster_members ORDER BY name")
            return LeaderView(leader.address, nodes, [str(row[0]) for row in rows])

    return asyncio.run(read())
