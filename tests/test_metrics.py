"""The coordinator's Prometheus endpoint, scraped over HTTP from a real lab whose coordinator checks every INTERVAL
seconds of its own: what the last check found (discrepancies, silent agents) follows the cluster without anyone
calling CheckMembership, checks are counted by origin, operations are counted from the journal, and a coordinator
configured with a bad interval or address refuses to start, saying which setting is wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from memberguard import Client
from memberguard.v1 import coordinator_pb2, membership_pb2, operation_pb2
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from coordinator.core.model import DiscrepancyKind, Severity
from coordinator.core.operation import OperationKind, OperationState
from coordinator.lab import lab as labs
from coordinator.service import DEFAULT_AGENT_TIMEOUT
from tests.restarts import kill_agent, restart_agent, start_coordinator

INTERVAL = 0.25
# A background check asks every agent for up to a second; a few of them, one after the other, is what "soon" means.
SOON = 4 * (INTERVAL + 1.0)

Scrape = dict[str, list[Sample]]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[labs.Lab]:
    """A consistent 3-node lab whose coordinator checks every INTERVAL seconds (conftest's `pristine` and `client`
    use this one in this module)."""
    running = labs.up(tmp_path_factory.mktemp("lab"), 3)
    try:
        start_coordinator(running, {}, {"metrics_interval": INTERVAL})
        yield labs.Lab.load(running.dir)
    finally:
        labs.down(running.dir)


def scrape(lab: labs.Lab) -> Scrape:
    url = f"http://{lab.document['coordinator']['metrics_address']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(scraped: Scrape, family: str, sample: str | None = None, **labels: str) -> float:
    """The sum of family's samples named sample (family itself by default) whose labels include labels."""
    return sum(
        s.value
        for s in scraped[family]
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())
    )


def soon(lab: labs.Lab, condition: Callable[[Scrape], bool], what: str) -> Scrape:
    """The first scrape that meets condition, polling for SOON seconds."""
    deadline = time.monotonic() + SOON
    while True:
        scraped = scrape(lab)
        if condition(scraped):
            return scraped
        assert time.monotonic() < deadline, f"{what} within {SOON:g} s; the last scrape: {scraped}"
        time.sleep(INTERVAL / 2)


def label(name: str) -> str:
    return name.lower().replace("_", "-")


def found(scraped: Scrape) -> Counter[tuple[str, str]]:
    """The scrape's non-zero discrepancy counts by (severity, kind)."""
    return Counter(
        {
            (s.labels["severity"], s.labels["kind"]): int(s.value)
            for s in scraped["memberguard_discrepancies"]
            if s.value
        }
    )


def reported(response: coordinator_pb2.CheckMembershipResponse) -> Counter[tuple[str, str]]:
    """A CheckMembershipResponse's discrepancies counted by (severity, kind), spelled as the metrics spell them."""
    return Counter(
        (
            label(membership_pb2.Severity.Name(d.severity).removeprefix("SEVERITY_")),
            label(membership_pb2.DiscrepancyKind.Name(d.kind).removeprefix("DISCREPANCY_KIND_")),
        )
        for d in response.diff.discrepancies
    )


def callers_checks(scraped: Scrape) -> float:
    return value(scraped, "memberguard_checks", "memberguard_checks_total", origin="caller")


def test_a_consistent_lab_shows_every_series_and_nothing_blocking(lab: labs.Lab) -> None:
    scraped = soon(lab, lambda s: "memberguard_operations" in s, "the first background check")
    assert len(scraped["memberguard_discrepancies"]) == len(Severity) * len(DiscrepancyKind)
    assert value(scraped, "memberguard_discrepancies", severity="blocking") == 0
    assert value(scraped, "memberguard_discrepancies", severity="warning") == 0
    assert value(scraped, "memberguard_agents_unreachable") == 0
    assert value(scraped, "memberguard_agents_untrusted") == 0
    assert len(scraped["memberguard_operations"]) == len(OperationKind) * len(OperationState)
    assert value(scraped, "memberguard_operations_parked") == 0


def test_a_divergence_shows_without_a_call_and_clears_when_restored(lab: labs.Lab, pristine: labs.Lab) -> None:
    """n3's record deleted from n2's truststore (scenario S9), seen by the coordinator's own checks alone."""
    record = Path(lab.node("n2")["state_dir"]) / "truststore" / "n3.yaml"
    saved = record.read_bytes()
    before = callers_checks(scrape(lab))
    record.unlink()
    try:
        scraped = soon(
            lab,
            lambda s: value(s, "memberguard_discrepancies", severity="blocking", kind="missing") >= 1,
            "n3's record missing from n2's truststore is not seen",
        )
        assert callers_checks(scraped) == before, "a caller's check did it, not the coordinator's own"
        with Client(lab.endpoint) as client:
            checked = client.check_membership()
        assert found(scrape(lab)) == reported(checked), "the scrape is not what the last check found"
    finally:
        record.write_bytes(saved)
    soon(
        lab,
        lambda s: value(s, "memberguard_discrepancies", severity="blocking") == 0,
        "the restored record does not clear the discrepancy",
    )


