"""A node's agent: serves AgentService with the node's own member certificate.

`python -m coordinator.agent CONFIG [CONFIG ...]` runs one agent per CONFIG in one process (the benchmark
packs many agents into few processes; each is the same code, on its own port). CONFIG is a JSON file:
    {"name": "n1", "listen": "127.0.0.1:0", "state_dir": PATH, "backend": "local",
     "members_table": PATH, "raft_config": PATH,          (local backend)
     "dqlite": {"address": ADDR, "data_dir": PATH, "database": NAME,
                "engine": {"command": [ARG, ...], "environment": {NAME: VALUE}}},
                                                            (dqlite backend: its node's engine, dialled with
                                                             state_dir's server.crt/key, trusting its truststore;
                                                             how to start it, for a join's engine step)
     "backend": "microcluster"                              (microcluster backend: state_dir is the member's
                                                             microcluster state directory; nothing else)
     "trusted_coordinators": PATH,                          (PEM bundle of the coordinators it answers)
     "role_adjustment_interval": 10.0,                      (optional, seconds; on microcluster its heartbeat,
                                                             microd's --heartbeat, 10 s unless given)
     "port_file": PATH}                                     (optional: the bound port, once serving)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from memberguard.v1 import agent_pb2, agent_pb2_grpc, membership_pb2

from coordinator.agent.dirwatch import Listener
from coordinator.agent.dqlite_sources import close_readers, dqlite_backend
from coordinator.agent.dqlite_steps import DqliteSteps
from coordinator.agent.dqlite_tls import client_ssl_context
from coordinator.agent.engine import Engine
from coordinator.agent.microcluster_sources import HEARTBEAT_INTERVAL, MicroclusterSteps, microcluster_backend
from coordinator.agent.sources import SourceReader, local_backend
from coordinator.agent.steps import EpochGuard, LocalSteps, StepApplier
from coordinator.auth import Peer, Principal, authorize
from coordinator.core.model import NodeView, Source, SourceReport
from coordinator.errors import MemberguardError
from coordinator.files import write_atomically
from coordinator.messages import view_to_proto
from coordinator.pki import Identity, dns_names, fingerprint, read_identity
from coordinator.serving import start_server
from coordinator.status import abort_with
from coordinator.watched_file import Version, WatchedFile

log = logging.getLogger("memberguard.agent")

_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
_OBSERVE = f"/{_SERVICE}/ObserveNodeView"  # authorized again at each request of the stream
RULES = {
    f"/{_SERVICE}/GetNodeView": frozenset({Principal.COORDINATOR}),
    _OBSERVE: frozenset({Principal.COORDINATOR}),
    f"/{_SERVICE}/ApplyStep": frozenset({Principal.COORDINATOR}),
}
_PEM_END = b"-----END CERTIFICATE-----"
_NOTICE = agent_pb2.ObserveNodeViewResponse(changed=True)
_NOTICE_MARK = agent_pb2.ObserveNodeViewRequest()  # in a stream's inbox: send a notice (compared by identity)


class CoordinatorPins:
    """The coordinators this agent answers: a PEM bundle file, re-read when its content changes (see
    coordinator/watched_file.py)."""

    def __init__(self, path: Path) -> None:
        self._file = WatchedFile(path)
        self._version: Version | None = None
        self._bundle = b""
        self._peers: Mapping[str, Peer] = {}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        with self._lock:
            version = self._file.current()
            if version is self._version:
                return
            bundle = version.data
            peers = {}
            for block in bundle.split(_PEM_END)[:-1]:
                pem = block.strip() + b"\n" + _PEM_END + b"\n"
                fp = fingerprint(pem)
                names = dns_names(pem)
                peers[fp] = Peer(Principal.COORDINATOR, names[0] if names else fp[:12], fp)
            self._bundle, self._peers, self._version = bundle, peers, version

    def peers(self) -> Mapping[str, Peer]:
        self._refresh()
        return self._peers

    def bundle(self) -> bytes:
        self._refresh()
        return self._bundle


@dataclass(frozen=True)
class AgentConfig:
    name: str
    listen: str
    state_dir: Path
    readers: tuple[SourceReader, ...]
    steps: StepApplier
    trusted_coordinators: Path
    backend: str
    role_adjustment_interval: float | None
    port_file: Path | None
    # Where the newest journal epoch seen is kept: the state directory, except on microcluster, whose state directory
    # is microd's own and gets nothing written into it by the agent (the epoch lives beside agent.json instead).
    epoch_dir: Path
    # Whether the readers are asked at once: a backend that reads over the network waits on each reader's round trip,
    # while the local backend's readers only read files, inline, and a task per reader would cost a check more than
    # the reads do (a fifth of an agent's answer to an unchanged view).
    concurrent_reads: bool
    # The directories whose changes the agent tells its coordinators of (ObserveNodeView's notices): its own files'.
    # Not the dqlite engine's data directory, which its Raft log writes all the time: a remote source's changes are
    # found by the coordinator's checks alone.
    watched: tuple[Path, ...] = ()

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        raw: dict[str, Any] = json.loads(path.read_text())
        state_dir = Path(raw["state_dir"])
        backend = raw.get("backend", "local")
        interval = raw.get("role_adjustment_interval")
        steps: StepApplier
        watched: tuple[Path, ...] = (state_dir / "truststore",)
        if backend == "local":
            members_table, raft_config = Path(raw["members_table"]), Path(raw["raft_config"])
            watched = tuple(dict.fromkeys((*watched, state_dir / "database", members_table.parent, raft_config.parent)))
            readers = local_backend(state_dir, members_table, raft_config)
            steps = LocalSteps(state_dir, members_table, raft_config)
        elif backend == "dqlite":
            settings = raw["dqlite"]
            # The node's own identity, and a context per dial that trusts its truststore as it is then.
            ssl = partial(
                client_ssl_context, state_dir / "server.crt", state_dir / "server.key", state_dir / "truststore"
            )
            data_dir = Path(settings["data_dir"])
            readers = dqlite_backend(
                state_dir=state_dir,
                data_dir=data_dir,
                address=settings["address"],
                database=settings["database"],
                ssl=ssl,
            )
            engine = Engine(
                state_dir, data_dir, settings["engine"]["command"], settings["engine"].get("environment", {})
            )
            steps = DqliteSteps(
                state_dir=state_dir, address=settings["address"], database=settings["database"], ssl=ssl, engine=engine
            )
        elif backend == "microcluster":
            readers = microcluster_backend(state_dir)
            steps = MicroclusterSteps(state_dir)
            interval = raw.get("role_adjustment_interval", HEARTBEAT_INTERVAL)
        else:
            raise ValueError(f"{path}: unknown backend {backend!r}")
        return cls(
            name=raw["name"],
            listen=raw["listen"],
            state_dir=state_dir,
            readers=readers,
            steps=steps,
            trusted_coordinators=Path(raw["trusted_coordinators"]),
            backend=backend,
            role_adjustment_interval=float(interval) if interval is not None else None,
            port_file=Path(raw["port_file"]) if raw.get("port_file") else None,
            epoch_dir=path.parent if backend == "microcluster" else state_dir,
            concurrent_reads=backend != "local",
            watched=watched,
        )


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Serves GetNodeView and ApplyStep. The view is rebuilt and re-serialized only when a source changed (readers
    return the same report objects for unchanged sources), and left out when the caller already holds it. Steps run
    one at a time, each under the epoch it was admitted with."""

    def __init__(self, config: AgentConfig, identity: Identity, coordinators: CoordinatorPins) -> None:
        self._config = config
        self._fingerprint = identity.fingerprint
        self._coordinators = coordinators
        self._epochs = EpochGuard(config.epoch_dir)
        self._built: dict[bool, tuple[tuple[SourceReport, ...], membership_pb2.NodeView, str]] = {}
        self._listener: Listener | None = None  # made by the first stream, in the event loop it needs
        self._streams: set[_Stream] = set()

    async def prime(self) -> None:
        """Reads the node's own files once, before the agent serves: all of its sources on the local backend, its
        truststore on the others (whose other sources are read over the network, from an engine that may not answer
        yet). Its first answer then costs what every later one does, not a parse of every record: in a cluster of
        a hundred, that parse is most of what a freshly started agent takes to answer its first check."""
        if self._config.backend == "local":
            await self._read(agent_pb2.GetNodeViewRequest(), None)
            return
        for reader in self._config.readers:
            if reader.source is Source.TRUSTSTORE:
                await reader.read(include_certificates=False)

    async def GetNodeView(
        self, request: agent_pb2.GetNodeViewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.GetNodeViewResponse:
        return await self._read(request, _reads_within(context.time_remaining()))

    async def ObserveNodeView(
        self,
        requests: AsyncIterator[agent_pb2.ObserveNodeViewRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_pb2.ObserveNodeViewResponse]:
        """Answers each request in turn; between two answers, at most one notice that a watched directory changed
        after the last read began (a change before it began is in that read's answer)."""
        if self._listener is None:
            self._listener = Listener(map(str, self._config.watched), self._changed)
        inbox: asyncio.Queue[agent_pb2.ObserveNodeViewRequest | None] = asyncio.Queue()
        stream = _Stream(inbox)
        self._streams.add(stream)
        pumping = asyncio.ensure_future(_pump(requests, inbox))
        # A request stream that fails (the caller went away, the server stops) ends this one all the same: the error
        # is the stream's end, not something to log as a task's.
        pumping.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            while (request := await inbox.get()) is not None:
                if request is _NOTICE_MARK:
                    yield _NOTICE
                    continue
                # The interceptor authorized the stream when it opened; the pins may have changed since.
                authorize(self._coordinators, RULES, _OBSERVE, context)
                self._listener.rearm()
                stream.asked = request.notify
                waits = (
                    request.answer_within.ToTimedelta().total_seconds() if request.HasField("answer_within") else None
                )
                yield agent_pb2.ObserveNodeViewResponse(answer=await self._read(request.read, _reads_within(waits)))
        finally:
            self._streams.discard(stream)
            pumping.cancel()

    def _changed(self) -> None:
        for stream in self._streams:
            if stream.asked:  # one notice between two answers
                stream.asked = False
                stream.inbox.put_nowait(_NOTICE_MARK)

    async def _read(self, request: agent_pb2.GetNodeViewRequest, within: float | None) -> agent_pb2.GetNodeViewResponse:
        asked = request.include_certificates
        reads = [r.read(include_certificates=asked, within=within) for r in self._config.readers]
        if self._config.concurrent_reads:
            reports = tuple(await asyncio.gather(*reads))
        else:
            reports = tuple([await read for read in reads])
        built = self._built.get(asked)
        if built is None or built[0] != reports:
            view = view_to_proto(
                NodeView(
                    node=self._config.name,
                    backend=self._config.backend,
                    certificate_fingerprint=self._fingerprint,
                    sources=reports,
                    role_adjustment_interval=self._config.role_adjustment_interval,
                )
            )
            built = (reports, view, hashlib.sha256(view.SerializeToString()).hexdigest())
        _, view, digest = built
        # Kept with these reports even when equal ones built it: a reader may hand back an equal report as a new
        # object (the members table's, after a read with certificates), and the next comparison is then by
        # identity, not record by record.
        self._built[asked] = (reports, view, digest)
        epoch = self._seen_epoch()
        if request.known_digest == digest:
            return agent_pb2.GetNodeViewResponse(view_digest=digest, unchanged=True, epoch=epoch)
        return agent_pb2.GetNodeViewResponse(view=view, view_digest=digest, epoch=epoch)

    def _seen_epoch(self) -> int:
        """The newest epoch admitted, for a coordinator checking its journal against it. An unreadable epoch file
        makes the guard refuse every step; the view still answers (0), so that the node can be looked at."""
        try:
            return self._epochs.newest()
        except (OSError, ValueError) as error:
            log.warning("the epoch file in %s is unreadable: %s", self._config.state_dir, error)
            return 0

    async def ApplyStep(
        self, request: agent_pb2.ApplyStepRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.ApplyStepResponse:
        try:
            async with self._epochs.admitted(request.epoch):
                applied = await self._config.steps.apply(request)
        except MemberguardError as error:
            log.info("step %d of %s refused: %s", request.step_index, request.operation_id, error)
            await abort_with(context, error)
        log.info(
            "step %d of %s (epoch %d): %s", request.step_index, request.operation_id, request.epoch, applied.detail
        )
        return agent_pb2.ApplyStepResponse(changed=applied.changed, detail=applied.detail, token=applied.token)


@dataclass(eq=False)  # a set member by identity
class _Stream:
    """One ObserveNodeView stream: what it has to do next, in order (requests, and notices between them), and whether
    a read began since its last notice."""

    inbox: asyncio.Queue[agent_pb2.ObserveNodeViewRequest | None]
    asked: bool = False


async def _pump(
    requests: AsyncIterator[agent_pb2.ObserveNodeViewRequest],
    inbox: asyncio.Queue[agent_pb2.ObserveNodeViewRequest | None],
) -> None:
    """Moves the stream's requests into its inbox, then None when the caller ends it."""
    try:
        async for request in requests:
            inbox.put_nowait(request)
    finally:
        inbox.put_nowait(None)


def _reads_within(remaining: float | None) -> float | None:
    """How long the sources may take to read, so that the view still reaches the caller in time: a source slower
    than the caller's deadline (a dqlite node looking for a leader that refuses it) is then one unreadable source in
    an answer, with the reader's own reason, not a whole agent gone silent, which would hold back every operation
    that needs it. A fifth of what is left, at most 0.2 s, is kept for building and sending the view."""
    return None if remaining is None else remaining - min(0.2, remaining / 5)


async def start_agent(config: AgentConfig) -> tuple[grpc.aio.Server, int]:
    identity = read_identity(config.state_dir / "server.crt", config.state_dir / "server.key")
    coordinators = CoordinatorPins(config.trusted_coordinators)
    if isinstance(config.steps, LocalSteps):
        await config.steps.started()  # the stand-in engine's start; a real engine is a process of its own
    servicer = AgentServicer(config, identity, coordinators)
    await servicer.prime()
    server, port = await start_server(
        address=config.listen,
        identity=identity,
        trust=coordinators,
        rules=RULES,
        services=[(_SERVICE, lambda s: agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, s))],
    )
    if config.port_file is not None:
        write_atomically(config.port_file, str(port).encode())
    log.info("agent %s serving on port %d", config.name, port)
    return server, port


async def serve(configs: list[AgentConfig]) -> None:
    servers = [server for server, _ in [await start_agent(c) for c in configs]]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(s.stop(grace=1.0) for s in servers))
    for config in configs:
        await close_readers(config.readers)
