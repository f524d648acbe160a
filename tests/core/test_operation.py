"""The operation lifecycle on plain values: the transition table row by row, the step rules as named tests, then
hypothesis (as h2's test_state_machines.py does): any sequence of events gives a legal record or IllegalTransition.

Row tests do not read TRANSITIONS: LEGAL below restates the table from docs/design.md and the module's rules.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memberguard.v1 import operation_pb2

from coordinator.core.model import Member
from coordinator.core.operation import (
    MAX_TEXT,
    Abandon,
    Audit,
    Event,
    IllegalTransition,
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
    next_step,
    next_steps,
    remaining_deferred,
    undo_order,
)
from coordinator.core.plan import (
    COORDINATOR,
    FenceNode,
    ForgetMember,
    RemoveMemberRow,
    RemoveRaftEntry,
    RemoveTruststoreRecord,
)

S = OperationState
_LETTER = {
    "P": StepState.PENDING,
    "S": StepState.SENT,
    "D": StepState.DONE,
    "U": StepState.UNDONE,
    "K": StepState.SKIPPED,
}


def record(
    steps: str = "PPP",
    commit: int | None = 1,
    state: OperationState = S.QUEUED,
    error: str = "",
    plan: str = "",
    updated_at: float = 100.0,
) -> OperationRecord:
    """A join of n4 whose steps are written one letter each (P pending, S sent, D done, U undone, K skipped); commit
    marks a step."""
    return OperationRecord(
        id="op-1",
        kind=OperationKind.JOIN,
        member=Member(name="n4", address="10.0.0.4:9000"),
        state=state,
        steps=tuple(
            Step(
                f"step {i}",
                commit_point=i == commit,
                state=_LETTER[letter],
                finished_at=None if letter in "PS" else updated_at,
            )
            for i, letter in enumerate(steps)
        ),
        error=error,
        plan=plan,
        audit=Audit(
            requested_by="join token",
            certificate_fingerprint="ab" * 32,
            request_id="r1",
            verdict="consistent",
            fingerprint="cd" * 32,
        ),
        epoch=1,
        created_at=updated_at,
        updated_at=updated_at,
    )


def letters(r: OperationRecord) -> str:
    return "".join({v: k for k, v in _LETTER.items()}[step.state] for step in r.steps)


def run(r: OperationRecord, *events: Event, now: float = 200.0) -> OperationRecord:
    for event in events:
        r = apply(r, event, now)
    return r


# --- the table, row by row ------------------------------------------------------------------------------------------

LEGAL: dict[tuple[OperationState, type[Event]], OperationState] = {
    (S.QUEUED, Start): S.RUNNING,
    (S.QUEUED, RollBack): S.ROLLED_BACK,  # dropped before it ran: its guard refused it or its deadline passed
    (S.RUNNING, StepSent): S.RUNNING,
    (S.RUNNING, StepDone): S.RUNNING,
    (S.RUNNING, StepUndone): S.RUNNING,
    (S.RUNNING, StepSkipped): S.RUNNING,
    (S.RUNNING, Succeed): S.SUCCEEDED,
    (S.RUNNING, RollBack): S.ROLLED_BACK,
    (S.RUNNING, Park): S.PARKED,
    (S.PARKED, Resume): S.RUNNING,
    (S.PARKED, Abandon): S.ABANDONED,  # an operator ends it; whether it may is core/recovery.py's rule
}
EVENT_TYPES: list[type[Event]] = [
    Start,
    StepSent,
    StepDone,
    StepUndone,
    StepSkipped,
    Succeed,
    RollBack,
    Park,
    Resume,
    Abandon,
]


def ready(state: OperationState, event_type: type[Event]) -> tuple[OperationRecord, Event]:
    """A record in state whose steps satisfy the step rules for event_type as far as the state allows, and the event:
    so a refusal in the row test comes from the table, not from the steps."""
    steps = {
        S.QUEUED: "PPP",
        S.SUCCEEDED: "DDD",
        S.ROLLED_BACK: "UPP",
        S.ABANDONED: "DPP",
    }.get(state, {Succeed: "DDD", RollBack: "UPP"}.get(event_type, "DPP"))
    error, plan = {
        S.PARKED: ("stuck", "bring n4 back"),
        S.ROLLED_BACK: ("gone", ""),
        S.ABANDONED: ("abandoned by ops: gone for good", "bring n4 back"),
    }.get(state, ("", ""))
    r = record(steps, state=state, error=error, plan=plan)
    events: dict[type[Event], Event] = {
        Start: Start(),
        StepSent: StepSent(next_step(r) or 0),
        StepDone: StepDone(next_step(r) or 0),
        StepUndone: StepUndone((undo_order(r) or [0])[0]),
        StepSkipped: StepSkipped((undo_order(r) or [0])[0]),
        Abandon: Abandon("abandoned by ops: n4 is gone for good"),
        Succeed: Succeed(),
        RollBack: RollBack("the joiner's engine did not start"),
        Park: Park("the joiner does not answer", "bring n4 back, or force-remove it"),
        Resume: Resume(),
    }
    return r, events[event_type]


@pytest.mark.parametrize("state", list(S), ids=lambda state: state.name)
@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_table_row(state: OperationState, event_type: type[Event]) -> None:
    r, event = ready(state, event_type)
    expected = LEGAL.get((state, event_type))
    if expected is None:
        with pytest.raises(IllegalTransition) as raised:
            apply(r, event, 200.0)
        assert (raised.value.state, raised.value.event) == (state, event)
        assert state.name in str(raised.value) and type(event).__name__ in str(raised.value)
    else:
        assert apply(r, event, 200.0).state is expected


# --- the step rules -------------------------------------------------------------------------------------------------


def test_a_join_runs_forward_to_success() -> None:
    done = run(record(), Start(), StepDone(0), StepDone(1), StepDone(2), Succeed())
    assert (done.state, letters(done), done.error, done.plan) == (S.SUCCEEDED, "DDD", "", "")
    assert all(step.finished_at == 200.0 for step in done.steps)


def test_steps_complete_in_order() -> None:
    r = run(record(), Start())
    for index in (1, 2):
        with pytest.raises(IllegalTransition, match="the next one is step 0"):
            apply(r, StepDone(index), 200.0)
    r = apply(r, StepDone(0), 200.0)
    with pytest.raises(IllegalTransition, match="the next one is step 1"):
        apply(r, StepDone(0), 200.0)  # done already: recording it twice is a bug, not a retry


def test_every_step_done_leaves_nothing_to_apply() -> None:
    with pytest.raises(IllegalTransition, match="every step is done"):
        apply(record("DDD", state=S.RUNNING), StepDone(2), 200.0)


@pytest.mark.parametrize("index", [-1, 3])
def test_a_step_out_of_range_is_refused(index: int) -> None:
    for event in (StepDone(index), StepUndone(index)):
        with pytest.raises(IllegalTransition, match=f"there is no step {index}"):
            apply(record("DPP", state=S.RUNNING), event, 200.0)


def test_rollback_before_the_commit_point_reverses_every_step_that_may_have_been_applied() -> None:
    r = record("DDSP", commit=2, state=S.RUNNING)
    assert not committed(r) and undo_order(r) == [2, 1, 0]  # the sent commit step may have been applied
    with pytest.raises(IllegalTransition, match=re.escape("steps [2, 1, 0] may still be applied")):
        apply(r, RollBack("fencing n4 failed"), 200.0)
    # The order is the recovery core's (a gone joiner's trust is revoked first): the lifecycle takes any.
    r = run(r, StepUndone(0))
    assert (letters(r), undo_order(r)) == ("UDSP", [2, 1])
    with pytest.raises(IllegalTransition, match="it is rolling back"):
        apply(r, StepDone(2), 200.0)  # the forward path is abandoned once a step is undone
    r = run(r, StepSkipped(2), StepUndone(1), RollBack("fencing n4 failed"))
    assert (r.state, letters(r), r.error) == (S.ROLLED_BACK, "UUKP", "fencing n4 failed")


def test_a_step_is_sent_before_it_is_done_and_a_sent_step_is_still_next() -> None:
    r = run(record(), Start(), StepSent(0))
    assert (letters(r), next_step(r), r.steps[0].finished_at) == ("SPP", 0, None)
    r = run(r, StepSent(0))  # re-sent after a crash: still the same step
    with pytest.raises(IllegalTransition, match="the next one is step 0"):
        apply(r, StepSent(1), 200.0)
    r = run(r, StepDone(0))
    assert (letters(r), next_step(r)) == ("DPP", 1)


def test_undoing_needs_a_step_done_or_sent() -> None:
    with pytest.raises(IllegalTransition, match="neither done nor sent"):
        apply(record("UPP", state=S.RUNNING), StepUndone(0), 200.0)
    with pytest.raises(IllegalTransition, match="neither done nor sent"):
        apply(record("DPP", state=S.RUNNING), StepSkipped(1), 200.0)


def test_past_the_commit_point_an_operation_only_goes_forward() -> None:
    r = record("DDP", commit=1, state=S.RUNNING)
    assert committed(r) and undo_order(r) == []
    for event in (RollBack("the leader changed"), StepUndone(1), StepUndone(0)):
        with pytest.raises(IllegalTransition, match="its commit point is done: it only goes forward"):
            apply(r, event, 200.0)
    assert run(r, StepDone(2), Succeed()).state is S.SUCCEEDED


def test_an_operation_without_a_commit_point_can_roll_back_until_it_succeeds() -> None:
    r = record("DDD", commit=None, state=S.RUNNING)
    assert not committed(r) and undo_order(r) == [2, 1, 0]
    assert run(r, StepUndone(2), StepUndone(1), StepUndone(0), RollBack("revoked")).state is S.ROLLED_BACK


def test_succeed_requires_every_step_done() -> None:
    with pytest.raises(IllegalTransition, match=re.escape("steps [2] are not done")):
        apply(record("DDP", state=S.RUNNING), Succeed(), 200.0)


def test_a_queued_operation_rolls_back_without_running() -> None:
    r = apply(record(), RollBack("its caller's deadline passed in the queue"), 200.0)
    assert (r.state, letters(r), r.error) == (S.ROLLED_BACK, "PPP", "its caller's deadline passed in the queue")


def test_park_then_resume_counts_attempts_and_keeps_the_cause() -> None:
    r = run(record("DDP", state=S.RUNNING), Park("n4 does not answer", "bring n4 back, or force-remove it"))
    assert (r.state, r.error, r.plan, r.attempts) == (
        S.PARKED,
        "n4 does not answer",
        "bring n4 back, or force-remove it",
        1,
    )
    assert next_step(r) == 2  # what the reconciler would do once it resumes
    for event in (StepDone(2), RollBack("no"), Park("again", "again"), Succeed()):
        with pytest.raises(IllegalTransition, match="from PARKED"):
            apply(r, event, 200.0)
    r = apply(r, Resume(), 300.0)
    assert (r.state, r.error, r.plan, r.updated_at) == (S.RUNNING, "n4 does not answer", "", 300.0)
    for _ in range(1000):  # a reconciler pass every 2 s for half an hour: the record does not grow
        r = run(r, Park("n4 does not answer", "bring n4 back"), Resume())
    assert (r.attempts, r.error) == (1001, "n4 does not answer")
    r = run(r, StepDone(2), Succeed())
    assert (r.state, r.error) == (S.SUCCEEDED, "")


def test_errors_and_plans_are_bounded() -> None:
    r = run(record("DDP", state=S.RUNNING), Park("x" * 100_000, "y" * 100_000))
    assert len(r.error) < MAX_TEXT + 40 and len(r.plan) < MAX_TEXT + 40 and "more characters" in r.error


def test_an_abandoned_operation_is_final_and_keeps_its_steps() -> None:
    r = run(record("DSP", state=S.PARKED, error="stuck", plan="bring n4 back"), Abandon("abandoned by ops: gone"))
    assert (r.state, letters(r), r.error) == (S.ABANDONED, "DSP", "abandoned by ops: gone")
    assert r.state.finished and next_step(r) is None and undo_order(r) == []


def test_a_finished_operation_accepts_nothing() -> None:
    for r in (
        record("DDD", state=S.SUCCEEDED),
        record("UUP", state=S.ROLLED_BACK, error="gone"),
        record("DPP", state=S.ABANDONED, error="abandoned by ops"),
    ):
        assert next_step(r) is None and undo_order(r) == []
        for event_type in EVENT_TYPES:
            with pytest.raises(IllegalTransition, match="it is finished"):
                apply(r, ready(S.RUNNING, event_type)[1], 200.0)


def _deferring(steps: str, state: OperationState, deferred: str) -> OperationRecord:
    """record(steps, state) whose steps marked "d" in deferred are deferred (step 0 is the commit point)."""
    r = record(steps, commit=0, state=state)
    marked = tuple(replace(step, deferred=mark == "d") for step, mark in zip(r.steps, deferred, strict=True))
    return replace(r, steps=marked)


def test_a_removal_goes_forward_and_succeeds_without_its_deferred_steps() -> None:
    r = _deferring("DDPP", S.RUNNING, "..dd")
    assert next_step(r) is None and remaining_deferred(r) == []
    r = run(r, Succeed())
    assert r.state is S.SUCCEEDED and remaining_deferred(r) == [2, 3]
    # Out of order and one at a time, each when its node answers; a node gone for good is skipped.
    r = run(r, StepSent(3), StepDone(3), StepSent(2), StepSkipped(2))
    assert (r.state, letters(r), remaining_deferred(r)) == (S.SUCCEEDED, "DDKD", [])
    with pytest.raises(IllegalTransition, match="it is finished"):
        apply(r, StepSent(3), 300.0)


def test_a_running_operation_never_sends_a_deferred_step() -> None:
    r = _deferring("DPP", S.RUNNING, "..d")
    assert next_step(r) == 1
    with pytest.raises(IllegalTransition, match="deferred"):
        apply(r, StepSent(2), 200.0)
    with pytest.raises(IllegalTransition, match="steps go forward in order"):
        apply(_deferring("DPPP", S.RUNNING, "...d"), StepSent(2), 200.0)


def test_a_succeeded_operation_accepts_events_of_its_deferred_steps_only() -> None:
    r = _deferring("DDP", S.SUCCEEDED, "..d")
    for event in (StepSent(1), StepDone(1), StepSkipped(1), StepUndone(2), Park("x", "y"), RollBack("x"), Succeed()):
        with pytest.raises(IllegalTransition):
            apply(r, event, 200.0)
    assert letters(run(r, StepSent(2))) == "DDS"


def test_a_deferred_step_follows_the_commit_point() -> None:
    with pytest.raises(ValueError, match="deferred"):
        _deferring("PPP", S.QUEUED, "d..")
    with pytest.raises(ValueError, match="deferred"):
        replace(record("PP", commit=None), steps=(Step("a", False), Step("b", False, deferred=True)))


def test_every_event_bumps_updated_at_and_a_clock_set_back_does_not_move_it_back() -> None:
    r = apply(record(updated_at=100.0), Start(), 150.0)
    assert r.updated_at == 150.0
    r = apply(r, StepDone(0), 120.0)  # the clock went back
    assert r.updated_at == 150.0 and r.steps[0].finished_at == 150.0
    assert r.created_at == 100.0


def test_rollback_and_park_must_say_why() -> None:
    with pytest.raises(ValueError, match="must say why"):
        RollBack("")
    with pytest.raises(ValueError, match="must say why"):
        Park("stuck", "")


def test_an_operation_has_one_commit_point_at_most() -> None:
    r = record()
    with pytest.raises(ValueError, match="more than one commit point"):
        OperationRecord(**{**vars(r), "steps": (Step("a", True), Step("b", True))})


@pytest.mark.parametrize(
    ("core", "proto", "prefix"),
    [
        (OperationKind, operation_pb2.OperationKind, "OPERATION_KIND_"),
        (OperationState, operation_pb2.OperationState, "OPERATION_STATE_"),
        (StepState, operation_pb2.StepState, "STEP_STATE_"),
    ],
)
def test_enums_carry_the_proto_numbers(core: type, proto: object, prefix: str) -> None:
    proto_values = {
        name.removeprefix(prefix): number
        for name, number in proto.items()  # type: ignore[attr-defined]
        if number != 0
    }
    assert {member.name: member.value for member in core} == proto_values  # type: ignore[attr-defined]


# --- properties -----------------------------------------------------------------------------------------------------


def invariant_violations(r: OperationRecord) -> list[str]:
    """What no reachable record may show (the module docstring's rules, restated as checks on one record)."""
    found = []
    text = letters(r)
    if not re.fullmatch("[DSUK]*P*", text) or text.count("S") > 1:
        found.append(f"steps out of order: {text}")
    if not set(text) & set("UK") and not re.fullmatch("D*S?P*", text):
        found.append(f"steps out of order going forward: {text}")
    if r.state is S.SUCCEEDED and "D" * len(r.steps) != text:
        found.append("succeeded with a step not done")
    if r.state is S.ROLLED_BACK and set(text) & set("DS"):
        found.append("rolled back with a step that may still be applied")
    if committed(r) and set(text) & set("UK"):
        found.append("a step undone in a committed operation")
    if r.state is S.QUEUED and set(text) - {"P"}:
        found.append("a queued operation with a step that ran")
    if r.state in (S.ROLLED_BACK, S.PARKED, S.ABANDONED) and not r.error:
        found.append(f"no error when {r.state.name}")
    if r.state in (S.QUEUED, S.SUCCEEDED) and (r.error or r.plan):
        found.append(f"error {r.error!r} or plan {r.plan!r} when {r.state.name}")
    if (bool(r.plan) and r.state not in (S.PARKED, S.ABANDONED)) or (r.state is S.PARKED and not r.plan):
        found.append(f"plan {r.plan!r} when {r.state.name}")
    if any((step.finished_at is None) != (step.state in (StepState.PENDING, StepState.SENT)) for step in r.steps):
        found.append("finished_at set on a pending step or missing on a finished one")
    return found


@st.composite
def fresh_records(draw: st.DrawFn) -> OperationRecord:
    size = draw(st.integers(0, 5))
    commit = draw(st.none() | st.integers(0, max(0, size - 1)))
    return record("P" * size, commit=commit, updated_at=draw(st.floats(0, 1e6)))


# An event is drawn as (type, index, now) before the record it applies to is known: one list per example keeps the
# encoding small. Lists hold at least 20 draws, as hypothesis keeps them short unless told (each prefix is checked
# anyway). Step events and Start are drawn more often than the others, and the index None means "the one the rules
# expect next", so that sequences reach deep states (a long operation succeeding, a rollback after several steps)
# before an event ends them.
EVENT_DRAWS = st.tuples(
    st.sampled_from(
        [StepSent] * 4
        + [StepDone] * 5
        + [StepUndone] * 2
        + [Start] * 3
        + [StepSkipped, Succeed, RollBack, Park, Resume, Abandon]
    ),
    st.sampled_from([None] * 4 + list(range(-1, 6))),
    st.floats(0, 2e6),
)


def event_from(r: OperationRecord, event_type: type[Event], index: int | None) -> Event:
    if event_type in (StepSent, StepDone):
        return event_type(next_step(r) or 0 if index is None else index)  # type: ignore[call-arg]
    if event_type in (StepUndone, StepSkipped):
        return event_type((undo_order(r) or [0])[0] if index is None else index)  # type: ignore[call-arg]
    # What an error or a plan says does not matter here, only that it says something.
    others: dict[type[Event], Event] = {
        Start: Start(),
        Succeed: Succeed(),
        RollBack: RollBack("failed"),
        Park: Park("stuck", "wait"),
        Resume: Resume(),
        Abandon: Abandon("abandoned by ops"),
    }
    return others[event_type]


@given(fresh_records(), st.lists(EVENT_DRAWS, min_size=20, max_size=60))
@settings(max_examples=500)  # deep states are a small share of the draws
def test_any_event_sequence_yields_a_legal_record_or_illegal_transition(
    r: OperationRecord, draws: list[tuple[type[Event], int | None, float]]
) -> None:
    assert invariant_violations(r) == []
    for event_type, index, now in draws:
        event = event_from(r, event_type, index)
        try:
            after = apply(r, event, now)
        except IllegalTransition as refused:
            assert (refused.state, refused.event) == (r.state, event)
            continue
        assert not r.state.finished, "a finished operation accepted an event"
        assert invariant_violations(after) == [], (r, event, after)
        assert after.updated_at == max(r.updated_at, now)
        assert committed(after) or not committed(r)
        assert (after.id, after.kind, after.audit, after.created_at) == (r.id, r.kind, r.audit, r.created_at)
        assert [(s.name, s.commit_point) for s in after.steps] == [(s.name, s.commit_point) for s in r.steps]
        r = after


@given(fresh_records())
def test_every_fresh_operation_can_succeed_and_can_roll_back(r: OperationRecord) -> None:
    started = apply(r, Start(), 0.0)
    forward = started
    while (index := next_step(forward)) is not None:
        forward = apply(apply(forward, StepSent(index), 0.0), StepDone(index), 0.0)
    assert apply(forward, Succeed(), 0.0).state is S.SUCCEEDED
    back = started
    while (index := next_step(back)) is not None and not back.steps[index].commit_point:
        back = apply(back, StepDone(index), 0.0)
    for index in undo_order(back):
        back = apply(back, StepUndone(index), 0.0)
    assert apply(back, RollBack("stopped"), 0.0).state is S.ROLLED_BACK


# --- steps that go together -----------------------------------------------------------------------------------------


def _removal(commit: int = 0) -> OperationRecord:
    """A running removal of n4 as plan_removal writes it: Raft entry (the commit point) and row through n1, n4 out of
    each truststore, n4 fenced, then forgotten by the coordinator."""
    actions = [
        ("n1", RemoveRaftEntry(4, "10.0.0.4:9000", None)),
        ("n1", RemoveMemberRow("n4")),
        *((node, RemoveTruststoreRecord("n4")) for node in ("n1", "n2", "n3", "n4")),
        ("n4", FenceNode()),
        (COORDINATOR, ForgetMember("n4")),
    ]
    r = record("P" * len(actions), commit=commit, state=S.RUNNING)
    steps = tuple(replace(s, target=t, action=a) for s, (t, a) in zip(r.steps, actions, strict=True))
    return replace(r, steps=steps)


def test_past_the_commit_point_truststore_steps_on_distinct_nodes_go_together() -> None:
    r = _removal()
    assert next_steps(r) == (0,)
    r = run(r, StepSent(0), StepDone(0))
    assert next_steps(r) == (1,)  # the row goes through n1 alone
    r = run(r, StepSent(1), StepDone(1))
    assert next_steps(r) == (2, 3, 4, 5)
    r = run(r, StepSent(2), StepSent(3), StepSent(4), StepSent(5), StepDone(4), StepDone(2))
    assert (letters(r), next_steps(r)) == ("DDDSDSPP", (3, 5))
    with pytest.raises(IllegalTransition, match="the next are steps 3, 5, together"):
        apply(r, StepSent(6), 200.0)  # the fence waits for every truststore
    r = run(r, StepDone(5), StepDone(3))
    assert next_steps(r) == (6,)
    r = run(r, StepDone(6))
    assert next_steps(r) == (7,)  # the coordinator's own step never goes with another


def test_before_the_commit_point_steps_go_one_at_a_time() -> None:
    # A join's trust steps come before its commit point: a rollback undoes them in order, so none goes with another.
    r = _removal(commit=6)
    r = run(r, StepSent(0), StepDone(0), StepSent(1), StepDone(1))
    assert next_steps(r) == (2,)
    with pytest.raises(IllegalTransition, match="the next one is step 2"):
        apply(r, StepSent(3), 200.0)


def test_a_node_that_comes_twice_ends_the_steps_that_go_together() -> None:
    r = _removal()
    steps = list(r.steps)
    steps[4] = replace(steps[4], target="n2")  # n2's truststore twice: the second waits for the first
    r = run(replace(r, steps=tuple(steps)), StepSent(0), StepDone(0), StepSent(1), StepDone(1))
    assert next_steps(r) == (2, 3)


_TARGETS = ("n1", "n2", "n3", COORDINATOR)


@st.composite
def running_plans(draw: st.DrawFn) -> OperationRecord:
    """A running operation of up to 7 steps, each a truststore step or another kind, on a drawn node."""
    size = draw(st.integers(1, 7))
    r = record("P" * size, commit=draw(st.none() | st.integers(0, size - 1)), state=S.RUNNING)
    steps = []
    for step in r.steps:
        target = draw(st.sampled_from(_TARGETS))
        trust = target != COORDINATOR and draw(st.booleans())
        action = RemoveTruststoreRecord("n4") if trust else RemoveMemberRow("n4")
        steps.append(replace(step, target=target, action=action))
    return replace(r, steps=tuple(steps))


@given(running_plans(), st.lists(st.tuples(st.sampled_from([StepSent, StepDone]), st.integers(0, 6)), max_size=40))
@settings(max_examples=300)
def test_steps_that_go_together_are_independent_truststore_steps_past_the_commit_point(
    r: OperationRecord, draws: list[tuple[type[StepSent | StepDone], int]]
) -> None:
    """Whatever the order of sends and completions, only the steps next_steps names are ever in flight, and those
    are one step, or truststore steps past the commit point on distinct nodes."""
    for event_type, pick in draws:
        batch = next_steps(r)
        if not batch:
            break
        assert len(batch) == 1 or (
            committed(r)
            and len({r.steps[i].target for i in batch}) == len(batch)
            and all(isinstance(r.steps[i].action, RemoveTruststoreRecord) for i in batch)
        ), (letters(r), batch)
        r = apply(r, event_type(batch[pick % len(batch)]), 200.0)
        first = next_step(r)
        beyond = [
            i for i, s in enumerate(r.steps) if first is not None and i > first and s.state is not StepState.PENDING
        ]
        if first is not None and beyond:
            # What went ahead of the first step not done went with it.
            span = r.steps[first : max(beyond) + 1]
            assert committed(r) and all(isinstance(s.action, RemoveTruststoreRecord) for s in span), letters(r)
            assert len({s.target for s in span}) == len(span), letters(r)
    assert committed(r) or len([s for s in r.steps if s.state is StepState.SENT]) <= 1
