"""The reconciler of a running coordinator, and CheckMembership while an operation is in flight, on real lab processes.

A removal of n3 is stopped at a step boundary (MEMBERGUARD_FAULT "stop-…"), an agent is killed or frozen there, and
the coordinator is continued: the removal parks for want of the agent, and the reconciler finishes it once the agent
is back (every reconcile interval, and at once when a gather hears the agent again); or it hangs on a frozen agent,
and meanwhile CheckMembership explains what the removal leaves about n3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from memberguard import Client, Endpoint
from memberguard.errors import InvalidArgument, NotAbandonable, OperationParked
from memberguard.v1 import membership_pb2
from memberguard.v1 import operation_pb2 as o

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests.restarts import kill_agent, restart_agent, start_coordinator, wait_until_stopped

# The removal of n3 from a 3-node lab: 0 leaves Raft (the commit point), 1 the row goes, 2-4 the truststores of n1,
# n2 and n3, then n3 is fenced and forgotten. tests/test_crash_matrix_agents.py derives it from the planner.
AFTER_ITS_ROW_IS_GONE = "stop-after-step:1"
BEFORE_ITS_ROW_GOES = "stop-before-step:1"


@dataclass
class Stopped:
    lab: labs.Lab
    coordinator: subprocess.Popen[bytes]
    endpoint: Endpoint


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3)
    os.kill(running.document["coordinator"]["pid"], signal.SIGTERM)
    yield running
    for node in running.document["nodes"]:
        try:
            os.kill(node["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    labs.down(running.dir)


@contextmanager
def _coordinator(lab: labs.Lab, fault: str, interval: float) -> Iterator[Stopped]:
    """The lab's coordinator with fault armed and the reconcile interval given; stopped (cleanly) at the end."""
    process, endpoint = start_coordinator(lab, {FAULT_ENV: fault}, {"reconcile_interval": interval})
    try:
        yield Stopped(lab, process, endpoint)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        assert process.wait(10) == 0, "the coordinator stops cleanly, its reconciler cancelled"


def _removal_stopped(client: Client, coordinator: subprocess.Popen[bytes], act: Callable[[], Any]) -> Future[Any]:
    """Starts removing n3; once the coordinator is stopped at its boundary, acts and continues it."""
    pool = ThreadPoolExecutor(1)
    running = pool.submit(client.remove_member, "n3", request_id="remove-n3")
    pool.shutdown(wait=False)
    wait_until_stopped(coordinator)
    act()
    os.kill(coordinator.pid, signal.SIGCONT)
    return running


def _agent_config(lab: labs.Lab, name: str) -> Path:
    return Path(lab.node(name)["state_dir"]) / "agent.json"


def _park_for_want_of_n3(stopped: Stopped, client: Client) -> o.Operation:
    n3 = stopped.lab.node("n3")
    parked: o.Operation = _removal_stopped(client, stopped.coordinator, lambda: kill_agent(n3["pid"])).result(30)
    assert parked.state == o.OPERATION_STATE_PARKED, parked
    assert "n3" in parked.error and "n3's truststore" in parked.plan, parked
    return parked


def _until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s"
        time.sleep(0.05)


def test_each_pass_keeps_a_parked_removal_parked_while_its_agent_is_away_then_finishes_it(
    own_lab: labs.Lab,
) -> None:
    with _coordinator(own_lab, AFTER_ITS_ROW_IS_GONE, interval=0.2) as stopped, Client(stopped.endpoint) as client:
        parked = _park_for_want_of_n3(stopped, client)
        # Parked, it is not going to plan: what it left is not explained away.
        diff = client.check_membership(timeout=10).diff
        assert [(d.kind, d.node, d.severity, d.explained_by_operation_id) for d in diff.discrepancies] == [
            (membership_pb2.DISCREPANCY_KIND_AGENT_UNREACHABLE, "n3", membership_pb2.SEVERITY_WARNING, "")
        ]
        time.sleep(1.0)  # five passes: n3's agent is silent, so each leaves the removal as it is
        assert client.get_operation(parked.id) == parked
        n3 = own_lab.node("n3")
        agent = restart_agent(_agent_config(own_lab, "n3"), n3["agent_address"], own_lab.dir / "logs" / "n3.log")
        try:
            # No gather but the reconciler's own: a pass finds n3 back and finishes the removal.
            _until(lambda: client.get_operation(parked.id).state == o.OPERATION_STATE_SUCCEEDED, 5.0)
            diff = client.check_membership(timeout=10).diff
            assert list(diff.discrepancies) == [] and sorted(m.name for m in diff.members) == ["n1", "n2"]
        finally:
            agent.kill()
            agent.wait()


