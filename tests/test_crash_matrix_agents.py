"""Crash matrix with agents killed: the coordinator stopped (SIGSTOP, MEMBERGUARD_FAULT "stop-…-step:N") at every
step boundary of a removal and of a join, an agent killed with SIGKILL while it is frozen, the coordinator continued,
and the agent restarted half a second later on the same port (the registry pins agents' addresses).

Killed in turn: the agent of the node being changed (the removed member, the joiner) and the agent of the member that
the cluster-wide steps go through. Whatever the boundary, within a bounded wait the cluster is consistent (nothing
WARNING or worse), the member is wholly in or wholly out, no operation is left unfinished (one parked for want of the
agent is finished by the reconciler once the agent answers again), and an operation that rolled back succeeds when
asked again. The step lists come from the planner, so the matrix follows the plans as they change.

Each case brings up its own 3-node local lab (under a second). `make test` kills one of the two agents before or
after each step, the four taking turns (tests/matrix.py; 21 cases, about a minute); MEMBERGUARD_CRASH_MATRIX=full
(`make crash-matrix`) kills each at every boundary (84). Run with -s, each case prints how it went, e.g.
"after-step:4: parked then rolled back then retried: succeeded".
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from memberguard import Client, Endpoint
from memberguard.v1 import membership_pb2
from memberguard.v1 import operation_pb2 as o

from coordinator.agent.raft_files import write_node_info, write_raft_config
from coordinator.core.diff import compute_diff
from coordinator.core.model import Role
from coordinator.core.plan import Joiner, PlannedStep, plan_join, plan_removal
from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests import matrix
from tests.core.views import consistent_view
from tests.restarts import kill_agent, restart_agent, start_coordinator, wait_until_stopped
from tests.settling import settled

SETTLE_TIMEOUT = 20.0  # seconds for the cluster to settle once the killed agent is back
RESTART_AFTER = 0.5  # seconds between the kill and the agent's restart
# A joiner's agent is not gathered before it is registered, so only the periodic pass notices it is back: keep the
# matrix quick (tests/test_reconciler.py checks the default's behaviour).
RECONCILE_INTERVAL = 0.5


def _planned() -> tuple[tuple[PlannedStep, ...], tuple[PlannedStep, ...]]:
    """The steps of removing n3 from, and of joining n4 to, a consistent 3-member cluster, as the lab will plan them."""
    diff = compute_diff(consistent_view(3))
    nodes = {"n1", "n2", "n3"}
    removed = next(m for m in diff.members if m.name == "n3")
    removal = plan_removal(diff, removed, reachable=nodes)
    joiner = Joiner("n4", "127.0.0.1:7004", "pem", "127.0.0.1:8004", 4)
    join = plan_join(diff, joiner, reachable=nodes, certificates=dict.fromkeys(nodes, "pem"))
    return removal.steps, join.steps


REMOVAL_STEPS, JOIN_STEPS = _planned()
# The member the cluster-wide steps go through: the first step's target in both plans.
VIA = REMOVAL_STEPS[0].target
assert VIA == JOIN_STEPS[0].target and VIA not in ("n3", "n4")


def _state(operation: o.Operation) -> str:
    return o.OperationState.Name(operation.state).removeprefix("OPERATION_STATE_").lower().replace("_", " ")


# --- one case ------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A lab whose coordinator is stopped at a boundary, and the processes the case started."""

    lab: labs.Lab
    coordinator: subprocess.Popen[bytes]
    endpoint: Endpoint
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)

    def run_while_stopped(self, start: Callable[[], o.Operation], kill: int, config: Path, agent: str) -> o.Operation:
        """Starts the operation, kills the agent (pid kill, started from config at address agent) while the
        coordinator is stopped at its boundary, continues the coordinator, restarts the agent; the operation as its
        request returned it."""
        with ThreadPoolExecutor(1) as pool:
            running: Future[o.Operation] = pool.submit(start)
            wait_until_stopped(self.coordinator)
            kill_agent(kill)
            os.kill(self.coordinator.pid, signal.SIGCONT)
            time.sleep(RESTART_AFTER)
            self.started.append(restart_agent(config, agent, self.lab.dir / "logs" / "restarted-agents.log"))
            first = running.result(timeout=60)
        self.outcome.append(_state(first))
        return first

    def settled(self, client: Client) -> membership_pb2.MembershipDiff:
        return settled(client, SETTLE_TIMEOUT)

    def finished(self, client: Client, operation_id: str) -> o.Operation:
        self.settled(client)
        final = client.get_operation(operation_id)
        if self.outcome[-1] == "parked":
            self.outcome.append(_state(final))
        return final


