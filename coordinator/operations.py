"""Guarded operations: one at a time under the membership lock, gather → diff → decide → journal → steps.

A request waits for the lock (bounded by its deadline: one whose deadline passed while it queued is dropped before
its guard runs), then the guard decides on a fresh diff. A refused request changes nothing. An admitted one is
journaled whole — every step, before the first runs — and its steps are applied in order, each completion
journaled with the next step's SENT (past the commit point, steps that change one truststore each on distinct nodes
are sent together). A step that fails before the commit point rolls the operation back; after it, the step is
retried and, if it keeps failing, the operation is parked: visible, blocking, with what would clear it.

The run belongs to the coordinator, not to the request: a caller whose deadline runs out gets the operation as it
stands and can follow it with WaitOperation. `reconcile` decides each unfinished operation that nothing in this
process is running from a fresh observation, never from the journal alone (the commit step may have been applied
and not yet recorded): forward past the commit point, back before it. It runs at start (after a crash), then every
reconcile interval and as soon as a silent agent answers again (`reconcile_periodically`): each pass retries every
parked operation once, unless the agent its next step needs is still silent, and costs a single journal query when
nothing is unfinished.

Recovery decisions are the pure core's (coordinator/core/recovery.py): this module gathers the observation it
needs, journals what it decides and sends the steps. Every step is journaled SENT before it is sent (write-ahead
intent), so a step applied by an agent just before a crash is undone or confirmed, never forgotten. Fault injection
is a hook the runner is given (coordinator/faults.py), inert unless a test arms it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

import grpc
from memberguard.v1 import coordinator_pb2, operation_pb2

from coordinator import pki
from coordinator.core import recovery, tokens
from coordinator.core.addresses import address_problem
from coordinator.core.diff import compute_diff
from coordinator.core.guard import Parked, Proceed, Refused, Request, Stale, decide
from coordinator.core.model import ClusterView, Member, MembershipDiff, NodeView, RemedySafety, Source
from coordinator.core.operation import (
    Abandon,
    Audit,
    OperationKind,
    OperationRecord,
    OperationState,
    Park,
    Resume,
    RollBack,
    Start,
    Step,
    StepDone,
    StepSent,
    StepSkipped,
    StepState,
    StepUndone,
    Succeed,
    apply,
    committed,
    next_steps,
    remaining_deferred,
)
from coordinator.core.plan import (
    COORDINATOR,
    Action,
    AgentPin,
    CannotPlan,
    FenceNode,
    ForgetMember,
    Joiner,
    JoinThroughMicrocluster,
    NotOnMicrocluster,
    PlannedStep,
    RegisterMember,
    plan_join,
    plan_microcluster_token,
    plan_removal,
)
from coordinator.core.recovery import Back, Forward, Wait, commit_effect, silent_agents
from coordinator.core.repair import RepairAction, RepairPlan, UnknownActions, UnknownDiscrepancies, plan_repair
from coordinator.errors import (
    AlreadyExists,
    DirtyMembership,
    FieldViolation,
    InvalidRequest,
    JoinerNotVerified,
    NotAbandonable,
    NotFound,
    OperationParked,
    PermissionDenied,
    PreconditionViolation,
    StaleFingerprint,
    TokenNotAccepted,
    quoted,
)
from coordinator.faults import Faults
from coordinator.gather import Agents, own_cancellation
from coordinator.journal import Journal
from coordinator.learned_trust import LearnedTrust
from coordinator.messages import diff_to_proto, step_to_proto
from coordinator.registry import RegisteredMember, Registry, UnreadableRegistry

log = logging.getLogger("memberguard.operations")

STEP_TIMEOUT = 5.0
# microcluster's join answers once the joiner's dqlite has joined and its hooks have run: seconds, more when loaded.
JOIN_THROUGH_MICROCLUSTER_TIMEOUT = 60.0
# A deferred step is tried at most this often (seconds): its node may stay away for good, and each try holds the lock.
REMAINDER_RETRY = 5.0
# After the commit point a failing step is retried this many times before the operation is parked.
STEP_ATTEMPTS = 3
MAX_REQUEST_ID = 128


class DeadlinePassed(Exception):
    """The request's deadline passed while it waited for the membership lock: it was dropped, nothing ran."""


@dataclass(frozen=True)
class Caller:
    """Who asks: for the audit trail."""

    name: str
    certificate_fingerprint: str


@dataclass(frozen=True)
class Outcome:
    record: OperationRecord
    token: str = ""  # the token text, for the request that issued it; never stored


