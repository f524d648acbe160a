"""Running memberguard's Go dqlite test node (coordinator/lab/go/testnode) from Python, for the lab and tests.

The node prints one line on stdout, `ready id=<ID> address=<ADDR>`, once it has joined (or bootstrapped) its
cluster; everything else goes to stderr, which lands in a log file. SIGTERM hands leadership over, then stops.

Starting is split from waiting (`start_node`, then `wait_ready`) so that the caller decides what overlaps. A
joiner retries until the node it joins answers, but joiners started together collide on Raft's one change at a
time and retry a second later: joining one after the other is faster (3 voters in ~0.2 s with a 5 ms
`--network-latency` hint). Blocking calls only, no event loop needed: the lab is synchronous.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.dqlite import wire

_REPO_ROOT = Path(__file__).resolve().parents[2]
_READY = re.compile(rb"ready id=(\d+) address=(\S+)")
_LOG_TAIL = 2000


class NodeError(RuntimeError):
    """A test node did not start, or stopped before it was ready. The message ends with its log's tail."""


@dataclass(frozen=True)
class NodeTls:
    """The node's own certificate and key (PEM files), and its truststore directory: it trusts the certificates
    of the records there as they are at each handshake."""

    cert: Path
    key: Path
    truststore: Path


@dataclass
class DqliteNode:
    name: str
    address: str
    data_dir: Path  # the node's go-dqlite directory, used as-is: info.yaml and cluster.yaml live here
    process: subprocess.Popen[bytes]
    log: Path
    tls: NodeTls | None = None
    node_id: int = 0  # set by wait_ready

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-_LOG_TAIL:]
        except OSError as exc:
            return f"(no log: {exc})"


def node_binary() -> Path:
    path = _REPO_ROOT / "build" / "bin" / "memberguard-dqlite-node"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"the dqlite test node {path} is missing: run `make go`")
    return path


def node_command(
    *,
    address: str,
    data_dir: Path,
    join: Sequence[str] = (),
    roles_interval: float = 1.0,
    tls: NodeTls | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of a node (no join: it bootstraps a new cluster)."""
    args = [str(node_binary()), "--db", address, "--dir", str(data_dir), "--roles-interval", f"{roles_interval}s"]
    if join:
        args += ["--join", ",".join(join)]
    if tls is not None:
        args += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-truststore", str(tls.truststore)]
    return args + list(extra_args)


def node_environment(address: str, tls: NodeTls | None) -> dict[str, str]:
    """What a node's environment needs on top of the caller's."""
    if tls is None:
        return {}
    # With TLS, go-dqlite binds the engine to the abstract socket @dqlite-<ID> behind its TLS proxy, and every
    # bootstrap node has the same ID: a second TLS cluster on the host fails with "failed to set bind address".
    # Inside a snap the name is @snap.<SNAP_INSTANCE_NAME>.dqlite-<ID>; a name per node keeps them apart
    # (go-dqlite reads the variable for nothing else).
    return {"SNAP_INSTANCE_NAME": f"memberguard-{address}"}


def start_node(
    *,
    name: str,
    address: str,
    data_dir: Path,
    join: Sequence[str] = (),
    roles_interval: float = 1.0,
    tls: NodeTls | None = None,
    log: Path,
    extra_args: Sequence[str] = (),
) -> DqliteNode:
    """Spawns the node and returns at once; `wait_ready` waits for it. No join: it bootstraps a new cluster."""
    args = node_command(
        address=address, data_dir=data_dir, join=join, roles_interval=roles_interval, tls=tls, extra_args=extra_args
    )
    env = {**os.environ, **node_environment(address, tls)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as stderr:  # the child keeps its own descriptor
        # Its own session: a Ctrl-C in the terminal reaches the node only through stop_node, so shutdown order
        # stays ours (see stop_cluster).
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True)
    return DqliteNode(name, address, data_dir, process, log, tls)


def wait_ready(node: DqliteNode, timeout: float) -> int:
    """Waits for the ready line; returns the node's dqlite ID (and sets node.node_id)."""
    assert node.process.stdout is not None
    fd = node.process.stdout.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while (match := _READY.search(seen)) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NodeError(f"{node.name} ({node.address}) not ready within {timeout}s; log:\n{node.log_tail()}")
        # select + os.read, not readline: a buffered read would block past the deadline.
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                code = _exit_code(node.process)
                raise NodeError(f"{node.name} ({node.address}) exited ({code}) before ready; log:\n{node.log_tail()}")
            seen += chunk
    node.node_id = int(match.group(1))
    return node.node_id


def _exit_code(process: subprocess.Popen[bytes]) -> int | None:
    try:
        return process.wait(1.0)  # stdout closes a moment before the process is gone
    except subprocess.TimeoutExpired:
        return None


def stop_node(node: DqliteNode, timeout: float = 10) -> int:
    """SIGTERM (hand-over, then a clean stop), SIGKILL after `timeout` seconds; reaps the child, returns its
    exit status (negative: the signal that ended it)."""
    process = node.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    assert process.returncode is not None
    return process.returncode


def stop_cluster(nodes: Sequence[DqliteNode], timeout: float = 10) -> None:
    """Stops followers first and the leader last, one at a time: SIGTERM to all at once leaves the leader
    handing over to nodes that are themselves going away, until its hand-over times out."""
    leader = _leader_address(nodes)
    for node in sorted(nodes, key=lambda node: node.address == leader):
        stop_node(node, timeout)


def _leader_address(nodes: Sequence[DqliteNode]) -> str:
    """The leader as the first live node that knows names it, or "" (any order will then do)."""
    for node in nodes:
        if node.process.poll() is not None:
            continue
        try:
            answer = _ask_leader(node)
        except (OSError, wire.RemoteProtocolError):
            continue
        if answer:
            return answer
    return ""


def _ask_leader(node: DqliteNode, timeout: float = 1.0) -> str:
    # Blocking, through the codec: stop_cluster runs where no event loop may be started (inside a running one).
    host, _, port = node.address.rpartition(":")
    decoder, exchange = wire.Decoder(), wire.Exchange(wire.Leader())
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    if node.tls is not None:
        context = client_ssl_context(node.tls.cert, node.tls.key, node.tls.truststore)
        sock = context.wrap_socket(sock)  # takes the descriptor over (and closes it if the handshake fails)
    with sock:
        sock.sendall(wire.encode_handshake() + wire.encode(wire.Leader()))
        while not exchange.complete:
            message = decoder.next_message()
            if message is wire.NEED_DATA:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError(f"{node.address} closed the connection")
                decoder.receive(data)
            else:
                exchange.receive(message)
    answer = exchange.response
    return answer.address if isinstance(answer, wire.Server) else ""
