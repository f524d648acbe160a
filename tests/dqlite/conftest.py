"""Real dqlite nodes (go-dqlite's dqlite-demo) on free loopback ports.

The readiness checks talk to the nodes through the sans-I/O codec over a blocking socket, so the
fixtures do not depend on the asyncio client under test (or on an event loop).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.dqlite import wire
from coordinator.lab.ports import loopback_addresses

DEMO = "dqlite-demo"
START_TIMEOUT = 20.0
STOP_GRACE = 3.0
# go-dqlite gives every bootstrapping node this fixed id.
BOOTSTRAP_ID = 0x2DC171858C3155BE


def converse(address: str, *requests: wire.Request, timeout: float = 2.0) -> list[list[wire.Response]]:
    """Send each request in turn on one blocking connection; return the raw messages answering each."""
    host, port = address.rsplit(":", 1)
    decoder = wire.Decoder()
    answers = []
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(wire.encode_handshake())
        for request in requests:
            sock.sendall(wire.encode(request))
            exchange, messages = wire.Exchange(request), []
            while not exchange.complete:
                message = decoder.next_message()
                if message is wire.NEED_DATA:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError(f"{address} closed the connection")
                    decoder.receive(data)
                else:
                    exchange.receive(message)
                    messages.append(message)
            answers.append(messages)
    return answers


def ask(address: str, request: wire.Request) -> wire.Response:
    """One single-message request on a fresh connection."""
    [[answer]] = converse(address, request)
    return answer


@dataclass
class Node:
    address: str
    api: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, join: str | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [DEMO, "--api", self.api, "--db", self.address, "-D", str(self.directory)]
        if join:
            args += ["--join", join]
        log = open(self.directory / "demo.log", "ab")  # the child keeps its own copy
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self) -> None:
        """SIGTERM (the demo hands over leadership), SIGKILL if that stalls."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        path = self.directory / "demo.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _wait(what: str, check: Callable[[], bool], nodes: list[Node]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last: object = None
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process is not None and node.process.poll() is not None:
                pytest.fail(f"dqlite-demo for {node.address} exited early:\n{node.log()}")
        try:
            if check():
                return
        except (OSError, wire.RemoteProtocolError) as exc:
            last = exc
        time.sleep(0.05)
    logs = "\n".join(f"--- {node.address}\n{node.log()}" for node in nodes)
    pytest.fail(f"dqlite nodes not ready within {START_TIMEOUT}s: {what} (last error: {last})\n{logs}")


def voters(leader: str) -> set[str]:
    answer = ask(leader, wire.Cluster())
    assert isinstance(answer, wire.Servers)
    return {node.address for node in answer.nodes if node.role is wire.Role.VOTER}


def start_cluster(base: Path, size: int) -> list[Node]:
    """Bootstrap one node, join the others, wait until all are voters (the demo promotes them)."""
    if shutil.which(DEMO) is None:
        pytest.fail(
            f"{DEMO} is not on PATH: the dqlite tests need real nodes. Install Debian's go-dqlite "
            "package (apt-get install go-dqlite), which provides dqlite-demo."
        )
    addresses = loopback_addresses(2 * size)
    nodes = [Node(addresses[2 * i], addresses[2 * i + 1], base / f"n{i}") for i in range(size)]
    first = nodes[0]
    try:
        first.start()
        _wait(
            "bootstrap leader",
            lambda: ask(first.address, wire.Leader()) == wire.Server(BOOTSTRAP_ID, first.address),
            nodes,
        )
        for node in nodes[1:]:
            node.start(join=first.address)
        everyone = {node.address for node in nodes}
        _wait("all nodes voters", lambda: voters(first.address) == everyone, nodes)
    except BaseException:
        stop_cluster(nodes)
        raise
    return nodes


def stop_cluster(nodes: list[Node]) -> None:
    """One node at a time: stopping all at once stalls the leader's hand-over."""
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    nodes = start_cluster(tmp_path_factory.mktemp("dqlite"), 3)
    yield nodes
    stop_cluster(nodes)


@pytest.fixture
def addresses(cluster: list[Node]) -> list[str]:
    return [node.address for node in cluster]
