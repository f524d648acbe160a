"""The coordinator process: CoordinatorService over mutual TLS.

`python -m coordinator.service CONFIG` runs it; CONFIG is a JSON file:
    {"coordinator_id": "...", "listen": "127.0.0.1:0", "cert": PATH, "key": PATH, "registry": PATH,
     "journal": PATH (the operations journal, SQLite; the coordinator holds its lock),
     "cluster_id": "..." (what join tokens name the cluster by),
     "join_listen": "127.0.0.1:0" (the join listener: no client certificate, joins only),
     "reconcile_interval": 2.0 (optional, seconds: how often the reconciler looks for unfinished operations; it
                                also runs at start and when a silent agent answers again),
     "join_attempts": {"burst": 20, "per_second": 1.0} (optional: the failed token attempts a source may make on
                                the join listener, and how fast they come back; coordinator/join_gate.py),
     "metrics_listen": "127.0.0.1:0" (optional: where Prometheus metrics are served, plain HTTP, coordinator/
                                metrics.py; absent, none are),
     "metrics_interval": 15.0 (optional, seconds: how long the coordinator waits after one check of its own before
                                the next, which keeps the metrics and the watchers current; the coordinator checks on
                                its own only with metrics_listen, or while anyone watches: coordinator/watch.py),
     "repair_grace": 300.0 (optional, seconds: how long an orphan must have been one before Repair plans its removal;
                                core/repair.py),
     "watch_state": PATH (optional: where the watch keeps the last state it sent, so that a watch resumes across a
                                restart; default: the journal's path with the suffix .watch),
     "port_file": PATH, "join_port_file": PATH, "metrics_port_file": PATH (optional: the bound ports, written once
                                serving)}
The servicer only parses, calls the core (or operations.py for guarded operations) and renders; a failure is a typed
error it raises, answered from the one error table by coordinator/status.py (`answering`, which the interceptor and the
join listener wrap every handler in).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from memberguard import DEFAULT_HEARTBEAT_INTERVAL, MAX_AGENT_TIMEOUT, MAX_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL
from memberguard.v1 import coordinator_pb2, coordinator_pb2_grpc, membership_pb2

from coordinator.auth import Principal, Trust, UnionTrust, peer_fingerprint
from coordinator.core import tokens
from coordinator.core.diff import compute_diff
from coordinator.core.inflight import explain_in_flight
from coordinator.core.model import ClusterView, MembershipDiff, Severity
from coordinator.core.throttle import Limit
from coordinator.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidRequest,
    JoinerNotVerified,
    MemberguardError,
    NotFound,
    PermissionDenied,
    TokenNotAccepted,
    TokenNotRevocable,
    TooManyAttempts,
    quoted,
)
from coordinator.faults import Faults
from coordinator.files import write_atomically
from coordinator.gather import Agents
from coordinator.join_gate import DEFAULT_LIMIT, JoinGate
from coordinator.journal import InvalidPageToken, Journal, JournalDamaged
from coordinator.learned_trust import LearnedTrust
from coordinator.messages import diff_to_proto, operation_to_proto, repair_plan_to_proto, token_to_proto
from coordinator.metrics import Metrics, Origin
from coordinator.metrics import serve as serve_metrics
from coordinator.operations import Caller, DeadlinePassed, Operations
from coordinator.pki import read_identity
from coordinator.registry import Registry, UnreadableRegistry
from coordinator.serving import start_join_listener, start_server
from coordinator.status import answering
from coordinator.watch import Watchers

log = logging.getLogger("memberguard.coordinator")

DEFAULT_AGENT_TIMEOUT = 1.0
DEFAULT_RECONCILE_INTERVAL = 2.0
DEFAULT_REPAIR_GRACE = 300.0
DEFAULT_METRICS_INTERVAL = 15.0
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Left for the diff and the answer when the caller's deadline cuts the agents' time.
_RESPONSE_MARGIN = 0.05

_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
RULES = {
    f"/{_SERVICE}/{method}": frozenset({Principal.OPERATOR})
    for method in coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].methods_by_name
}


def _duration_seconds(field: str, duration: duration_pb2.Duration, violations: list[FieldViolation]) -> float | None:
    """The duration in seconds, or None with a violation when its nanos are out of a Duration's range."""
    if duration.nanos < 0 or duration.nanos >= 1_000_000_000:
        violations.append(FieldViolation(f"{field}.nanos", "must be in [0, 999999999]"))
        return None
    return duration.ToNanoseconds() / 1e9


