"""WatchMembership against a real lab: events for a divergence and its repair, in order and across a crash of the
coordinator; who may watch; a subscriber that never reads; thousands opened and dropped; bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from memberguard import (
    AsyncClient,
    AsyncMembershipWatch,
    Client,
    Endpoint,
    InvalidArgument,
    MembershipWatch,
    PermissionDenied,
    Unavailable,
)
from memberguard.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from memberguard.v1 import membership_pb2 as pb

from coordinator.files import write_atomically
from coordinator.lab import lab as labs
from coordinator.pki import make_identity
from coordinator.watch import QUEUE_LIMIT
from tests.restarts import start_coordinator
from tests.settling import settled

# The coordinator's own check runs this often here, so that a change reaches the watchers within a fraction of a second.
SETTINGS = {"metrics_interval": 0.2}
Response = coordinator_pb2.WatchMembershipResponse
SUBSCRIBED = coordinator_pb2.SNAPSHOT_REASON_SUBSCRIBED
UNKNOWN = coordinator_pb2.SNAPSHOT_REASON_RESUME_TOKEN_UNKNOWN
FELL_BEHIND = coordinator_pb2.SNAPSHOT_REASON_FELL_BEHIND
APPEARED = coordinator_pb2.DISCREPANCY_TRANSITION_APPEARED
CLEARED = coordinator_pb2.DISCREPANCY_TRANSITION_CLEARED


@pytest.fixture(scope="module")
def watched(lab: labs.Lab) -> labs.Lab:
    """The module's lab, its coordinator checking every SETTINGS["metrics_interval"] seconds."""
    start_coordinator(lab, {}, SETTINGS)
    return lab


def _record(lab: labs.Lab) -> Path:
    return Path(lab.node("n2")["state_dir"]) / "truststore" / "n3.yaml"


def _diverge(lab: labs.Lab) -> bytes:
    """Deletes n2's truststore record of n3; returns what it held."""
    record = _record(lab)
    held = record.read_bytes()
    record.unlink()
    return held


def _repair(lab: labs.Lab, held: bytes) -> None:
    # Atomically: a check that read the file half written would see an invalid entry, one more event.
    write_atomically(_record(lab), held)


def _event(response: Response) -> str:
    return str(response.WhichOneof("event"))


def _next_event(watch: MembershipWatch, within: float = 10.0) -> Response:
    """The next response that is not a heartbeat (the watches here beat every second, so this never blocks long)."""
    deadline = time.monotonic() + within
    for response in watch:
        if _event(response) != "heartbeat":
            return response
        assert time.monotonic() < deadline, f"nothing but heartbeats for {within:g} s"
    raise AssertionError("the stream ended")


async def _next_async_event(watch: AsyncMembershipWatch) -> Response:
    async with asyncio.timeout(10):
        async for response in watch:
            if _event(response) != "heartbeat":
                return response
    raise AssertionError("the stream ended")


def _transitions(change: coordinator_pb2.MembershipChange) -> list[tuple[str, int]]:
    return [(c.discrepancy_id, c.transition) for c in change.discrepancies]


def _assert_appeared(change: coordinator_pb2.MembershipChange, clean: str, now: pb.MembershipDiff) -> None:
    """change is the deletion of n2's record of n3, as a check made afterwards (now) reports it."""
    assert (change.previous_fingerprint, change.fingerprint) == (clean, now.fingerprint) and clean != now.fingerprint
    assert _transitions(change) == [(d.id, APPEARED) for d in now.discrepancies]
    missing = [c.discrepancy for c in change.discrepancies if c.discrepancy.kind == pb.DISCREPANCY_KIND_MISSING]
    assert [(d.source, d.node, d.member.name) for d in missing] == [(pb.SOURCE_TRUSTSTORE, "n2", "n3")]
    assert list(change.members) == list(now.members) and list(change.nodes) == list(now.nodes)


def _assert_cleared(change: coordinator_pb2.MembershipChange, appeared: coordinator_pb2.MembershipChange) -> None:
    assert (change.previous_fingerprint, change.fingerprint) == (appeared.fingerprint, appeared.previous_fingerprint)
    assert _transitions(change) == [(c.discrepancy_id, CLEARED) for c in appeared.discrepancies]
    assert [c.discrepancy for c in change.discrepancies] == [c.discrepancy for c in appeared.discrepancies]


