"""The files that set memberguard up, each defined once: an agent's configuration, the coordinator's, and the
coordinator's registry, which pins the members' agents and registers the operator. `memberguard adopt`
(coordinator/adopt.py) writes them for a running microcluster cluster, the lab (coordinator/lab/lab.py) for a
cluster of its own; where each keeps them is its own to say."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.auth import Principal
from coordinator.pki import Identity
from coordinator.registry import RegisteredIdentity, RegisteredMember, write_registry

COORDINATOR_NAME = "memberguard-coordinator"
OPERATOR_NAME = "operator"


def agent_config(
    name: str,
    listen: str,
    state_dir: Path,
    backend: Mapping[str, Any],
    trusted_coordinators: Path,
    *,
    role_adjustment_interval: float | None = None,
    port_file: Path | None = None,
) -> dict[str, Any]:
    """An agent's configuration, as coordinator/agent/service.py reads it. backend is the backend's part ("backend"
    and its settings). Without a role_adjustment_interval the agent takes its backend's (microd's heartbeat on
    microcluster), so none is written: on microcluster a null would mean none at all."""
    document = {
        "name": name,
        "listen": listen,
        "state_dir": str(state_dir),
        **backend,
        "trusted_coordinators": str(trusted_coordinators),
    }
    if role_adjustment_interval is not None:
        document["role_adjustment_interval"] = role_adjustment_interval
    if port_file is not None:
        document["port_file"] = str(port_file)
    return document


def coordinator_config(
    listen: str, *, cert: Path, key: Path, registry: Path, journal: Path, **settings: str
) -> dict[str, Any]:
    """The coordinator's configuration, as coordinator/service.py reads it: COORDINATOR_NAME's, for a new cluster ID;
    settings adds the optional ones (join_listen, metrics_listen, the port files)."""
    return {
        "coordinator_id": COORDINATOR_NAME,
        "listen": listen,
        "cert": str(cert),
        "key": str(key),
        "registry": str(registry),
        "journal": str(journal),
        "cluster_id": uuid.uuid4().hex,
        **settings,
    }


def write_coordinator_registry(path: Path, members: Sequence[RegisteredMember], operator: Identity) -> None:
    """The coordinator's registry: each member's agent pinned, and operator's certificate registered as OPERATOR_NAME,
    an OPERATOR."""
    identity = RegisteredIdentity(OPERATOR_NAME, Principal.OPERATOR, operator.certificate_pem.decode())
    write_registry(path, members, [identity])
