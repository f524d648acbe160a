"""`memberguard journal recover`: a new journal for a coordinator whose journal is lost or damaged.

The coordinator refuses to start on such a journal (coordinator/journal.py, `diagnose`). Recovery is what the
operator asks for instead, with the coordinator stopped (it would hold the journal's lock): learn the newest epoch
every agent has admitted, then have the journal module move the damaged files aside and start a new journal above
all of them, recording the recovery in it. Learning an epoch: the registered members' agents are asked over mutual
TLS with the coordinator's own certificate; with a lab (`--lab`), an agent that does not answer has its epoch file
read from its state directory instead, and so does every node directory the registry does not list yet (a joiner
whose join was cut short has admitted the journal's steps too). An agent whose epoch cannot be learned either way
refuses the recovery unless the operator accepts it: a new journal below that agent's epoch would see every one of
its steps refused there (STALE_EPOCH) until it is started again above it.

What the lost journal held (operations, tokens) is not recovered: it stays in the moved-aside files for a look, and
the cluster's own records are what the new coordinator's first check compares.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.epochs import ask_agents, read_epoch_file
from coordinator.journal import AgentEpoch, Recovery, recover
from coordinator.pki import read_identity
from coordinator.registry import Registry

AGENT_TIMEOUT = 2.0


class EpochsUnknown(Exception):
    """Some agents' epochs could not be learned, and the operator did not accept starting without them."""

    def __init__(self, agents: list[AgentEpoch]) -> None:
        super().__init__(
            "the newest epoch of "
            + "; ".join(f"{agent.name} ({agent.how})" for agent in agents)
            + " is not known: start those agents and recover again, or pass --ignore-unreachable to start a new "
            "journal without them (their steps are refused until it is opened above their epoch)"
        )
        self.agents = agents


@dataclass(frozen=True)
class Recovered:
    journal: Path
    recovery: Recovery


def recover_journal(
    config_path: Path, *, lab: Path | None = None, ignore_unreachable: bool = False, timeout: float = AGENT_TIMEOUT
) -> Recovered:
    """Recovers the journal of the coordinator configured in config_path (see the module's docstring). Raises
    EpochsUnknown, journal.JournalLocked (the coordinator runs), journal.JournalHealthy (nothing to recover), OSError
    and ValueError (an unreadable configuration)."""
    config: dict[str, Any] = json.loads(config_path.read_text())
    agents = learn_epochs(config, lab, timeout)
    unknown = [agent for agent in agents if agent.epoch is None]
    if unknown and not ignore_unreachable:
        raise EpochsUnknown(unknown)
    journal = Path(config["journal"])
    return Recovered(
        journal, recover(journal, agents=agents, requested_by=f"{getpass.getuser()}@{socket.gethostname()}")
    )


def learn_epochs(config: dict[str, Any], lab: Path | None, timeout: float) -> list[AgentEpoch]:
    """Every agent's newest admitted epoch: asked, or (with a lab) read from its state directory."""
    identity = read_identity(Path(config["cert"]), Path(config["key"]))
    members = Registry(Path(config["registry"])).members()
    asked = asyncio.run(ask_agents(identity, members, timeout))
    if lab is None:
        return asked
    state_dirs = _state_dirs(lab)
    learned = [
        read_epoch_file(agent.name, state_dirs[agent.name])
        if agent.epoch is None and agent.name in state_dirs
        else agent
        for agent in asked
    ]
    registered = {member.name for member in members}
    learned += [read_epoch_file(name, path) for name, path in sorted(state_dirs.items()) if name not in registered]
    return learned


def _state_dirs(lab: Path) -> dict[str, Path]:
    """The lab's node state directories by name: lab.json's, and every node directory with an agent configuration."""
    found = {path.parent.name: path.parent for path in sorted((lab / "nodes").glob("*/agent.json"))}
    try:
        document = json.loads((lab / "lab.json").read_text())
    except (OSError, ValueError):
        return found
    for entry in [*document.get("nodes", []), *document.get("joining", [])]:
        found[entry["name"]] = Path(entry["state_dir"])
    return found


def describe(recovered: Recovered) -> list[str]:
    """What the recovery did, for the operator, one line each."""
    recovery = recovered.recovery
    lines = [f"journal {recovered.journal} recovered: it {recovery.damage}"]
    if recovery.moved:
        lines.append(f"  moved aside (nothing deleted) to {recovery.moved_to}: {', '.join(recovery.moved)}")
    else:
        lines.append("  nothing to move aside: no file of the journal was left")
    for agent in recovery.agents:
        epoch = "unknown" if agent.epoch is None else f"epoch {agent.epoch}"
        lines.append(f"  agent {agent.name}: {epoch} ({agent.how})")
    lines.append(
        f"  the new journal starts from epoch {recovery.epoch}: the coordinator's next start opens epoch "
        f"{recovery.epoch + 1}, above every epoch known"
    )
    lines.append(
        "  the lost journal's operations and tokens are not carried over: once the coordinator runs, "
        "`memberguard check` shows what an operation cut short left, and tokens must be issued again"
    )
    return lines
