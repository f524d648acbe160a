"""WatchMembership's I/O side: one coordinator's watchers, the states of the diff they are sent, and each one's queue.

Every check that may move an alert publishes its diff here (service.py, `CoordinatorServicer.check`): the background
check, which runs every metrics_interval seconds while anyone watches, and, while anyone does, SETTLE after an agent
tells that its files changed; and every caller's that gave the agents their full time. There is no gather of the
watch's own, so N watchers cost the gathers of one. A diff that a watcher has seen already (the same resume token,
coordinator/core/watch.py) costs one comparison per watcher; a new one is rendered, its change computed and written
to the state file once, however many watch.

Publishing never waits for a watcher. Each has a queue of at most QUEUE_LIMIT states; one that overflows is emptied and
marked behind, and no more is queued for it: when its stream is read again, it is sent one snapshot of the diff current
then (SNAPSHOT_REASON_FELL_BEHIND), which takes the place of everything it missed. What a stream that nobody reads
holds is bounded by that queue and by HTTP/2 flow control.

The history keeps the last HISTORY_LIMIT distinct states in the order they were found, each with the change from the
one before it, so that a stream resuming from a token found there is sent the changes after that token's last
occurrence, exactly as a stream that never ended would have been. The newest state is also kept in the state file
(written before any stream is sent its token), so that a client resumes across a restart of the coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from google.protobuf.message import DecodeError
from memberguard.v1 import coordinator_pb2
from memberguard.v1 import membership_pb2 as pb

from coordinator.core.model import MembershipDiff, Severity
from coordinator.core.watch import Change, Seen, Transition, change, resume_token
from coordinator.files import write_atomically
from coordinator.messages import diff_to_proto

log = logging.getLogger("memberguard.watch")

HISTORY_LIMIT = 64
QUEUE_LIMIT = 16
SETTLE = 0.01  # seconds from an agent's notice to the check it wakes

Response = coordinator_pb2.WatchMembershipResponse
Reason: TypeAlias = coordinator_pb2.SnapshotReason.ValueType


@dataclass(frozen=True)
class _State:
    """A diff as the watch served it: its token, what a watcher saw of it, the diff as rendered when it was found, and
    the change from the state before it in the history (None for the first: only a snapshot ever shows it)."""

    token: str
    seen: Seen
    diff: pb.MembershipDiff
    change: coordinator_pb2.MembershipChange | None


class _Watcher:
    """One stream's place in the watch."""

    def __init__(self, given: str, owed: Reason | None) -> None:
        # The token of the last state queued or sent to it: a state with the same token has nothing new for it.
        self.given = given
        # The snapshot it is owed once the next check is in: it subscribed when no diff was fresh enough to send.
        self.owed = owed
        self.queue: deque[_State] = deque()
        self.behind = False
        self.wake = asyncio.Event()

    def offer(self, state: _State) -> None:
        if self.behind or (self.owed is None and state.token == self.given):
            return
        if len(self.queue) >= QUEUE_LIMIT:
            self.queue.clear()
            self.behind = True
        else:
            self.queue.append(state)
            self.given = state.token
        self.wake.set()


