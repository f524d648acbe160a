"""Crash matrix on the real engine: a join (n4 joining a 3-node dqlite lab) and a removal (n3, not the leader), with
one target killed with SIGKILL at every step boundary and started again.

The targets: the coordinator (it exits at the boundary, MEMBERGUARD_FAULT "before-step:N"/"after-step:N", and is
started again on the same journal); the agent of the node being changed (the joiner, the removed member); the agent
that the cluster-wide steps go through; the changed node's engine (if it runs at that boundary); the leader's
engine. For all but the coordinator, the coordinator stops itself at the boundary ("stop-…-step:N"), the target is
killed while it is frozen, the coordinator is continued, and the target is started again half a second later: an
agent on its own address, an engine as a supervisor would start it (only if its data still has an identity: a
fenced node's daemon starts no engine; its command and environment from its agent.json).

Whatever the case, within a bounded wait (two role-adjustment intervals plus recovery): nothing WARNING or worse
in CheckMembership, no operation left unfinished (a parked one says why, and the reconciler finishes it once its
target is back), the member wholly in or wholly out (the leader's CLUSTER, its members table and the diff agree),
and an operation that rolled back succeeds when asked again.

Selection (tests/matrix.py): by default each step once, before or after it, the ten moments and targets taking turns
over the steps, the removal's and the join's together; MEMBERGUARD_CRASH_MATRIX=full runs every boundary with every
target (`make crash-matrix`). Each case brings up its own 3-node dqlite lab. Run with -s to see each case's outcome.
"""

from __future__ import annotations

import contextlib
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

from coordinator.agent.engine import JOIN_FLAG, Engine
from coordinator.agent.raft_files import write_node_info, write_raft_config
from coordinator.core.diff import compute_diff
from coordinator.core.model import Role
from coordinator.core.plan import Joiner, PlannedStep, plan_join, plan_removal
from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests import matrix
from tests.core.views import consistent_view
from tests.engines import LeaderView, engine_pid, kill_engine, leader_view, reap, restart_engine
from tests.restarts import kill_agent, restart_agent, start_coordinator, wait_until_stopped
from tests.settling import settled

pytestmark = pytest.mark.dqlite

ROLES_INTERVAL = 0.5
RESTART_AFTER = 0.5  # seconds between the kill and the target's restart
RECOVERY = 15.0  # seconds for the reconciler to finish what the kill left, once the target is back
SETTLE_TIMEOUT = 2 * ROLES_INTERVAL + RECOVERY
TARGETS = ("coordinator", "changed-agent", "via-agent", "changed-engine", "leader-engine")
REMOVED, JOINER, STAYS = "n3", "n4", "n2"  # STAYS: a member never removed, whose certificate reads the cluster


def _planned() -> tuple[tuple[PlannedStep, ...], tuple[PlannedStep, ...]]:
    """The steps of removing n3 from, and of joining n4 to, a consistent 3-member cluster, as the lab plans them."""
    diff = compute_diff(consistent_view(3))
    nodes = {"n1", "n2", "n3"}
    removed = next(m for m in diff.members if m.name == REMOVED)
    removal = plan_removal(diff, removed, reachable=nodes)
    joiner = Joiner(JOINER, "127.0.0.1:7004", "pem", "127.0.0.1:8004", 4)
    join = plan_join(diff, joiner, reachable=nodes, certificates=dict.fromkeys(nodes, "pem"))
    return removal.steps, join.steps


REMOVAL_STEPS, JOIN_STEPS = _planned()
# The member the cluster-wide steps go through: the first step's target in both plans.
VIA = REMOVAL_STEPS[0].target
assert VIA == JOIN_STEPS[0].target and VIA not in (REMOVED, JOINER, STAYS)


def _selection() -> list[tuple[str, str, str]]:
    """(operation, boundary, target) of every case to run."""
    steps = [("remove", i) for i in range(len(REMOVAL_STEPS))] + [("join", i) for i in range(len(JOIN_STEPS))]
    variants = [(when, target) for target in TARGETS for when in ("before", "after")]
    return [
        (kind, f"{when}-step:{index}", target)
        for (kind, index), picked in zip(steps, matrix.chosen(variants, len(steps)), strict=True)
        for when, target in picked
    ]


