"""The benchmarks, each printing figures from one run with a same-run baseline (`make bench` runs them all).

`python -m coordinator.lab.bench [--backend local|dqlite] [--sizes 3,10,30,100,300] [--calls 200] [--changes 20]
[--plot FILE.png]` brings up a lab at each size (large labs pack several agents into one process: the same agent
code), then interleaves a trivial unary call (the health check, over the same mutual-TLS channel), a full
CheckMembership and the agent round a check cannot avoid, made by the bench itself (AgentRound), so all three see
the same machine noise. It prints p50/p99 of the floor and the check, their ratio, the round's p50 and `beyond` (the
check's p50 over the round's plus the floor's: what memberguard adds), and the lab's first check before them (its
time, and how many agents it found unreachable); a size whose agents still miss the coordinator's per-agent deadline
once warmed up is timed with a longer one, and says so. Then, in a 3-node lab whose coordinator checks every 0.2 s,
it times `--changes` source changes (n2's truststore record of n3 deleted, then restored) from the change to the
WatchMembership event reaching a subscriber. `--plot` draws the three p50s against N, both axes logarithmic
(matplotlib: the `bench` extra).

`python -m coordinator.lab.bench --microcluster [--calls 1000] [--changes 20]` brings up a 3-member microcluster lab
(real microd daemons, `lab up --backend microcluster`) and, on it: CheckMembership against the trivial call, as
above; LEADER, CLUSTER and a primary-key SELECT of core_cluster_members on one kept connection to the leader over
microd's upgraded connection, and a new dial, with go-dqlite v3's own client over a dial made as a member makes it
(the Go program memberguard-microcluster-bench, `make go`) and with memberguard's native client, in alternating
turns of the same run; then `--changes` rounds of a divergence made through microcluster (a member's row deleted
with `microctl sql`), each timed from the deletion to memberguard reporting it (a CheckMembership returning it, or a
WatchMembership event, every other round, the coordinator checking every 0.2 s) and to microcluster's own `microctl
tokens add` refusing on the same state, then undone.

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
import os
import queue
import random
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
from memberguard import Client
from memberguard.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, operation_pb2
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
from coordinator.registry import Registry
from coordinator.service import DEFAULT_AGENT_TIMEOUT, DEFAULT_METRICS_INTERVAL

T = TypeVar("T")

# How often the microcluster lab's coordinator checks on its own: its agents cannot tell of a row deleted in dqlite, so
# the watch's event waits for such a check.
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


class AgentRound:
    """The one round a fresh check cannot avoid, made by the bench itself as the coordinator makes it: over one kept
    ObserveNodeView stream per agent, with the coordinator's identity and the certificates the registry pins, a read
    naming the digest the agent last sent, written to every agent at once, and every answer awaited. No view is
    parsed, nothing is diffed, and no answer is built: what a check costs beyond this round and the floor is
    memberguard's own."""

    def __init__(self, lab: labs.Lab) -> None:
        config = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
        self._key, self._certificate = Path(config["key"]).read_bytes(), Path(config["cert"]).read_bytes()
        self._members = Registry.open(Path(config["registry"])).members()
        self._loop = _round_loop()
        self._channels: list[grpc.aio.Channel] = []
        self._streams: list[Any] = []
        self._digests = [""] * len(self._members)
        self._loop.run_until_complete(self._open())

    async def _open(self) -> None:
        for member in self._members:
            credentials = grpc.ssl_channel_credentials(member.certificate_pem.encode(), self._key, self._certificate)
            options = [("grpc.ssl_target_name_override", member.name)]
            channel = grpc.aio.secure_channel(member.agent_address, credentials, options=options)
            self._channels.append(channel)
            self._streams.append(agent_pb2_grpc.AgentServiceStub(channel).ObserveNodeView())  # type: ignore[call-arg]

    async def _ask(self, index: int) -> None:
        request = agent_pb2.ObserveNodeViewRequest(read=agent_pb2.GetNodeViewRequest(known_digest=self._digests[index]))
        request.answer_within.FromTimedelta(timedelta(seconds=DEFAULT_AGENT_TIMEOUT))
        stream = self._streams[index]
        await stream.write(request)
        while True:
            response = await stream.read()
            if response is grpc.aio.EOF:  # type: ignore[attr-defined]  # not in grpc's stubs
                raise RuntimeError(f"{self._members[index].name}'s agent ended the stream")
            if response.HasField("answer"):  # not a notice that its files changed, which answers nothing
                break
        self._digests[index] = response.answer.view_digest or self._digests[index]

    async def _round(self) -> None:
        await asyncio.gather(*(self._ask(i) for i in range(len(self._members))))

    async def _close(self) -> None:
        for stream in self._streams:
            stream.cancel()
        await asyncio.gather(*(channel.close(None) for channel in self._channels))

    def __call__(self) -> None:
        self._loop.run_until_complete(self._round())

    def close(self) -> None:
        self._loop.run_until_complete(self._close())


