"""How much a flood of garbage on the join listener slows the operators' CheckMembership: p50 without and with it.

    .venv/bin/python -m tests.join_flood [--calls 300] [--flooders 1] [--in-flight 64] [--nice]

A 3-node lab; the flood is `--flooders` processes, each keeping `--in-flight` garbage requests outstanding on one TLS
channel to the join listener for as long as the measurement runs. Prints the two p50s and what the flood got back.
On a small machine the flooders' own CPU slows everything down; `--nice` runs them at the lowest priority, so that
what remains is what handling the flood costs the coordinator.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path

import grpc
from memberguard import Client

from coordinator.lab import lab as labs

GUARDED = "/memberguard.v1.CoordinatorService/GuardedOperation"


def _flood(
    join_address: str, ca: bytes, server_name: str, in_flight: int, nice: bool, stop: Event, counts: dict[str, int]
) -> None:
    if nice:
        os.nice(19)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.ssl_target_name_override", server_name)]
    seen: collections.Counter[str] = collections.Counter()
    with grpc.secure_channel(join_address, credentials, options=options) as channel:
        call = channel.unary_unary(GUARDED)
        pending = [call.future(b"\xff\xff\xff\xff\x0f", timeout=10) for _ in range(in_flight)]
        while not stop.is_set():
            done, pending = pending[0], pending[1:]
            try:
                done.result()
                seen["OK"] += 1
            except grpc.RpcError as error:
                seen[error.code().name] += 1  # type: ignore[attr-defined]
            pending.append(call.future(b"\xff\xff\xff\xff\x0f", timeout=10))
    counts.update(seen)


def _p50(client: Client, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.check_membership(timeout=10)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--flooders", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--nice", action="store_true", help="run the flooders at the lowest CPU priority")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        lab = labs.up(Path(directory) / "lab", 3)
        try:
            coordinator = lab.document["coordinator"]
            with Client(lab.endpoint) as client:
                _p50(client, 50)  # warm: channels, caches
                quiet = _p50(client, args.calls)
                stop = multiprocessing.Event()
                manager = multiprocessing.Manager()
                counts = manager.dict()
                flooders = [
                    multiprocessing.Process(
                        target=_flood,
                        args=(
                            coordinator["join_address"],
                            Path(coordinator["ca"]).read_bytes(),
                            coordinator["server_name"],
                            args.in_flight,
                            args.nice,
                            stop,
                            counts,
                        ),
                    )
                    for _ in range(args.flooders)
                ]
                for flooder in flooders:
                    flooder.start()
                time.sleep(1.0)  # the flood is under way, and its source throttled
                started = time.monotonic()
                flooded = _p50(client, args.calls)
                elapsed = time.monotonic() - started
                stop.set()
                for flooder in flooders:
                    flooder.join(30)
            answers = dict(counts)
            total = sum(answers.values())
            print(f"CheckMembership p50 quiet:   {quiet * 1e3:.2f} ms ({args.calls} calls)")
            print(f"CheckMembership p50 flooded: {flooded * 1e3:.2f} ms ({args.calls} calls, {elapsed:.1f} s)")
            print(f"flood: {total} garbage requests in about {elapsed + 1:.1f} s, answered {answers}")
            log = (lab.dir / "logs" / "coordinator.log").read_text()
            print(f"coordinator log: {log.count('Traceback')} tracebacks, {log.count(' WARNING ')} WARNING lines")
        finally:
            labs.down(lab.dir)


if __name__ == "__main__":
    main()
