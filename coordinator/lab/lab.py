"""The lab: a coordinator and N agents as real background processes on loopback, with fresh certificates,
a consistent cluster and an operator identity; `memberguard lab up|down|add-node|restart`.

DIR/lab.json is a contract other tools read (absolute paths; later backends add keys, never rename them):
    {"backend": "local",
     "coordinator": {"address", "join_address", "metrics_address", "ca", "server_name", "pid"},
     "operator": {"cert", "key"},
     "sources": {"members_table", "raft_config"},
     "nodes": [{"name", "address", "agent_address", "pid", "state_dir", "log"}],
     "joining": [the same, for a node whose join may still finish (optional)]}

`metrics_address` is the coordinator's Prometheus endpoint (plain HTTP, on loopback: coordinator/metrics.py).

Every process binds port 0 the first time and the lab then writes the port it got into that process's configuration
(`listen`, and the coordinator's `join_listen` and `metrics_listen`), so that `restart` starts it again on the same
ports: its peers know it by its address, the join tokens issued so far name the coordinator's join port, and a
scraper keeps finding its metrics. An agent's pid is also kept in `<state_dir>/agent.pid`, so that a joiner not yet
in lab.json can be restarted too.

`add_node` grows a running lab by one node through a real join (a token, then the joiner's own request). Several
may run at once: DIR/lab.lock (an exclusive flock) serializes choosing a name and an address and updating lab.json;
the joins themselves run in parallel and queue on the coordinator's membership lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from memberguard import Client, Endpoint, MemberguardError, MembershipRefused, error_from_rpc
from memberguard.v1 import operation_pb2

from coordinator.agent.dqlite_sources import ROLES
from coordinator.agent.engine import PID_FILE, Engine, write_pid_file
from coordinator.agent.filecache import load_yaml
from coordinator.agent.join import CoordinatorNotVerified, request_join
from coordinator.agent.members_table import create_members_table, upsert_member
from coordinator.agent.node_state import LaidOutMember, lay_out_node
from coordinator.agent.raft_files import write_node_info, write_raft_config
from coordinator.core import tokens
from coordinator.core.model import Role
from coordinator.deployment import (
    COORDINATOR_NAME,
    OPERATOR_NAME,
    agent_config,
    coordinator_config,
    write_coordinator_registry,
)
from coordinator.files import throwaway, write_atomically, write_json
from coordinator.lab import microcluster
from coordinator.lab.dqlite_cluster import (
    DATABASE,
    NODE_ARGS,
    MemberSpec,
    lay_out_members,
    record_members,
    start_members,
)
from coordinator.lab.dqlite_nodes import NodeTls, node_command, node_environment
from coordinator.lab.ports import loopback_addresses
from coordinator.pki import Identity, make_identity, write_identity
from coordinator.registry import RegisteredMember

# Every dqlite bootstrap node has this ID (docs/design.md, "Backends"); joiners get random ones.
BOOTSTRAP_ID = 0x2DC171858C3155BE
STARTUP_TIMEOUT = 30.0
BACKENDS = ("local", "dqlite", "microcluster")
AGENT_PID_FILE = "agent.pid"
PINS_FILE = "coordinators.pem"  # in a node's state directory: the coordinators its agent answers
ENGINE_SUFFIX = "-engine"
_LOG_TAIL_LINES = 5  # of a process that exited at start, quoted in the error


class LabError(Exception):
    """The lab cannot be brought up, grown or brought down as asked; the message says why and what to do.

    exit_status is the CLI's status for it (memberguard's: 1 not done, 2 usage, 3 coordinator, 4 guard refused)."""

    exit_status = 1


class CoordinatorFailed(LabError):
    """The coordinator could not be reached, or refused a call (a token, a join)."""

    exit_status = 3


class GuardRefused(LabError):
    """The guard refused to issue the joiner's token: the membership is not clean."""

    exit_status = 4


class BadNodeName(LabError):
    """add-node was given a name that cannot name a node, or that the lab already has."""

    exit_status = 2


@dataclass(frozen=True)
class Lab:
    """A lab directory and its lab.json."""

    dir: Path
    document: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> Lab:
        path = directory.resolve() / "lab.json"
        try:
            return cls(directory.resolve(), json.loads(path.read_text()))
        except FileNotFoundError:
            raise LabError(f"no lab in {directory} (no lab.json)") from None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.from_lab(self.dir)

    def pids(self) -> list[int]:
        """Every process of the lab: the coordinator, the agents (joiners' included) and (dqlite) the engines."""
        pids = [self.document["coordinator"]["pid"]] + [n["pid"] for n in self.entries()]
        return list(dict.fromkeys(pids + self.engine_pids()))

    def entries(self) -> list[dict[str, Any]]:
        """The nodes' entries, and those of the joiners whose join may still finish."""
        return [*self.document["nodes"], *self.document.get("joining", [])]

    def engine_pids(self) -> list[int]:
        """The engines' pids: dqlite nodes as each node's engine.pid says (an agent restarts or fences its node's
        engine; the pid lab.json recorded at start is the fallback), and microcluster's daemons."""
        pids = []
        for node in self.entries():
            try:
                pids.append(int((Path(node["state_dir"]) / PID_FILE).read_text()))
            except (OSError, ValueError):
                for engine in ("dqlite", "microcluster"):
                    if engine in node:
                        pids.append(node[engine]["pid"])
        return pids

    def running(self) -> list[int]:
        return [pid for pid in self.pids() if _is_ours(pid)]

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.entries() if n["name"] == name)


