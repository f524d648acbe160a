"""The lab: a coordinator and N agents as real background processes on loopback, with fresh certificates,
a consistent cluster and an operator identity; `memberguard lab up|down`.

DIR/lab.json is a contract other tools read (absolute paths; later backends add keys, never rename them):
    {"backend": "local",
     "coordinator": {"address", "ca", "server_name", "pid"},
     "operator": {"cert", "key"},
     "sources": {"members_table", "raft_config"},
     "nodes": [{"name", "address", "agent_address", "pid", "state_dir"}]}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memberguard import Client, Endpoint, MemberguardError

from coordinator.agent.members_table import create_members_table, upsert_member
from coordinator.agent.node_state import LaidOutMember, lay_out_node
from coordinator.agent.raft_files import write_raft_config
from coordinator.auth import Principal
from coordinator.core.model import Role
from coordinator.files import write_atomically
from coordinator.pki import Identity, make_identity, write_identity
from coordinator.registry import RegisteredIdentity, RegisteredMember, write_registry

# Every dqlite bootstrap node has this ID (research/microcluster.md §1.3); joiners get random ones.
BOOTSTRAP_ID = 0x2DC171858C3155BE
COORDINATOR_NAME = "memberguard-coordinator"
STARTUP_TIMEOUT = 30.0


class LabError(Exception):
    """The lab cannot be brought up or down as asked; the message says why and what to do."""


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
        pids = [self.document["coordinator"]["pid"]] + [n["pid"] for n in self.document["nodes"]]
        return list(dict.fromkeys(pids))

    def running(self) -> list[int]:
        return [pid for pid in self.pids() if _is_ours(pid)]

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.document["nodes"] if n["name"] == name)


def _is_ours(pid: int) -> bool:
    """True if pid is alive and runs memberguard code (a recycled pid of another program is not ours)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"coordinator" in command


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# The processes this Python process started, so that `down` can reap them: an unreaped child would linger as a
# zombie, and a Popen dropped while its child runs is a ResourceWarning.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,  # the lab outlives the command that brought it up
        )
    _children[process.pid] = process
    return process


