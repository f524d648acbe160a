"""The seam between the agent and a backend: one reader per source, each returning a SourceReport.

A reader never raises for what it finds: a source it cannot read is a report with an error (the records are
then unknown, not empty), and a bad entry is an invalid entry beside the good ones. The coordinator turns
both into discrepancies; an exception would only lose the node's whole view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from coordinator.agent.members_table import MembersTableReader
from coordinator.agent.raft_files import NodeInfoReader, RaftConfigFileReader
from coordinator.agent.truststore import TruststoreReader
from coordinator.core.model import Source, SourceReport


class SourceReader(Protocol):
    source: Source

    async def read(self, *, include_certificates: bool, within: float | None = None) -> SourceReport:
        """The source as it is now. Async because the dqlite backend reads over the network; readers of
        local files do their (fast, cached) work inline. PEMs are filled only when include_certificates. A
        network read ends within `within` seconds when it is given and shorter than the reader's own timeout."""
        ...


def local_backend(state_dir: Path, members_table: Path, raft_config: Path) -> tuple[SourceReader, ...]:
    """The readers of one node of the `local` backend.

    state_dir is the node's microcluster-style state directory (truststore/, database/); members_table and
    raft_config are the files every node of the cluster shares, standing in for the replicated table and
    the Raft log.
    """
    database = state_dir / "database"
    return (
        MembersTableReader(members_table),
        TruststoreReader(state_dir / "truststore"),
        RaftConfigFileReader(raft_config, Source.RAFT_CONFIG),
        RaftConfigFileReader(database / "cluster.yaml", Source.RAFT_CACHE),
        NodeInfoReader(database / "info.yaml"),
    )