def test_a_divergence_and_its_repair_are_told_in_order(watched: labs.Lab, pristine: labs.Lab, client: Client) -> None:
    settled(client, 10)
    with client.watch_membership(heartbeat_interval=1) as watch:
        start = _next_event(watch)
        assert start.snapshot.reason == SUBSCRIBED and not start.snapshot.diff.discrepancies
        assert start.header.coordinator_id == labs.COORDINATOR_NAME
        held = _diverge(pristine)
        appeared = _next_event(watch)
        _assert_appeared(appeared.change, start.snapshot.diff.fingerprint, client.check_membership().diff)
        _repair(pristine, held)
        cleared = _next_event(watch)
        _assert_cleared(cleared.change, appeared.change)
        assert cleared.resume_token == start.resume_token, "the same diff again is the same state"
        beat = next(watch)
    assert beat.heartbeat.last_checked_at.ToNanoseconds() > 0 and beat.resume_token == cleared.resume_token
    assert list(watch) == [], "a closed watch ends its iteration"


async def test_the_async_client_watches_as_the_sync_one_does(watched: labs.Lab, pristine: labs.Lab) -> None:
    async with AsyncClient(pristine.endpoint) as client:
        while (await client.check_membership()).diff.discrepancies:  # what the last test's restore left, for a moment
            await asyncio.sleep(0.1)
        async with client.watch_membership(heartbeat_interval=1) as watch:
            start = await _next_async_event(watch)
            clean = start.snapshot.diff.fingerprint
            held = _diverge(pristine)
            appeared = await _next_async_event(watch)
            _assert_appeared(appeared.change, clean, (await client.check_membership()).diff)
            _repair(pristine, held)
            _assert_cleared((await _next_async_event(watch)).change, appeared.change)
        assert [response async for response in watch] == []


def test_a_watch_resumed_gets_what_changed_since_and_nothing_again(
    watched: labs.Lab, pristine: labs.Lab, client: Client
) -> None:
    settled(client, 10)
    with client.watch_membership(heartbeat_interval=1) as watch:
        start = _next_event(watch)
        held = _diverge(pristine)
        appeared = _next_event(watch)
    _repair(pristine, held)
    client.check_membership()  # the coordinator sees the repair while nobody watches
    with client.watch_membership(resume_token=appeared.resume_token, heartbeat_interval=1) as watch:
        resumed, since = next(watch), next(watch)
    assert resumed.resumed.changes_since == 1 and resumed.resume_token == appeared.resume_token
    _assert_cleared(since.change, appeared.change)
    assert since.resume_token == start.resume_token
    with client.watch_membership(resume_token=since.resume_token, heartbeat_interval=1) as watch:
        resumed, after = next(watch), next(watch)
    assert resumed.resumed.changes_since == 0
    assert _event(after) == "heartbeat", "the current state is not sent again"


def test_nothing_is_lost_across_a_crash_of_the_coordinator(watched: labs.Lab, pristine: labs.Lab) -> None:
    process, endpoint = start_coordinator(pristine, {}, SETTINGS)
    with Client(endpoint) as client:
        settled(client, 10)
        with client.watch_membership(heartbeat_interval=1) as watch:
            _next_event(watch)
            held = _diverge(pristine)
            appeared = _next_event(watch)
            process.kill()
            process.wait()
            with pytest.raises(Unavailable):
                _next_event(watch)
        _repair(pristine, held)  # while the coordinator is down
        start_coordinator(pristine, {}, SETTINGS)
        with client.watch_membership(resume_token=appeared.resume_token, heartbeat_interval=1) as watch:
            resumed = _next_event(watch)
            # The repair is a change whether or not the coordinator's first check came before the watch resumed.
            assert resumed.resumed.changes_since in (0, 1)
            _assert_cleared(_next_event(watch).change, appeared.change)


def _as(lab: labs.Lab, cert: bytes, key: bytes) -> Endpoint:
    base = lab.endpoint
    return Endpoint(base.address, base.ca, base.server_name, cert, key)


def test_only_an_operator_may_watch(watched: labs.Lab) -> None:
    state = Path(watched.node("n1")["state_dir"])
    member = _as(watched, (state / "server.crt").read_bytes(), (state / "server.key").read_bytes())
    with Client(member) as as_member, as_member.watch_membership() as watch, pytest.raises(PermissionDenied) as refused:
        next(watch)
    assert refused.value.reason == "ROLE_NOT_ALLOWED"
    stranger = make_identity("operator")  # the right name is not enough: the certificate is not pinned
    with Client(_as(watched, stranger.certificate_pem, stranger.key_pem)) as client, client.watch_membership() as watch:
        with pytest.raises(Unavailable):
            next(watch)


