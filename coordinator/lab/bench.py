"""The benchmarks, each printing figures from one run with a same-run baseline (`make bench` runs them all).

`python -m coordinator.lab.bench [--backend local|dqlite] [--sizes 3,10,30,100,300] [--calls 200] [--changes 20]
[--plot FILE.png]` brings up a lab at each size (large labs pack several agents into one process: the same agent
code), then interleaves a trivial unary call (the health check, over the same mutual-TLS channel) with a full
CheckMembership, so both see the same machine noise, and prints p50/p99 of each and their ratio; a size whose agents
still miss the coordinator's per-agent deadline once warmed up is timed with a longer one, and says so. Then, in a
3-node lab whose coordinator checks every 0.2 s, it times `--changes` source changes (n2's truststore record of n3
deleted, then restored) from the change to the WatchMembership event reaching a subscriber. `--plot` draws the
check's p50 and the floor's against N, both axes logarithmic (matplotlib: the `bench` extra).

`python -m coordinator.lab.bench --microcluster-client [--calls 1000]` starts 3 real microd daemons and times CLUSTER
and a primary-key SELECT over microd's upgraded connection, as a member dials it, against LEADER on the same
connection in the same run, and a new dial. (go-dqlite's client over microcluster's own dial is not built as a
baseline yet.)

`python -m coordinator.lab.bench --operations [--backend local|dqlite] [--calls 20]` times guarded operations in a
3-node lab against a fresh CheckMembership in the same lab and run, over `--calls` rounds: issuing a token (gather,
diff, guard, journal write with fsync), a guarded join (the joiner's agent's GuardedOperation call: 14 journaled
steps; on dqlite its engine starts and joins), the guarded removal of the node that just joined, and a whole
add-node (a new agent process, token, join); then ten add-nodes at once, against ten times one.

`python -m coordinator.lab.bench --dqlite-client [--calls 1000]` starts a 3-node TLS dqlite cluster and times
CLUSTER and a primary-key SELECT on one kept connection to the leader, with go-dqlite's own client (the Go
benchmark program, `make go`) and with memberguard's native client, on the same cluster in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import ssl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from memberguard import Client
from memberguard.v1 import coordinator_pb2, operation_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.microcluster_dial import MemberDial
from coordinator.agent.microcluster_sources import DATABASE as MICROCLUSTER_DATABASE
from coordinator.agent.truststore import trusted_certificates
from coordinator.dqlite import connect_leader
from coordinator.files import write_atomically
from coordinator.lab import lab as labs
from coordinator.lab import microcluster
from coordinator.lab.dqlite_cluster import DATABASE, MemberSpec, lay_out_members, start_members
from coordinator.lab.dqlite_nodes import node_binary, stop_cluster
from coordinator.lab.ports import loopback_addresses
from coordinator.service import DEFAULT_AGENT_TIMEOUT

T = TypeVar("T")

# How often the watch's lab's coordinator checks on its own: every event waits for such a check.
WATCH_INTERVAL = 0.2
# The per-agent deadline of the timed checks in a lab whose agents miss the default one (DEFAULT_AGENT_TIMEOUT).
LARGE_LAB_AGENT_TIMEOUT = 20.0


@dataclass(frozen=True)
class Figures:
    p50: float
    p99: float

    @classmethod
    def of(cls, samples: list[float]) -> Figures:
        ordered = sorted(samples)
        return cls(statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))])


def _timed(call: Callable[[], object]) -> float:
    return _timed_result(call)[0]


def _timed_result(call: Callable[[], T]) -> tuple[float, T]:
    """(milliseconds the call took, what it returned)."""
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1000, result


def _succeeded(operation: operation_pb2.Operation) -> None:
    """A benchmark times what worked: an operation that did not succeed ends the run."""
    if operation.state != operation_pb2.OPERATION_STATE_SUCCEEDED:
        raise RuntimeError(
            f"{operation.member.name}: {operation_pb2.OperationState.Name(operation.state)}: {operation.error}"
        )


@dataclass(frozen=True)
class CheckCost:
    """One lab size, from one interleaved run: the trivial call (the floor) and CheckMembership. missed is how many
    agents the last warm-up check, with the coordinator's default per-agent deadline, found unreachable: when any
    did, the timed checks allowed each agent LARGE_LAB_AGENT_TIMEOUT instead. late is how many timed checks found
    some agent unreachable all the same."""

    nodes: int
    floor: Figures
    check: Figures
    missed: int
    late: int


def agents_per_process(nodes: int) -> int:
    """Small labs give each agent its own process, as a cluster would; larger ones pack them, so that a lab of
    hundreds does not run hundreds of interpreters on two cores."""
    return 1 if nodes <= 10 else 25


def measure(nodes: int, calls: int, directory: Path, backend: str = "local") -> CheckCost:
    """The check's cost in a consistent lab of `nodes` nodes."""
    lab = labs.up(directory, nodes, agents_per_process=agents_per_process(nodes), backend=backend)
    try:
        with Client(lab.endpoint) as client:
            rounds = max(5, calls // 10)
            for _ in range(rounds):  # warm the channels, caches and allocator
                client.ping()
                warmed = client.check_membership(timeout=30)
            missed = _unreachable(warmed)
            # Checks cut short at the deadline would time the deadline, not the check: a lab too large for it on
            # this machine is timed with the agents given the time they take, and says so.
            agent_timeout = LARGE_LAB_AGENT_TIMEOUT if missed else None
            check_membership = partial(client.check_membership, agent_timeout=agent_timeout, timeout=30)
            if missed:
                for _ in range(rounds):  # again, now that every agent has the time it takes
                    check_membership()
            floor, check, late = [], [], 0
            for _ in range(calls):
                floor.append(_timed(client.ping))
                elapsed, answer = _timed_result(check_membership)
                check.append(elapsed)
                late += bool(_unreachable(answer))
                # An agent that misses its deadline loses its node's view, which may show as more; else only a
                # source's own lag (INFO, as an engine's cache) may show in a lab that is consistent.
                loud = [d for d in answer.diff.discrepancies if d.severity != pb.SEVERITY_INFO]
                if loud and not _unreachable(answer):
                    raise RuntimeError(f"the lab of {nodes} is not consistent: {loud}")
    finally:
        labs.down(lab.dir)
    return CheckCost(nodes, Figures.of(floor), Figures.of(check), missed, late)


def _unreachable(answer: coordinator_pb2.CheckMembershipResponse) -> int:
    return sum(d.kind == pb.DISCREPANCY_KIND_AGENT_UNREACHABLE for d in answer.diff.discrepancies)


def watch_latency(changes: int, directory: Path, backend: str) -> Figures:
    """From a source change to its WatchMembership event at a subscriber, in a 3-node lab whose coordinator checks
    every WATCH_INTERVAL seconds: `changes` changes, n2's truststore record of n3 deleted and restored in turn."""
    lab = labs.up(directory, 3, backend=backend)
    try:
        _check_every(lab, WATCH_INTERVAL)
        record = Path(lab.node("n2")["state_dir"]) / "truststore" / "n3.yaml"
        held = record.read_bytes()
        samples = []
        # Each change has a few seconds to show; a stream that outlives that fails the run rather than hang it.
        with Client(lab.endpoint) as client, client.watch_membership(timeout=10 + 5 * changes) as watch:
            events = (response for response in watch if response.WhichOneof("event") != "heartbeat")
            clean = next(events).snapshot.diff.fingerprint
            for i in range(changes):
                # A change lands anywhere in the coordinator's cycle, not just after the check that sent the last
                # event: that would time the worst case every time.
                time.sleep(random.uniform(0, WATCH_INTERVAL))
                started = time.perf_counter()
                restored = i % 2 == 1
                if restored:
                    write_atomically(record, held)  # whole: a half-written record would be one more event
                else:
                    record.unlink()
                event = next(events)
                samples.append((time.perf_counter() - started) * 1000)
                if event.WhichOneof("event") != "change" or (event.change.fingerprint == clean) != restored:
                    raise RuntimeError(f"change {i + 1}: the watch sent {event}, not the change just made")
    finally:
        labs.down(lab.dir)
    return Figures.of(samples)


def _check_every(lab: labs.Lab, interval: float) -> None:
    """Restarts the lab's coordinator with its own checks `interval` seconds apart, which is what a watch waits on."""
    document = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
    config = lab.dir / "coordinator" / "coordinator-bench.json"
    config.write_text(json.dumps({**document, "metrics_interval": interval}))
    labs.restart_coordinator(lab, config=config)


def plot(costs: list[CheckCost], backend: str, path: Path) -> None:
    """The check's p50 and the floor's against N, both axes logarithmic, as a PNG."""
    # Imported here: matplotlib is an optional extra that only a plot needs. Agg draws without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    sizes = [cost.nodes for cost in costs]
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    checks = [cost.check.p50 for cost in costs]
    axes.loglog(sizes, checks, "o-", label="CheckMembership p50")
    axes.loglog(sizes, [cost.floor.p50 for cost in costs], "s--", label="floor p50 (health check, same channel)")
    for cost in costs:
        label = f"{cost.check.p50:.3g} ms" + (
            f"\n({LARGE_LAB_AGENT_TIMEOUT:g} s agent deadline)" if cost.missed else ""
        )
        axes.annotate(label, (cost.nodes, cost.check.p50), textcoords="offset points", xytext=(0, 8), ha="center")
    axes.margins(0.08, 0.15)
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("agents in the lab (N)")
    axes.set_ylabel("milliseconds")
    axes.set_title(f"CheckMembership p50 against lab size, {backend} backend")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)


