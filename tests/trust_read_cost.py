"""What reading the registry by content costs per call (coordinator/watched_file.py), against one bare stat.

    .venv/bin/python -m tests.trust_read_cost

For a registry of 3 and of 100 members: the cost of Registry.peers() right after the file was written (within the
settle margin every call reads the file and hashes it) and once the version has settled (one stat per call).
"""

from __future__ import annotations

import os
import tempfile
import time
import timeit
from pathlib import Path

from coordinator.auth import Principal
from coordinator.pki import make_identity
from coordinator.registry import RegisteredIdentity, RegisteredMember, Registry, write_registry
from coordinator.watched_file import SETTLE_MARGIN

CALLS = 5000


def _per_call(function: object) -> float:
    assert callable(function)
    return timeit.timeit(function, number=CALLS) / CALLS * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "registry.json"
        pem = make_identity("operator").certificate_pem.decode()
        operator = RegisteredIdentity("operator", Principal.OPERATOR, pem)
        for count in (3, 100):
            members = [
                RegisteredMember(f"n{i}", "127.0.0.1:1", make_identity(f"n{i}").certificate_pem.decode())
                for i in range(count)
            ]
            write_registry(path, members, [operator])
            registry = Registry.open(path)
            fresh = _per_call(registry.peers)
            time.sleep(SETTLE_MARGIN + 0.1)
            registry.peers()  # the read that finds the version settled
            settled = _per_call(registry.peers)
            stat = _per_call(lambda: os.stat(path))
            print(
                f"{count:3} members, {path.stat().st_size:6} bytes: settled {settled:6.1f} us/call, "
                f"within the margin {fresh:6.1f} us/call, a bare os.stat {stat:5.1f} us"
            )


if __name__ == "__main__":
    main()