@cache
def _round_loop() -> asyncio.AbstractEventLoop:
    """The one event loop of the rounds, across lab sizes, never closed: gRPC's poller thread hands it events as
    long as the process runs, and a loop closed under it fails each of them."""
    return asyncio.new_event_loop()


@dataclass(frozen=True)
class CheckCost:
    """One lab size, from one interleaved run: the trivial call (the floor), CheckMembership, and the agent round
    it cannot avoid (AgentRound). missed is how many
    agents the last warm-up check, with the coordinator's default per-agent deadline, found unreachable: when any
    did, the timed checks allowed each agent LARGE_LAB_AGENT_TIMEOUT instead. late is how many timed checks found
    some agent unreachable all the same. first is the lab's first check, in ms (channels dialled, every view sent
    whole), and first_missed how many agents it found unreachable, with the default deadline."""

    nodes: int
    floor: Figures
    check: Figures
    round: Figures
    missed: int
    late: int
    first: float
    first_missed: int


def agents_per_process(nodes: int) -> int:
    """Small labs give each agent its own process, as a cluster would; larger ones pack them, so that a lab of
    hundreds does not run hundreds of interpreters on two cores."""
    return 1 if nodes <= 10 else 25


def measure(nodes: int, calls: int, directory: Path, backend: str = "local") -> CheckCost:
    """The check's cost in a consistent lab of `nodes` nodes."""
    lab = labs.up(directory, nodes, agents_per_process=agents_per_process(nodes), backend=backend)
    try:
        return check_cost(lab, calls)
    finally:
        labs.down(lab.dir)


def check_cost(lab: labs.Lab, calls: int) -> CheckCost:
    """The check's cost in `lab`, which is consistent and stays so."""
    nodes = len(lab.document["nodes"])
    with Client(lab.endpoint) as client:
        client.ping()
        first, answer = _timed_result(partial(client.check_membership, timeout=30))
        first_missed = _unreachable(answer)
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
        agent_round = AgentRound(lab)
        for _ in range(rounds):
            agent_round()
        floor, check, bare, late = [], [], [], 0
        for _ in range(calls):
            floor.append(_timed(client.ping))
            bare.append(_timed(agent_round))
            elapsed, answer = _timed_result(check_membership)
            check.append(elapsed)
            late += bool(_unreachable(answer))
            # An agent that misses its deadline loses its node's view, which may show as more; else only a
            # source's own lag (INFO, as an engine's cache) may show in a lab that is consistent.
            loud = [d for d in answer.diff.discrepancies if d.severity != pb.SEVERITY_INFO]
            if loud and not _unreachable(answer):
                raise RuntimeError(f"the lab of {nodes} is not consistent: {loud}")
        agent_round.close()
    return CheckCost(nodes, Figures.of(floor), Figures.of(check), Figures.of(bare), missed, late, first, first_missed)