async def _native(addresses: list[str], context: ssl.SSLContext, calls: int) -> tuple[Figures, Figures]:
    async with await connect_leader(addresses, timeout=10, ssl=context) as connection:
        await connection.open(DATABASE)
        for _ in range(20):
            await connection.cluster()
            await connection.query("SELECT v FROM bench WHERE id = 1")
        cluster, select = [], []
        for _ in range(calls):
            started = time.perf_counter()
            await connection.cluster()
            cluster.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await connection.query("SELECT v FROM bench WHERE id = 1")
            select.append((time.perf_counter() - started) * 1000)
    return Figures.of(cluster), Figures.of(select)


def dqlite_client(calls: int) -> None:
    """go-dqlite's client and the native one, on the same TLS cluster, in the same run."""
    with tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch:
        root = Path(scratch)
        names = ("n1", "n2", "n3")
        specs = [MemberSpec(n, a, root / n) for n, a in zip(names, loopback_addresses(3), strict=True)]
        tls = lay_out_members(specs)
        nodes = start_members(specs, tls)
        try:
            addresses = [node.address for node in nodes]
            own = tls["n1"]
            # go-dqlite's client takes a fixed bundle: n1's truststore as it stands, which nothing changes here.
            bundle = root / "n1-trusted.pem"
            bundle.write_text("\n".join(trusted_certificates(own.truststore)))
            # The Go program creates the table it reads (bench: one row) before it times anything.
            command = [
                str(node_binary().with_name("memberguard-dqlite-bench")),
                *("--cluster", ",".join(addresses), "--db", DATABASE, "--n", str(calls)),
                *("--tls-cert", str(own.cert), "--tls-key", str(own.key), "--tls-ca", str(bundle)),
            ]
            go = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            context = client_ssl_context(own.cert, own.key, own.truststore)
            cluster, select = asyncio.run(_native(addresses, context, calls))
        finally:
            stop_cluster(nodes)
    print(f"dqlite over TLS, one kept connection to the leader, {calls} calls each (ms)")
    print(f"{'request':<22} {'go p50':>8} {'go p99':>8} {'native p50':>11} {'native p99':>11} {'ratio':>6}")
    for label, key, native in (("CLUSTER", "cluster_ms", cluster), ("SELECT by primary key", "select_ms", select)):
        p50, p99 = go[key]["p50"], go[key]["p99"]
        print(f"{label:<22} {p50:>8.3f} {p99:>8.3f} {native.p50:>11.3f} {native.p99:>11.3f} {native.p50 / p50:>5.1f}x")