def _cases(kind: str) -> list[Any]:
    return [
        pytest.param(boundary, target, id=f"{target}-{boundary}")
        for which, boundary, target in _selection()
        if which == kind
    ]


def _state(operation: o.Operation) -> str:
    return o.OperationState.Name(operation.state).removeprefix("OPERATION_STATE_").lower().replace("_", " ")


def _names(diff: membership_pb2.MembershipDiff) -> list[str]:
    return sorted(m.name for m in diff.members)


# --- one case ------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """A dqlite lab with its coordinator armed at a boundary, the target to kill there, and what the case started."""

    lab: labs.Lab
    kind: str  # "remove" or "join"
    boundary: str
    target: str
    coordinator: subprocess.Popen[bytes]
    endpoint: Endpoint
    joiner: labs.JoiningNode | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    engines: list[Engine] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)
    last: str = ""  # the operation's state as last recorded in outcome

    # --- the nodes -----------------------------------------------------------------------------------------------

    @property
    def changed(self) -> str:
        return REMOVED if self.kind == "remove" else JOINER

    def state_dir(self, name: str) -> Path:
        if self.joiner is not None and name == self.joiner.name:
            return self.joiner.state_dir
        return Path(self.lab.node(name)["state_dir"])

    def addresses(self) -> dict[str, str]:
        """Every node's engine address, the joiner's included."""
        found = {n["address"]: n["name"] for n in self.lab.document["nodes"]}
        if self.joiner is not None:
            found[self.joiner.address] = self.joiner.name
        return found

    def leader(self) -> LeaderView:
        return leader_view(list(self.addresses()), self.state_dir(STAYS))

    # --- killing and restarting ----------------------------------------------------------------------------------

    def _kill_agent(self, name: str) -> Callable[[], None]:
        if self.joiner is not None and name == self.joiner.name:
            pid, address = self.joiner.pid, self.joiner.agent_address
        else:
            node = self.lab.node(name)
            pid, address = node["pid"], node["agent_address"]
        kill_agent(pid)
        log = self.lab.dir / "logs" / "restarted-agents.log"
        config = self.state_dir(name) / "agent.json"
        self.outcome.append(f"killed {name}'s agent")
        return lambda: self.started.append(restart_agent(config, address, log))

    def _kill_engine(self, name: str) -> Callable[[], None]:
        state_dir = self.state_dir(name)
        if kill_engine(state_dir) is None:
            self.outcome.append(f"{name}'s engine was not running")
            return lambda: None
        self.outcome.append(f"killed {name}'s engine")

        def restart() -> None:
            engine = restart_engine(state_dir)
            if engine is None:
                self.outcome.append("not restarted (fenced)")
            else:
                self.engines.append(engine)

        return restart

    def kill_target(self) -> Callable[[], None]:
        """Kills the case's target (the coordinator is frozen); what restarts it."""
        match self.target:
            case "changed-agent":
                return self._kill_agent(self.changed)
            case "via-agent":
                return self._kill_agent(VIA)
            case "changed-engine":
                return self._kill_engine(self.changed)
            case "leader-engine":
                return self._kill_engine(self.addresses()[self.leader().address])
        raise AssertionError(self.target)

    def restart_coordinator(self) -> None:
        self.coordinator, self.endpoint = start_coordinator(self.lab, {})
        self.outcome.append("coordinator restarted")

    # --- running the operation -----------------------------------------------------------------------------------

    def run(self, start: Callable[[], o.Operation]) -> str:
        """Starts the operation, kills the target at the boundary and restarts it; the operation's id."""
        kinds = {"remove": o.OPERATION_KIND_REMOVE, "join": o.OPERATION_KIND_JOIN}
        with ThreadPoolExecutor(1) as pool:
            running: Future[o.Operation] = pool.submit(start)
            if self.target == "coordinator":
                assert self.coordinator.wait(60) == 137, "the armed fault did not fire"
                with pytest.raises(Exception):  # noqa: B017 - the call is cut short, however the client says it
                    running.result(timeout=60)
                self.outcome.append("coordinator killed")
                self.restart_coordinator()
                with Client(self.endpoint) as client:
                    [operation] = [op for op in client.list_operations().operations if op.kind == kinds[self.kind]]
                self.record(operation)
                return operation.id
            wait_until_stopped(self.coordinator)
            restart = self.kill_target()
            os.kill(self.coordinator.pid, signal.SIGCONT)
            time.sleep(RESTART_AFTER)
            restart()
            first = running.result(timeout=60)
        self.record(first)
        return first.id

    def record(self, operation: o.Operation) -> None:
        if _state(operation) != self.last:
            self.last = _state(operation)
            self.outcome.append(self.last)

    def settled(self, client: Client) -> membership_pb2.MembershipDiff:
        return settled(client, SETTLE_TIMEOUT, parked=self.record)

    def finished(self, client: Client, operation_id: str) -> o.Operation:
        """The operation once everything settled (see settled), which the outcome says with the time it took."""
        began = time.monotonic()
        self.settled(client)
        final = client.get_operation(operation_id)
        self.record(final)
        self.outcome.append(f"settled in {time.monotonic() - began:.1f} s")
        return final