def _unreachable(answer: coordinator_pb2.CheckMembershipResponse) -> int:
    return sum(d.kind == pb.DISCREPANCY_KIND_AGENT_UNREACHABLE for d in answer.diff.discrepancies)


def watch_latency(changes: int, directory: Path, backend: str) -> Figures:
    """From a source change to its WatchMembership event at a subscriber, in a 3-node lab whose coordinator checks on
    its own every DEFAULT_METRICS_INTERVAL seconds, as by default: `changes` changes, n2's truststore record of n3
    deleted and restored in turn, each told by n2's agent."""
    lab = labs.up(directory, 3, backend=backend)
    try:
        record = Path(lab.node("n2")["state_dir"]) / "truststore" / "n3.yaml"
        held = record.read_bytes()
        samples = []
        # Each change has a few seconds to show; a stream that outlives that fails the run rather than hang it.
        with Client(lab.endpoint) as client, client.watch_membership(timeout=10 + 5 * changes) as watch:
            events = (response for response in watch if response.WhichOneof("event") != "heartbeat")
            clean = next(events).snapshot.diff.fingerprint
            for i in range(changes):
                # At random moments: not in step with the coordinator's heartbeats or anything else periodic.
                time.sleep(random.uniform(0, 0.2))
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
    """The check's p50, the bare agent round's and the floor's against N, both axes logarithmic, as a PNG."""
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
    axes.loglog(sizes, [cost.round.p50 for cost in costs], "^:", label="agent round p50 (the bench's own, bare)")
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


async def _native(addresses: list[str], context: ssl.SSLContext, calls: int) -> dict[str, list[float]]:
    """CLUSTER and the SELECT in turn on one kept connection to the leader, as the Go program times them."""
    async with await connect_leader(addresses, timeout=10, ssl=context) as connection:
        await connection.open(DATABASE)
        requests = (
            ("cluster_ms", connection.cluster),
            ("select_ms", partial(connection.query, "SELECT v FROM bench WHERE id = 1")),
        )
        return await _in_turn(requests, calls)


async def _in_turn(
    requests: Sequence[tuple[str, Callable[[], Awaitable[object]]]], calls: int
) -> dict[str, list[float]]:
    """`calls` rounds of the requests, each once a round in order, after the Go programs' 20 untimed rounds: every
    timing, in milliseconds, by the request's key."""
    samples: dict[str, list[float]] = {key: [] for key, _ in requests}
    for _ in range(20):
        for _, request in requests:
            await request()
    for _ in range(calls):
        for key, request in requests:
            started = time.perf_counter()
            await request()
            samples[key].append((time.perf_counter() - started) * 1000)
    return samples


_DQLITE_REQUESTS = (("CLUSTER", "cluster_ms"), ("SELECT by primary key", "select_ms"))