class Operations:
    def __init__(
        self,
        *,
        journal: Journal,
        agents: Agents,
        trust: LearnedTrust,
        registry: Registry,
        cluster_id: str,
        certificate_fingerprint: str,
        agent_timeout: float,
        repair_grace: float,
        faults: Faults | None = None,
    ) -> None:
        self._journal = journal
        self._agents = agents
        self._trust = trust
        self._registry = registry
        self._cluster_id = cluster_id
        self._fingerprint = certificate_fingerprint
        self._join_addresses: tuple[str, ...] = ()
        self._agent_timeout = agent_timeout
        self._repair_grace = repair_grace  # how long an orphan must have been one before a repair removes it
        # Discrepancy id → when a repair's gather first saw it, in every repair's gather since: what proves an orphan
        # older than the grace period on a backend whose records cannot tell when they last changed (dqlite).
        self._seen_since: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._runs: dict[str, asyncio.Future[OperationRecord]] = {}  # running now, for WaitOperation
        # The join token a step obtained from microcluster, by operation, until its issuer hands it to the caller: it
        # is never journaled.
        self._obtained: dict[str, str] = {}
        self._faults = faults or Faults()
        self._remainder_tried: dict[str, float] = {}  # operation id → when its deferred steps were last tried

    def listening_on(self, addresses: Sequence[str]) -> None:
        """Where joiners reach this coordinator (tokens carry it); known once the server is bound."""
        self._join_addresses = tuple(addresses)

    # --- requests ------------------------------------------------------------------------------------------------

    async def submit(
        self,
        request: coordinator_pb2.GuardedOperationRequest,
        caller: Caller,
        deadline: float | None,
        *,
        join_listener: bool = False,
    ) -> Outcome:
        """Runs the request under the guard and waits for its outcome until the deadline (loop time). Joins arrive
        only on the join listener (no client certificate: the token authorizes them), everything else only on the
        operators' listener."""
        if (request.WhichOneof("operation") == "join") != join_listener:
            raise PermissionDenied(
                "the join listener accepts joins only"
                if join_listener
                else "joins arrive on the join listener, with their token"
            )
        kind, target = _validate(request)
        known = self._retried(request)
        if known is not None:
            return Outcome(known)
        admitted: asyncio.Future[OperationRecord] = asyncio.get_running_loop().create_future()
        run = asyncio.create_task(self._execute(request, kind, target, caller, deadline, admitted))
        wait = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(run), wait)
        except TimeoutError:
            if admitted.done():
                return Outcome(self._journal.get(admitted.result().id) or admitted.result())
            raise

    def _retried(self, request: coordinator_pb2.GuardedOperationRequest) -> OperationRecord | None:
        """The operation an earlier request with this request id started, if the caller may see it. An operator may
        see any. A joiner is a stranger until its token is verified: it gets back only its own join, and only once it
        presents the token that join was made with (whatever became of the token since); anything else about the
        request id is none of its business."""
        known = self._journal.by_request_id(request.request_id)
        if known is None or request.WhichOneof("operation") != "join":
            return known
        join = request.join
        own = known.kind is OperationKind.JOIN and known.member.name == join.name
        if own and tokens.authenticates(join.token, self._journal.token(join.name)):
            return known
        self._admit_joiner(join)  # a refusal for the token as such: expired, forged, for another name, ...
        raise AlreadyExists(f"request id {quoted(request.request_id)} belongs to another operation: use a new one")

    async def repair_plan(
        self, *, expected_fingerprint: str, only: Sequence[str], confirmed: Sequence[str]
    ) -> RepairPlan:
        """The plan that would clear the diff as it is now (core/repair.py); nothing is changed. Refused as the guard
        refuses a repair (a parked operation first, no leader, a stale fingerprint: ABORTED with the new diff); ids the
        diff or the plan does not hold are INVALID_ARGUMENT, naming them."""
        view = await self._agents.gather(self._agent_timeout)
        diff = compute_diff(view)
        self._admit_repair(diff, expected_fingerprint)
        plan = self._plan_repair(view, diff, only)
        _chosen(plan, confirmed)
        return plan

    async def apply_repair(
        self, request: coordinator_pb2.RepairRequest, caller: Caller, deadline: float | None
    ) -> tuple[RepairPlan, OperationRecord | None]:
        """Applies the plan under the membership lock: the diff is gathered again under it and the plan made again
        from it, so the fingerprint checked is the one the steps are planned on. The SAFE actions and the confirmed
        ones run as one REPAIR operation, their steps in plan order, the first its commit point (core/recovery.py
        says why that makes its recovery safe). Returns the plan and the operation as it stands at the deadline (loop
        time), or no operation when the plan chose nothing; a retry with the request id of an earlier apply gets that
        operation back, with the plan of the diff as it is now."""
        violations = _request_id_violations(request.request_id)
        if violations:
            raise InvalidRequest(violations)
        admitted: asyncio.Future[tuple[RepairPlan, OperationRecord]] = asyncio.get_running_loop().create_future()
        run = asyncio.create_task(self._execute_repair(request, caller, deadline, admitted))
        wait = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(run), wait)
        except TimeoutError:
            if not admitted.done():
                raise
            plan, record = admitted.result()
            return plan, self._journal.get(record.id) or record

    async def _execute_repair(
        self,
        request: coordinator_pb2.RepairRequest,
        caller: Caller,
        deadline: float | None,
        admitted: asyncio.Future[tuple[RepairPlan, OperationRecord]],
    ) -> tuple[RepairPlan, OperationRecord | None]:
        async with self._lock:
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                raise DeadlinePassed(f"request {request.request_id} waited past its deadline for the membership lock")
            view = await self._agents.gather(self._agent_timeout)
            diff = compute_diff(view)
            known = self._journal.by_request_id(request.request_id)
            if known is not None:
                return self._plan_repair(view, diff, request.discrepancy_ids), known
            self._admit_repair(diff, request.expected_fingerprint)
            plan = self._plan_repair(view, diff, request.discrepancy_ids)
            chosen = _chosen(plan, request.confirmed_action_ids)
            # A deferred step waits for a silent node after success, which a repair has no use for: it plans again.
            steps = [step.planned for action in chosen for step in action.steps if not step.planned.deferred]
            if not steps:
                return plan, None
            steps[0] = replace(steps[0], commit_point=True)
            confirmed = sorted(a.id for a in chosen if a.safety is not RemedySafety.SAFE)
            audit = Audit(
                requested_by=caller.name,
                certificate_fingerprint=caller.certificate_fingerprint,
                request_id=request.request_id,
                verdict=f"repair of {len(chosen)} action(s): {', '.join(a.id for a in chosen)}; confirmed "
                f"{len(confirmed)}; fingerprint {'checked' if request.expected_fingerprint else 'not given'}",
                fingerprint=diff.fingerprint,
            )
            record = self._new_record(OperationKind.REPAIR, Member(), steps, audit, time.time())
            record = replace(record, plan="; ".join(a.remainder for a in chosen if a.remainder))
            record = self._journal.create(record)
            admitted.set_result((plan, record))
            return plan, await self._follow(record)

    def _admit_repair(self, diff: MembershipDiff, expected_fingerprint: str) -> None:
        """The guard's verdict on a repair, raised when it is not Proceed: a parked operation comes first, as for any
        change; without a leader nothing is repaired; a stale fingerprint is ABORTED with the new diff."""
        parked = [r for r in self._journal.unfinished() if r.state is OperationState.PARKED]
        verdict = decide(Request(OperationKind.REPAIR, "", expected_fingerprint), diff, parked=parked)
        if isinstance(verdict, Parked):
            raise _parked(verdict, diff)
        if isinstance(verdict, Refused):
            raise DirtyMembership(
                f"nothing can be repaired now: {len(verdict.violations)} violation(s)",
                diff_to_proto(diff),
                [PreconditionViolation(v.type, v.subject, v.description) for v in verdict.violations],
            )
        if isinstance(verdict, Stale):
            raise StaleFingerprint(
                "the membership changed since the caller's diff: re-read it and retry", diff_to_proto(diff)
            )

    def _plan_repair(self, view: ClusterView, diff: MembershipDiff, only: Sequence[str]) -> RepairPlan:
        # The PEMs a restored record needs, by fingerprint: the registry's pins and what the truststores vouch for.
        pems = self._trust.certificates(self._registry.members()).values()
        certificates = {pki.fingerprint(pem): pem for pem in pems}
        now = time.time()
        self._seen_since = {d.id: self._seen_since.get(d.id, now) for d in diff.discrepancies}
        try:
            return plan_repair(
                view,
                diff,
                in_flight=self._journal.unfinished(),
                now=now,
                grace=self._repair_grace,
                only=only,
                certificates=certificates,
                seen_since=self._seen_since,
            )
        except UnknownDiscrepancies as error:
            raise InvalidRequest(
                [FieldViolation("discrepancy_ids", f"not in the diff: {', '.join(sorted(error.ids))}")]
            ) from None

    async def abandon(self, request: coordinator_pb2.AbandonOperationRequest, caller: Caller) -> OperationRecord:
        """Ends a parked operation at an operator's request, under the membership lock, if core/recovery.py's rule
        lets it; journaled with who ended it and why."""
        violations = []
        if not request.operation_id:
            violations.append(FieldViolation("operation_id", "is required"))
        if not request.reason.strip():
            violations.append(FieldViolation("reason", "is required: the journal keeps why"))
        if violations:
            raise InvalidRequest(violations)
        async with self._lock:
            record = self._journal.get(request.operation_id)
            if record is None:
                raise NotFound(f"no operation {quoted(request.operation_id)}")
            diff = compute_diff(await self._agents.gather(self._agent_timeout))
            refused = recovery.abandon_violations(
                record, diff, force=request.force, acknowledged=frozenset(request.acknowledged_discrepancy_ids)
            )
            if refused:
                raise NotAbandonable(
                    f"operation {record.id} may not be abandoned: {len(refused)} violation(s)",
                    diff_to_proto(diff),
                    [PreconditionViolation(v.type, v.subject, v.description) for v in refused],
                )
            record = self._save(apply(record, Abandon(f"abandoned by {caller.name}: {request.reason}"), time.time()))
            held = self._journal.token(record.member.name) if record.kind is OperationKind.JOIN else None
            if held is not None and held.state is tokens.TokenState.ACTIVE:
                self._journal.update_token(tokens.release(held))  # so that it can be revoked, or used again
            log.info("operation %s abandoned by %s", record.id, caller.name)
            return record

    async def wait(self, operation_id: str, timeout: float | None) -> OperationRecord:
        record = self._journal.get(operation_id)
        if record is None:
            raise NotFound(f"no operation {quoted(operation_id)}")
        if not record.state.finished:
            try:
                async with asyncio.timeout(timeout):
                    run = self._runs.get(operation_id)
                    if run is None:
                        # Not running yet: whoever holds the lock (the reconciler, after a restart) takes it up next.
                        async with self._lock:
                            pass
                        run = self._runs.get(operation_id)
                    if run is not None:
                        await asyncio.shield(run)
            except TimeoutError:
                pass
        found = self._journal.get(operation_id)
        assert found is not None
        return found

    async def _execute(
        self,
        request: coordinator_pb2.GuardedOperationRequest,
        kind: OperationKind,
        target: str,
        caller: Caller,
        deadline: float | None,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        async with self._lock:
            loop = asyncio.get_running_loop()
            if deadline is not None and loop.time() >= deadline:
                raise DeadlinePassed(f"request {request.request_id} waited past its deadline for the membership lock")
            # A retry that queued behind the original must not run twice.
            known = self._retried(request)
            if known is not None:
                return Outcome(known)
            # A joiner is not trusted yet: its token is checked before it learns anything about the cluster.
            token = self._admit_joiner(request.join) if kind is OperationKind.JOIN else None
            diff = compute_diff(await self._agents.gather(self._agent_timeout))
            verdict = decide(
                Request(
                    kind,
                    target,
                    request.expected_fingerprint,
                    frozenset(request.acknowledged_discrepancy_ids),
                ),
                diff,
                parked=[r for r in self._journal.unfinished() if r.state is OperationState.PARKED],
            )
            if isinstance(verdict, Parked):
                raise _parked(verdict, diff)
            # An unknown member is NOT_FOUND, not a dirty diff: there is nothing to clear.
            member = _resolve(diff, target, request.remove_member.address) if kind.removes else None
            if isinstance(verdict, Refused):
                violations = [PreconditionViolation(v.type, v.subject, v.description) for v in verdict.violations]
                raise DirtyMembership(
                    f"membership may not change: {len(violations)} violation(s); clear them first",
                    diff_to_proto(diff),
                    violations,
                )
            if isinstance(verdict, Stale):
                raise StaleFingerprint(
                    "the membership changed since the caller's diff: re-read it and retry", diff_to_proto(diff)
                )
            assert isinstance(verdict, Proceed)
            audit = Audit(
                requested_by=caller.name,
                certificate_fingerprint=caller.certificate_fingerprint,
                request_id=request.request_id,
                verdict=_verdict(verdict, request),
                fingerprint=diff.fingerprint,
                acknowledged=tuple(sorted(verdict.acknowledged_used)),
            )
            if kind is OperationKind.ISSUE_TOKEN:
                return await self._issue_token(request.issue_token, diff, audit, admitted)
            if kind is OperationKind.JOIN:
                assert token is not None
                return await self._join(request.join, token, diff, audit, admitted)
            assert member is not None
            return await self._remove(kind, member, diff, audit, admitted)

    # --- tokens --------------------------------------------------------------------------------------------------

    async def _issue_token(
        self,
        operation: operation_pb2.IssueTokenOperation,
        diff: MembershipDiff,
        audit: Audit,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        if any(m.name == operation.name for m in diff.members):
            raise AlreadyExists(f"{operation.name} is already a member")
        now = time.time()
        ttl = operation.ttl.ToNanoseconds() / 1e9 if operation.HasField("ttl") else None
        if operation.microcluster:
            return await self._issue_microcluster_token(operation.name, ttl, diff, audit, admitted)
        try:
            text, token = tokens.issue(
                operation.name,
                secrets.token_bytes(32),
                now=now,
                ttl=ttl,
                issued_by=audit.requested_by,
                coordinator_fingerprint=self._fingerprint,
                cluster_id=self._cluster_id,
                join_addresses=self._join_addresses,
            )
        except tokens.InvalidTokenRequest as error:
            raise InvalidRequest([FieldViolation(f"issue_token.{error.field}", error.reason)]) from None
        record = self._new_record(OperationKind.ISSUE_TOKEN, Member(name=operation.name), (), audit, now)
        record = self._journal.create(record)
        admitted.set_result(record)
        # One token per name: issuing again replaces the earlier one (a stale token never blocks a re-issue).
        self._journal.put_token(token)
        record = self._save(apply(apply(record, Start(), now), Succeed(), now))
        return Outcome(record, text)

    async def _issue_microcluster_token(
        self,
        name: str,
        ttl: float | None,
        diff: MembershipDiff,
        audit: Audit,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        """microcluster's own token, for a joiner that joins with `microctl init`: the guard has passed, and a member's
        daemon issues it (core/plan.py, `plan_microcluster_token`)."""
        try:
            ttl = tokens.checked_request(name, ttl)
            plan = plan_microcluster_token(diff, name, ttl=ttl, reachable=set(diff.nodes) - silent_agents(diff))
        except tokens.InvalidTokenRequest as error:
            raise InvalidRequest([FieldViolation(f"issue_token.{error.field}", error.reason)]) from None
        except NotOnMicrocluster as error:
            raise InvalidRequest([FieldViolation("issue_token.microcluster", str(error))]) from None
        except CannotPlan as error:
            violation = PreconditionViolation("NO_REACHABLE_NODE", name, str(error))
            raise DirtyMembership(str(error), diff_to_proto(diff), [violation]) from None
        record = self._new_record(OperationKind.ISSUE_TOKEN, Member(name=name), plan.steps, audit, time.time())
        record = self._journal.create(replace(record, plan=plan.remainder))
        admitted.set_result(record)
        record = await self._follow(record)
        return Outcome(record, self._obtained.pop(record.id, ""))

    # --- joins ---------------------------------------------------------------------------------------------------

    def _admit_joiner(self, join: operation_pb2.JoinOperation) -> tokens.TokenRecord:
        """The joiner's stored token, checked against the token it presents and the certificate it submits."""
        try:
            presented = tokens.decode_token(join.token)
            record = self._journal.token(presented.name)
            checked = tokens.check_join(
                join.token,
                name=join.name,
                certificate_fingerprint=pki.fingerprint(join.certificate_pem),
                certificate_dns_names=pki.dns_names(join.certificate_pem),
                record=record,
                now=time.time(),
                cluster_id=self._cluster_id,
            )
        except tokens.MalformedToken as error:
            raise InvalidRequest([FieldViolation("join.token", str(error))]) from None
        except tokens.CertificateNameMismatch as error:
            raise InvalidRequest([FieldViolation("join.certificate_pem", str(error))]) from None
        except tokens.TokenRefused as error:
            raise TokenNotAccepted(str(error), error.reason) from None
        assert record is not None and checked.name == join.name
        return record

    async def _join(
        self,
        join: operation_pb2.JoinOperation,
        token: tokens.TokenRecord,
        diff: MembershipDiff,
        audit: Audit,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        if any(m.name == join.name for m in diff.members):
            raise AlreadyExists(f"{join.name} is already a member")
        # Dialled pinned to the certificate it submitted, the joiner's agent proves it holds that key; its view
        # says which dqlite node ID its node has.
        joining = RegisteredMember(join.name, join.agent_address, join.certificate_pem)
        view = await self._agents.joiner_view(joining, self._agent_timeout)
        # On microcluster the joiner has no node ID until microcluster's join gives it one.
        node_id = 0 if view is not None and diff.backend == "microcluster" else _node_id(view)
        if node_id is None:
            raise JoinerNotVerified(
                f"the joiner's agent at {join.agent_address} did not answer as the holder of the certificate it"
                " submitted, with its node's identity"
            )
        fingerprint = pki.fingerprint(join.certificate_pem)
        reachable = set(diff.nodes) - silent_agents(diff)
        joiner = Joiner(join.name, join.address, join.certificate_pem, join.agent_address, node_id)
        try:
            plan = plan_join(
                diff, joiner, reachable=reachable, certificates=self._trust.certificates(self._registry.members())
            )
        except CannotPlan as error:
            violation = PreconditionViolation("CANNOT_PLAN", join.name, str(error))
            raise DirtyMembership(str(error), diff_to_proto(diff), [violation]) from None
        self._journal.update_token(tokens.bind(token, fingerprint))
        now = time.time()
        member = Member(join.name, fingerprint, join.address, node_id)
        record = replace(self._new_record(OperationKind.JOIN, member, plan.steps, audit, now), plan=plan.remainder)
        record = self._journal.create(record)
        admitted.set_result(record)
        try:
            return Outcome(await self._follow(record))
        finally:
            self._obtained.pop(record.id, None)  # microcluster's token for the joiner, used or not

    # --- removals ------------------------------------------------------------------------------------------------

    async def _remove(
        self,
        kind: OperationKind,
        member: Member,
        diff: MembershipDiff,
        audit: Audit,
        admitted: asyncio.Future[OperationRecord],
    ) -> Outcome:
        reachable = set(diff.nodes) - silent_agents(diff)
        pinned = next((m for m in self._registry.members() if m.name == member.name), None)
        agent = None if pinned is None else AgentPin(pinned.agent_address, pinned.certificate_pem)
        try:
            plan = plan_removal(
                diff, member, reachable=reachable, agent=agent, force=kind is OperationKind.FORCE_REMOVE
            )
        except CannotPlan as error:
            raise DirtyMembership(
                str(error),
                diff_to_proto(diff),
                [PreconditionViolation("NO_REACHABLE_NODE", member.name or member.address, str(error))],
            ) from None
        now = time.time()
        record = self._new_record(kind, member, plan.steps, audit, now)
        record = replace(record, plan=plan.remainder)
        record = self._journal.create(record)
        admitted.set_result(record)
        return Outcome(await self._follow(record))

    async def _follow(self, record: OperationRecord) -> OperationRecord:
        """Runs the operation as a task WaitOperation can wait for."""
        run = asyncio.ensure_future(self._run(record))
        self._runs[record.id] = run
        run.add_done_callback(lambda _: self._runs.pop(record.id, None))
        return await run

    async def _run(self, record: OperationRecord) -> OperationRecord:
        """Applies the record's pending steps in order, each journaled SENT before it is sent; a failure is decided
        by the recovery core on a fresh observation: roll back, park, or go on when the commit took effect.

        One journal write a step: a step's completion is journaled with the next step's SENT (or the outcome), as a
        crash between the two would have left the journal saying no more than the step SENT, which recovery settles
        from the sources all the same. Steps that may go together (next_steps) are sent at once."""
        done: list[int] = []  # steps applied whose DONE is not journaled yet: it goes with the next write

        def journal(record: OperationRecord) -> OperationRecord:
            self._save(record)
            for index in done:
                self._faults.at("after-step", index)
            done.clear()
            return record

        if record.state is OperationState.QUEUED:
            record = apply(record, Start(), time.time())
        while batch := next_steps(record):
            for index in batch:
                self._faults.at("before-step", index)
                record = apply(record, StepSent(index), time.time())
            record = journal(record)
            errors = await asyncio.gather(*(self._apply_with_retries(record, i, record.steps[i]) for i in batch))
            for index, error in zip(batch, errors, strict=True):
                if error is None:
                    self._faults.at("applied-step", index)  # applied by its agent, not yet recorded: write-ahead intent
                    record = apply(record, StepDone(index), time.time())
                    done.append(index)
            failed = next(((i, e) for i, e in zip(batch, errors, strict=True) if e is not None), None)
            if failed is None:
                continue
            index, error = failed
            if committed(record):
                remaining = ", ".join(s.name for s in record.steps[index:] if s.state is not StepState.DONE)
                return journal(apply(record, Park(error, f"finish it: {remaining}"), time.time()))
            # Before the commit point steps go one at a time: nothing is left unjournaled here.
            # Silence is not a refusal: the sources say whether the step took effect all the same.
            decision = await self._decide(record, error)
            if isinstance(decision, Forward) and decision.confirm is not None:
                record = apply(record, StepDone(decision.confirm), time.time())
                continue
            return await self._settle(record, decision)
        return journal(apply(record, Succeed(), time.time()))

    async def _decide(self, record: OperationRecord, cause: str) -> Forward | Back | Wait:
        """Observes the sources now (and a joiner's agent, which no gather reaches before it is registered) and asks
        the recovery core what to do with the record."""
        diff = compute_diff(await self._agents.gather(self._agent_timeout))
        silent = set(silent_agents(diff))
        if record.kind is OperationKind.JOIN and not committed(record):
            joiner = record.member.name
            try:
                answered = await self._agents.joiner_view(self._target(record, joiner), self._agent_timeout) is not None
            except StepFailed:
                answered = False
            if not answered:
                silent.add(joiner)
        return recovery.decide(record, commit=commit_effect(record, diff), silent=silent, nodes=diff.nodes, cause=cause)

    async def _settle(self, record: OperationRecord, decision: Forward | Back | Wait) -> OperationRecord:
        match decision:
            case Forward(confirm=confirm):
                if confirm is not None:
                    record = self._save(apply(record, StepDone(confirm), time.time()))
                return await self._follow(record)
            case Back():
                return await self._roll_back(record, decision)
            case Wait(error=error, plan=plan):
                return self._save(apply(record, Park(error, plan), time.time()))

    async def _roll_back(self, record: OperationRecord, back: Back) -> OperationRecord:
        """Reverses what may have been applied, in the order the recovery core chose: a joiner that answers is fenced
        first; a joiner that is gone has its trust revoked first and the steps on its own node skipped. An undo that
        fails parks the operation: the next pass decides again, on what the sources say then."""
        if back.fence:
            fence = Step(f"fence {record.member.name}", False, target=record.member.name, action=FenceNode())
            try:
                await self._apply(record, -1, fence)
            except StepFailed:
                # It went away since it answered: decided again, it is a joiner gone, whose trust is revoked first.
                decision = await self._decide(record, back.cause)
                if not isinstance(decision, Back) or decision.fence:
                    return self._park_undo(record, back.cause, f"{record.member.name} could not be fenced")
                back = decision
        for reverse in back.undo:
            step = record.steps[reverse.index]
            if reverse.skipped:
                record = self._save(apply(record, StepSkipped(reverse.index), time.time()))
                continue
            if reverse.action is not None:
                try:
                    await self._apply(
                        record, reverse.index, replace(step, target=reverse.target, action=reverse.action)
                    )
                except StepFailed as failure:
                    return self._park_undo(record, back.cause, f"undoing '{step.name}' failed: {failure}")
            record = self._save(apply(record, StepUndone(reverse.index), time.time()))
        if record.kind is OperationKind.JOIN:
            held = self._journal.token(record.member.name)
            if held is not None and held.state is tokens.TokenState.ACTIVE:
                self._journal.update_token(tokens.release(held))
        error = back.cause
        if back.unreset:
            error = f"{error}; {back.unreset} was not reset: reset it before it comes back"
        return self._save(apply(record, RollBack(error), time.time()))

    def _park_undo(self, record: OperationRecord, cause: str, why: str) -> OperationRecord:
        return self._save(apply(record, Park(cause, f"{why}; the reconciler retries the rollback"), time.time()))

    async def _apply_with_retries(self, record: OperationRecord, index: int, step: Step) -> str | None:
        attempts = STEP_ATTEMPTS if committed(record) or step.commit_point else 1
        error = ""
        for attempt in range(attempts):
            try:
                if self._faults.fails(index):
                    raise StepFailed("failure injected by the fault hook")
                await self._apply(record, index, step)
                return None
            except StepFailed as failure:
                error = f"{step.name}: {failure}"
                await asyncio.sleep(0.2 * (attempt + 1))
        return error

    async def _apply(self, record: OperationRecord, index: int, step: Step, *, timeout: float = STEP_TIMEOUT) -> None:
        assert step.action is not None
        if step.target == COORDINATOR:
            self._apply_own(step.action)
            return
        request = step_to_proto(step.action)
        if isinstance(step.action, JoinThroughMicrocluster):
            timeout = max(timeout, JOIN_THROUGH_MICROCLUSTER_TIMEOUT)
            token = self._obtained.get(record.id)
            if token is None:
                raise StepFailed(
                    "microcluster's join token was issued to an earlier run of this coordinator, and kept only in its"
                    " memory"
                )
            request.join_through_microcluster.token = token
        request.operation_id, request.step_index, request.epoch = record.id, max(index, 0), self._journal.epoch
        try:
            response = await self._agents.apply_step(self._target(record, step.target), request, timeout)
        except grpc.aio.AioRpcError as error:
            # The agent's own words, not gRPC's debug string: the operation's error is read by callers.
            raise StepFailed(f"{error.code().name}: {error.details() or 'no details'}") from error
        except Exception as error:
            raise StepFailed(f"{type(error).__name__}: {error}") from error
        if response.token:
            self._obtained[record.id] = response.token

    def _apply_own(self, action: Action) -> None:
        try:
            self._apply_own_action(action)
        except UnreadableRegistry as error:
            raise StepFailed(f"the registry could not be read: {error}") from error

    def _apply_own_action(self, action: Action) -> None:
        match action:
            case ForgetMember(name=name):
                self._registry.forget(name)
                self._journal.delete_tokens_of(name)
            case RegisterMember(name=name, agent_address=agent_address, certificate_pem=pem):
                self._registry.register(RegisteredMember(name, agent_address, pem))
                held = self._journal.token(name)
                if held is not None and held.state is tokens.TokenState.ACTIVE:
                    self._journal.update_token(tokens.consume(held))
            case _:
                raise AssertionError(f"not a coordinator step: {action}")

    def _target(self, record: OperationRecord, node: str) -> RegisteredMember:
        """The agent a step goes to: a registered member, or the joiner of a join not yet registered (its agent's
        address and certificate are in the journaled plan)."""
        for member in self._registry.members():
            if member.name == node:
                return member
        for step in record.steps:
            if isinstance(step.action, RegisterMember) and step.action.name == node:
                return RegisteredMember(node, step.action.agent_address, step.action.certificate_pem)
            if isinstance(step.action, FenceNode) and step.target == node and step.action.agent_address:
                return RegisteredMember(node, step.action.agent_address, step.action.certificate_pem)
        raise StepFailed(f"no agent is known for {node}")

    # --- recovery ------------------------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Finishes or rolls back every unfinished operation that no run of this process is following: what a crash
        left, and what was parked."""
        # Looked up before the lock is taken, so that a pass with nothing to do never waits for a running operation.
        if not self._unattended() and not self._due_remainders():
            return
        async with self._lock:
            for record in self._unattended():
                await self._recover(record)
            for record in self._due_remainders():
                await self._finish_remainder(record)

    async def reconcile_periodically(self, interval: float) -> None:
        """Reconciles every `interval` seconds, and at once when a silent agent answers again; until cancelled."""
        reconnected = self._agents.reconnected
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reconnected.wait(), interval)
            reconnected.clear()
            try:
                await self.reconcile()
            except (Exception, asyncio.CancelledError) as error:
                if isinstance(error, asyncio.CancelledError) and own_cancellation():
                    raise
                # An operation this pass could not handle must not end recovery for good: the next pass tries again.
                log.exception("reconciling failed; the next pass tries again")

    def _unattended(self) -> list[OperationRecord]:
        return [record for record in self._journal.unfinished() if record.id not in self._runs]

    def _due_remainders(self) -> list[OperationRecord]:
        """Succeeded removals with deferred steps not tried for REMAINDER_RETRY seconds."""
        now = time.monotonic()
        return [
            record
            for record in self._journal.with_remainder()
            if now - self._remainder_tried.get(record.id, -math.inf) >= REMAINDER_RETRY
        ]

    async def _finish_remainder(self, record: OperationRecord) -> None:
        """Applies what is left of a succeeded removal where its nodes answer now; a step about a name that a member
        holds again, or on a node that has left the cluster, is skipped: it would only harm the new holder."""
        self._remainder_tried[record.id] = time.monotonic()
        name = record.member.name
        registered = {m.name for m in self._registry.members()}
        if any(r.member.name == name for r in self._journal.unfinished()):
            return  # an operation about that name is under way: it decides what the name's records become
        for index in remaining_deferred(record):
            step = record.steps[index]
            gone = step.target != name and step.target not in registered
            if name in registered or gone:
                record = self._save(apply(record, StepSkipped(index), time.time()))
                continue
            record = self._save(apply(record, StepSent(index), time.time()))
            try:
                await self._apply(record, index, step, timeout=self._agent_timeout)
            except StepFailed as failure:
                log.info("operation %s: '%s' is deferred still: %s", record.id, step.name, failure)
                continue
            record = self._save(apply(record, StepDone(index), time.time()))
        if not remaining_deferred(record):
            self._remainder_tried.pop(record.id, None)

    async def _recover(self, record: OperationRecord) -> None:
        """Decides one unattended operation from a fresh observation (coordinator/core/recovery.py)."""
        decision = await self._decide(record, record.error or recovery.INTERRUPTED)
        if record.state is OperationState.PARKED and isinstance(decision, Wait):
            return  # it still cannot go on: it stays parked as it is, and the journal is not written
        if record.state is OperationState.PARKED:
            record = self._save(apply(record, Resume(), time.time()))
        # A QUEUED one never sent a step: recovery decides Back with nothing to undo, and a join's token is released.
        await self._settle(record, decision)

    # --- helpers -------------------------------------------------------------------------------------------------

    def _new_record(
        self,
        kind: OperationKind,
        member: Member,
        steps: Sequence[PlannedStep],
        audit: Audit,
        now: float,
    ) -> OperationRecord:
        return OperationRecord(
            id=uuid.uuid4().hex,
            kind=kind,
            member=member,
            state=OperationState.QUEUED,
            steps=tuple(
                Step(s.name, s.commit_point, target=s.target, action=s.action, deferred=s.deferred) for s in steps
            ),
            error="",
            plan="",
            audit=audit,
            epoch=self._journal.epoch,
            created_at=now,
            updated_at=now,
        )

    def _save(self, record: OperationRecord) -> OperationRecord:
        self._journal.save(record)
        return record


def _node_id(view: NodeView | None) -> int | None:
    """The dqlite node ID a node's own view reports (its info.yaml); None without one."""
    report = view.report(Source.NODE_INFO) if view else None
    ids = [r.node_id for r in report.records if r.node_id] if report and not report.error else []
    return ids[0] if len(ids) == 1 else None


class StepFailed(Exception):
    """A step could not be applied (the agent refused, failed or did not answer)."""


def _request_id_violations(request_id: str) -> list[FieldViolation]:
    if not request_id:
        return [FieldViolation("request_id", "is required")]
    if len(request_id) > MAX_REQUEST_ID:
        return [FieldViolation("request_id", f"must be at most {MAX_REQUEST_ID} characters")]
    return []


def _chosen(plan: RepairPlan, confirmed: Sequence[str]) -> tuple[RepairAction, ...]:
    try:
        return plan.chosen(confirmed)
    except UnknownActions as error:
        raise InvalidRequest(
            [FieldViolation("confirmed_action_ids", f"not in the plan: {', '.join(sorted(error.ids))}")]
        ) from None


def _validate(request: coordinator_pb2.GuardedOperationRequest) -> tuple[OperationKind, str]:
    violations = _request_id_violations(request.request_id)
    which = request.WhichOneof("operation")
    kind, target = OperationKind.ISSUE_TOKEN, ""
    if which is None:
        violations.append(FieldViolation("operation", "exactly one operation must be set"))
    elif which == "join":
        kind, target = OperationKind.JOIN, request.join.name
        violations += _join_violations(request.join)
    elif which == "issue_token":
        target = request.issue_token.name
        problem = tokens.dns_name_problem(target)
        if problem is not None:
            violations.append(FieldViolation("issue_token.name", f"a member name {problem}"))
    else:
        removal = request.remove_member
        kind = OperationKind.FORCE_REMOVE if removal.force else OperationKind.REMOVE
        target = removal.name or removal.address
        if not target:
            violations.append(FieldViolation("remove_member.name", "a name, or an address, is required"))
    if violations:
        raise InvalidRequest(violations)
    return kind, target


def _join_violations(join: operation_pb2.JoinOperation) -> list[FieldViolation]:
    violations = []
    if not join.token:
        violations.append(FieldViolation("join.token", "is required"))
    problem = tokens.dns_name_problem(join.name)
    if problem is not None:
        violations.append(FieldViolation("join.name", f"a member name {problem}"))
    for field, value in (("join.address", join.address), ("join.agent_address", join.agent_address)):
        problem = address_problem(value)
        if problem is not None:
            violations.append(FieldViolation(field, problem))
    try:
        pki.fingerprint(join.certificate_pem)
    except ValueError:
        violations.append(FieldViolation("join.certificate_pem", "is not a PEM certificate"))
    return violations


def _parked(verdict: Parked, diff: MembershipDiff) -> OperationParked:
    return OperationParked(
        f"{len(verdict.violations)} parked operation(s) must be finished (or abandoned) first",
        diff_to_proto(diff),
        [PreconditionViolation(v.type, v.subject, v.description) for v in verdict.violations],
    )


def _resolve(diff: MembershipDiff, target: str, address: str) -> Member:
    found = [m for m in diff.members if target in (m.name, m.address)]
    if address:
        found = [m for m in found if m.address == address]
    if not found:
        raise NotFound(f"no member {quoted(target)} in the members table or the Raft configuration")
    return found[0]


def _verdict(verdict: Proceed, request: coordinator_pb2.GuardedOperationRequest) -> str:
    used = len(verdict.acknowledged_used)
    base = "consistent" if not used else f"acknowledged {used} discrepancy(ies)"
    return f"{base}; fingerprint {'checked' if request.expected_fingerprint else 'not given'}"
