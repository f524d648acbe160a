"""A microcluster member's state directory, for the tests that read one: copied for a test to edit, and its
heartbeat's rewrite of the truststore waited for."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from coordinator.lab import microcluster

MEMBER_FILES = ("daemon.yaml", "server.crt", "server.key", "cluster.crt", "database/info.yaml", "database/cluster.yaml")


def heartbeat_after(member: microcluster.Member) -> None:
    """Returns right after the heartbeat's next rewrite of MEMBER's truststore (every file is replaced on each one),
    so that a change made now has a whole interval before the next."""
    directory = member.state_dir / "truststore"
    before = directory.stat().st_mtime_ns
    deadline = time.monotonic() + 3 * microcluster.HEARTBEAT
    while directory.stat().st_mtime_ns == before:
        assert time.monotonic() < deadline, f"{member.name}'s truststore was not rewritten"
        time.sleep(0.01)
    # The files are replaced one after the other: the rewrite is over once the directory stops changing.
    while (seen := directory.stat().st_mtime_ns) != before:
        before = seen
        time.sleep(0.05)


def copy_member(member: microcluster.Member, directory: Path) -> Path:
    """What an agent reads of MEMBER's state directory (not its socket or dqlite's data), for editing a copy."""
    copy = directory / member.name
    (copy / "database").mkdir(parents=True)
    for name in MEMBER_FILES:
        shutil.copy2(member.state_dir / name, copy / name)
    shutil.copytree(member.state_dir / "truststore", copy / "truststore")
    return copy