def _agent_timeout(request: coordinator_pb2.CheckMembershipRequest) -> float:
    """The per-agent timeout the request asks for, or InvalidRequest listing every bad field."""
    violations: list[FieldViolation] = []
    timeout = DEFAULT_AGENT_TIMEOUT
    if request.HasField("agent_timeout"):
        seconds = _duration_seconds("agent_timeout", request.agent_timeout, violations)
        if seconds is not None and not 0 <= seconds <= MAX_AGENT_TIMEOUT:
            violations.append(FieldViolation("agent_timeout", f"must be between 0 and {MAX_AGENT_TIMEOUT:g} s"))
        elif seconds:
            timeout = seconds
    if request.minimum_severity not in membership_pb2.Severity.values():
        violations.append(FieldViolation("minimum_severity", "is not a Severity value"))
    if violations:
        raise InvalidRequest(violations)
    return timeout


def _heartbeat_interval(request: coordinator_pb2.WatchMembershipRequest) -> float:
    """The heartbeat interval the request asks for, or InvalidRequest."""
    violations: list[FieldViolation] = []
    seconds = _duration_seconds("heartbeat_interval", request.heartbeat_interval, violations)
    if seconds is not None and seconds != 0 and not MIN_HEARTBEAT_INTERVAL <= seconds <= MAX_HEARTBEAT_INTERVAL:
        violations.append(
            FieldViolation(
                "heartbeat_interval",
                f"must be between {MIN_HEARTBEAT_INTERVAL:g} s and {MAX_HEARTBEAT_INTERVAL:g} s (0: the default)",
            )
        )
    if violations:
        raise InvalidRequest(violations)
    return seconds or DEFAULT_HEARTBEAT_INTERVAL


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    """The loop time by which a change must have been admitted to answer within the caller's deadline; None without
    one."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + max(0.0, remaining - _RESPONSE_MARGIN)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        coordinator_id: str,
        agents: Agents,
        operations: Operations,
        journal: Journal,
        trust: Trust,
        metrics: Metrics,
        watchers: Watchers,
    ) -> None:
        self._id = coordinator_id
        self._agents = agents
        self._trust = trust
        self._operations = operations
        self._journal = journal
        self._metrics = metrics
        self._watchers = watchers
        self._consistent: tuple[tuple[object, ...], MembershipDiff] | None = None
        self._published_from = 0.0  # when the gather of the last diff handed to the metrics and watchers began

    def _diff(self, view: ClusterView) -> MembershipDiff:
        """compute_diff(view), skipped when every node answered exactly as when the cluster was last consistent.

        The gather hands back the same NodeView objects for unchanged answers, so the check is a comparison by
        identity. Only an empty diff is reused: time enters a diff only through the ages of lagging views, and an
        empty diff has none, so it is the same diff at any later time.
        """
        key = tuple((o.node, o.view, o.failure) for o in view.nodes)
        if self._consistent is not None and self._consistent[0] == key:
            # Equal views that are other objects (an agent's view sent anew, as after the gather fetched PEMs) cost a
            # field-by-field comparison, O(N²) at N nodes; keeping these objects makes the next one by identity.
            self._consistent = (key, self._consistent[1])
            return replace(self._consistent[1], observed_at=view.now)
        diff = compute_diff(view)
        self._consistent = (key, diff) if not diff.discrepancies else None
        return diff

    async def check(self, timeout: float, origin: Origin) -> MembershipDiff:
        """One membership check: the gather (timeout per agent), the diff and what the operations in flight explain;
        counted in the metrics and handed to the watchers. It only reads, and takes no membership lock."""
        started = time.monotonic()
        view = await self._agents.gather(timeout)
        diff = explain_in_flight(self._diff(view), self._journal.unfinished())
        self._metrics.checked(origin, time.monotonic() - started)
        if timeout >= DEFAULT_AGENT_TIMEOUT and started >= self._published_from:
            # Agents given less time than the coordinator's own checks give them may be silent only to this caller:
            # what such a check found must not move an alert, nor reach a watcher. Nor may a check that began before
            # the last one published and finished after it: checks run concurrently (the background check and every
            # caller's), and its older reading would tell the watchers that the cluster went back.
            self._published_from = started
            self._metrics.found(view, diff)
            self._watchers.publish(diff)
        return diff

    def _header(self) -> coordinator_pb2.ResponseHeader:
        header = coordinator_pb2.ResponseHeader(coordinator_id=self._id)
        header.served_at.GetCurrentTime()
        return header

    async def CheckMembership(
        self, request: coordinator_pb2.CheckMembershipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CheckMembershipResponse:
        timeout = _agent_timeout(request)
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - _RESPONSE_MARGIN))
        diff = await self.check(timeout, Origin.CALLER)
        minimum = Severity(request.minimum_severity) if request.minimum_severity else None
        return coordinator_pb2.CheckMembershipResponse(header=self._header(), diff=diff_to_proto(diff, minimum))

    async def WatchMembership(
        self, request: coordinator_pb2.WatchMembershipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[coordinator_pb2.WatchMembershipResponse]:
        heartbeat = _heartbeat_interval(request)
        async for response in self._watchers.watch(request.resume_token, heartbeat):
            response.header.CopyFrom(self._header())
            yield response

    async def GuardedOperation(
        self, request: coordinator_pb2.GuardedOperationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GuardedOperationResponse:
        return await self.guarded(request, context, self._caller(context), join_listener=False)

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        fingerprint = peer_fingerprint(context) or ""
        peer = self._trust.peers().get(fingerprint)
        return Caller(peer.name if peer else "unknown", fingerprint)

    async def AbandonOperation(
        self, request: coordinator_pb2.AbandonOperationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.AbandonOperationResponse:
        record = await self._operations.abandon(request, self._caller(context))
        return coordinator_pb2.AbandonOperationResponse(header=self._header(), operation=operation_to_proto(record))

    async def Repair(
        self, request: coordinator_pb2.RepairRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.RepairResponse:
        if not request.apply:
            plan = await self._operations.repair_plan(
                expected_fingerprint=request.expected_fingerprint,
                only=list(request.discrepancy_ids),
                confirmed=list(request.confirmed_action_ids),
            )
            return coordinator_pb2.RepairResponse(header=self._header(), plan=repair_plan_to_proto(plan))
        try:
            plan, record = await self._operations.apply_repair(request, self._caller(context), _deadline(context))
        except (TimeoutError, DeadlinePassed):
            raise DeadlineExceeded("the request's deadline passed before it ran") from None
        response = coordinator_pb2.RepairResponse(header=self._header(), plan=repair_plan_to_proto(plan))
        if record is not None:
            response.operation.CopyFrom(operation_to_proto(record))
        return response

    async def guarded(
        self,
        request: coordinator_pb2.GuardedOperationRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        caller: Caller,
        *,
        join_listener: bool,
    ) -> coordinator_pb2.GuardedOperationResponse:
        try:
            outcome = await self._operations.submit(request, caller, _deadline(context), join_listener=join_listener)
        except (TimeoutError, DeadlinePassed):
            raise DeadlineExceeded("the request's deadline passed before it ran") from None
        return coordinator_pb2.GuardedOperationResponse(
            header=self._header(), operation=operation_to_proto(outcome.record, outcome.token)
        )

    async def GetOperation(
        self, request: coordinator_pb2.GetOperationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetOperationResponse:
        record = self._journal.get(request.id)
        if record is None:
            raise NotFound(f"no operation {quoted(request.id)}")
        return coordinator_pb2.GetOperationResponse(header=self._header(), operation=operation_to_proto(record))

    async def WaitOperation(
        self, request: coordinator_pb2.WaitOperationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.WaitOperationResponse:
        limits = [context.time_remaining()]
        if request.HasField("timeout"):
            limits.append(request.timeout.ToNanoseconds() / 1e9)
        timeout = min((t for t in limits if t is not None), default=None)
        record = await self._operations.wait(request.id, None if timeout is None else max(0.0, timeout - 0.05))
        return coordinator_pb2.WaitOperationResponse(header=self._header(), operation=operation_to_proto(record))

    async def ListOperations(
        self, request: coordinator_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListOperationsResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidRequest([FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")])
        try:
            records, next_token = self._journal.page(request.page_size or DEFAULT_PAGE_SIZE, request.page_token)
        except InvalidPageToken:
            raise InvalidRequest([FieldViolation("page_token", "is not a token this gave out")]) from None
        return coordinator_pb2.ListOperationsResponse(
            header=self._header(),
            operations=[operation_to_proto(record) for record in records],
            next_page_token=next_token,
        )

    async def ListTokens(
        self, request: coordinator_pb2.ListTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListTokensResponse:
        usable = self._journal.tokens(time.time())
        return coordinator_pb2.ListTokensResponse(
            header=self._header(), tokens=[token_to_proto(record) for record in usable]
        )

    async def RevokeToken(
        self, request: coordinator_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.RevokeTokenResponse:
        record = self._journal.token(request.name)
        if record is None or record.state is tokens.TokenState.REVOKED:
            raise NotFound(f"no usable token for {quoted(request.name)}")
        try:
            revoked = tokens.revoke(record)
        except tokens.TokenRefused as error:
            # A join in flight holds it (TOKEN_IN_USE), or a finished one used it (TOKEN_CONSUMED).
            raise TokenNotRevocable(error.message, error.reason) from None
        self._journal.update_token(revoked)
        return coordinator_pb2.RevokeTokenResponse(header=self._header(), token=token_to_proto(revoked))


def _failed_attempt(error: MemberguardError) -> bool:
    """Whether a join listener's refusal is one that fails before a valid token: garbage, a request that is not a
    join, a refused token or a malformed field. A joiner whose token was good but whose agent did not answer, or
    whom the guard refused, spent no attempt."""
    if isinstance(error, JoinerNotVerified):
        return False
    return isinstance(error, InvalidRequest | TokenNotAccepted | PermissionDenied)


def _join_service(coordinator: CoordinatorServicer, gate: JoinGate) -> grpc.GenericRpcHandler[Any, Any]:
    """The join listener's one method: GuardedOperation with a join, authorized by its token. Any other method is
    UNIMPLEMENTED there.

    The method takes bytes and decodes them itself: garbage is INVALID_ARGUMENT, counted against its source, with no
    traceback in the log (a deserializer that raises makes grpc answer UNKNOWN and log the exception). A source the
    gate refuses is answered before its bytes are looked at."""

    async def join(data: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            source = gate.admit(context.peer())
        except TooManyAttempts as refusal:
            await gate.hold(refusal)
            raise
        try:
            try:
                request = coordinator_pb2.GuardedOperationRequest.FromString(data)
            except DecodeError:
                raise InvalidRequest(
                    [FieldViolation("", "the request does not decode as a GuardedOperationRequest")]
                ) from None
            response = await coordinator.guarded(request, context, Caller("join token", ""), join_listener=True)
        except MemberguardError as error:
            if _failed_attempt(error):
                gate.failed(source)
            raise
        return response.SerializeToString()

    handler = grpc.unary_unary_rpc_method_handler(answering(join, f"/{_SERVICE}/GuardedOperation"))
    return grpc.method_handlers_generic_handler(_SERVICE, {"GuardedOperation": handler})


async def _check_periodically(
    servicer: CoordinatorServicer,
    metrics: Metrics,
    journal: Journal,
    watchers: Watchers,
    interval: float,
    changed: asyncio.Event,
    *,
    metrics_served: bool,
) -> None:
    """Checks the membership and counts the journal's operations, then waits interval seconds, until cancelled: one
    check at a time, whatever a check costs, so that alerts on the metrics fire before anyone tries a mutation and
    watchers hear of a change within interval. A new watcher that finds no diff younger than interval cuts the wait
    short, and so does, while anyone watches, an agent's notice that its files changed (`changed`). Nobody reads
    metrics that are not served: without them, it checks only while someone watches."""
    while True:
        changed.clear()  # a notice from here on may tell of what this check does not see: it wakes the next one
        if metrics_served or watchers.watched:
            try:
                await servicer.check(DEFAULT_AGENT_TIMEOUT, Origin.BACKGROUND)
                metrics.journaled(journal.counts())
            except Exception:
                # The metrics and the watchers go stale rather than stop: the next check tries again.
                log.exception("the background membership check failed; the next one tries again")
        await watchers.until_wanted(interval, changed)


class BadConfig(ValueError):
    """A setting of the coordinator's configuration that it cannot run with; the message says which and why."""