@contextmanager
def stopping_at(directory: Path, boundary: str) -> Iterator[Case]:
    """A fresh 3-node lab whose coordinator is armed to stop at boundary; everything stopped when it ends."""
    lab = labs.up(directory, 3)
    os.kill(lab.document["coordinator"]["pid"], signal.SIGTERM)
    coordinator, endpoint = start_coordinator(
        lab, {FAULT_ENV: f"stop-{boundary}"}, {"reconcile_interval": RECONCILE_INTERVAL}
    )
    running = Case(lab, coordinator, endpoint)
    try:
        yield running
    finally:
        if coordinator.poll() is None:
            os.kill(coordinator.pid, signal.SIGCONT)
            coordinator.terminate()
            coordinator.wait(10)
        for process in running.started:
            process.kill()
            process.wait()
        labs.down(lab.dir)
        # The matrix's outcomes, for whoever runs it with -s.
        print(f" {boundary}: {' then '.join(running.outcome)}", end="")


TARGETS = ("changed", "via")


def _cases(steps: tuple[PlannedStep, ...]) -> list[Any]:
    variants = [(target, when) for when in ("before", "after") for target in TARGETS]
    return [
        pytest.param(target, f"{when}-step:{index}", id=f"{target}-{when}-step:{index}")
        for index, picked in enumerate(matrix.chosen(variants, len(steps)))
        for target, when in picked
    ]


# --- removal -------------------------------------------------------------------------------------------------------


def _members(diff: membership_pb2.MembershipDiff) -> list[str]:
    return sorted(m.name for m in diff.members)


@pytest.mark.parametrize(("target", "boundary"), _cases(REMOVAL_STEPS))
def test_a_removal_survives_an_agent_killed_at_every_step_boundary(tmp_path: Path, target: str, boundary: str) -> None:
    with stopping_at(tmp_path / "lab", boundary) as case, Client(case.endpoint) as client:
        killed = case.lab.node("n3" if target == "changed" else VIA)
        first = case.run_while_stopped(
            lambda: client.remove_member("n3", request_id="remove-n3"),
            killed["pid"],
            Path(killed["state_dir"]) / "agent.json",
            killed["agent_address"],
        )
        assert len(first.steps) == len(REMOVAL_STEPS)
        operation = case.finished(client, first.id)
        if operation.state == o.OPERATION_STATE_ROLLED_BACK:
            assert operation.error, "a rollback says why"
            assert _members(case.settled(client)) == ["n1", "n2", "n3"], "rolled back whole"
            retried = client.remove_member("n3", request_id="remove-n3-again")
            case.outcome.append(f"retried: {_state(retried)}")
            assert retried.state == o.OPERATION_STATE_SUCCEEDED, retried
        else:
            assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        diff = case.settled(client)
        assert _members(diff) == ["n1", "n2"] and list(diff.nodes) == ["n1", "n2"], "n3 is wholly out"
        assert list(diff.discrepancies) == []
        assert not (Path(case.lab.node("n3")["state_dir"]) / "database" / "info.yaml").exists(), "n3 is fenced"


# --- join ----------------------------------------------------------------------------------------------------------


def _reset(joiner: labs.JoiningNode) -> None:
    """What an operator does to a fenced node before it joins again: a fresh engine identity."""
    database = joiner.state_dir / "database"
    if not (database / "info.yaml").exists():
        write_node_info(database / "info.yaml", random.SystemRandom().getrandbits(63), joiner.address, Role.VOTER)
        write_raft_config(database / "cluster.yaml", [])


@pytest.mark.parametrize(("target", "boundary"), _cases(JOIN_STEPS))
def test_a_join_survives_an_agent_killed_at_every_step_boundary(tmp_path: Path, target: str, boundary: str) -> None:
    with stopping_at(tmp_path / "lab", boundary) as case, Client(case.endpoint) as client:
        joiner = labs.start_joining_node(case.lab, "n4")
        case.started.append(labs._children.pop(joiner.pid))
        token = client.issue_token("n4", request_id="token-n4").token
        if target == "changed":
            pid, config, agent = joiner.pid, joiner.state_dir / "agent.json", joiner.agent_address
        else:
            killed = case.lab.node(VIA)
            pid, config, agent = killed["pid"], Path(killed["state_dir"]) / "agent.json", killed["agent_address"]
        first = case.run_while_stopped(lambda: joiner.join(token), pid, config, agent)
        assert len(first.steps) == len(JOIN_STEPS)
        operation = case.finished(client, first.id)
        if operation.state == o.OPERATION_STATE_ROLLED_BACK:
            assert operation.error, "a rollback says why"
            assert _members(case.settled(client)) == ["n1", "n2", "n3"], "no trace of n4"
            # The fenced joiner gets a fresh engine identity and asks again with the same token, released.
            _reset(joiner)
            retried = joiner.join(token)
            case.outcome.append(f"retried: {_state(retried)}")
            assert retried.state == o.OPERATION_STATE_SUCCEEDED, retried
        else:
            assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        diff = case.settled(client)
        assert _members(diff) == ["n1", "n2", "n3", "n4"] and list(diff.nodes) == ["n1", "n2", "n3", "n4"]
        assert list(diff.discrepancies) == []
        assert client.list_tokens() == [], "the token was consumed"