def dqlite_client(calls: int) -> None:
    """go-dqlite's client and the native one, on the same TLS cluster, in the same run, in alternating turns."""
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
            per_block = max(1, calls // _CLIENT_BLOCKS)
            # The Go program creates the table it reads (bench: one row) before it times anything.
            command = [
                str(node_binary().with_name("memberguard-dqlite-bench")),
                *("--cluster", ",".join(addresses), "--db", DATABASE, "--n", str(per_block), "--samples"),
                *("--tls-cert", str(own.cert), "--tls-key", str(own.key), "--tls-ca", str(bundle)),
            ]
            context = client_ssl_context(own.cert, own.key, own.truststore)
            go, native = _alternating(
                command, lambda: asyncio.run(_native(addresses, context, per_block)), _DQLITE_REQUESTS
            )
        finally:
            stop_cluster(nodes)
    _print_clients("dqlite over TLS", calls, go, native, _DQLITE_REQUESTS)


def _print_clients(
    what: str,
    calls: int,
    go: dict[str, Figures],
    native: dict[str, Figures],
    requests: Iterable[tuple[str, str]],
) -> None:
    print(f"{what}, one kept connection to the leader, {calls} calls each in {_CLIENT_BLOCKS} alternating turns (ms)")
    print(f"{'request':<22} {'go p50':>8} {'go p99':>8} {'native p50':>11} {'native p99':>11} {'ratio':>6}")
    for label, key in requests:
        theirs, ours = go[key], native[key]
        print(
            f"{label:<22} {theirs.p50:>8.3f} {theirs.p99:>8.3f} {ours.p50:>11.3f} {ours.p99:>11.3f}"
            f" {ours.p50 / theirs.p50:>5.1f}x"
        )


def microcluster_figures(calls: int, changes: int) -> None:
    """On one 3-member microcluster lab: the check's cost, go-dqlite's client against the native one over microd's
    upgraded connection, and the time memberguard and microcluster each take to tell of a divergence."""
    # Two cores shared with whatever else runs: the load says how far to trust the ratios.
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch:
        lab = labs.up(Path(scratch) / "lab", 3, backend="microcluster")
        try:
            with Client(lab.endpoint) as client:
                _settle(client)
            cost = check_cost(lab, calls)
            go, native = _microcluster_clients(lab, calls)
            detection = detection_times(lab, changes) if changes else None
        finally:
            labs.down(lab.dir)
    print(
        f"CheckMembership vs a trivial unary call (health check), same mTLS channel, {calls} calls each,"
        " a 3-member microcluster lab"
    )
    print(_COST_HEADER)
    print(_cost_row(cost))
    print()
    _print_clients("microd's upgraded dqlite connection", calls, go, native, _UPGRADED_REQUESTS)
    if detection:
        print()
        print(
            f"a member's row deleted with microctl sql, {changes} rounds (ms; memberguard's from the deletion,"
            " microcluster's from its command's start)"
        )
        print(f"{'told by':<56} {'p50':>8} {'p99':>8}")
        for label, figures in (
            ("memberguard: a CheckMembership returning it", detection.check),
            (f"memberguard: its WatchMembership event ({WATCH_INTERVAL * 1000:.0f} ms checks)", detection.watch),
            ("microcluster: `microctl tokens add` refusing", detection.refusal),
        ):
            print(f"{label:<56} {figures.p50:>8.1f} {figures.p99:>8.1f}")
        refusal = detection.refusal.p50
        print(
            f"p50 ratios: microcluster's refusal takes {refusal / detection.check.p50:.0f}x memberguard's check,"
            f" {refusal / detection.watch.p50:.0f}x its watch event"
        )
        for words, count in detection.refused.most_common():
            print(f"microcluster said, {count} of {changes} rounds: {words}")
    print(f"\nload average (1 min): {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


# What the Go program's JSON and _upgraded's samples call each request, and how the tables name it.
_UPGRADED_REQUESTS = (
    ("LEADER (the floor)", "leader_ms"),
    ("CLUSTER", "cluster_ms"),
    ("SELECT by primary key", "select_ms"),
    ("a new dial", "dial_ms"),
)
MICROCLUSTER_BENCH = microcluster.MICROD.with_name("memberguard-microcluster-bench")
# The primary-key SELECT both clients time.
_MEMBER_BY_ID = "SELECT id, name, address, certificate, role FROM core_cluster_members WHERE id = ?"
_DIALS = 20
# Turns each client takes; see _microcluster_clients.
_CLIENT_BLOCKS = 4


def _microcluster_clients(lab: labs.Lab, calls: int) -> tuple[dict[str, Figures], dict[str, Figures]]:
    """go-dqlite's client (the Go program) and the native one, each dialling as the lab's first member."""
    nodes = lab.document["nodes"]
    state_dir = Path(nodes[0]["state_dir"])
    addresses = [node["address"] for node in nodes]
    per_block, dials = max(1, calls // _CLIENT_BLOCKS), max(1, _DIALS // _CLIENT_BLOCKS)
    command = [
        str(MICROCLUSTER_BENCH),
        *("--state-dir", str(state_dir), "--cluster", ",".join(addresses), "--db", MICROCLUSTER_DATABASE),
        *("--n", str(per_block), "--dials", str(dials), "--samples"),
    ]
    return _alternating(
        command, lambda: asyncio.run(_upgraded(MemberDial(state_dir), addresses, per_block, dials)), _UPGRADED_REQUESTS
    )


def _alternating(
    command: list[str], native: Callable[[], dict[str, list[float]]], requests: Iterable[tuple[str, str]]
) -> tuple[dict[str, Figures], dict[str, Figures]]:
    """go-dqlite's client (the Go program `command`, printing its samples) and the native one (`native`), in
    _CLIENT_BLOCKS turns each, alternating, so that neither has the quieter half of the run; each side's samples are
    pooled, and both go through Figures.of."""
    go: dict[str, list[float]] = {key: [] for _, key in requests}
    ours: dict[str, list[float]] = {key: [] for key in go}
    for _ in range(_CLIENT_BLOCKS):
        ran = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
        for key, values in json.loads(ran.stdout)["samples_ms"].items():
            go[key].extend(values)
        for key, values in native().items():
            ours[key].extend(values)
    return _figures(go), _figures(ours)


def _figures(samples: dict[str, list[float]]) -> dict[str, Figures]:
    return {key: Figures.of(values) for key, values in samples.items()}


async def _upgraded(dial: MemberDial, addresses: list[str], calls: int, dials: int) -> dict[str, list[float]]:
    """LEADER, CLUSTER and the SELECT interleaved on one kept connection to the leader, then new dials, as the Go
    program times them: every timing, in milliseconds, by the Go program's names."""
    async with await connect_leader(addresses, timeout=10, dial=dial.dial) as connection:
        await connection.open(MICROCLUSTER_DATABASE)
        requests = (
            ("leader_ms", connection.leader),
            ("cluster_ms", connection.cluster),
            ("select_ms", partial(connection.query, _MEMBER_BY_ID, [1])),
        )
        samples = await _in_turn(requests, calls)
        leader = connection.address
    samples["dial_ms"] = []
    for _ in range(dials):
        started = time.perf_counter()
        await _dial_and_close(dial, leader)
        samples["dial_ms"].append((time.perf_counter() - started) * 1000)
    return samples


async def _dial_and_close(dial: MemberDial, address: str) -> None:
    connection = await dial.dial(address, 5)
    await connection.close()


@dataclass(frozen=True)
class Detection:
    """Rounds of one divergence, each timed from its making: to a CheckMembership that returns it (even rounds), to
    the WatchMembership event that announces it (odd rounds), and, every round, microcluster's `tokens add` from its
    start to its refusal. refused counts the rounds by microcluster's words (the last line of what it printed)."""

    check: Figures
    watch: Figures
    refusal: Figures
    refused: Counter[str]


# A copy of the members table, in the cluster's own database, from which each round's undo inserts the row back whole.
_HELD = "memberguard_bench_held"
# How long a divergence or its undo may take to show before the run fails rather than hang.
_SHOW_TIMEOUT = 30.0


def detection_times(lab: labs.Lab, rounds: int) -> Detection:
    """`rounds` times: a member's row deleted from core_cluster_members through the first member's `microctl sql`,
    memberguard's report and microcluster's refusal timed, the row inserted back, and the lab left to settle.

    The member is never the dqlite leader: microcluster's heartbeat, which the leader sends every 2 s, rewrites every
    truststore from the members table, so a deleted member soon trusts no one and no one trusts it. A follower comes
    back when its row does; a leader that its followers refuse would leave the cluster without one for a while."""
    _check_every(lab, WATCH_INTERVAL)
    nodes = lab.document["nodes"]
    first = nodes[0]
    _microctl(first, "sql", f"CREATE TABLE {_HELD} AS SELECT * FROM core_cluster_members")
    samples: dict[str, list[float]] = {"check": [], "watch": [], "refusal": []}
    refused: Counter[str] = Counter()
    arrivals: queue.Queue[tuple[float, coordinator_pb2.WatchMembershipResponse]] = queue.Queue()
    with Client(lab.endpoint) as client, client.watch_membership() as watch:
        reader = threading.Thread(target=_arrive, args=(watch, arrivals), daemon=True)
        reader.start()
        for i in range(rounds):
            _settle(client)
            leader = asyncio.run(_leader(MemberDial(Path(first["state_dir"])), [node["address"] for node in nodes]))
            name = [node["name"] for node in nodes[1:] if node["address"] != leader][-1]
            # The deletion lands anywhere in the coordinator's cycle, as in watch_latency.
            time.sleep(random.uniform(0, WATCH_INTERVAL))
            _microctl(first, "sql", f"DELETE FROM core_cluster_members WHERE name = '{name}'")
            made = time.perf_counter()
            if i % 2 == 0:
                while not _missing_row(client.check_membership(timeout=10).diff.discrepancies, name):
                    _before_timeout(made, f"no check reported {name}'s row missing")
                samples["check"].append((time.perf_counter() - made) * 1000)
            else:
                samples["watch"].append((_announced(arrivals, made, name) - made) * 1000)
            started = time.perf_counter()
            answer = _microctl(first, "tokens", "add", f"bench-{i}", check=False)
            samples["refusal"].append((time.perf_counter() - started) * 1000)
            # Its consistency check either finds the discrepancy or, on a loaded machine, fails to read the table
            # within its own deadline: a refusal either way, told apart by its words.
            if answer.returncode == 0 or "consistency check" not in answer.stderr:
                raise RuntimeError(f"microcluster did not refuse a token with {name}'s row deleted: {answer}")
            refused[answer.stderr.strip().splitlines()[-1]] += 1
            _microctl(first, "sql", f"INSERT INTO core_cluster_members SELECT * FROM {_HELD} WHERE name = '{name}'")
        _settle(client)
    reader.join(timeout=10)
    return Detection(
        Figures.of(samples["check"]), Figures.of(samples["watch"]), Figures.of(samples["refusal"]), refused
    )


async def _leader(dial: MemberDial, addresses: list[str]) -> str:
    async with await connect_leader(addresses, timeout=10, dial=dial.dial) as connection:
        return connection.address


def _arrive(
    watch: Iterable[coordinator_pb2.WatchMembershipResponse],
    arrivals: queue.Queue[tuple[float, coordinator_pb2.WatchMembershipResponse]],
) -> None:
    """Every event of the watch, with when it arrived, until the watch is closed."""
    for event in watch:
        arrivals.put((time.perf_counter(), event))


def _announced(
    arrivals: queue.Queue[tuple[float, coordinator_pb2.WatchMembershipResponse]], made: float, name: str
) -> float:
    """When the first event after `made` that has `name`'s row go missing arrived."""
    while True:
        remaining = made + _SHOW_TIMEOUT - time.perf_counter()
        try:
            arrived, event = arrivals.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            raise RuntimeError(f"no event reported {name}'s row missing within {_SHOW_TIMEOUT:g} s") from None
        appeared = [
            change.discrepancy
            for change in event.change.discrepancies
            if change.transition == coordinator_pb2.DISCREPANCY_TRANSITION_APPEARED
        ]
        if arrived > made and _missing_row(appeared, name):
            return arrived


def _missing_row(discrepancies: Iterable[pb.Discrepancy], name: str) -> bool:
    return any(
        d.kind == pb.DISCREPANCY_KIND_MISSING
        and d.source == pb.SOURCE_MEMBERS_TABLE
        and d.severity == pb.SEVERITY_BLOCKING
        and d.member.name == name
        for d in discrepancies
    )


def _settle(client: Client) -> None:
    """Waits for a check that finds nothing at all: the roles dqlite assigned have reached every node's cluster.yaml,
    and what a round changed is undone everywhere."""
    started = time.perf_counter()
    while found := client.check_membership(timeout=10).diff.discrepancies:
        _before_timeout(started, f"the microcluster lab did not settle: {[d.summary for d in found]}")
        time.sleep(0.1)


def _before_timeout(started: float, what: str) -> None:
    if time.perf_counter() - started > _SHOW_TIMEOUT:
        raise RuntimeError(f"{what} within {_SHOW_TIMEOUT:g} s")


def _microctl(node: dict[str, Any], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """microctl on the node's state directory; with check, a failure ends the run with microctl's words."""
    answer = microcluster.microctl(node["state_dir"], *args, timeout=60, leader_within=30)
    if check and answer.returncode != 0:
        raise RuntimeError(f"microctl {' '.join(args)} on {node['name']}: {answer.stderr.strip()}")
    return answer


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
        "--changes",
        type=int,
        default=20,
        help="source changes the watch's latency is timed over; with --microcluster, divergence rounds (0: none)",
    )
    parser.add_argument(
        "--plot", type=Path, help="write a PNG of the check's, the agent round's and the floor's p50 against N"
    )
    parser.add_argument("--dqlite-client", action="store_true", help="compare the native dqlite client with Go's")
    parser.add_argument("--operations", action="store_true", help="time guarded operations against a check")
    parser.add_argument(
        "--microcluster",
        action="store_true",
        help="on a 3-member microcluster lab: the check, the dqlite clients, a divergence's detection",
    )
    args = parser.parse_args(argv)
    if args.dqlite_client:
        dqlite_client(args.calls)
        return 0
    if args.microcluster:
        if args.changes == 1:
            parser.error("--changes: a divergence's detection takes 0 rounds (none) or at least 2 (check and watch)")
        microcluster_figures(args.calls, args.changes)
        return 0
    if args.operations:
        operations(args.calls, args.backend)
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"CheckMembership vs a trivial unary call (health check), same mTLS channel, {args.calls} calls each,"
        f" {args.backend} backend"
    )
    print(_COST_HEADER)
    costs = []
    with tempfile.TemporaryDirectory(prefix="memberguard-bench-") as scratch:
        for nodes in sizes:
            cost = measure(nodes, args.calls, Path(scratch) / f"lab-{nodes}", args.backend)
            costs.append(cost)
            print(_cost_row(cost))
        if args.changes:
            latency = watch_latency(args.changes, Path(scratch) / "lab-watch", args.backend)
            print(
                f"WatchMembership, 3-node {args.backend} lab, the coordinator checking on its own every"
                f" {DEFAULT_METRICS_INTERVAL:g} s: {args.changes} source changes to their events at a subscriber:"
                f" p50 {latency.p50:.1f} ms, p99 {latency.p99:.1f} ms"
            )
    if args.plot:
        plot(costs, args.backend, args.plot)
        print(f"plot: {args.plot}")
    return 0


_COST_HEADER = (
    f"{'N':>4} {'floor p50':>10} {'floor p99':>10} {'check p50':>10} {'check p99':>10} {'p50 ratio':>10}"
    f" {'round p50':>10} {'beyond':>8} {'first check':>12} {'unreachable':>12}"
)


def _cost_row(cost: CheckCost) -> str:
    """`beyond` is the check's p50 over the round's plus the floor's: what memberguard adds to the round it cannot
    avoid and the call that asks for it."""
    beyond = cost.check.p50 / (cost.round.p50 + cost.floor.p50)
    return (
        f"{cost.nodes:>4} {cost.floor.p50:>9.2f}ms {cost.floor.p99:>9.2f}ms {cost.check.p50:>9.2f}ms"
        f" {cost.check.p99:>9.2f}ms {cost.check.p50 / cost.floor.p50:>9.1f}x {cost.round.p50:>8.2f}ms"
        f" {beyond:>7.2f}x {cost.first:>10.1f}ms {cost.first_missed:>12}{_notes(cost)}"
    )


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
