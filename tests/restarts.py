"""Running a lab's coordinator in a process of the test's own: with a fault armed, or restarted after a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from memberguard import Endpoint

from coordinator import lab as labs


def start_coordinator(lab: labs.Lab, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Endpoint]:
    """Starts the lab's coordinator configuration (the lab's own process must be stopped: it holds the journal)
    and returns once it serves — after its reconciler has run — with the endpoint of its operators' listener."""
    document = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
    port_file, join_port_file = Path(document["port_file"]), Path(document["join_port_file"])
    port_file.unlink(missing_ok=True)
    join_port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator.service", str(lab.dir / "coordinator" / "coordinator.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and join_port_file.exists()):
        assert process.poll() is None and time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)
    base = lab.endpoint
    return process, Endpoint(f"127.0.0.1:{port_file.read_text()}", base.ca, base.server_name, base.cert, base.key)