def microcluster_client(calls: int) -> None:
    """The native client over microd's upgraded connection (as a member dials it), on a 3-member microcluster
    cluster: CLUSTER and a primary-key SELECT of core_cluster_members, each against the same run's LEADER on the
    same connection (the floor: one round trip that reads nothing), interleaved; then the cost of a new dial."""
    with (
        tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch,
        microcluster.running(Path(scratch), 3) as cluster,
    ):
        dial = MemberDial(cluster.members[0].state_dir)
        floor, clustered, selected, dials = asyncio.run(
            _upgraded(dial, [member.address for member in cluster.members], calls)
        )
    print(f"microd's upgraded dqlite connection, one kept connection to the leader, {calls} calls each (ms)")
    print(f"{'request':<22} {'p50':>8} {'p99':>8} {'LEADER p50':>11} {'ratio':>6}")
    for label, figures in (("CLUSTER", clustered), ("SELECT by primary key", selected)):
        print(
            f"{label:<22} {figures.p50:>8.3f} {figures.p99:>8.3f} {floor.p50:>11.3f} {figures.p50 / floor.p50:>5.1f}x"
        )
    print(f"a new dial (TLS as the member, the upgrade, the dqlite handshake): p50 {dials.p50:.2f} ms")


async def _upgraded(dial: MemberDial, addresses: list[str], calls: int) -> tuple[Figures, Figures, Figures, Figures]:
    select = "SELECT id, name, address, certificate, role FROM core_cluster_members WHERE id = ?"
    samples: dict[str, list[float]] = {"leader": [], "cluster": [], "select": [], "dial": []}

    async def timed(label: str, call: Callable[[], Awaitable[object]]) -> None:
        started = time.perf_counter()
        await call()
        samples[label].append((time.perf_counter() - started) * 1000)

    for _ in range(20):
        await timed("dial", partial(_dial_and_close, dial, addresses[0]))
    async with await connect_leader(addresses, timeout=10, dial=dial.dial) as connection:
        await connection.open(MICROCLUSTER_DATABASE)
        for _ in range(calls):
            await timed("leader", connection.leader)
            await timed("cluster", connection.cluster)
            await timed("select", partial(connection.query, select, [1]))
    leader, cluster, selected, dialled = (Figures.of(samples[k]) for k in ("leader", "cluster", "select", "dial"))
    return leader, cluster, selected, dialled