def _is_ours(pid: int) -> bool:
    """True if pid is alive and runs memberguard code (a recycled pid of another program is not ours)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(word in command for word in (b"coordinator", b"memberguard-dqlite-node", b"microd"))


# The processes this Python process started, so that `down` can reap them: an unreaped child would linger as a
# zombie, and a Popen dropped while its child runs is a ResourceWarning.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(args: list[str], log: Path, environment: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        start = output.tell()
        process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env={**os.environ, **environment} if environment else None,
            start_new_session=True,  # the lab outlives the command that brought it up
        )
    _children[process.pid] = process
    _log_starts[process.pid] = start
    return process


# Where each spawned process's output starts in its log, to quote it if the process exits at start.
_log_starts: dict[int, int] = {}


def _wait_for_port(port_file: Path, process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if process.poll() is not None:
            raise LabError(f"process {process.pid} exited with {process.returncode}{_said(process, log)}; see {log}")
        time.sleep(0.02)
    raise LabError(f"process {process.pid} did not start within {STARTUP_TIMEOUT:g} s; see {log}")


def _said(process: subprocess.Popen[bytes], log: Path) -> str:
    """The last lines process wrote to its log, as a clause: a refusal to start says why there."""
    try:
        with log.open("rb") as output:
            output.seek(_log_starts.get(process.pid, 0))
            lines = output.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    tail = [line.strip() for line in lines if line.strip()][-_LOG_TAIL_LINES:]
    return f", saying: {' / '.join(tail)}" if tail else ""


def _write_agent_pid(state_dir: Path, pid: int) -> None:
    write_atomically(state_dir / AGENT_PID_FILE, f"{pid}\n".encode())


def _pin_listen(config: Path, key: str, address: str) -> None:
    """Writes the address a process bound into its configuration, for it to bind again when it restarts."""
    document = json.loads(config.read_text())
    if document.get(key) != address:
        write_json(config, {**document, key: address})


def _set_up_agent(
    state_dir: Path, name: str, backend: dict[str, Any], coordinators: bytes, role_adjustment_interval: float | None
) -> Path:
    """Writes the configuration of node name's agent, which binds port 0 and says which it got in agent.port, and the
    coordinators it answers (PEM) into a file of the node's own, as on a real node; returns the configuration."""
    pins = state_dir / PINS_FILE
    pins.write_bytes(coordinators)
    config = state_dir / "agent.json"
    write_json(
        config,
        agent_config(
            name,
            "127.0.0.1:0",
            state_dir,
            backend,
            pins,
            role_adjustment_interval=role_adjustment_interval,
            port_file=state_dir / "agent.port",
        ),
    )
    return config


@dataclass(frozen=True)
class _Cluster:
    """A backend's cluster, laid out (and for dqlite, running) before any agent starts."""

    members: list[LaidOutMember]  # (name, address, certificate PEM, dqlite node ID, role)
    state_dirs: dict[str, Path]
    agent_settings: dict[str, dict[str, Any]]  # per node: the backend's part of its agent.json
    node_entries: dict[str, dict[str, Any]]  # per node: the backend's keys in lab.json's node entry
    document: dict[str, Any]  # the backend's top-level keys in lab.json
    role_adjustment_interval: float | None