def _slow_channel(endpoint: Endpoint) -> grpc.Channel:
    """A channel whose streams take 1 KiB before the client must read: one that never reads is found out at once,
    instead of after the megabytes HTTP/2 would buffer for it."""
    credentials = grpc.ssl_channel_credentials(endpoint.ca, endpoint.key, endpoint.cert)
    options = [
        ("grpc.ssl_target_name_override", endpoint.server_name),
        ("grpc.http2.lookahead_bytes", 1024),
        ("grpc.http2.bdp_probe", 0),
    ]
    return grpc.secure_channel(endpoint.address, credentials, options=options)


def test_a_subscriber_that_never_reads_delays_nobody_and_is_told_it_fell_behind(
    watched: labs.Lab, pristine: labs.Lab, client: Client
) -> None:
    settled(client, 10)
    request = coordinator_pb2.WatchMembershipRequest(heartbeat_interval=duration_pb2.Duration(seconds=1))
    with _slow_channel(pristine.endpoint) as channel, client.watch_membership(heartbeat_interval=1) as fast:
        slow = coordinator_pb2_grpc.CoordinatorServiceStub(channel).WatchMembership(request)
        _next_event(fast)
        held = _record(pristine).read_bytes()
        delays, checks = [], []
        for toggle in range(3 * QUEUE_LIMIT):
            started = time.monotonic()
            if toggle % 2 == 0:
                _diverge(pristine)
            else:
                _repair(pristine, held)
            diff = client.check_membership().diff
            checks.append(time.monotonic() - started)
            change = _next_event(fast).change
            delays.append(time.monotonic() - started)
            assert change.fingerprint == diff.fingerprint
            assert {c.transition for c in change.discrepancies} == {APPEARED if toggle % 2 == 0 else CLEARED}
        # Every change reached the reader promptly, and the coordinator answered as fast, the other stream stuck.
        assert max(delays) < 1.0 and max(checks) < 1.0, (delays, checks)
        seen = []
        for response in slow:
            seen.append(response)
            if response.snapshot.reason == FELL_BEHIND:
                break
        assert seen[0].snapshot.reason == SUBSCRIBED
        assert len([r for r in seen if _event(r) == "change"]) < 3 * QUEUE_LIMIT
        assert seen[-1].snapshot.diff.fingerprint == diff.fingerprint, "it resumes from the current diff"
        assert {_event(r) for r in seen[1:-1]} <= {"change", "heartbeat"}
        slow.cancel()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS")


async def _subscribe_and_drop(endpoint: Endpoint, count: int) -> None:
    """count watches on one new connection, each read to its snapshot, then all dropped with the connection."""
    async with AsyncClient(endpoint) as client:
        watches = [client.watch_membership() for _ in range(count)]
        firsts = await asyncio.gather(*(anext(watch) for watch in watches))
        assert {_event(first) for first in firsts} == {"snapshot"}
        for watch in watches:
            await watch.close()


async def _settled_fds(pid: int, at_most: int) -> int:
    """The coordinator's open files once at most at_most, or as they are after 10 s (it closes a dropped connection
    within moments)."""
    deadline = time.monotonic() + 10
    while (count := _fds(pid)) > at_most and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return count


async def _median_rss_after(endpoint: Endpoint, pid: int, fds: int, rounds: int, samples: int) -> float:
    """rounds of 200 watchers opened and dropped, each on a connection of its own, the coordinator's open files back
    to fds after each; its median RSS (KiB) over the last `samples` rounds."""
    sizes = []
    for done in range(rounds):
        await _subscribe_and_drop(endpoint, 200)
        assert await _settled_fds(pid, fds) <= fds
        if done >= rounds - samples:
            sizes.append(_rss_kib(pid))
    return statistics.median(sizes)


def test_thousands_of_watchers_opened_and_dropped_leave_no_leak(watched: labs.Lab) -> None:
    pid = labs.Lab.load(watched.dir).document["coordinator"]["pid"]
    fds = _fds(pid)

    async def measure() -> tuple[float, float]:
        # The first thousand grow the allocator's and gRPC's pools, which is not a leak.
        before = await _median_rss_after(watched.endpoint, pid, fds, rounds=10, samples=5)
        return before, await _median_rss_after(watched.endpoint, pid, fds, rounds=20, samples=5)

    before, after = asyncio.run(measure())
    # RSS wanders by a few MiB from one round to the next, hence medians; a watcher left behind (its queue, its place in
    # the set: some 3 KiB) would add 12 MiB between the two.
    assert after - before < 6 * 1024, f"RSS grew by {after - before} KiB over 4000 watchers"