async def _dial_and_close(dial: MemberDial, address: str) -> None:
    connection = await dial.dial(address, 5)
    await connection.close()


def operations(rounds: int, backend: str) -> None:
    """Guarded operations in a 3-node lab beside a fresh check, same lab, same run; then ten joins at once."""
    samples: dict[str, list[float]] = {label: [] for label in _OPERATIONS}
    with tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch:
        lab = labs.up(Path(scratch) / "lab", 3, backend=backend)
        try:
            with Client(lab.endpoint) as client:
                for i in range(rounds):
                    _join_and_remove(lab, client, f"round-{i}", samples)
            started = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENT_JOINS) as pool:
                list(pool.map(lambda _: labs.add_node(lab.dir), range(CONCURRENT_JOINS)))
            concurrent = (time.perf_counter() - started) * 1000
        finally:
            labs.down(lab.dir)
    base = Figures.of(samples["CheckMembership"])
    print(f"guarded operations, {backend} backend, a 3-node lab, {rounds} rounds of join + removal")
    print(f"{'what':<18} {'p50':>9} {'p99':>9} {'x check':>8}")
    for label, values in samples.items():
        figures = Figures.of(values)
        print(f"{label:<18} {figures.p50:>7.2f}ms {figures.p99:>7.2f}ms {figures.p50 / base.p50:>7.1f}x")
    one = Figures.of(samples["add-node, whole"]).p50
    print(
        f"{CONCURRENT_JOINS} add-nodes at once: {concurrent / 1000:.2f} s to all finish,"
        f" vs {CONCURRENT_JOINS} x one add-node p50 = {CONCURRENT_JOINS * one / 1000:.2f} s"
        f" ({concurrent / (CONCURRENT_JOINS * one):.2f}x)"
    )


