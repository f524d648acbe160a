"""Restarting a lab's processes for a test, through the lab's own `restart` (coordinator/lab/lab.py): its coordinator
with a fault armed or a setting changed, or after a crash, an agent after a kill; and freezing and killing them.

A restarted process binds the ports it had (the lab pins them in its configuration), is listed in lab.json (so that
`lab down` stops it, whatever the test does) and is returned as a Popen for the test to stop, signal or wait for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from memberguard import Endpoint

from coordinator.lab import lab as labs


def start_coordinator(
    lab: labs.Lab, env: dict[str, str], settings: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], Endpoint]:
    """Restarts the lab's coordinator (stopping the running one first: it holds the journal) with env added to its
    environment and settings to its configuration, and returns once it serves — after its reconciler has run — with
    the endpoint of its operators' listener. Its output goes to the lab's logs/coordinator-restarts.log."""
    config = None
    if settings:
        document = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
        config = lab.dir / "coordinator" / "coordinator-test.json"
        config.write_text(json.dumps({**document, **settings}))
    process = labs.restart_coordinator(
        lab, config=config, environment=env, log=lab.dir / "logs" / "coordinator-restarts.log"
    )
    return process, lab.endpoint


def _state(pid: int) -> str:
    """The process's state letter (R, S, T, Z, ...); it follows the command name, in parentheses that may hold
    spaces."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def wait_until_stopped(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Returns once process is stopped (SIGSTOP, state T); fails if it exits or does not stop in time."""
    deadline = time.monotonic() + timeout
    while _state(process.pid) != "T":
        assert process.poll() is None, "the process exited instead of stopping"
        assert time.monotonic() < deadline, "the process did not stop"
        time.sleep(0.005)


def kill_agent(pid: int) -> None:
    """kill -9 an agent of the lab, and returns once it is dead (reaped, if this process started it)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and _state(pid) != "Z":
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.005)
    child = labs._children.pop(pid, None)
    if child is not None:
        child.wait()


def restart_agent(config: Path, agent_address: str, log: Path) -> subprocess.Popen[bytes]:
    """Restarts the agent of config (a lab node's, a joiner's included) on the address it had, its coordinator knows
    it by that address; returns once it serves, its output going to log. The caller stops it (or `lab down` does)."""
    document = json.loads(config.read_text())
    assert document["listen"] == agent_address, f"{config} does not pin {agent_address}"
    state_dir = Path(document["state_dir"])
    lab = labs.Lab.load(state_dir.parent.parent)  # a node's state directory is DIR/nodes/NAME
    return labs.restart_agent(lab, document["name"], log=log)
