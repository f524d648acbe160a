"""`memberguard lab add-node` and `memberguard join` as a user runs them: the console script, in processes of their
own, against a lab of real processes. Joins run at once queue on the coordinator's membership lock; the lab's
own lock (DIR/lab.lock) keeps their names, addresses and lab.json entries apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from memberguard import Client

from coordinator.faults import ENVIRONMENT as FAULT_ENV
from coordinator.lab import lab as labs

MEMBERGUARD = str(Path(sys.executable).parent / "memberguard")
CONCURRENT = 10


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEMBERGUARD, *args], capture_output=True, text=True, timeout=120, input=stdin)


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()  # a zombie runs no code any more
    except OSError:
        return False


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _consistent(lab: Path) -> list[str]:
    """The members, once check says the lab is consistent."""
    check = _run("check", "--lab", str(lab), "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    return sorted(m["name"] for m in json.loads(check.stdout)["diff"]["members"])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Path]:
    running = labs.up(tmp_path / "lab", 3)
    yield running.dir
    labs.down(running.dir)  # a no-op for what a test brought down itself


def test_add_node_twice_then_down_stops_the_new_agents(lab: Path) -> None:
    started = time.monotonic()
    first = _run("lab", "add-node", "--dir", str(lab))
    one = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    second = _run("lab", "add-node", "--dir", str(lab))
    assert second.returncode == 0, second.stderr
    document = json.loads((lab / "lab.json").read_text())
    added = document["nodes"][3:]
    assert [n["name"] for n in added] == ["n4", "n5"]
    assert [first.stdout.split(), second.stdout.split()] == [[n["name"], n["agent_address"]] for n in added]
    assert all(_alive(n["pid"]) for n in added)
    assert _consistent(lab) == ["n1", "n2", "n3", "n4", "n5"]

    taken = _run("lab", "add-node", "--dir", str(lab), "--name", "n4")
    assert taken.returncode == 2 and "already has a node n4" in taken.stderr

    down = _run("lab", "down", "--dir", str(lab))
    assert down.returncode == 0, down.stderr
    assert not any(_alive(n["pid"]) for n in added)

    unreachable = _run("lab", "add-node", "--dir", str(lab))
    assert unreachable.returncode == 3, unreachable.stderr
    assert not (lab / "nodes" / "n6").exists(), "a join that never ran leaves nothing behind"
    print(f"\none add-node: {one:.2f} s")


def test_add_nodes_at_once_queue_and_each_joins(lab: Path) -> None:
    started = time.monotonic()
    adding = [
        subprocess.Popen(
            [MEMBERGUARD, "lab", "add-node", "--dir", str(lab)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(CONCURRENT)
    ]
    outputs = [process.communicate(timeout=120) for process in adding]
    elapsed = time.monotonic() - started
    assert [p.returncode for p in adding] == [0] * CONCURRENT, [err for _, err in outputs]
    names = {out.split()[0] for out, _ in outputs}
    expected = {f"n{i}" for i in range(1, 4 + CONCURRENT)}
    assert names == expected - {"n1", "n2", "n3"}
    assert set(_consistent(lab)) == expected
    nodes = json.loads((lab / "lab.json").read_text())["nodes"]
    assert sorted(n["name"] for n in nodes) == sorted(expected)
    assert len({n["address"] for n in nodes}) == len(nodes) and all(_alive(n["pid"]) for n in nodes)
    print(f"\n{CONCURRENT} add-nodes at once: {elapsed:.2f} s")


def test_a_rolled_back_join_exits_1_and_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setenv(FAULT_ENV, "fail-step:2")  # trusting the joiner on n2, before the commit point
        lab = labs.up(tmp_path / "lab", 3)
    try:
        rolled_back = _run("lab", "add-node", "--dir", str(lab.dir))
        assert rolled_back.returncode == 1, rolled_back.stderr
        assert "the join of n4 rolled-back: trust n4 on n2" in rolled_back.stderr
        assert not (lab.dir / "nodes" / "n4").exists() and len(labs.Lab.load(lab.dir).document["nodes"]) == 3
        assert _run("token", "list", "--lab", str(lab.dir)).stdout.strip() == "no tokens", "its token was revoked"
        assert _consistent(lab.dir) == ["n1", "n2", "n3"]
        joiner_config = str(lab.dir / "nodes" / "n4" / "agent.json").encode()
        assert not any(joiner_config in _cmdline(pid) for pid in _pids()), "the joiner's agent was stopped"
    finally:
        labs.down(lab.dir)


def test_join_with_a_refused_token_exits_3_and_never_prints_it(lab: Path) -> None:
    joiner = labs.start_joining_node(labs.Lab.load(lab))
    try:
        with Client(labs.Lab.load(lab).endpoint) as client:
            token = client.issue_token(joiner.name).token
            client.revoke_token(joiner.name)
        join = [
            "join",
            "--name",
            joiner.name,
            "--address",
            joiner.address,
            "--cert",
            str(joiner.state_dir / "server.crt"),
            "--agent-address",
            joiner.agent_address,
            "--pins",
            str(joiner.pins),
        ]
        revoked = _run(*join, "--token", "-", stdin=token + "\n")
        assert revoked.returncode == 3, revoked.stderr
        assert "TOKEN_REVOKED" in revoked.stderr and token not in revoked.stdout + revoked.stderr
        malformed = _run(*join, "--token", token[:-4])
        assert malformed.returncode == 2 and "malformed" in malformed.stderr, malformed.stderr
        assert token[:-4] not in malformed.stdout + malformed.stderr
        assert _consistent(lab) == ["n1", "n2", "n3"]
    finally:
        joiner.stop()
    assert not os.path.exists(f"/proc/{joiner.pid}/cmdline")