def test_a_stopped_agent_counts_as_unreachable_until_it_is_back(lab: labs.Lab) -> None:
    n3 = lab.node("n3")
    kill_agent(n3["pid"])
    try:
        soon(lab, lambda s: value(s, "memberguard_agents_unreachable") == 1, "the stopped agent is not unreachable")
    finally:
        config = Path(n3["state_dir"]) / "agent.json"
        restart_agent(config, n3["agent_address"], lab.dir / "logs" / "agent-n3-restarted.log")
    soon(lab, lambda s: value(s, "memberguard_agents_unreachable") == 0, "the restarted agent is not back")


def test_checks_are_counted_and_timed_by_origin(lab: labs.Lab, client: Client) -> None:
    calls = 5
    before = scrape(lab)
    for _ in range(calls):
        client.check_membership()
    after = scrape(lab)
    duration = "memberguard_check_duration_seconds"
    assert callers_checks(after) - callers_checks(before) == calls
    assert (
        value(after, duration, f"{duration}_count", origin="caller")
        - value(before, duration, f"{duration}_count", origin="caller")
        == calls
    )
    assert value(after, "memberguard_checks", "memberguard_checks_total", origin="background") >= 1
    assert value(after, duration, f"{duration}_sum", origin="background") > 0


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process stopped (SIGSTOP: it keeps its sockets and answers nothing) until the block ends."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        # The state follows the command name, in parentheses; "T" is stopped by a signal.
        while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
            assert time.monotonic() < deadline, f"process {pid} did not stop"
            time.sleep(0.005)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_check_that_gave_agents_too_little_time_moves_no_alert(lab: labs.Lab, client: Client) -> None:
    # A running agent can beat even a microsecond's deadline: gRPC enforces it with timers, at both ends, that race
    # the answer, and an agent whose view is unchanged has its answer ready within a millisecond (a quarter to a half
    # of the hurried checks of a 3-node lab found every agent answering). So n2's agent is stopped, which no deadline
    # races, for the hurried check and the scrape after it. Meanwhile no background check can hide what the hurried
    # check would publish: one that began after it waits for n2, and one that began before it cannot publish after it
    # did (checks publish in the order their gathers began: service.py's check). So the scrape shows n2 silent if the
    # hurried check published.
    with stopped(labs.Lab.load(lab.dir).node("n2")["pid"]):
        since = time.monotonic()
        hurried = client.check_membership(agent_timeout=1e-6)
        scraped = scrape(lab)
        stopped_for = time.monotonic() - since
    silent = {d.node for d in hurried.diff.discrepancies if d.kind == membership_pb2.DISCREPANCY_KIND_AGENT_UNREACHABLE}
    assert "n2" in silent, hurried.diff
    # Unless n2 was stopped for longer than a background check waits for it, and one found it silent on its own.
    published = (
        f"published (n2 was stopped for {stopped_for:.2f} s, background checks wait {DEFAULT_AGENT_TIMEOUT:g} s)"
    )
    assert value(scraped, "memberguard_agents_unreachable") == 0, published
    assert value(scraped, "memberguard_discrepancies", kind="agent-unreachable") == 0, published


def test_operations_are_counted_from_the_journal(lab: labs.Lab, client: Client) -> None:
    issued = client.issue_token("n9")
    try:
        assert issued.state == operation_pb2.OPERATION_STATE_SUCCEEDED
        journaled = Counter(
            (
                label(operation_pb2.OperationKind.Name(o.kind).removeprefix("OPERATION_KIND_")),
                label(operation_pb2.OperationState.Name(o.state).removeprefix("OPERATION_STATE_")),
            )
            for o in client.list_operations(page_size=500).operations
        )

        def counted(scraped: Scrape) -> Counter[tuple[str, str]]:
            return Counter(
                {
                    (s.labels["kind"], s.labels["state"]): int(s.value)
                    for s in scraped["memberguard_operations"]
                    if s.value
                }
            )

        scraped = soon(lab, lambda s: counted(s) == journaled, "the journal's operations are not counted")
        parked = sum(n for (_, state), n in journaled.items() if state == "parked")
        assert value(scraped, "memberguard_operations_parked") == parked
    finally:
        client.revoke_token("n9")


@pytest.mark.parametrize(
    ("setting", "bad", "message"),
    [
        ("metrics_interval", 0, "metrics_interval must be a positive number of seconds, not 0"),
        ("metrics_interval", -1.5, "metrics_interval must be a positive number of seconds, not -1.5"),
        ("metrics_interval", "15s", "metrics_interval must be a positive number of seconds, not '15s'"),
        ("metrics_interval", None, "metrics_interval must be a positive number of seconds, not None"),
        ("metrics_interval", float("inf"), "metrics_interval must be a positive number of seconds, not inf"),
        ("metrics_listen", "localhost", 'metrics_listen must be "host:port" or "[ipv6]:port", not \'localhost\''),
    ],
)
def test_a_bad_setting_is_refused_at_start(
    lab: labs.Lab, tmp_path: Path, setting: str, bad: object, message: str
) -> None:
    """Refused before the coordinator touches anything: the lab's own coordinator keeps its journal meanwhile."""
    config = tmp_path / "coordinator.json"
    document = json.loads((lab.dir / "coordinator" / "coordinator.json").read_text())
    config.write_text(json.dumps({**document, setting: bad}))
    started = subprocess.run(
        [sys.executable, "-m", "coordinator.service", str(config)], capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 1, started.stderr
    assert f"not starting: {message}" in started.stderr