def up(
    directory: Path, nodes: int, *, agents_per_process: int = 1, backend: str = "local", roles_interval: float = 1.0
) -> Lab:
    """Brings a consistent lab up in directory and returns once CheckMembership answers."""
    if backend not in BACKENDS:
        raise LabError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if nodes < 1 or agents_per_process < 1:
        raise LabError("--nodes and --agents-per-process must be at least 1")
    directory = directory.resolve()
    if (directory / "lab.json").exists():
        running = Lab.load(directory).running()
        if running:
            raise LabError(
                f"a lab is running in {directory} (pids {running}); run `memberguard lab down --dir {directory}`"
            )
    for part in ("coordinator", "operator", "sources", "nodes", "logs", "lab.json"):
        target = directory / part
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    (directory / "logs").mkdir(parents=True)
    names = [f"n{i}" for i in range(1, nodes + 1)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # A lab directory is laid out anew by every `up`: not worth one fsync per file, thousands in a large lab.
        with throwaway():
            if backend == "local":
                cluster = _local_cluster(directory, names)
            elif backend == "dqlite":
                cluster = _dqlite_cluster(directory, names, roles_interval, processes)
            else:
                cluster = _microcluster_cluster(directory, names, processes)
            return _start(directory, backend, cluster, agents_per_process, processes)
    except BaseException:
        # Half a lab is worse than none: nothing may keep running that lab.json does not list.
        for process in processes:
            process.kill()
            process.wait()
            _children.pop(process.pid, None)
        raise


def _local_cluster(directory: Path, names: list[str]) -> _Cluster:
    """The `local` backend: a SQLite members table and a YAML Raft configuration that every node shares."""
    identities = {name: make_identity(name) for name in names}
    rng = random.SystemRandom()
    members: list[LaidOutMember] = [
        (
            name,
            address,
            identities[name].certificate_pem.decode(),
            BOOTSTRAP_ID if i == 0 else rng.getrandbits(63),
            Role.VOTER,
        )
        for i, (name, address) in enumerate(zip(names, loopback_addresses(len(names)), strict=True))
    ]
    sources = directory / "sources"
    sources.mkdir()
    members_table, raft_config = sources / "members.db", sources / "raft.yaml"
    create_members_table(members_table)
    for name, address, certificate, _, _ in members:
        upsert_member(members_table, name, address, certificate, "voter")
    write_raft_config(raft_config, [(node_id, address, role) for _, address, _, node_id, role in members])
    state_dirs = {name: directory / "nodes" / name for name in names}
    for name, address, _, node_id, _ in members:
        lay_out_node(state_dirs[name], identities[name], name, address, node_id, members)
    settings = {"backend": "local", "members_table": str(members_table), "raft_config": str(raft_config)}
    return _Cluster(
        members=members,
        state_dirs=state_dirs,
        agent_settings={name: settings for name in names},
        node_entries={name: {} for name in names},
        document={"sources": {"members_table": str(members_table), "raft_config": str(raft_config)}},
        role_adjustment_interval=None,
    )


def _dqlite_cluster(
    directory: Path, names: list[str], roles_interval: float, processes: list[subprocess.Popen[bytes]]
) -> _Cluster:
    """The `dqlite` backend: real dqlite nodes speaking TLS with their members' certificates."""
    addresses = loopback_addresses(len(names))
    specs = [
        MemberSpec(name, address, directory / "nodes" / name) for name, address in zip(names, addresses, strict=True)
    ]
    tls = lay_out_members(specs)
    engines = start_members(specs, tls, roles_interval=roles_interval)
    for engine in engines:
        # The node writes nothing after its ready line; the lab outlives this process, so let go of the pipe.
        assert engine.process.stdout is not None
        engine.process.stdout.close()
        _children[engine.process.pid] = engine.process
        processes.append(engine.process)
        write_pid_file(engine.data_dir.parent, engine.process.pid)  # for its agent, to fence it
    certificates = {spec.name: (spec.state_dir / "server.crt").read_text() for spec in specs}
    roles = asyncio.run(record_members(engines, certificates))
    members: list[LaidOutMember] = [
        (e.name, e.address, certificates[e.name], e.node_id, ROLES[roles[e.address]]) for e in engines
    ]
    return _Cluster(
        members=members,
        state_dirs={spec.name: spec.state_dir for spec in specs},
        agent_settings={
            e.name: {
                "backend": "dqlite",
                "dqlite": _dqlite_settings(e.data_dir.parent, e.address, DATABASE, roles_interval),
            }
            for e in engines
        },
        node_entries={
            e.name: {"dqlite": {"address": e.address, "data_dir": str(e.data_dir), "pid": e.process.pid}}
            for e in engines
        },
        document={"sources": {}, "dqlite_database": DATABASE, "role_adjustment_interval": roles_interval},
        role_adjustment_interval=roles_interval,
    )


def _microcluster_cluster(directory: Path, names: list[str], processes: list[subprocess.Popen[bytes]]) -> _Cluster:
    """The `microcluster` backend: real microd daemons (microcluster's example daemon), bootstrapped and joined with
    microctl as microcluster's own tests do; each node's state_dir is its daemon's state directory, which the agent
    reads and writes nothing to but its own files (agent.json, agent.port, agent.pid, coordinators.pem)."""
    daemons = microcluster.start(directory / "nodes", len(names), names=names, logs=directory / "logs")
    processes.extend(daemons.processes())
    for process in daemons.processes():
        _children[process.pid] = process
    # dqlite promotes the joiners a heartbeat or two after they joined, and a leader may change meanwhile: a lab is
    # up once the voters are there (three, or every member of a smaller cluster).
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while (listed := daemons.cluster_list()) and sum(row.role == "voter" for row in listed) < min(3, len(names)):
        if time.monotonic() > deadline:
            raise LabError(f"the microcluster members did not become voters within {STARTUP_TIMEOUT:g} s: {listed}")
        time.sleep(0.5)
    roles = {row.name: Role.from_text(row.role) for row in listed}
    members: list[LaidOutMember] = []
    for member in daemons.members:
        info = load_yaml((member.state_dir / "database" / "info.yaml").read_bytes())
        node_id = int(info["ID"]) if isinstance(info, dict) else 0  # go-dqlite's info.yaml: ID, Address, Role
        certificate = (member.state_dir / "server.crt").read_text()
        members.append((member.name, member.address, certificate, node_id, roles[member.name] or Role.SPARE))
    return _Cluster(
        members=members,
        state_dirs={member.name: member.state_dir for member in daemons.members},
        agent_settings={member.name: {"backend": "microcluster"} for member in daemons.members},
        node_entries={
            member.name: {"microcluster": {"pid": daemons.pid(member), "address": member.address}}
            for member in daemons.members
        },
        document={"sources": {}, "role_adjustment_interval": microcluster.HEARTBEAT},
        role_adjustment_interval=microcluster.HEARTBEAT,
    )


def _start(
    directory: Path,
    backend: str,
    cluster: _Cluster,
    agents_per_process: int,
    processes: list[subprocess.Popen[bytes]],
) -> Lab:
    logs = directory / "logs"
    coordinator, operator = make_identity(COORDINATOR_NAME), make_identity(OPERATOR_NAME)
    coordinator_cert, coordinator_key = write_identity(directory / "coordinator", coordinator)
    operator_cert, operator_key = write_identity(directory / "operator", operator, stem="operator")
    configs = [
        _set_up_agent(
            cluster.state_dirs[name],
            name,
            cluster.agent_settings[name],
            coordinator.certificate_pem,
            cluster.role_adjustment_interval,
        )
        for name, _, _, _, _ in cluster.members
    ]

    # Start every agent process first and only then wait: they import and bind in parallel.
    batches = []
    for start in range(0, len(cluster.members), agents_per_process):
        batch = [member[0] for member in cluster.members[start : start + agents_per_process]]
        log = logs / f"agents-{batch[0]}.log"
        process = _spawn(["-m", "coordinator.agent", *map(str, configs[start : start + agents_per_process])], log)
        processes.append(process)
        batches.append((batch, process, log))
    node_entries: list[dict[str, Any]] = []
    for batch, process, log in batches:
        for name in batch:
            state_dir = cluster.state_dirs[name]
            port = _wait_for_port(state_dir / "agent.port", process, log)
            address = next(member[1] for member in cluster.members if member[0] == name)
            _pin_listen(state_dir / "agent.json", "listen", f"127.0.0.1:{port}")
            _write_agent_pid(state_dir, process.pid)
            node_entries.append(
                {
                    "name": name,
                    "address": address,
                    "agent_address": f"127.0.0.1:{port}",
                    "pid": process.pid,
                    "state_dir": str(state_dir),
                    "log": str(log),
                    **cluster.node_entries[name],
                }
            )

    registry = directory / "coordinator" / "registry.json"
    certificates = {member[0]: member[2] for member in cluster.members}
    write_coordinator_registry(
        registry,
        [RegisteredMember(n["name"], n["agent_address"], certificates[n["name"]]) for n in node_entries],
        operator,
    )
    config = directory / "coordinator" / "coordinator.json"
    write_json(
        config,
        coordinator_config(
            "127.0.0.1:0",
            cert=coordinator_cert,
            key=coordinator_key,
            registry=registry,
            journal=directory / "coordinator" / "journal.db",
            metrics_listen="127.0.0.1:0",
            port_file=str(directory / "coordinator" / "coordinator.port"),
            join_port_file=str(directory / "coordinator" / "join.port"),
            metrics_port_file=str(directory / "coordinator" / "metrics.port"),
        ),
    )
    log = logs / "coordinator.log"
    process = _spawn(["-m", "coordinator.service", str(config)], log)
    processes.append(process)
    port = _wait_for_port(directory / "coordinator" / "coordinator.port", process, log)
    join_port = _wait_for_port(directory / "coordinator" / "join.port", process, log)
    metrics_port = _wait_for_port(directory / "coordinator" / "metrics.port", process, log)
    _pin_listen(config, "listen", f"127.0.0.1:{port}")
    _pin_listen(config, "join_listen", f"127.0.0.1:{join_port}")
    _pin_listen(config, "metrics_listen", f"127.0.0.1:{metrics_port}")

    document = {
        "backend": backend,
        "coordinator": {
            "address": f"127.0.0.1:{port}",
            "join_address": f"127.0.0.1:{join_port}",
            "metrics_address": f"127.0.0.1:{metrics_port}",
            "ca": str(coordinator_cert),
            "server_name": COORDINATOR_NAME,
            "pid": process.pid,
        },
        "operator": {"cert": str(operator_cert), "key": str(operator_key)},
        **cluster.document,
        "nodes": node_entries,
    }
    write_json(directory / "lab.json", document)
    lab = Lab(directory, document)
    _wait_until_answering(lab)
    return lab


def _wait_until_answering(lab: Lab) -> None:
    # The health check, not a membership check: the lab's first check is its user's (the benchmark times it).
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with Client(lab.endpoint) as client:
        while True:
            try:
                client.ping(timeout=5.0)
                return
            except MemberguardError as error:
                if time.monotonic() > deadline:
                    raise LabError(f"the coordinator does not answer its health check: {error}") from error
                time.sleep(0.05)


def down(directory: Path) -> list[int]:
    """Stops every process of the lab: the coordinator and the agents, then the dqlite nodes one at a time (all at
    once would leave a leader handing over to nodes that are going away). Returns the pids that were running."""
    lab = Lab.load(directory)
    engines = lab.engine_pids()
    running = lab.running()
    _stop([pid for pid in running if pid not in engines])
    for pid in reversed([pid for pid in engines if pid in running]):
        _stop([pid], timeout=10.0)
    for pid, child in list(_children.items()):  # an engine its agent fenced is gone already: reap it too
        if child.poll() is not None:
            del _children[pid]
    return running


def _stop(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_is_ours(pid) for pid in pids):
        time.sleep(0.02)
    for pid in pids:
        if _is_ours(pid):
            os.kill(pid, signal.SIGKILL)
        child = _children.pop(pid, None)
        if child is not None:
            child.wait()


def _stop_if_running(pid: int, timeout: float = 5.0) -> None:
    """Stops pid if it is a process of the lab that still runs; reaps it if this process started it."""
    if _is_ours(pid):
        with contextlib.suppress(ProcessLookupError):
            _stop([pid], timeout)
    elif (child := _children.pop(pid, None)) is not None:
        child.wait()


def _update_document(directory: Path, change: Any) -> dict[str, Any]:
    """Applies change (document -> document) to lab.json as it is now, under DIR/lab.lock; the new document."""
    with _locked(directory):
        document = change(Lab.load(directory).document)
        write_json(directory / "lab.json", document)
        return dict(document)


# --- restarting one process in place ----------------------------------------------------------------------------


def restart(directory: Path, target: str) -> int:
    """Restarts one process of the running lab in directory on the same ports with the same configuration, stopping
    it first if it runs (SIGTERM, then SIGKILL), and returns its new pid; lab.json gets it. target is `coordinator`,
    a node's name (its agent; agents sharing its process restart with it) or `NAME-engine` (its dqlite engine).
    The node may be a joiner that lab.json does not list yet: its directory under DIR/nodes is enough."""
    lab = Lab.load(directory)
    if target == "coordinator":
        return restart_coordinator(lab).pid
    if _state_dir(lab, target) is not None:
        return restart_agent(lab, target).pid
    if target.endswith(ENGINE_SUFFIX) and _state_dir(lab, target.removesuffix(ENGINE_SUFFIX)) is not None:
        return restart_engine(lab, target.removesuffix(ENGINE_SUFFIX))
    raise BadNodeName(
        f"the lab has no process {target!r}: name `coordinator`, a node (NAME) or its engine (NAME-engine)"
    )


def restart_coordinator(
    lab: Lab,
    *,
    config: Path | None = None,
    environment: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Restarts the coordinator (see restart); returns once it serves, after the reconciler's first pass. config and
    environment replace its configuration file and add to its environment, for a test that arms a fault or changes
    a setting (its ports stay those of the lab's configuration); log replaces DIR/logs/coordinator.log."""
    lab = Lab.load(lab.dir)
    _stop_if_running(lab.document["coordinator"]["pid"])
    lab_config = lab.dir / "coordinator" / "coordinator.json"
    document = json.loads((config or lab_config).read_text())
    for port_file in (document.get("port_file"), document.get("join_port_file"), document.get("metrics_port_file")):
        if port_file:
            Path(port_file).unlink(missing_ok=True)
    log = log or lab.dir / "logs" / "coordinator.log"
    process = _spawn(["-m", "coordinator.service", str(config or lab_config)], log, environment)
    try:
        _wait_for_port(Path(document["port_file"]), process, log)
    except BaseException:
        # Not yet in lab.json: left running, it would outlive `lab down` and hold the journal.
        _stop_if_running(process.pid)
        raise

    def pid(document: dict[str, Any]) -> dict[str, Any]:
        return {**document, "coordinator": {**document["coordinator"], "pid": process.pid}}

    _update_document(lab.dir, pid)
    return process


def _state_dir(lab: Lab, name: str) -> Path | None:
    """The state directory of node name: from lab.json, or a joiner's directory with its agent's configuration."""
    for entry in lab.entries():
        if entry["name"] == name:
            return Path(entry["state_dir"])
    candidate = lab.dir / "nodes" / name
    return candidate if not tokens.dns_name_problem(name) and (candidate / "agent.json").exists() else None


def _agent_pid(lab: Lab, name: str, state_dir: Path) -> int | None:
    for entry in lab.entries():
        if entry["name"] == name:
            return int(entry["pid"])
    try:
        return int((state_dir / AGENT_PID_FILE).read_text())
    except (OSError, ValueError):
        return None


def restart_agent(lab: Lab, name: str, *, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Restarts node name's agent (see restart), with the agents that share its process, on their addresses;
    returns once every one serves. log replaces the log the lab keeps for it."""
    lab = Lab.load(lab.dir)
    state_dir = _state_dir(lab, name)
    if state_dir is None:
        raise BadNodeName(f"the lab has no node {name!r}")
    pid = _agent_pid(lab, name, state_dir)
    # Agents packed into one process (--agents-per-process) go down and come back together.
    batch = [e for e in lab.entries() if pid is not None and e["pid"] == pid] or [
        {"name": name, "state_dir": str(state_dir)}
    ]
    if pid is not None:
        _stop_if_running(pid)
    configs = []
    for entry in batch:
        config = Path(entry["state_dir"]) / "agent.json"
        document = json.loads(config.read_text())
        if document["listen"].endswith(":0") and entry.get("agent_address"):
            _pin_listen(config, "listen", entry["agent_address"])
        Path(document["port_file"]).unlink(missing_ok=True)
        configs.append((config, Path(document["port_file"])))
    log = log or Path(batch[0].get("log") or lab.dir / "logs" / f"agent-{name}.log")
    process = _spawn(["-m", "coordinator.agent", *(str(config) for config, _ in configs)], log)
    for _, port_file in configs:
        _wait_for_port(port_file, process, log)
    names = {entry["name"] for entry in batch}
    for entry in batch:
        _write_agent_pid(Path(entry["state_dir"]), process.pid)

    def pids(document: dict[str, Any]) -> dict[str, Any]:
        return {
            **document,
            **{
                key: [{**e, "pid": process.pid} if e["name"] in names else e for e in document[key]]
                for key in ("nodes", "joining")
                if key in document
            },
        }

    _update_document(lab.dir, pids)
    return process


def restart_engine(lab: Lab, name: str) -> int:
    """Restarts node name's dqlite engine (see restart) as the node's daemon would: with its agent.json's command
    and environment, only if its data still has an identity (a fenced node's daemon starts no engine). Its pid."""
    lab = Lab.load(lab.dir)
    state_dir = _state_dir(lab, name)
    if lab.document["backend"] != "dqlite" or state_dir is None:
        raise BadNodeName(f"the lab has no engine {name}{ENGINE_SUFFIX}: engines run on the dqlite backend only")
    settings = json.loads((state_dir / "agent.json").read_text())["dqlite"]
    engine = Engine(
        state_dir, Path(settings["data_dir"]), settings["engine"]["command"], settings["engine"]["environment"]
    )
    running = engine.pid()
    if running is not None:
        # SIGTERM first: the engine hands leadership over before it stops.
        _stop_if_running(running, timeout=10.0)
    if not (engine.data_dir / "info.yaml").exists():
        raise LabError(
            f"{name}'s engine was not started: {engine.data_dir} holds no info.yaml (the node was fenced; reset it "
            "before it joins again)"
        )
    pid = engine.start()
    if engine._child is not None:  # the child Engine.start made: `down` reaps it (this process may outlive it)
        _children[pid] = engine._child

    def engine_pid(document: dict[str, Any]) -> dict[str, Any]:
        nodes = [
            {**e, "dqlite": {**e["dqlite"], "pid": pid}} if e["name"] == name and "dqlite" in e else e
            for e in document["nodes"]
        ]
        return {**document, "nodes": nodes}

    _update_document(lab.dir, engine_pid)
    return pid


# --- growing a lab: add-node ------------------------------------------------------------------------------------

JOIN_TIMEOUT = 60.0
_REFUSALS = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
)


@dataclass(frozen=True)
class JoiningNode:
    """A node about to join a lab, laid out as a new node is: its identity, an empty truststore, its engine's
    info.yaml (a fresh node ID) and an empty cluster.yaml, and its agent running, trusting no coordinator (pins
    holds a placeholder) until its token says which."""

    name: str
    address: str
    identity: Identity
    state_dir: Path
    pid: int  # its agent's when it started; `lab restart` may have replaced it since (agent_pid)
    agent_address: str
    pins: Path
    daemon_pid: int = 0  # on the microcluster backend, its microd's

    @property
    def agent_pid(self) -> int:
        """Its agent's pid now, as `<state_dir>/agent.pid` says (`lab restart` rewrites it)."""
        try:
            return int((self.state_dir / AGENT_PID_FILE).read_text())
        except (OSError, ValueError):
            return self.pid

    def join(self, token: str, *, timeout: float = JOIN_TIMEOUT) -> operation_pb2.Operation:
        """Asks the coordinator the token names; the finished (or rolled back) operation. A refusal raises
        grpc.aio.AioRpcError, a token naming no coordinator that answers with its pinned certificate
        CoordinatorNotVerified, a malformed token tokens.MalformedToken."""
        return asyncio.run(
            request_join(
                token,
                name=self.name,
                address=self.address,
                certificate_pem=self.identity.certificate_pem.decode(),
                agent_address=self.agent_address,
                pins=self.pins,
                timeout=timeout,
            )
        )

    def entry(self) -> dict[str, Any]:
        """Its node entry in lab.json."""
        return {
            "name": self.name,
            "address": self.address,
            "agent_address": self.agent_address,
            "pid": self.agent_pid,
            "state_dir": str(self.state_dir),
            "log": str(self.state_dir.parent.parent / "logs" / f"agent-{self.name}.log"),
            **({"microcluster": {"pid": self.daemon_pid, "address": self.address}} if self.daemon_pid else {}),
        }

    def stop(self) -> None:
        """Stops its agent, and its engine if the join started one, if they still run."""
        with contextlib.suppress(OSError, ValueError):
            engine = int((self.state_dir / PID_FILE).read_text())
            if _is_ours(engine):
                _stop([engine])
        for pid in dict.fromkeys((self.agent_pid, self.pid)):
            _stop_if_running(pid)
        if self.daemon_pid:
            _stop_if_running(self.daemon_pid)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Holds DIR/lab.lock exclusively, so that one add-node at a time picks a name and an address or updates
    lab.json. The lock goes with the file's descriptor: a process that dies lets go of it."""
    with (directory / "lab.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def start_joining_node(lab: Lab, name: str | None = None) -> JoiningNode:
    """Lays out a node that is about to join the lab (see JoiningNode) and starts its agent; it joins nothing yet.

    name defaults to the lowest nN that neither lab.json nor a directory under DIR/nodes has; the node's directory
    is its reservation, made under DIR/lab.lock along with its member address (which no other node has), so that
    several of these may run at once. Its agent's log is DIR/logs/agent-NAME.log; on the dqlite backend its engine's
    is DIR/nodes/NAME/node.log, once the join starts it.
    """
    microcluster_backend = lab.document["backend"] == "microcluster"
    with _locked(lab.dir):
        document = Lab.load(lab.dir).document  # as it is now: another add-node may have added to it
        nodes_dir = lab.dir / "nodes"
        if name is None:
            name = _free_name(document, nodes_dir)
        elif problem := tokens.dns_name_problem(name):
            raise BadNodeName(f"{name!r} cannot name a node: {problem}")
        elif any(node["name"] == name for node in document["nodes"]):
            raise BadNodeName(f"the lab already has a node {name}")
        state_dir = nodes_dir / name
        try:
            state_dir.mkdir()
        except FileExistsError:
            raise BadNodeName(f"{name} is taken: {state_dir} exists") from None
        try:
            address = _free_member_address(document, nodes_dir)
            identity = make_identity(name)
            # On microcluster, microd keeps a server.crt that names the member; it would replace one that does not
            # when it joins, and the agent would no longer hold the certificate its join submitted.
            write_identity(state_dir, identity)
            if not microcluster_backend:
                (state_dir / "truststore").mkdir(mode=0o700)
                write_node_info(
                    state_dir / "database" / "info.yaml", random.SystemRandom().getrandbits(63), address, Role.VOTER
                )
                write_raft_config(state_dir / "database" / "cluster.yaml", [])
            config = _set_up_agent(
                state_dir,
                name,
                _backend_settings(document, state_dir, address),
                make_identity("nobody-yet").certificate_pem,
                document.get("role_adjustment_interval"),
            )
        except BaseException:
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
    daemon = _start_joining_daemon(lab, name, state_dir) if microcluster_backend else None
    log = lab.dir / "logs" / f"agent-{name}.log"
    process = _spawn(["-m", "coordinator.agent", str(config)], log)
    try:
        port = _wait_for_port(state_dir / "agent.port", process, log)
        _pin_listen(config, "listen", f"127.0.0.1:{port}")
        _write_agent_pid(state_dir, process.pid)
    except BaseException:
        for started in (process, daemon):
            if started is not None:
                started.kill()
                started.wait()
                _children.pop(started.pid, None)
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    return JoiningNode(
        name,
        address,
        identity,
        state_dir,
        process.pid,
        f"127.0.0.1:{port}",
        state_dir / PINS_FILE,
        daemon_pid=daemon.pid if daemon else 0,
    )


def _start_joining_daemon(lab: Lab, name: str, state_dir: Path) -> subprocess.Popen[bytes]:
    """A microd on the joiner's state directory, ready and never initialised: memberguard's join has it join."""
    daemon = microcluster.spawn(
        state_dir, lab.dir / "logs" / f"{name}.log", heartbeat=lab.document["role_adjustment_interval"]
    )
    _children[daemon.pid] = daemon
    try:
        microcluster.wait_ready(state_dir)
    except BaseException:
        daemon.kill()
        daemon.wait()
        _children.pop(daemon.pid, None)
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
    return daemon


def _backend_settings(document: dict[str, Any], state_dir: Path, address: str) -> dict[str, Any]:
    """The backend's part of a joining node's agent.json. On dqlite, its engine is not started here: the join's
    engine step starts it, joining (the agent knows how from `engine`)."""
    if document["backend"] == "microcluster":
        return {"backend": "microcluster"}
    if document["backend"] == "local":
        sources = document["sources"]
        return {"backend": "local", "members_table": sources["members_table"], "raft_config": sources["raft_config"]}
    return {
        "backend": "dqlite",
        "dqlite": _dqlite_settings(
            state_dir, address, document["dqlite_database"], document["role_adjustment_interval"]
        ),
    }


def _dqlite_settings(state_dir: Path, address: str, database: str, roles_interval: float) -> dict[str, Any]:
    """The `dqlite` part of a node's agent.json: its engine's address, data, database, and how to start it."""
    data_dir = state_dir / "database"
    tls = NodeTls(state_dir / "server.crt", state_dir / "server.key", state_dir / "truststore")
    return {
        "address": address,
        "data_dir": str(data_dir),
        "database": database,
        "engine": {
            "command": node_command(
                address=address, data_dir=data_dir, roles_interval=roles_interval, tls=tls, extra_args=NODE_ARGS
            ),
            "environment": node_environment(address, tls),
        },
    }


def _free_name(document: dict[str, Any], nodes_dir: Path) -> str:
    taken = {node["name"] for node in document["nodes"]} | {path.name for path in nodes_dir.iterdir()}
    return next(f"n{i}" for i in range(1, len(taken) + 2) if f"n{i}" not in taken)


def _free_member_address(document: dict[str, Any], nodes_dir: Path) -> str:
    """A loopback address no node of the lab has, joined or reserved. The local backend binds no member address,
    so a probe may well hand out one that a member already has."""
    taken = {node["address"] for node in document["nodes"]}
    for info in nodes_dir.glob("*/database/info.yaml"):
        with contextlib.suppress(OSError, ValueError):
            node = load_yaml(info.read_bytes())
            if isinstance(node, dict):
                taken.add(node.get("Address"))
    while (address := loopback_addresses(1)[0]) in taken:
        pass
    return address


def add_node(directory: Path, name: str | None = None, *, timeout: float = JOIN_TIMEOUT) -> dict[str, Any]:
    """Grows the running lab in directory by one node, through a real join, and returns its lab.json entry.

    Starts a joining node (start_joining_node), issues its token through the public client, has it join, and on
    success appends the node to lab.json (so that `lab down` stops its agent). Otherwise a LabError says why: the
    operation's state and error if the join ran, the coordinator's refusal if not. A join that is over without the
    node (refused, rolled back) leaves nothing behind: its agent stops, its directory and token go. A join that may
    still finish (cut short by a lost coordinator or a deadline, parked, unfinished) keeps the joiner's agent
    running, since the coordinator's recovery may need it to finish the join or to undo it, and lists it under
    "joining" in lab.json, where `lab down` and `lab restart` find it. Safe to run several at once: see _locked.
    """
    lab = Lab.load(directory)
    joiner = start_joining_node(lab, name)
    over = True  # the join cannot finish any more: nothing of it needs the joiner
    try:
        with Client(lab.endpoint) as client:
            try:
                issued = client.issue_token(joiner.name, timeout=timeout)
            except MembershipRefused as error:
                raise GuardRefused(f"the guard refused {joiner.name}'s token: {error}") from None
            except MemberguardError as error:
                raise CoordinatorFailed(f"coordinator {lab.endpoint.address}: {error}") from None
            if issued.state != operation_pb2.OPERATION_STATE_SUCCEEDED:
                raise LabError(f"issuing {joiner.name}'s token {_state(issued)}: {issued.error or '-'}")
            over = False  # from here the coordinator may be running the join, whatever this call hears of it
            try:
                operation = joiner.join(issued.token, timeout=timeout)
            except CoordinatorNotVerified as error:
                over = True  # the joiner asked nothing of a coordinator it could not verify
                raise CoordinatorFailed(f"{joiner.name} cannot join: {error}") from None
            except grpc.aio.AioRpcError as error:
                # A refusal changed nothing; a join cut short (a deadline, a lost connection) may still be running.
                over = error.code() in _REFUSALS
                raise CoordinatorFailed(f"{joiner.name}'s join: {error_from_rpc(error)}") from None
            if operation.state != operation_pb2.OPERATION_STATE_SUCCEEDED:
                over = operation.state == operation_pb2.OPERATION_STATE_ROLLED_BACK
                raise LabError(
                    f"the join of {joiner.name} {_state(operation)}: {operation.error or '-'} "
                    f"(memberguard ops {operation.id} --lab {lab.dir})"
                )
    except BaseException as error:
        if over:
            joiner.stop()
            _revoke_quietly(lab, joiner.name)
            shutil.rmtree(joiner.state_dir, ignore_errors=True)
            raise
        _keep_joining(lab.dir, joiner)
        if isinstance(error, LabError):
            raise type(error)(
                f"{error}; the join may still finish, so {joiner.name}'s agent keeps running (pid "
                f'{joiner.agent_pid}, under "joining" in lab.json: `memberguard lab down` stops it); follow it '
                f"with `memberguard ops --lab {lab.dir}`"
            ) from None
        raise
    entry = joiner.entry()
    if lab.document["backend"] == "dqlite":
        pid = int((joiner.state_dir / PID_FILE).read_text())
        entry["dqlite"] = {"address": joiner.address, "data_dir": str(joiner.state_dir / "database"), "pid": pid}
    _update_document(lab.dir, lambda document: {**document, "nodes": [*document["nodes"], entry]})
    return entry


def _keep_joining(directory: Path, joiner: JoiningNode) -> None:
    """Lists the joiner under "joining" in lab.json, replacing an earlier entry of its name."""

    def joining(document: dict[str, Any]) -> dict[str, Any]:
        kept = [e for e in document.get("joining", []) if e["name"] != joiner.name]
        return {**document, "joining": [*kept, joiner.entry()]}

    _update_document(directory, joining)


def _revoke_quietly(lab: Lab, name: str) -> None:
    """Revokes name's token if it has a usable one; the coordinator may not answer, or have none."""
    with contextlib.suppress(MemberguardError), Client(lab.endpoint) as client:
        client.revoke_token(name, timeout=5.0)


def _state(operation: operation_pb2.Operation) -> str:
    return operation_pb2.OperationState.Name(operation.state).removeprefix("OPERATION_STATE_").lower().replace("_", "-")


def register(subparsers: Any) -> None:
    """Adds `lab up`, `lab down`, `lab add-node` and `lab restart` to the memberguard CLI."""
    parser = subparsers.add_parser("lab", help="bring a local lab of real processes up or down")
    commands = parser.add_subparsers(dest="lab_command", required=True)
    up_parser = commands.add_parser("up", help="start a coordinator and N agents with a consistent cluster")
    up_parser.add_argument("--dir", required=True, type=Path, help="the lab directory")
    up_parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up_parser.add_argument("--backend", default="local", choices=BACKENDS, help="source backend (default local)")
    up_parser.add_argument(
        "--roles-interval", type=float, default=1.0, help="dqlite: the nodes' role-adjustment interval in seconds"
    )
    up_parser.add_argument("--agents-per-process", type=int, default=1, help="agents sharing one process (large labs)")
    up_parser.set_defaults(handler=_run_up)
    down_parser = commands.add_parser("down", help="stop every process of a lab")
    down_parser.add_argument("--dir", required=True, type=Path, help="the lab directory")
    down_parser.set_defaults(handler=_run_down)
    add_parser = commands.add_parser(
        "add-node",
        help="join one more node to a running lab; prints its name and agent address",
        description="Start a new node's agent, issue its token and have it join, as a real joiner does; on success\n"
        "the node is in lab.json (so `lab down` stops it). A join that may still finish (the coordinator was\n"
        'lost mid-join, or the join is parked) keeps the joiner\'s agent running, under "joining" in lab.json.\n'
        "Several may run at once. Exit 0 joined, 1 the join rolled back or did not finish, 2 a bad --name, 3 the\n"
        "coordinator is unreachable or refused, 4 the guard refused to issue the token.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_parser.add_argument("--dir", required=True, type=Path, help="the lab directory")
    add_parser.add_argument("--name", help="the new node's name (default: the lowest free nN)")
    add_parser.add_argument(
        "--timeout", type=float, default=JOIN_TIMEOUT, metavar="S", help=f"per call (default {JOIN_TIMEOUT:g})"
    )
    add_parser.set_defaults(handler=_run_add_node)
    restart_parser = commands.add_parser(
        "restart",
        help="restart one process of a running lab in place, on the same ports",
        description="Stop the process if it runs (SIGTERM, then SIGKILL) and start it again with the same\n"
        "configuration on the same ports; lab.json gets its new pid. TARGET is `coordinator`, a node's name\n"
        "(its agent; a joiner whose join may still finish too) or NAME-engine (its dqlite engine, started only\n"
        "if the node was not fenced). Exit 0 restarted, 1 it did not start (its log's last lines say why), 2 no\n"
        "such process.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    restart_parser.add_argument("--dir", required=True, type=Path, help="the lab directory")
    restart_parser.add_argument("target", metavar="TARGET", help="coordinator, NAME or NAME-engine")
    restart_parser.set_defaults(handler=_run_restart)


def _run_up(args: argparse.Namespace) -> int:
    try:
        lab = up(
            args.dir,
            args.nodes,
            agents_per_process=args.agents_per_process,
            backend=args.backend,
            roles_interval=args.roles_interval,
        )
    except LabError as error:
        print(f"memberguard: {error}", file=sys.stderr)
        return 1
    print(f"lab up in {lab.dir}: coordinator {lab.document['coordinator']['address']}, {args.nodes} nodes")
    print(f"  memberguard check --lab {lab.dir}")
    return 0


def _run_down(args: argparse.Namespace) -> int:
    try:
        stopped = down(args.dir)
    except LabError as error:
        print(f"memberguard: {error}", file=sys.stderr)
        return 1
    print(f"lab down in {args.dir.resolve()}: stopped {len(stopped)} processes")
    return 0


def _run_restart(args: argparse.Namespace) -> int:
    try:
        pid = restart(args.dir, args.target)
    except LabError as error:
        print(f"memberguard: {error}", file=sys.stderr)
        return error.exit_status
    print(f"{args.target} restarted: pid {pid}")
    return 0


def _run_add_node(args: argparse.Namespace) -> int:
    try:
        entry = add_node(args.dir, args.name, timeout=args.timeout)
    except LabError as error:
        print(f"memberguard: {error}", file=sys.stderr)
        return error.exit_status
    print(f"{entry['name']} {entry['agent_address']}")
    return 0
