"""`memberguard lab restart`: one process of a running lab started again in place, on the same ports with the same
configuration, whether it still ran or was killed; and `lab add-node`, which keeps the joiner's agent running when it
loses the coordinator mid-join."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from memberguard import Client
from memberguard.v1 import operation_pb2 as o

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs
from tests.engines import engine_pid, kill_engine
from tests.restarts import kill_agent, start_coordinator, wait_until_stopped
from tests.settling import settled

MEMBERGUARD = str(Path(sys.executable).parent / "memberguard")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEMBERGUARD, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[labs.Lab]:
    running = labs.up(tmp_path / "lab", 3)
    try:
        yield running
    finally:
        labs.down(running.dir)


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def test_the_coordinator_restarts_on_its_ports_and_earlier_tokens_still_name_it(lab: labs.Lab) -> None:
    before = lab.document["coordinator"]
    with Client(lab.endpoint) as client:
        token = client.issue_token("n4").token

    restarted = _run("lab", "restart", "--dir", str(lab.dir), "coordinator")  # it runs: stopped first
    assert restarted.returncode == 0, restarted.stderr
    after = labs.Lab.load(lab.dir).document["coordinator"]
    assert after["pid"] != before["pid"] and _gone(before["pid"]) and f"pid {after['pid']}" in restarted.stdout
    os.kill(after["pid"], signal.SIGKILL)  # and once it was killed
    assert _run("lab", "restart", "--dir", str(lab.dir), "coordinator").returncode == 0
    final = labs.Lab.load(lab.dir).document["coordinator"]
    assert (final["address"], final["join_address"]) == (before["address"], before["join_address"])
    config = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
    assert config["join_listen"] == before["join_address"] and config["listen"] == before["address"]

    # The token issued before both restarts names the join listener it had: it is still there.
    joiner = labs.start_joining_node(labs.Lab.load(lab.dir), "n4")
    try:
        joined = joiner.join(token)
        assert joined.state == o.OPERATION_STATE_SUCCEEDED, joined
    finally:
        joiner.stop()


def test_an_agent_restarts_on_its_address_running_or_killed(lab: labs.Lab) -> None:
    n2, n3 = lab.node("n2"), lab.node("n3")
    assert _run("lab", "restart", "--dir", str(lab.dir), "n2").returncode == 0
    kill_agent(n3["pid"])
    assert _run("lab", "restart", "--dir", str(lab.dir), "n3").returncode == 0
    now = labs.Lab.load(lab.dir)
    for before in (n2, n3):
        after = now.node(before["name"])
        assert after["agent_address"] == before["agent_address"] and after["pid"] != before["pid"]
        assert (
            _gone(before["pid"]) and int((Path(after["state_dir"]) / labs.AGENT_PID_FILE).read_text()) == after["pid"]
        )
    with Client(now.endpoint) as client:
        diff = client.check_membership(timeout=10).diff
    assert list(diff.discrepancies) == [] and sorted(diff.nodes) == ["n1", "n2", "n3"]

    unknown = _run("lab", "restart", "--dir", str(lab.dir), "n9")
    assert unknown.returncode == 2 and "no process 'n9'" in unknown.stderr
    no_engine = _run("lab", "restart", "--dir", str(lab.dir), "n1-engine")
    assert no_engine.returncode == 2 and "dqlite backend only" in no_engine.stderr


def test_add_node_keeps_the_joiner_running_when_it_loses_the_coordinator(lab: labs.Lab) -> None:
    """The coordinator is frozen after the join's second step, then killed: add-node hears a lost connection, and
    the join may still finish (forward or back) once the coordinator is back, which may need the joiner's agent."""
    coordinator, _ = start_coordinator(lab, {FAULT_ENV: "stop-after-step:1"})
    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(labs.add_node, lab.dir, "n4")
        wait_until_stopped(coordinator)
        coordinator.kill()
        coordinator.wait()
        with pytest.raises(labs.CoordinatorFailed) as lost:
            adding.result(timeout=60)
    assert "the join may still finish, so n4's agent keeps running" in str(lost.value), lost.value
    [joining] = labs.Lab.load(lab.dir).document["joining"]
    assert joining["name"] == "n4" and not _gone(joining["pid"]), "the joiner's agent runs, listed in lab.json"

    labs.restart(lab.dir, "coordinator")
    with Client(lab.endpoint) as client:
        diff = settled(client, 30.0)
        [operation] = [op for op in client.list_operations().operations if op.kind == o.OPERATION_KIND_JOIN]
    names = sorted(m.name for m in diff.members)
    assert names in (["n1", "n2", "n3"], ["n1", "n2", "n3", "n4"]), names
    assert operation.state in (o.OPERATION_STATE_SUCCEEDED, o.OPERATION_STATE_ROLLED_BACK), operation
    labs.down(lab.dir)
    assert _gone(joining["pid"]), "lab down stops a joiner it lists"


@pytest.mark.dqlite
def test_an_engine_restarts_running_or_killed(tmp_path: Path) -> None:
    lab = labs.up(tmp_path / "lab", 3, backend="dqlite", roles_interval=0.5)
    try:
        states = {name: Path(lab.node(name)["state_dir"]) for name in ("n2", "n3")}
        running = engine_pid(states["n2"])
        assert running is not None
        assert _run("lab", "restart", "--dir", str(lab.dir), "n2-engine").returncode == 0
        assert kill_engine(states["n3"]) is not None
        assert _run("lab", "restart", "--dir", str(lab.dir), "n3-engine").returncode == 0
        now = labs.Lab.load(lab.dir)
        for name, state_dir in states.items():
            pid = engine_pid(state_dir)
            assert pid is not None and now.node(name)["dqlite"]["pid"] == pid
        assert _gone(running)
        deadline = time.monotonic() + 30
        with Client(now.endpoint) as client:
            diff = settled(client, max(0.0, deadline - time.monotonic()))
        assert sorted(m.name for m in diff.members) == ["n1", "n2", "n3"]
    finally:
        labs.down(lab.dir)
        for pid, child in list(labs._children.items()):
            if child.poll() is not None:
                del labs._children[pid]
