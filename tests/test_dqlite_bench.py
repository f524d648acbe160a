"""The Go baseline of `bench --dqlite-client`: go-dqlite's own client on one kept TLS connection to the leader of three
real dqlite nodes, run once. It prints the figures the benchmark compares the native client with, and with --samples
the timings the benchmark pools across its alternating turns."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from coordinator.agent.truststore import trusted_certificates
from coordinator.lab.dqlite_cluster import DATABASE
from coordinator.lab.dqlite_nodes import node_binary
from tests.dqlite_cluster import start_cluster

pytestmark = pytest.mark.dqlite

FIGURES = ("cluster_ms", "select_ms")


def test_go_dqlite_over_tls_prints_each_figure_and_its_samples(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path)
    try:
        own = cluster.members["n1"].tls
        bundle = tmp_path / "n1-trusted.pem"
        bundle.write_text("\n".join(trusted_certificates(own.truststore)))
        ran = subprocess.run(
            [
                str(node_binary().with_name("memberguard-dqlite-bench")),
                *("--cluster", ",".join(cluster.addresses), "--db", DATABASE, "--n", "40", "--warmup", "5"),
                *("--tls-cert", str(own.cert), "--tls-key", str(own.key), "--tls-ca", str(bundle), "--samples"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        cluster.stop()
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert (result["n"], result["warmup"], result["tls"]) == (40, 5, True)
    assert result["leader"] in cluster.addresses
    for figure in FIGURES:
        stats, samples = result[figure], result["samples_ms"][figure]
        assert 0 < stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"], (figure, stats)
        assert len(samples) == 40
        # The figures summarise exactly these samples (the p50 by nearest rank: the 20th of 40).
        assert stats["p50"] == pytest.approx(sorted(samples)[19], abs=1e-4)
        assert stats["mean"] == pytest.approx(statistics.fmean(samples), abs=1e-3)
