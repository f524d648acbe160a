"""The Go baseline of `bench --microcluster`: go-dqlite v3's client over a dial made as a member makes it, run once
against three real microd daemons. It prints the figures the benchmark compares the native client with."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from coordinator.agent.microcluster_sources import DATABASE
from coordinator.lab import microcluster
from coordinator.lab.bench import MICROCLUSTER_BENCH

pytestmark = pytest.mark.microcluster

FIGURES = ("leader_ms", "cluster_ms", "select_ms", "dial_ms")


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MICROCLUSTER_BENCH), *args], capture_output=True, text=True, timeout=120)


def test_go_dqlite_over_the_upgraded_connection_prints_each_figure(tmp_path: Path) -> None:
    with microcluster.running(tmp_path, 3) as cluster:
        addresses = [member.address for member in cluster.members]
        ran = _bench(
            *("--state-dir", str(cluster.members[0].state_dir), "--cluster", ",".join(addresses)),
            *("--db", DATABASE, "--n", "50", "--dials", "3", "--warmup", "5", "--samples"),
        )
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert (result["n"], result["dials"], result["warmup"]) == (50, 3, 5)
    # It found the leader among the members, and the SELECT read core_cluster_members through it.
    assert result["leader"] in addresses
    for figure in FIGURES:
        stats, samples = result[figure], result["samples_ms"][figure]
        assert 0 < stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"], (figure, stats)
        # The samples the benchmark pools across runs are the ones the figures summarise.
        assert len(samples) == (3 if figure == "dial_ms" else 50)
        assert stats["p50"] == pytest.approx(statistics.median(samples), abs=1e-4)
    # A new dial (TLS, the upgrade, dqlite's handshake) costs more than a request on the kept connection.
    assert result["dial_ms"]["p50"] > result["leader_ms"]["p50"]


def test_a_state_directory_without_the_members_identity_fails_naming_it(tmp_path: Path) -> None:
    ran = _bench("--state-dir", str(tmp_path), "--cluster", "127.0.0.1:9")
    assert ran.returncode == 1
    assert "the member's identity" in ran.stderr and str(tmp_path / "server.crt") in ran.stderr, ran.stderr


def test_missing_flags_are_a_usage_error() -> None:
    ran = _bench("--cluster", "127.0.0.1:9")
    assert ran.returncode == 2 and "--state-dir" in ran.stderr