class Watchers:
    """The watch of one coordinator. interval is how old the last check may be for a new stream to be sent its diff
    (metrics_interval); an older one, or none, wakes the background check (`until_wanted`)."""

    def __init__(self, interval: float, state_file: Path) -> None:
        self._interval = interval
        self._state_file = state_file
        self._watchers: set[_Watcher] = set()
        self._history: deque[_State] = deque(maxlen=HISTORY_LIMIT)
        restored = _read_state(state_file)
        if restored is not None:
            self._history.append(restored)
        self._current: MembershipDiff | None = None  # the last published diff
        self._rendered: pb.MembershipDiff | None = None  # _current as a message, once something needed it
        self._checked_at: float | None = None  # when it was published (monotonic)
        self._wanted = asyncio.Event()

    @property
    def watched(self) -> bool:
        return bool(self._watchers)

    async def until_wanted(self, timeout: float, changed: asyncio.Event) -> None:
        """Returns after timeout seconds, as soon as a new stream wants a fresher diff than the last check's, or,
        while anyone watches, SETTLE after `changed` is set (an agent told of a change: the agents' own writes come
        in bursts, a file and its directory, a step on several nodes, and one check after the burst sees them all)."""
        waits = [asyncio.ensure_future(self._wanted.wait()), asyncio.ensure_future(self._told(changed))]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._wanted.clear()

    async def _told(self, changed: asyncio.Event) -> None:
        while True:
            await changed.wait()
            if self.watched:
                await asyncio.sleep(SETTLE)
                return
            changed.clear()  # nobody to tell: the next check, at its interval, sees it all the same

    def publish(self, diff: MembershipDiff) -> None:
        """Hands a check's diff to every stream; never waits."""
        self._current, self._rendered, self._checked_at = diff, None, time.monotonic()
        seen = Seen.of(diff)
        token = resume_token(seen)
        if not self._history or self._history[-1].token != token:
            self._rendered = diff_to_proto(diff)
            self._add(token, seen, self._rendered)
        latest = self._history[-1]
        for watcher in self._watchers:
            watcher.offer(latest)

    def _add(self, token: str, seen: Seen, diff: pb.MembershipDiff) -> None:
        message = None
        if self._history:
            before = self._history[-1]
            found = change(before.seen, seen)
            message = None if found is None else _change(found, before.diff, diff)
        state = _State(token, seen, diff, message)
        try:
            write_atomically(self._state_file, state.diff.SerializeToString())
        except OSError:
            # Only a resume across a restart needs the file; the streams need only memory.
            log.exception("could not keep the watch's state in %s; a restart will not resume watches", self._state_file)
        self._history.append(state)

    async def watch(self, token: str, heartbeat: float) -> AsyncIterator[Response]:
        """One stream: where it starts (see the module docstring), then what every check brings, with a heartbeat
        after heartbeat seconds of quiet. The responses carry no header."""
        fresh = self._checked_at is not None and time.monotonic() - self._checked_at < self._interval
        if not fresh or not self._watchers:
            # The first watcher also wants the agents told to send notices, which the next check's reads ask for.
            self._wanted.set()
        replay = self._since(token) if token else None
        reason = coordinator_pb2.SNAPSHOT_REASON_SUBSCRIBED
        if token:
            reason = coordinator_pb2.SNAPSHOT_REASON_RESUME_TOKEN_UNKNOWN
        first: list[Response] = []
        if replay is not None:
            watcher = _Watcher(self._history[-1].token, None)
            first.append(Response(resume_token=token, resumed=coordinator_pb2.WatchResumed(changes_since=len(replay))))
            first += [Response(resume_token=state.token, change=state.change) for state in replay]
        elif fresh:
            watcher = _Watcher(self._history[-1].token, None)
            first.append(self._snapshot(reason))
        else:
            watcher = _Watcher("", reason)
        # Registered in the same step as its start was decided: no check can fall between the two.
        self._watchers.add(watcher)
        try:
            for response in first:
                yield response
            while True:
                yield await self._next(watcher, heartbeat)
        finally:
            self._watchers.discard(watcher)

    def _since(self, token: str) -> list[_State] | None:
        """The states after token's last occurrence in the history, oldest first; None when the history lacks it."""
        states = list(self._history)
        for index in range(len(states) - 1, -1, -1):
            if states[index].token == token:
                return states[index + 1 :]
        return None

    async def _next(self, watcher: _Watcher, heartbeat: float) -> Response:
        while not (watcher.behind or watcher.queue):
            watcher.wake.clear()
            try:
                async with asyncio.timeout(heartbeat):
                    await watcher.wake.wait()
            except TimeoutError:
                beat = coordinator_pb2.WatchHeartbeat()
                if self._current is not None:
                    beat.last_checked_at.FromNanoseconds(int(self._current.observed_at * 1e9))
                return Response(resume_token=watcher.given, heartbeat=beat)
        if watcher.behind or watcher.owed is not None:
            reason = coordinator_pb2.SNAPSHOT_REASON_FELL_BEHIND if watcher.behind else watcher.owed
            assert reason is not None
            watcher.queue.clear()
            watcher.behind, watcher.owed, watcher.given = False, None, self._history[-1].token
            return self._snapshot(reason)
        state = watcher.queue.popleft()
        # A stream is offered the history's first state only while it is owed a snapshot, which replaced it above.
        assert state.change is not None
        return Response(resume_token=state.token, change=state.change)

    def _snapshot(self, reason: Reason) -> Response:
        assert self._current is not None, "a snapshot is sent only once a check has published"
        if self._rendered is None:
            self._rendered = diff_to_proto(self._current)
        snapshot = coordinator_pb2.WatchSnapshot(reason=reason, diff=self._rendered)
        return Response(resume_token=self._history[-1].token, snapshot=snapshot)


def _change(found: Change, before: pb.MembershipDiff, after: pb.MembershipDiff) -> coordinator_pb2.MembershipChange:
    held = {d.id: d for d in after.discrepancies}
    held_before = {d.id: d for d in before.discrepancies}
    return coordinator_pb2.MembershipChange(
        fingerprint=found.fingerprint,
        previous_fingerprint=found.previous_fingerprint,
        discrepancies=[
            coordinator_pb2.DiscrepancyChange(
                discrepancy_id=c.id,
                transition=coordinator_pb2.DiscrepancyTransition.ValueType(c.transition),
                discrepancy=held_before[c.id] if c.transition is Transition.CLEARED else held[c.id],
                previous_severity=pb.Severity.ValueType(c.before or 0),
            )
            for c in found.discrepancies
        ],
        members=after.members,
        nodes=after.nodes,
        observed_at=after.observed_at,
    )


def _read_state(path: Path) -> _State | None:
    """The state the state file keeps, or None when there is none that this coordinator can read."""
    try:
        diff = pb.MembershipDiff.FromString(path.read_bytes())
        seen = Seen(diff.fingerprint, {d.id: Severity(d.severity) for d in diff.discrepancies})
    except FileNotFoundError:
        return None
    except (OSError, DecodeError, ValueError):
        # A torn or foreign file only costs the streams that resume from it a snapshot.
        log.warning("the watch's state file %s is unreadable; watches resumed from it start over", path, exc_info=True)
        return None
    return _State(resume_token(seen), seen, diff, None)
