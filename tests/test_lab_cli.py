"""`memberguard lab up|down` and `check` as a user runs them: the console script, in processes of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MEMBERGUARD = str(Path(sys.executable).parent / "memberguard")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MEMBERGUARD, *args], capture_output=True, text=True, timeout=120)


def test_a_lab_goes_up_is_checked_diverges_and_goes_down(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    up = _run("lab", "up", "--dir", str(lab), "--nodes", "2")
    assert up.returncode == 0, up.stderr
    try:
        document = json.loads((lab / "lab.json").read_text())
        assert document["backend"] == "local"
        assert [n["name"] for n in document["nodes"]] == ["n1", "n2"]
        paths = [document["coordinator"]["ca"], document["operator"]["cert"], document["operator"]["key"]]
        paths += [*document["sources"].values(), *(n["state_dir"] for n in document["nodes"])]
        assert all(Path(p).is_absolute() and Path(p).exists() for p in paths)

        again = _run("lab", "up", "--dir", str(lab), "--nodes", "2")
        assert again.returncode == 1
        assert "a lab is running" in again.stderr and "lab down" in again.stderr

        consistent = _run("check", "--lab", str(lab))
        assert consistent.returncode == 0, consistent.stderr
        assert consistent.stdout.startswith("consistent")

        (lab / "nodes" / "n1" / "truststore" / "n2.yaml").unlink()
        diverged = _run("check", "--lab", str(lab), "--json")
        assert diverged.returncode == 1
        discrepancies = json.loads(diverged.stdout)["diff"]["discrepancies"]
        assert [(x["kind"], x["node"]) for x in discrepancies] == [("DISCREPANCY_KIND_MISSING", "n1")]
    finally:
        down = _run("lab", "down", "--dir", str(lab))
    assert down.returncode == 0, down.stderr
    for node in document["nodes"]:
        assert not _alive(node["pid"])
    assert not _alive(document["coordinator"]["pid"])

    unreachable = _run("check", "--lab", str(lab))
    assert unreachable.returncode == 3
    assert _run("lab", "up", "--dir", str(lab), "--nodes", "1").returncode == 0, "a lab that is down can go up again"
    assert _run("lab", "down", "--dir", str(lab)).returncode == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of `lab up` that was killed stays a zombie until init reaps it: it runs no code any more.
    status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else ""
    return "State:\tZ" not in status


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _run("lab", "up").returncode == 2
    assert _run("check", "--lab", str(tmp_path / "nowhere")).returncode == 2