@contextmanager
def armed(directory: Path, kind: str, boundary: str, target: str) -> Iterator[Case]:
    """A fresh 3-node dqlite lab whose coordinator exits (target: the coordinator) or stops at boundary; every
    process of the case stopped when it ends."""
    lab = labs.up(directory, 3, backend="dqlite", roles_interval=ROLES_INTERVAL)
    engines: list[Engine] = []
    try:
        labs._stop([lab.document["coordinator"]["pid"]])
        fault = boundary if target == "coordinator" else f"stop-{boundary}"
        coordinator, endpoint = start_coordinator(lab, {FAULT_ENV: fault})
        case = Case(lab, kind, boundary, target, coordinator, endpoint, engines=engines)
        try:
            yield case
        finally:
            if case.coordinator.poll() is None:
                os.kill(case.coordinator.pid, signal.SIGCONT)
                case.coordinator.terminate()
                case.coordinator.wait(10)
            for process in case.started:
                process.kill()
                process.wait()
            if case.joiner is not None:
                case.joiner.stop()
            # The matrix's outcomes, for whoever runs it with -s.
            print(f"\nMATRIX {kind} {boundary} {target}: {'; '.join(case.outcome)}", end="")
    finally:
        labs.down(lab.dir)
        for engine in engines:
            reap(engine)
        # An engine its agent fenced is a zombie child of this process (the lab started it) that `down` leaves:
        # reaped here, it is no ResourceWarning when the interpreter exits.
        for pid, child in list(labs._children.items()):
            if child.poll() is not None:
                del labs._children[pid]


def _check_leader(case: Case, names: list[str]) -> None:
    """The leader's configuration holds exactly the engines of names, and its members table exactly their rows."""
    view = case.leader()
    addresses = case.addresses()
    assert sorted(addresses[node.address] for node in view.nodes) == names, view
    assert view.rows == names, view


# --- removal -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("boundary", "target"), _cases("remove"))
def test_a_removal_survives_a_kill_at_every_step_boundary(tmp_path: Path, boundary: str, target: str) -> None:
    with armed(tmp_path / "lab", "remove", boundary, target) as case, contextlib.ExitStack() as stack:
        assert case.leader().address != case.lab.node(REMOVED)["address"], "the plain case removes a follower"
        client = stack.enter_context(Client(case.endpoint))
        operation_id = case.run(lambda: client.remove_member(REMOVED, request_id="remove-n3"))
        client = stack.enter_context(Client(case.endpoint))  # the coordinator's, restarted or not
        operation = case.finished(client, operation_id)
        assert len(operation.steps) == len(REMOVAL_STEPS)
        if operation.state == o.OPERATION_STATE_ROLLED_BACK:
            assert operation.error, "a rollback says why"
            assert _names(case.settled(client)) == ["n1", "n2", "n3"], "rolled back whole"
            _check_leader(case, ["n1", "n2", "n3"])
            retried = client.remove_member(REMOVED, request_id="remove-n3-again")
            case.outcome.append(f"retried: {_state(retried)}")
            assert retried.state == o.OPERATION_STATE_SUCCEEDED, retried
        else:
            assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        diff = case.settled(client)
        assert _names(diff) == ["n1", "n2"] and list(diff.nodes) == ["n1", "n2"], "n3 is wholly out"
        _check_leader(case, ["n1", "n2"])
        removed = case.state_dir(REMOVED)
        assert engine_pid(removed) is None, "n3 is fenced: its engine stopped"
        assert not (removed / "database" / "info.yaml").exists(), "n3 is fenced: its engine's data cleared"


