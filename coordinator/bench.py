"""The benchmark: what a fresh CheckMembership costs against the floor of a trivial call, from one run.

`python -m coordinator.bench [--sizes 3,10,50,100] [--calls 200]` (or `make bench`) brings up a lab at each
size (large labs pack several agents into one process: the same agent code), then interleaves a trivial
unary call (the health check, over the same mutual-TLS channel) with a full CheckMembership, so both see the
same machine noise, and prints p50/p99 of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memberguard import Client

from coordinator import lab as labs


@dataclass(frozen=True)
class Figures:
    p50: float
    p99: float

    @classmethod
    def of(cls, samples: list[float]) -> Figures:
        ordered = sorted(samples)
        return cls(statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))])


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def measure(nodes: int, calls: int, directory: Path) -> tuple[Figures, Figures, int]:
    """(floor, check, discrepancies seen) for a consistent lab of `nodes` nodes."""
    lab = labs.up(directory, nodes, agents_per_process=1 if nodes <= 10 else 25)
    try:
        with Client(lab.endpoint) as client:
            for _ in range(max(5, calls // 10)):  # warm the channels, caches and allocator
                client.ping()
                client.check_membership(timeout=30)
            floor, check = [], []
            for _ in range(calls):
                floor.append(_timed(client.ping))
                check.append(_timed(lambda: client.check_membership(timeout=30)))
            found = len(client.check_membership(timeout=30).diff.discrepancies)
    finally:
        labs.down(lab.dir)
    return Figures.of(floor), Figures.of(check), found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.bench", description=__doc__)
    parser.add_argument("--sizes", default="3,10,50,100", help="comma-separated lab sizes (default 3,10,50,100)")
    parser.add_argument("--calls", type=int, default=200, help="measured calls of each kind per size")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"CheckMembership vs a trivial unary call (health check), same mTLS channel, {args.calls} calls each")
    print(f"{'N':>4} {'floor p50':>10} {'floor p99':>10} {'check p50':>10} {'check p99':>10} {'p50 ratio':>10}")
    with tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch:
        for nodes in sizes:
            floor, check, found = measure(nodes, args.calls, Path(scratch) / f"lab-{nodes}")
            note = "" if found == 0 else f"  ({found} discrepancies: the lab was not consistent)"
            print(
                f"{nodes:>4} {floor.p50:>9.2f}ms {floor.p99:>9.2f}ms {check.p50:>9.2f}ms {check.p99:>9.2f}ms"
                f" {check.p50 / floor.p50:>9.1f}x{note}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