@pytest.mark.parametrize(
    ("interval", "fields"),
    [
        (duration_pb2.Duration(nanos=500_000_000), {"heartbeat_interval"}),
        (duration_pb2.Duration(seconds=301), {"heartbeat_interval"}),
        (duration_pb2.Duration(seconds=-1), {"heartbeat_interval"}),
        (duration_pb2.Duration(seconds=10**9), {"heartbeat_interval"}),
        (duration_pb2.Duration(seconds=1, nanos=2_000_000_000), {"heartbeat_interval.nanos"}),
    ],
)
def test_absurd_heartbeat_intervals_are_invalid_arguments(
    watched: labs.Lab, interval: duration_pb2.Duration, fields: set[str]
) -> None:
    endpoint = watched.endpoint
    credentials = grpc.ssl_channel_credentials(endpoint.ca, endpoint.key, endpoint.cert)
    options = [("grpc.ssl_target_name_override", endpoint.server_name)]
    with grpc.secure_channel(endpoint.address, credentials, options=options) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        request = coordinator_pb2.WatchMembershipRequest(heartbeat_interval=interval)
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchMembership(request, timeout=5))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    violations = set()
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations |= {v.field for v in bad_request.field_violations}
    assert violations == fields


def test_a_request_that_does_not_decode_is_an_invalid_argument(watched: labs.Lab) -> None:
    endpoint = watched.endpoint
    credentials = grpc.ssl_channel_credentials(endpoint.ca, endpoint.key, endpoint.cert)
    options = [("grpc.ssl_target_name_override", endpoint.server_name)]
    with grpc.secure_channel(endpoint.address, credentials, options=options) as channel:
        raw = channel.unary_stream("/memberguard.v1.CoordinatorService/WatchMembership")
        with pytest.raises(grpc.RpcError) as refused:
            next(raw(b"\xff\xff\xff\xff\x0f", timeout=5))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "Traceback" not in refused.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize("interval", [0.5, 301, float("nan"), -1])
def test_the_client_refuses_an_absurd_heartbeat_interval_before_sending(client: Client, interval: float) -> None:
    with pytest.raises(InvalidArgument) as refused:
        client.watch_membership(heartbeat_interval=interval)
    assert refused.value.reason == "CLIENT_VALIDATION"
    assert [field for field, _ in refused.value.field_violations] == ["heartbeat_interval"]


@pytest.mark.parametrize("token", ["0" * 64, "not a token", "é" * 300])
def test_an_unknown_resume_token_starts_from_the_current_diff_and_says_so(
    watched: labs.Lab, client: Client, token: str
) -> None:
    with client.watch_membership(resume_token=token, heartbeat_interval=1) as watch:
        start = next(watch)
    current = client.check_membership().diff
    assert start.snapshot.reason == UNKNOWN
    assert start.snapshot.diff.fingerprint == current.fingerprint
    assert start.resume_token not in ("", token)


def test_a_new_watch_gets_the_last_diff_while_young_and_a_fresh_check_after(watched: labs.Lab) -> None:
    """Without metrics served, the coordinator checks on its own only while someone watches."""
    start_coordinator(watched, {}, {"metrics_interval": 1.0, "metrics_listen": None})
    try:
        with Client(watched.endpoint) as client:
            checked = client.check_membership().diff.observed_at.ToNanoseconds()
            with client.watch_membership() as watch:
                young = next(watch).snapshot.diff.observed_at.ToNanoseconds()
            time.sleep(1.5)
            with client.watch_membership() as watch:
                fresh = next(watch).snapshot.diff.observed_at.ToNanoseconds()
        assert young == checked, "a diff younger than the interval is served as it is"
        assert fresh - checked > 1.4e9, "an older one is checked again, once someone watches"
    finally:
        start_coordinator(watched, {}, SETTINGS)