def _wait_for_port(port_file: Path, process: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if process.poll() is not None:
            raise LabError(f"process {process.pid} exited with {process.returncode}; see {log}")
        time.sleep(0.02)
    raise LabError(f"process {process.pid} did not start within {STARTUP_TIMEOUT:g} s; see {log}")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    write_atomically(path, (json.dumps(document, indent=2) + "\n").encode())


@dataclass(frozen=True)
class _Layout:
    """Everything `lab up` writes before it starts a process."""

    directory: Path
    members: list[LaidOutMember]
    identities: dict[str, Identity]
    operator: Identity
    coordinator_cert: Path
    coordinator_key: Path
    operator_cert: Path
    operator_key: Path
    members_table: Path
    raft_config: Path
    agent_configs: list[Path]


def up(directory: Path, nodes: int, *, agents_per_process: int = 1, backend: str = "local") -> Lab:
    """Brings a consistent lab up in directory and returns once CheckMembership answers."""
    if backend != "local":
        raise LabError(f"backend {backend!r} is not available yet (only 'local')")
    if nodes < 1 or agents_per_process < 1:
        raise LabError("--nodes and --agents-per-process must be at least 1")
    directory = directory.resolve()
    if (directory / "lab.json").exists():
        running = Lab.load(directory).running()
        if running:
            raise LabError(
                f"a lab is running in {directory} (pids {running}); run `memberguard lab down --dir {directory}`"
            )
    layout = _lay_out(directory, nodes)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        return _start(layout, agents_per_process, backend, processes)
    except BaseException:
        # Half a lab is worse than none: nothing may keep running that lab.json does not list.
        for process in processes:
            process.kill()
            process.wait()
            _children.pop(process.pid, None)
        raise


def _lay_out(directory: Path, nodes: int) -> _Layout:
    for part in ("coordinator", "operator", "sources", "nodes", "logs", "lab.json"):
        target = directory / part
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    (directory / "logs").mkdir(parents=True)

    coordinator_cert, coordinator_key = write_identity(directory / "coordinator", make_identity(COORDINATOR_NAME))
    operator = make_identity("operator")
    operator_cert, operator_key = write_identity(directory / "operator", operator, stem="operator")

    names = [f"n{i}" for i in range(1, nodes + 1)]
    identities = {name: make_identity(name) for name in names}
    rng = random.SystemRandom()
    members: list[LaidOutMember] = [
        (
            name,
            f"127.0.0.1:{_free_port()}",
            identities[name].certificate_pem.decode(),
            BOOTSTRAP_ID if i == 0 else rng.getrandbits(63),
            Role.VOTER,
        )
        for i, name in enumerate(names)
    ]

    sources = directory / "sources"
    sources.mkdir()
    members_table, raft_config = sources / "members.db", sources / "raft.yaml"
    create_members_table(members_table)
    for name, address, certificate, _, _ in members:
        upsert_member(members_table, name, address, certificate, "voter")
    write_raft_config(raft_config, [(node_id, address, role) for _, address, _, node_id, role in members])

    agent_configs = []
    for name, address, _, node_id, _ in members:
        state_dir = directory / "nodes" / name
        lay_out_node(state_dir, identities[name], name, address, node_id, members)
        # Each node pins the coordinators it answers in a file of its own, as a real node would.
        pins = state_dir / "coordinators.pem"
        pins.write_bytes(coordinator_cert.read_bytes())
        config = state_dir / "agent.json"
        _write_json(
            config,
            {
                "name": name,
                "listen": "127.0.0.1:0",
                "state_dir": str(state_dir),
                "backend": "local",
                "members_table": str(members_table),
                "raft_config": str(raft_config),
                "trusted_coordinators": str(pins),
                "port_file": str(state_dir / "agent.port"),
            },
        )
        agent_configs.append(config)
    return _Layout(
        directory,
        members,
        identities,
        operator,
        coordinator_cert,
        coordinator_key,
        operator_cert,
        operator_key,
        members_table,
        raft_config,
        agent_configs,
    )


def _start(layout: _Layout, agents_per_process: int, backend: str, processes: list[subprocess.Popen[bytes]]) -> Lab:
    directory, logs = layout.directory, layout.directory / "logs"
    # Start every agent process first and only then wait: they import and bind in parallel.
    batches = []
    for start in range(0, len(layout.members), agents_per_process):
        batch = layout.members[start : start + agents_per_process]
        configs = layout.agent_configs[start : start + agents_per_process]
        log = logs / f"agents-{batch[0][0]}.log"
        process = _spawn(["-m", "coordinator.agent", *map(str, configs)], log)
        processes.append(process)
        batches.append((batch, process, log))
    node_entries: list[dict[str, Any]] = []
    for batch, process, log in batches:
        for name, address, _, _, _ in batch:
            state_dir = directory / "nodes" / name
            port = _wait_for_port(state_dir / "agent.port", process, log)
            node_entries.append(
                {
                    "name": name,
                    "address": address,
                    "agent_address": f"127.0.0.1:{port}",
                    "pid": process.pid,
                    "state_dir": str(state_dir),
                }
            )

    registry = directory / "coordinator" / "registry.json"
    write_registry(
        registry,
        [
            RegisteredMember(n["name"], n["agent_address"], layout.identities[n["name"]].certificate_pem.decode())
            for n in node_entries
        ],
        [RegisteredIdentity("operator", Principal.OPERATOR, layout.operator.certificate_pem.decode())],
    )
    coordinator_config = directory / "coordinator" / "coordinator.json"
    _write_json(
        coordinator_config,
        {
            "coordinator_id": COORDINATOR_NAME,
            "listen": "127.0.0.1:0",
            "cert": str(layout.coordinator_cert),
            "key": str(layout.coordinator_key),
            "registry": str(registry),
            "port_file": str(directory / "coordinator" / "coordinator.port"),
        },
    )
    log = logs / "coordinator.log"
    process = _spawn(["-m", "coordinator.service", str(coordinator_config)], log)
    processes.append(process)
    port = _wait_for_port(directory / "coordinator" / "coordinator.port", process, log)

    document = {
        "backend": backend,
        "coordinator": {
            "address": f"127.0.0.1:{port}",
            "ca": str(layout.coordinator_cert),
            "server_name": COORDINATOR_NAME,
            "pid": process.pid,
        },
        "operator": {"cert": str(layout.operator_cert), "key": str(layout.operator_key)},
        "sources": {"members_table": str(layout.members_table), "raft_config": str(layout.raft_config)},
        "nodes": node_entries,
    }
    _write_json(directory / "lab.json", document)
    lab = Lab(directory, document)
    _wait_until_answering(lab)
    return lab


def _wait_until_answering(lab: Lab) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with Client(lab.endpoint) as client:
        while True:
            try:
                client.check_membership(timeout=5.0)
                return
            except MemberguardError as error:
                if time.monotonic() > deadline:
                    raise LabError(f"the coordinator does not answer CheckMembership: {error}") from error
                time.sleep(0.05)


def down(directory: Path) -> list[int]:
    """Stops every process of the lab (coordinator first); returns the pids that were running."""
    lab = Lab.load(directory)
    running = lab.running()
    for pid in running:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_is_ours(pid) for pid in running):
        time.sleep(0.02)
    for pid in running:
        if _is_ours(pid):
            os.kill(pid, signal.SIGKILL)
    for pid in lab.pids():
        child = _children.pop(pid, None)
        if child is not None:
            child.wait()
    return running


def register(subparsers: Any) -> None:
    """Adds `lab up` and `lab down` to the memberguard CLI."""
    parser = subparsers.add_parser("lab", help="bring a local lab of real processes up or down")
    commands = parser.add_subparsers(dest="lab_command", required=True)
    up_parser = commands.add_parser("up", help="start a coordinator and N agents with a consistent cluster")
    up_parser.add_argument("--dir", required=True, type=Path, help="the lab directory")
    up_parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up_parser.add_argument("--backend", default="local", choices=["local"], help="source backend")
    up_parser.add_argument("--agents-per-process", type=int, default=1, help="agents sharing one process (large labs)")
    up_parser.set_defaults(handler=_run_up)
    down_parser = commands.add_parser("down", help="stop every process of a lab")
    down_parser.add_argument("--dir", required=True, type=Path, help="the lab directory")
    down_parser.set_defaults(handler=_run_down)


def _run_up(args: argparse.Namespace) -> int:
    try:
        lab = up(args.dir, args.nodes, agents_per_process=args.agents_per_process, backend=args.backend)
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
