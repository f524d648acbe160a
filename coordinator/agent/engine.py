"""A node's dqlite engine process, as its agent starts and stops it for the steps that need it.

On a real node the daemon runs the engine; in memberguard's lab the engine is the Go test node
(coordinator/lab/go/testnode), and the agent is what a join or a fence asks to start or stop it. The engine's pid is
kept in `<state_dir>/engine.pid`, written by whoever started it (the lab for the members it lays out, the agent for
a joiner), so that an agent that restarted still finds the engine it must fence.

go-dqlite's files in the data directory decide what a started engine does (docs/design.md, "Backends"): info.yaml is its
identity, cluster.yaml the addresses it looks for a leader at, and the `join` flag makes it add itself to the
configuration — retried every second until it succeeds, on every start, which is why fencing clears the flag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from coordinator.files import write_atomically

PID_FILE = "engine.pid"
JOIN_FLAG = "join"
_STOP_TIMEOUT = 5.0


class Engine:
    """The engine of one node: `command`, with `environment` added to the agent's, starts it (the data directory and
    the node's address are in the command)."""

    def __init__(self, state_dir: Path, data_dir: Path, command: Sequence[str], environment: Mapping[str, str]) -> None:
        self._pid_file = state_dir / PID_FILE
        self._log = state_dir / "node.log"
        self.data_dir = data_dir
        self._command = tuple(command)
        self._environment = {**os.environ, **environment}
        self._child: subprocess.Popen[bytes] | None = None  # the engine this agent started, reaped by poll()

    def pid(self) -> int | None:
        """The running engine's pid, or None: no pid file, or its process is gone (or is not an engine)."""
        if self._child is not None and self._child.poll() is not None:
            self._child = None
        try:
            pid = int(self._pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_engine(pid, Path(self._command[0]).name) else None

    def start(self) -> int:
        """Starts the engine unless it runs; its pid. Its stdout and stderr go to `<state_dir>/node.log`."""
        running = self.pid()
        if running is not None:
            return running
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            # Its own session: the engine outlives this agent (a restarted agent finds it by its pid file), as a
            # daemon's engine would.
            self._child = subprocess.Popen(
                self._command, stdout=log, stderr=log, env=self._environment, start_new_session=True
            )
        write_pid_file(self._pid_file.parent, self._child.pid)
        return self._child.pid

    def stop(self) -> bool:
        """Kills the engine (a fence is decisive: no hand-over) and waits until it is gone; True if it ran."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        if self._child is not None and self._child.pid == pid:
            self._child.wait(_STOP_TIMEOUT)
            self._child = None
        else:
            # Waited for by its state, not its command line: an exiting process loses its command line before it
            # has stopped running.
            deadline = time.monotonic() + _STOP_TIMEOUT
            while _state(pid) not in (None, b"Z", b"X") and time.monotonic() < deadline:
                time.sleep(0.01)
        return True


def write_pid_file(state_dir: Path, pid: int) -> None:
    """Records the pid of a node's engine; the lab calls it for the members it starts, for their agents to fence."""
    write_atomically(state_dir / PID_FILE, f"{pid}\n".encode())


def _state(pid: int) -> bytes | None:
    """The process's state letter (/proc/PID/stat), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _is_engine(pid: int, binary: str) -> bool:
    """The process lives (a zombie does not) and runs `binary`: a pid file that outlived its engine may name a
    process the pid was reused for, which must never be killed."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return _state(pid) not in (None, b"Z", b"X") and os.path.basename(command) == binary.encode()