def _join_and_remove(lab: labs.Lab, client: Client, request_id: str, samples: dict[str, list[float]]) -> None:
    """One round: a check, a new node's token and join, a check, the node's removal."""
    samples["CheckMembership"].append(_timed(lambda: client.check_membership(timeout=30)))
    started = time.perf_counter()
    joiner = labs.start_joining_node(lab)
    try:
        elapsed, issued = _timed_result(partial(client.issue_token, joiner.name, request_id=f"token-{request_id}"))
        samples["issue a token"].append(elapsed)
        samples["guarded join"].append(_timed(lambda: _succeeded(joiner.join(issued.token))))
        samples["add-node, whole"].append((time.perf_counter() - started) * 1000)
        samples["CheckMembership"].append(_timed(lambda: client.check_membership(timeout=30)))
        removal = partial(client.remove_member, joiner.name, request_id=f"remove-{request_id}")
        samples["guarded removal"].append(_timed(lambda: _succeeded(removal())))
    finally:
        joiner.stop()


CONCURRENT_JOINS = 10
_OPERATIONS = (
    "CheckMembership",
    "issue a token",
    "guarded join",
    "guarded removal",
    "add-node, whole",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.lab.bench", description=__doc__)
    parser.add_argument("--backend", default="local", choices=labs.BACKENDS, help="the lab's backend")
    parser.add_argument(
        "--sizes", default="3,10,30,100,300", help="comma-separated lab sizes (default 3,10,30,100,300)"
    )
    parser.add_argument("--calls", type=int, default=200, help="measured calls of each kind per size (rounds)")
    parser.add_argument(
        "--changes", type=int, default=20, help="source changes the watch's latency is timed over (0: none)"
    )
    parser.add_argument("--plot", type=Path, help="write a PNG of the check's p50 and the floor's against N")
    parser.add_argument("--dqlite-client", action="store_true", help="compare the native dqlite client with Go's")
    parser.add_argument("--operations", action="store_true", help="time guarded operations against a check")
    parser.add_argument(
        "--microcluster-client", action="store_true", help="time the native client over microd's upgraded connection"
    )
    args = parser.parse_args(argv)
    if args.dqlite_client:
        dqlite_client(args.calls)
        return 0
    if args.microcluster_client:
        microcluster_client(args.calls)
        return 0
    if args.operations:
        operations(args.calls, args.backend)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"CheckMembership vs a trivial unary call (health check), same mTLS channel, {args.calls} calls each,"
        f" {args.backend} backend"
    )
    print(f"{'N':>4} {'floor p50':>10} {'floor p99':>10} {'check p50':>10} {'check p99':>10} {'p50 ratio':>10}")
    costs = []
    with tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch:
        for nodes in sizes:
            cost = measure(nodes, args.calls, Path(scratch) / f"lab-{nodes}", args.backend)
            costs.append(cost)
            print(
                f"{nodes:>4} {cost.floor.p50:>9.2f}ms {cost.floor.p99:>9.2f}ms {cost.check.p50:>9.2f}ms"
                f" {cost.check.p99:>9.2f}ms {cost.check.p50 / cost.floor.p50:>9.1f}x{_notes(cost)}"
            )
        if args.changes:
            latency = watch_latency(args.changes, Path(scratch) / "lab-watch", args.backend)
            print(
                f"WatchMembership, 3-node {args.backend} lab, the coordinator checking every"
                f" {WATCH_INTERVAL * 1000:.0f} ms: {args.changes} source changes to their events at a subscriber:"
                f" p50 {latency.p50:.1f} ms, p99 {latency.p99:.1f} ms (interval {WATCH_INTERVAL * 1000:.0f} ms)"
            )
    if args.plot:
        plot(costs, args.backend, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _notes(cost: CheckCost) -> str:
    notes = []
    if cost.missed:
        notes.append(
            f"{cost.missed} agents missed the {DEFAULT_AGENT_TIMEOUT:g} s agent deadline when warm:"
            f" timed with {LARGE_LAB_AGENT_TIMEOUT:g} s"
        )
    if cost.late:
        notes.append(f"{cost.late} timed checks found agents unreachable")
    return "".join(f"  ({note})" for note in notes)


if __name__ == "__main__":
    raise SystemExit(main())