def test_an_agent_that_answers_again_wakes_the_reconciler_at_once(own_lab: labs.Lab) -> None:
    with _coordinator(own_lab, AFTER_ITS_ROW_IS_GONE, interval=60.0) as stopped, Client(stopped.endpoint) as client:
        parked = _park_for_want_of_n3(stopped, client)
        n3 = own_lab.node("n3")
        agent = restart_agent(_agent_config(own_lab, "n3"), n3["agent_address"], own_lab.dir / "logs" / "n3.log")
        try:
            # A gather that hears n3 again wakes the reconciler: it does not wait for its next pass, a minute
            # away. (The first gathers may find the channel to n3 still backing off.)
            def finished() -> bool:
                client.check_membership(timeout=10)
                return client.get_operation(parked.id).state == o.OPERATION_STATE_SUCCEEDED

            _until(finished, 10.0)
            assert list(client.check_membership(timeout=10).diff.discrepancies) == []
        finally:
            agent.kill()
            agent.wait()


def test_check_membership_explains_what_a_removal_in_flight_leaves_about_its_member(own_lab: labs.Lab) -> None:
    n1 = own_lab.node("n1")  # the member the removal's cluster-wide steps go through
    with _coordinator(own_lab, BEFORE_ITS_ROW_GOES, interval=2.0) as stopped, Client(stopped.endpoint) as client:
        # n1 frozen: the removal, past its commit point, waits for n1 to delete n3's row.
        removal = _removal_stopped(client, stopped.coordinator, lambda: os.kill(n1["pid"], signal.SIGSTOP))
        try:
            [running] = client.list_operations().operations
            assert running.state == o.OPERATION_STATE_RUNNING
            diff = client.check_membership(agent_timeout=0.3, timeout=10).diff
            explained = [d for d in diff.discrepancies if d.explained_by_operation_id]
            assert {d.explained_by_operation_id for d in explained} == {running.id}
            assert all(d.severity == membership_pb2.SEVERITY_INFO for d in explained)
            missing = [d for d in explained if d.kind == membership_pb2.DISCREPANCY_KIND_MISSING]
            assert [d.member.name for d in missing] == ["n3"], "its row outlives its Raft entry"
            # n1's silence is not the removal's doing: it keeps its severity.
            loud = client.check_membership(
                agent_timeout=0.3, minimum_severity=membership_pb2.SEVERITY_WARNING, timeout=10
            ).diff
            assert [(d.kind, d.node, d.explained_by_operation_id) for d in loud.discrepancies] == [
                (membership_pb2.DISCREPANCY_KIND_AGENT_UNREACHABLE, "n1", "")
            ]
            assert loud.fingerprint == diff.fingerprint
        finally:
            os.kill(n1["pid"], signal.SIGCONT)
        assert removal.result(30).state == o.OPERATION_STATE_SUCCEEDED
        assert list(client.check_membership(timeout=10).diff.discrepancies) == []


def test_an_operator_abandons_a_parked_removal_only_by_force_with_its_discrepancies_acknowledged(
    own_lab: labs.Lab,
) -> None:
    with _coordinator(own_lab, AFTER_ITS_ROW_IS_GONE, interval=60) as stopped, Client(stopped.endpoint) as client:
        parked = _park_for_want_of_n3(stopped, client)
        with pytest.raises(OperationParked):
            client.issue_token("n5")  # a parked operation blocks every change
        with pytest.raises(InvalidArgument):
            client.abandon_operation(parked.id, " ")  # the journal keeps why
        with pytest.raises(NotAbandonable) as refused:
            client.abandon_operation(parked.id, "n3 is gone for good")
        assert [v[0] for v in refused.value.violations] == ["PAST_COMMIT_POINT"]
        assert client.get_operation(parked.id) == parked, "a refusal changes nothing"
        with pytest.raises(NotAbandonable) as refused:
            client.abandon_operation(parked.id, "n3 is gone for good", force=True)
        about_n3 = [v[1] for v in refused.value.violations]
        assert about_n3, "forced, it still needs the discrepancies about n3 acknowledged"
        abandoned = client.abandon_operation(
            parked.id, "n3 is gone for good", force=True, acknowledged_discrepancy_ids=about_n3
        )
        assert abandoned.state == o.OPERATION_STATE_ABANDONED
        assert abandoned.error.startswith("abandoned by ") and "n3 is gone for good" in abandoned.error
        assert [s.state for s in abandoned.steps] == [s.state for s in parked.steps], "what it did stays as it was"
        with pytest.raises(NotAbandonable) as refused:
            client.abandon_operation(parked.id, "again")
        assert [v[0] for v in refused.value.violations] == ["NOT_PARKED"]
        # No longer parked, it blocks nothing of its own; what it left is in the diff, for a repair or a removal.
        assert client.get_operation(parked.id).state == o.OPERATION_STATE_ABANDONED
        assert all(op.state != o.OPERATION_STATE_PARKED for op in client.list_operations().operations)
