"""The lifecycle of a guarded operation and of its steps, as data (DESIGN.md, "Operations" and "The journal and
recovery").

An operation is a journaled list of idempotent steps. `apply(record, event, now)` is the only way a record changes:
it returns the next record or raises IllegalTransition. Everything that decides whether an event is legal lives in
this module, in two places read together: TRANSITIONS ((state, event) → state) and `_refusal` (what the steps must
look like for a transition the table allows). The rules they encode:

- A record is journaled QUEUED (waiting for the membership lock) with every step PENDING; Start makes it RUNNING.
- Steps complete in order: StepDone(i) is legal only for the first PENDING step, so DONE steps are always a prefix.
- Once the commit-point step is DONE the operation only goes forward: RollBack and every StepUndone are illegal.
  (DESIGN.md: roll back before the commit point, forward after it; a committed join cannot be unjoined by undoing.)
- Before it, a rollback undoes the DONE steps in reverse order (StepUndone(i) only for the last DONE step), then
  RollBack(error) records the outcome; RollBack is illegal while any step is still DONE. Once a step is undone the
  operation is rolling back and StepDone is illegal. So the steps, read in order, always match DONE* UNDONE* PENDING*.
- A QUEUED operation may be rolled back before it starts (its guard refused it, or its caller's deadline passed).
- Park(error, plan) sets aside a RUNNING operation that can neither finish nor roll back now; it stays visible and
  blocks mutations until the reconciler picks it up again with Resume, which makes it RUNNING and clears error and
  plan (the contract: error and plan are empty unless rolled back or parked).
- Succeed requires every step DONE. SUCCEEDED and ROLLED_BACK are final: they accept no event.
- Every applied event sets updated_at to `now`, the caller's clock reading (nothing here reads a clock); a clock set
  back cannot move updated_at back, so updated_at never decreases. A step's finished_at is the same reading.

Pure: the journal (coordinator/journal.py) stores records; the enums carry the protobuf numbers of
protos/memberguard/v1/operation.proto, so adapters convert by number as they do for coordinator/core/model.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import IntEnum
from types import MappingProxyType

from coordinator.core.model import Member
from coordinator.core.plan import COORDINATOR, Action


class OperationKind(IntEnum):
    """What an operation changes (the guard's policy table has one column per kind)."""

    ISSUE_TOKEN = 1
    JOIN = 2
    REMOVE = 3
    FORCE_REMOVE = 4  # the member is broken; what is broken about it may be acknowledged

    @property
    def removes(self) -> bool:
        return self in (OperationKind.REMOVE, OperationKind.FORCE_REMOVE)


class OperationState(IntEnum):
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    ROLLED_BACK = 4
    PARKED = 5

    @property
    def finished(self) -> bool:
        """A finished operation accepts no event; the reconciler looks only at the others."""
        return self in (OperationState.SUCCEEDED, OperationState.ROLLED_BACK)


class StepState(IntEnum):
    PENDING = 1
    DONE = 2
    UNDONE = 3


@dataclass(frozen=True)
class Step:
    """One idempotent step. commit_point marks the step after which the operation rolls forward, never back.

    target and action are what plan.py decided (PlannedStep): who applies the step and what it does. They travel with
    the step into the journal because after a crash the journal is all that is left of the plan, and recovery
    re-sends the remaining steps from it. The lifecycle never reads them.
    """

    name: str
    commit_point: bool
    state: StepState = StepState.PENDING
    finished_at: float | None = None  # seconds since the epoch when it was applied or undone; None while pending
    target: str = COORDINATOR  # the node whose agent applies it; COORDINATOR for the coordinator's own steps
    action: Action | None = None  # None for a step built without a plan: the lifecycle needs none


@dataclass(frozen=True, kw_only=True)
class Audit:
    """Who asked for an operation and what the guard decided (the audit trail)."""

    requested_by: str
    certificate_fingerprint: str
    request_id: str  # the caller's id: a retry with the same id gets this operation back instead of a new one
    verdict: str
    fingerprint: str  # the diff fingerprint the guard decided on
    acknowledged: tuple[str, ...] = ()  # the discrepancy ids the decision relied on


@dataclass(frozen=True, kw_only=True)
class OperationRecord:
    """An operation as the journal holds it. Times are seconds since the epoch."""

    id: str
    kind: OperationKind
    member: Member  # for ISSUE_TOKEN, only the name the token is for
    state: OperationState
    steps: tuple[Step, ...]
    error: str  # why it was rolled back or parked; empty otherwise
    plan: str  # what is left to do: what would clear a parked operation, or what a removal could not reach
    audit: Audit
    epoch: int  # the journal epoch of the coordinator that last wrote it
    created_at: float
    updated_at: float

    def __post_init__(self) -> None:
        # "The" commit point: with two, committed() and the rollback rule would disagree about where it is.
        if sum(step.commit_point for step in self.steps) > 1:
            raise ValueError(f"operation {self.id} has more than one commit point")


# --- events ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """The operation got the membership lock and its guard let it run."""


@dataclass(frozen=True)
class StepDone:
    index: int


@dataclass(frozen=True)
class StepUndone:
    index: int


@dataclass(frozen=True)
class Succeed:
    pass


@dataclass(frozen=True)
class RollBack:
    error: str

    def __post_init__(self) -> None:
        if not self.error:
            raise ValueError("a rollback must say why, in one sentence")


@dataclass(frozen=True)
class Park:
    error: str
    plan: str

    def __post_init__(self) -> None:
        if not (self.error and self.plan):
            raise ValueError("a parked operation must say why, and what would clear it")


@dataclass(frozen=True)
class Resume:
    """The reconciler picks a parked operation up again."""


Event = Start | StepDone | StepUndone | Succeed | RollBack | Park | Resume


class IllegalTransition(Exception):
    """An event that the lifecycle does not allow in the operation's state, or with its steps as they are."""

    def __init__(self, operation_id: str, state: OperationState, event: Event, reason: str) -> None:
        super().__init__(f"operation {operation_id}: {event!r} is illegal when {state.name}: {reason}")
        self.operation_id = operation_id
        self.state = state
        self.event = event
        self.reason = reason


# --- the table ------------------------------------------------------------------------------------------------------

_S = OperationState
__ = None  # illegal: IllegalTransition
_EVENTS: tuple[type[Event], ...] = (Start, StepDone, StepUndone, Succeed, RollBack, Park, Resume)
# fmt: off
_ROWS: dict[OperationState, tuple[OperationState | None, ...]] = {
    #                Start       StepDone    StepUndone  Succeed       RollBack        Park       Resume
    _S.QUEUED:      (_S.RUNNING, __,         __,         __,           _S.ROLLED_BACK, __,        __),
    _S.RUNNING:     (__,         _S.RUNNING, _S.RUNNING, _S.SUCCEEDED, _S.ROLLED_BACK, _S.PARKED, __),
    _S.PARKED:      (__,         __,         __,         __,           __,             __,        _S.RUNNING),
    _S.SUCCEEDED:   (__,         __,         __,         __,           __,             __,        __),
    _S.ROLLED_BACK: (__,         __,         __,         __,           __,             __,        __),
}
# fmt: on

TRANSITIONS: Mapping[tuple[OperationState, type[Event]], OperationState] = MappingProxyType(
    {
        (state, event): new
        for state, row in _ROWS.items()
        for event, new in zip(_EVENTS, row, strict=True)
        if new is not None
    }
)


def apply(record: OperationRecord, event: Event, now: float) -> OperationRecord:
    """The record after event, at the clock reading now; IllegalTransition if the lifecycle does not allow it."""
    new_state = TRANSITIONS.get((record.state, type(event)))
    if new_state is None:
        why = "it is finished" if record.state.finished else f"no {type(event).__name__} from {record.state.name}"
        raise IllegalTransition(record.id, record.state, event, why)
    refusal = _refusal(record, event)
    if refusal is not None:
        raise IllegalTransition(record.id, record.state, event, refusal)
    at = max(record.updated_at, now)
    steps, error, plan = record.steps, record.error, record.plan
    match event:
        case StepDone(index=index):
            steps = _mark(steps, index, StepState.DONE, at)
        case StepUndone(index=index):
            steps = _mark(steps, index, StepState.UNDONE, at)
        case RollBack():
            error = event.error
        case Park():
            error, plan = event.error, event.plan
        case Resume():
            error, plan = "", ""
    return replace(record, state=new_state, steps=steps, error=error, plan=plan, updated_at=at)


def _refusal(record: OperationRecord, event: Event) -> str | None:
    """Why the steps forbid an event the table allows in this state; None when they do not."""
    match event:
        case StepDone(index=index) | StepUndone(index=index) if not 0 <= index < len(record.steps):
            return f"there is no step {index}"
        case StepDone(index=index):
            if any(step.state is StepState.UNDONE for step in record.steps):
                return "it is rolling back: no step is applied any more"
            following = next_step(record)
            if following is None:
                return "every step is done"
            if index != following:
                return f"steps complete in order: the next one is step {following}"
        case StepUndone(index=index):
            if committed(record):
                return "its commit point is done: it only goes forward"
            order = undo_order(record)
            if not order:
                return "no step is done"
            if index != order[0]:
                return f"steps are undone in reverse order: the next one is step {order[0]}"
        case Succeed():
            pending = [i for i, step in enumerate(record.steps) if step.state is not StepState.DONE]
            if pending:
                return f"steps {pending} are not done"
        case RollBack():
            if committed(record):
                return "its commit point is done: it only goes forward"
            order = undo_order(record)
            if order:
                return f"steps {order} are still done: undo them first, in that order"
    return None


def _mark(steps: tuple[Step, ...], index: int, state: StepState, at: float) -> tuple[Step, ...]:
    return (*steps[:index], replace(steps[index], state=state, finished_at=at), *steps[index + 1 :])


# --- what the coordinator and the reconciler ask ---------------------------------------------------------------------


def committed(record: OperationRecord) -> bool:
    """True once the commit-point step is done: from then on the operation only rolls forward."""
    return any(step.commit_point and step.state is StepState.DONE for step in record.steps)


def next_step(record: OperationRecord) -> int | None:
    """The index of the step to apply next; None when the operation is finished, rolling back, or has none left."""
    if record.state.finished or any(step.state is StepState.UNDONE for step in record.steps):
        return None
    return next((i for i, step in enumerate(record.steps) if step.state is StepState.PENDING), None)


def undo_order(record: OperationRecord) -> list[int]:
    """The DONE steps a rollback must undo, last first; empty once committed (nothing is undone then) or finished."""
    if record.state.finished or committed(record):
        return []
    return [i for i in reversed(range(len(record.steps))) if record.steps[i].state is StepState.DONE]