# --- join ----------------------------------------------------------------------------------------------------------


def _check_cut_off(case: Case) -> None:
    """A joiner whose join rolled back cannot add itself again: its engine stopped, no join flag; fenced (its data
    cleared) or, if its agent did not answer the fence, its trust revoked on every member."""
    database = case.state_dir(JOINER) / "database"
    assert engine_pid(database.parent) is None, "the joiner's engine stopped"
    assert not (database / JOIN_FLAG).exists(), "the joiner has no join flag left"
    if (database / "info.yaml").exists():
        trusting = [name for name in ("n1", "n2", "n3") if (case.state_dir(name) / "truststore" / "n4.yaml").exists()]
        assert trusting == [], "the joiner was not fenced, and is still trusted"
        case.outcome.append("joiner not fenced (its agent was down), trusted nowhere")


def _reset(joiner: labs.JoiningNode) -> None:
    """What an operator does to a fenced node before it joins again: a fresh engine identity."""
    database = joiner.state_dir / "database"
    if not (database / "info.yaml").exists():
        write_node_info(database / "info.yaml", random.SystemRandom().getrandbits(63), joiner.address, Role.VOTER)
        write_raft_config(database / "cluster.yaml", [])


@pytest.mark.parametrize(("boundary", "target"), _cases("join"))
def test_a_join_survives_a_kill_at_every_step_boundary(tmp_path: Path, boundary: str, target: str) -> None:
    with armed(tmp_path / "lab", "join", boundary, target) as case, contextlib.ExitStack() as stack:
        joiner = case.joiner = labs.start_joining_node(case.lab, JOINER)
        case.started.append(labs._children.pop(joiner.pid))
        client = stack.enter_context(Client(case.endpoint))
        token = client.issue_token(JOINER, request_id="token-n4").token
        operation_id = case.run(lambda: joiner.join(token))
        client = stack.enter_context(Client(case.endpoint))  # the coordinator's, restarted or not
        operation = case.finished(client, operation_id)
        assert len(operation.steps) == len(JOIN_STEPS)
        if operation.state == o.OPERATION_STATE_ROLLED_BACK:
            assert operation.error, "a rollback says why"
            assert _names(case.settled(client)) == ["n1", "n2", "n3"], "no trace of n4"
            _check_leader(case, ["n1", "n2", "n3"])
            _check_cut_off(case)
            # The fenced joiner gets a fresh engine identity and asks again. A new token: a coordinator the case
            # restarted listens for joins on another port than the one the first token names.
            _reset(joiner)
            token = client.issue_token(JOINER, request_id="token-n4-again").token
            retried = joiner.join(token)
            case.outcome.append(f"retried: {_state(retried)}")
            assert retried.state == o.OPERATION_STATE_SUCCEEDED, retried
        else:
            assert operation.state == o.OPERATION_STATE_SUCCEEDED, operation
        diff = case.settled(client)
        assert _names(diff) == ["n1", "n2", "n3", "n4"] and list(diff.nodes) == ["n1", "n2", "n3", "n4"]
        _check_leader(case, ["n1", "n2", "n3", "n4"])
        [entry] = [node for node in case.leader().nodes if node.address == joiner.address]
        assert f"ID: {entry.id}" in (joiner.state_dir / "database" / "info.yaml").read_text(), "the engine that joined"
        assert engine_pid(joiner.state_dir) is not None, "n4's engine runs"
        assert client.list_tokens() == [], "the token was consumed"