def _seconds(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise BadConfig(f"{key} must be a positive number of seconds, not {value!r}")
    return float(value)


def _metrics_listen(config: dict[str, Any]) -> tuple[str, int] | None:
    """The host and port of metrics_listen ("host:port" or "[ipv6]:port", port 0 picks one), or None when absent."""
    address = config.get("metrics_listen")
    if address is None:
        return None
    host, colon, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise BadConfig(f'metrics_listen must be "host:port" or "[ipv6]:port", not {address!r}')
    return host.removeprefix("[").removesuffix("]"), int(port)


def _join_limit(config: dict[str, Any]) -> Limit:
    settings = config.get("join_attempts")
    if settings is None:
        return DEFAULT_LIMIT
    return Limit(burst=int(settings["burst"]), per_second=float(settings["per_second"]))


async def serve(config: dict[str, Any]) -> None:
    interval = _seconds(config, "reconcile_interval", DEFAULT_RECONCILE_INTERVAL)
    metrics_interval = _seconds(config, "metrics_interval", DEFAULT_METRICS_INTERVAL)
    repair_grace = _seconds(config, "repair_grace", DEFAULT_REPAIR_GRACE)
    metrics_listen = _metrics_listen(config)
    identity = read_identity(Path(config["cert"]), Path(config["key"]))
    registry = Registry.open(Path(config["registry"]))
    learned = LearnedTrust()
    watch_state = Path(config.get("watch_state") or Path(config["journal"]).with_suffix(".watch"))
    watchers = Watchers(metrics_interval, watch_state)
    agents = Agents(identity, registry, learned, wants_notices=lambda: watchers.watched)
    # The agents that answer are evidence of the journal's past: one that admitted an epoch the journal never reached
    # proves the journal lost what it recorded, and opening it would start below that epoch (journal.py, `diagnose`).
    # Asked by a gather over the channels the checks keep: the first check then finds them open, the PEMs fetched
    # and every view held, instead of dialling every agent a second time.
    await agents.gather(DEFAULT_AGENT_TIMEOUT)
    journal = Journal.open(Path(config["journal"]), seen_epochs=agents.epochs())
    trust = UnionTrust(registry, learned)
    listen = config["listen"]
    operations = Operations(
        journal=journal,
        agents=agents,
        trust=learned,
        registry=registry,
        cluster_id=config["cluster_id"],
        certificate_fingerprint=identity.fingerprint,
        agent_timeout=DEFAULT_AGENT_TIMEOUT,
        repair_grace=repair_grace,
        faults=Faults.from_environment(),
    )
    metrics = Metrics()
    servicer = CoordinatorServicer(config["coordinator_id"], agents, operations, journal, trust, metrics, watchers)
    server, port = await start_server(
        address=listen,
        identity=identity,
        trust=trust,
        rules=RULES,
        services=[(_SERVICE, lambda s: coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, s))],
    )
    join_listen = config.get("join_listen", f"{listen.rpartition(':')[0]}:0")
    gate = JoinGate(_join_limit(config))
    joins, join_port = await start_join_listener(
        join_listen,
        identity,
        lambda s: s.add_generic_rpc_handlers((_join_service(servicer, gate),)),
    )
    log.info("coordinator %s serving on port %d, joins on port %d", config["coordinator_id"], port, join_port)
    operations.listening_on([f"{join_listen.rpartition(':')[0]}:{join_port}"])
    if config.get("join_port_file"):
        write_atomically(Path(config["join_port_file"]), str(join_port).encode())
    # What a crash left unfinished is finished or rolled back before the coordinator says it is up; requests that
    # arrive meanwhile queue behind it on the membership lock.
    await operations.reconcile()
    metrics_server = None
    if metrics_listen is not None:
        metrics_server = serve_metrics(metrics, *metrics_listen)
        log.info("metrics on port %d", metrics_server.server_port)
        if config.get("metrics_port_file"):
            write_atomically(Path(config["metrics_port_file"]), str(metrics_server.server_port).encode())
    background = _check_periodically(
        servicer,
        metrics,
        journal,
        watchers,
        metrics_interval,
        agents.changed,
        metrics_served=metrics_server is not None,
    )
    tasks = [asyncio.create_task(operations.reconcile_periodically(interval)), asyncio.create_task(background)]
    if config.get("port_file"):
        write_atomically(Path(config["port_file"]), str(port).encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Cut short mid-operation, the reconciler leaves it as a crash would: journaled, for the next start.
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if metrics_server is not None:
        await asyncio.to_thread(metrics_server.shutdown)
        metrics_server.server_close()
    await joins.stop(grace=1.0)
    await server.stop(grace=1.0)
    await agents.close()
    journal.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m coordinator.service CONFIG.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.Formatter.converter = time.gmtime
    try:
        asyncio.run(serve(json.loads(Path(args[0]).read_text())))
    except (UnreadableRegistry, BadConfig) as error:
        log.error("not starting: %s", error)
        return 1
    except JournalDamaged as error:
        log.error("%s", error.refusal(args[0]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
