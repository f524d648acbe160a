"""Running a lab's processes in processes of the test's own: its coordinator with a fault armed or restarted after a
crash, an agent restarted after a kill; and freezing and killing them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from memberguard import Endpoint

from coordinator import lab as labs


def start_coordinator(
    lab: labs.Lab, env: dict[str, str], settings: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], Endpoint]:
    """Starts the lab's coordinator configuration (the lab's own process must be stopped: it holds the journal), with
    settings added to it, and returns once it serves — after its reconciler has run — with the endpoint of its
    operators' listener. Its output goes to the lab's logs/coordinator-restarts.log."""
    config = lab.dir / "coordinator" / "coordinator.json"
    document = json.loads(config.read_text())
    if settings:
        config = config.with_name("coordinator-test.json")
        config.write_text(json.dumps({**document, **settings}))
    port_file, join_port_file = Path(document["port_file"]), Path(document["join_port_file"])
    port_file.unlink(missing_ok=True)
    join_port_file.unlink(missing_ok=True)
    with (lab.dir / "logs" / "coordinator-restarts.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.service", str(config)],
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and join_port_file.exists()):
        assert process.poll() is None and time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)
    base = lab.endpoint
    return process, Endpoint(f"127.0.0.1:{port_file.read_text()}", base.ca, base.server_name, base.cert, base.key)


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
    """Starts the agent of config again on the address it had (its coordinator knows it by that address, and the lab
    lets the first start choose a free port); returns once it serves. The caller stops it."""
    document = json.loads(config.read_text())
    state_dir = Path(document["state_dir"])
    port_file = state_dir / "agent-restarted.port"
    port_file.unlink(missing_ok=True)
    restarted = state_dir / "agent-restarted.json"
    restarted.write_text(json.dumps({**document, "listen": agent_address, "port_file": str(port_file)}))
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.agent", str(restarted)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not port_file.exists():
        assert process.poll() is None, f"the restarted agent exited; see {log}"
        assert time.monotonic() < deadline, "the restarted agent did not start"
        time.sleep(0.01)
    return process