def test_an_agent_notice_brings_a_change_long_before_the_interval(watched: labs.Lab, pristine: labs.Lab) -> None:
    """With the coordinator checking on its own once a minute, a change on disk reaches a watcher within a second or
    two all the same: n2's agent tells the coordinator, which checks then."""
    start_coordinator(watched, {}, {"metrics_interval": 60.0})
    try:
        with Client(watched.endpoint) as client, client.watch_membership(heartbeat_interval=1) as watch:
            assert _next_event(watch).snapshot.reason == SUBSCRIBED
            started = time.monotonic()
            held = _diverge(pristine)
            appeared = _next_event(watch, within=5.0)
            took = time.monotonic() - started
            assert _event(appeared) == "change" and took < 5.0
            _repair(pristine, held)
            assert _event(_next_event(watch, within=5.0)) == "change"
    finally:
        start_coordinator(watched, {}, SETTINGS)


class _Observer:
    """An ObserveNodeView stream to a node's agent, opened as the lab's coordinator opens its own; what the agent sends
    is read as it comes (a read cancelled by a timeout would cancel the stream)."""

    def __init__(self, lab: labs.Lab, node: str) -> None:
        config = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
        key, certificate = Path(config["key"]).read_bytes(), Path(config["cert"]).read_bytes()
        pem = (Path(lab.node(node)["state_dir"]) / "server.crt").read_bytes()
        self._channel = grpc.aio.secure_channel(
            lab.node(node)["agent_address"],
            grpc.ssl_channel_credentials(pem, key, certificate),
            options=[("grpc.ssl_target_name_override", node)],
        )
        self._stream: Any = agent_pb2_grpc.AgentServiceStub(self._channel).ObserveNodeView()  # type: ignore[call-arg]
        self._received: asyncio.Queue[agent_pb2.ObserveNodeViewResponse] = asyncio.Queue()
        self._reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self._stream:
            self._received.put_nowait(message)

    async def ask(self, notify: bool = True) -> None:
        read = agent_pb2.ObserveNodeViewRequest(read=agent_pb2.GetNodeViewRequest(), notify=notify)
        await self._stream.write(read)

    async def next(self, within: float) -> agent_pb2.ObserveNodeViewResponse | None:
        """The next message, or None if none comes within that many seconds."""
        try:
            return await asyncio.wait_for(self._received.get(), within)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self._stream.cancel()
        self._reading.cancel()
        await self._channel.close(None)


async def test_an_agent_tells_of_a_change_once_between_two_answers(pristine: labs.Lab) -> None:
    """No notice before the first read that asks for one (its answer has it all), one for any number of changes after
    such a read began, and the next only after another."""
    stream = _Observer(pristine, "n2")
    try:
        held = _diverge(pristine)
        assert await stream.next(0.3) is None, "nothing is told before the stream's first read"
        await stream.ask(notify=False)
        assert (quiet := await stream.next(5.0)) is not None and quiet.HasField("answer")
        _repair(pristine, held)
        assert await stream.next(0.3) is None, "nothing is told after a read that did not ask"
        held = _diverge(pristine)
        await stream.ask()
        answer = await stream.next(5.0)
        assert answer is not None and answer.HasField("answer") and not answer.changed
        _repair(pristine, held)
        notice = await stream.next(5.0)
        assert notice is not None and notice.changed and not notice.HasField("answer")
        _diverge(pristine)
        assert await stream.next(0.3) is None, "one notice until the next read"
        await stream.ask()
        again = await stream.next(5.0)
        assert again is not None and again.HasField("answer"), "the read after a notice gets its answer"
        _repair(pristine, held)
        told = await stream.next(5.0)
        assert told is not None and told.changed, "a change after that read is told"
    finally:
        await stream.close()


def test_check_watch_prints_each_change_as_a_json_line_and_the_resume_token_on_ctrl_c(watched: labs.Lab) -> None:
    memberguard = str(Path(sys.executable).parent / "memberguard")
    command = [memberguard, "check", "--lab", str(watched.dir), "--watch", "-o", "json", "--heartbeat", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        assert first["snapshot"]["reason"] == "SNAPSHOT_REASON_SUBSCRIBED"
        held = _diverge(watched)
        try:
            while "change" not in (event := json.loads(process.stdout.readline())):
                assert "heartbeat" in event, event
            [appeared] = event["change"]["discrepancies"]
            assert appeared["transition"] == "DISCREPANCY_TRANSITION_APPEARED"
            assert appeared["discrepancy"]["member"]["name"] == "n3" and appeared["discrepancy"]["node"] == "n2"
        finally:
            _record(watched).write_bytes(held)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0
    # The last response's token: the change's, or a later one if the restored record was seen before Ctrl-C.
    [token] = [line.removeprefix("resume token ") for line in err.splitlines() if line.startswith("resume token ")]
    assert token and event["resumeToken"]
