"""`memberguard adopt`: attach memberguard to a running microcluster cluster, one member at a time.

Run for each member, given its state directory (DIR) and the cluster's memberguard configuration directory (OUT), it
checks that DIR is the state directory of an initialised member (`read_member`), then writes into OUT:

    agents/NAME/agent.json       the member's agent: the microcluster backend reading DIR         (every adopt)
    registry.json                the coordinator's registry: the member's agent address and its
                                 pinned server.crt, and the operator's certificate                (every adopt)
    coordinator.json             the coordinator's configuration: `listen`, `join_listen` on the
                                 next port, its identity, registry and journal paths              (the first)
    coordinator.crt, .key        the coordinator's identity                                       (the first)
    coordinators.pem             the coordinators the agents answer: that certificate             (the first)
    operator.crt, .key           the operator's identity, registered as an OPERATOR               (the first)
    profile.json                 the operator's client profile (Endpoint.from_profile)            (the first)
    cluster.crt                  the cluster's certificate: every later adopt's member must hold it
                                 (a member of another cluster is refused)                         (the first)
and names `journal.db` there as the journal, which the coordinator creates when it first starts.

Everything is checked before anything is written, and a refusal (`Refused`) names the path or the member and what is
wrong. The first adopt, into an absent or empty OUT, lays the whole configuration out in a directory beside OUT and
renames it into place, so that OUT is either all of it or untouched. A later one writes the agent's configuration and
then the registry, each replaced atomically; until both are there the member is not adopted, and adopting it again
with the same settings finishes the job. Adopts into one OUT run one at a time (a lock on OUT's parent directory), so
that two of them cannot both set it up or both rewrite its registry. Adopted already with the same settings, a member
is left as it is; with other ones (another agent address, state directory, heartbeat or server.crt) it is refused
unless `replace` is given. A member whose cluster.crt is not the one the first adopt kept is another cluster's:
refused.

Keys are written mode 0600. No file holds a key the agents' nodes need: an agent presents its member's own server.crt
and server.key, read from DIR; the coordinator's and the operator's keys stay where the coordinator and the operator
run (docs/deployment.md says which host needs which file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from coordinator.agent.filecache import MalformedFile, load_yaml
from coordinator.agent.microcluster_dial import MemberDial, UnusableStateDir
from coordinator.agent.truststore import file_name_problem
from coordinator.core.addresses import address_problem
from coordinator.deployment import (
    COORDINATOR_NAME,
    OPERATOR_NAME,
    agent_config,
    coordinator_config,
    write_coordinator_registry,
)
from coordinator.files import write_atomically, write_json
from coordinator.pki import fingerprint, make_identity
from coordinator.registry import RegisteredMember, Registry, UnreadableRegistry

DEFAULT_COORDINATOR_LISTEN = "127.0.0.1:7443"

AGENTS = "agents"
AGENT_CONFIG = "agent.json"
COORDINATOR_CONFIG = "coordinator.json"
REGISTRY = "registry.json"
PINS = "coordinators.pem"
PROFILE = "profile.json"
JOURNAL = "journal.db"
CLUSTER_CERTIFICATE = "cluster.crt"
_PRIVATE = 0o600


class Refused(Exception):
    """adopt will not do what it was asked, and wrote nothing; the message names the path or the member and what is
    wrong."""


@dataclass(frozen=True)
class Member:
    """A member as its state directory says: its name, its daemon's address, and its server.crt."""

    name: str
    address: str
    state_dir: Path
    certificate_pem: str
    cluster_certificate_pem: bytes  # cluster.crt: which cluster it is a member of


@dataclass(frozen=True)
class Adopted:
    """What an adopt did: the member, where its configuration is, and the files it wrote (none if the member was
    adopted already with these settings)."""

    member: Member
    config_dir: Path
    wrote: tuple[Path, ...]

    @property
    def agent_config(self) -> Path:
        return agent_config_path(self.config_dir, self.member.name)


def agent_config_path(config_dir: Path, name: str) -> Path:
    return config_dir / AGENTS / name / AGENT_CONFIG


# --- the member's state directory -------------------------------------------------------------------------------


def read_member(state_dir: Path) -> Member:
    """The member whose state directory this is, once it is known to be an initialised member's: daemon.yaml names
    it and its address; cluster.crt and server.crt are PEM certificates and server.key is server.crt's key;
    database/info.yaml is there (microd writes it when it first starts dqlite, at init); and the truststore holds
    the member's own record, under its name, with server.crt's certificate. Refused otherwise, at the first thing
    wrong."""
    if not state_dir.is_dir():
        raise Refused(f"{state_dir}: not a directory")
    if not (state_dir / "daemon.yaml").exists() and not (state_dir / "server.crt").exists():
        raise Refused(f"{state_dir} is not a microcluster state directory: it has neither daemon.yaml nor server.crt")
    try:
        daemon = MemberDial(state_dir).daemon_config()
    except UnusableStateDir as error:
        raise Refused(str(error)) from None
    if problem := file_name_problem(daemon.name):
        raise Refused(f"{state_dir / 'daemon.yaml'}: the member's name {problem}")
    cluster_certificate_pem, _ = _certificate(state_dir / "cluster.crt")
    certificate_pem, certificate = _certificate(state_dir / "server.crt")
    _check_key(state_dir / "server.key", certificate.public_key(), state_dir / "server.crt")
    _read(
        state_dir / "database" / "info.yaml", missing="missing: dqlite never started here (not an initialised member)"
    )
    _check_own_record(state_dir / "truststore" / f"{daemon.name}.yaml", daemon.name, certificate_pem)
    return Member(daemon.name, daemon.address, state_dir, certificate_pem.decode(), cluster_certificate_pem)


def _read(path: Path, *, missing: str = "missing") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Refused(f"{path}: {missing}") from None
    except OSError as error:
        raise Refused(f"{path}: cannot be read: {error.strerror or error}") from None


def _certificate(path: Path) -> tuple[bytes, x509.Certificate]:
    data = _read(path)
    try:
        return data, x509.load_pem_x509_certificate(data)
    except ValueError:
        raise Refused(f"{path}: not a PEM certificate") from None


def _check_key(path: Path, public_key: PublicKeyTypes, certificate_path: Path) -> None:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        raise Refused(f"{path}: not an unencrypted PEM private key") from None
    if _public_bytes(key.public_key()) != _public_bytes(public_key):
        raise Refused(f"{path}: not the key of {certificate_path}")


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_own_record(path: Path, name: str, certificate_pem: bytes) -> None:
    """The member is in its own truststore as microcluster writes it at init or join: a file under its name holding
    that name and its server.crt. The heartbeat keeps it there, and a member missing from it is not one its peers'
    view of the cluster can be compared with."""
    data = _read(path, missing=f"missing: {name} is not in its own truststore")
    try:
        record = load_yaml(data)
    except MalformedFile as error:
        raise Refused(f"{path}: {error}") from None
    if not isinstance(record, dict) or record.get("name") != name:
        raise Refused(f"{path}: not {name}'s truststore record")
    held = record.get("certificate")
    try:
        same = isinstance(held, str) and fingerprint(held) == fingerprint(certificate_pem)
    except ValueError:
        raise Refused(f"{path}: its certificate is not a PEM certificate") from None
    if not same:
        raise Refused(f"{path}: {name}'s record holds another certificate than {path.parent.parent / 'server.crt'}")


# --- adopting ---------------------------------------------------------------------------------------------------


def adopt(
    state_dir: Path,
    config_dir: Path,
    *,
    agent_listen: str,
    coordinator_listen: str | None = None,
    heartbeat: float | None = None,
    replace: bool = False,
) -> Adopted:
    """Adopts the member whose state directory is state_dir into config_dir (see the module's docstring).
    agent_listen is where its agent listens, and so where the coordinator dials it; coordinator_listen is the
    coordinator's address, for the first adopt (DEFAULT_COORDINATOR_LISTEN unless given); heartbeat is the member's
    daemon's heartbeat interval in seconds if it is not microcluster's default. Refused if anything is wrong."""
    for flag, address in (("--agent-listen", agent_listen), ("--coordinator-listen", coordinator_listen)):
        if address is not None and (problem := address_problem(address)):
            raise Refused(f"{flag} {address!r} {problem}")
    member = read_member(state_dir.resolve())
    out = config_dir.resolve()
    agent = agent_config(
        member.name,
        agent_listen,
        member.state_dir,
        {"backend": "microcluster"},
        out / PINS,
        role_adjustment_interval=heartbeat,
    )
    pin = RegisteredMember(member.name, agent_listen, member.certificate_pem)
    with _one_adopt_at_a_time(out):
        if (out / COORDINATOR_CONFIG).exists():
            return _adopt_into(out, member, agent, pin, coordinator_listen, replace=replace)
        if out.exists() and not out.is_dir():
            raise Refused(f"{out}: not a directory")
        if out.exists() and any(out.iterdir()):
            raise Refused(
                f"{out} is neither empty nor memberguard's configuration (it has no {COORDINATOR_CONFIG}): give an "
                "empty or a new directory"
            )
        _set_up(out, agent, pin, coordinator_listen or DEFAULT_COORDINATOR_LISTEN, member.cluster_certificate_pem)
        return Adopted(member, out, tuple(sorted(path for path in out.rglob("*") if path.is_file())))


@contextlib.contextmanager
def _one_adopt_at_a_time(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on OUT's parent directory (OUT itself may not exist yet, and is renamed into place)."""
    try:
        fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        raise Refused(f"{out.parent}: cannot be opened: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _adopt_into(
    out: Path,
    member: Member,
    agent: dict[str, Any],
    pin: RegisteredMember,
    coordinator_listen: str | None,
    *,
    replace: bool,
) -> Adopted:
    """Adopts the member into the configuration a first adopt set up in out."""
    pinned = out / CLUSTER_CERTIFICATE
    if _read(pinned) != member.cluster_certificate_pem:
        raise Refused(
            f"{member.state_dir / 'cluster.crt'} is not the cluster certificate {pinned} holds: {member.name} is a "
            f"member of another cluster than the one adopted into {out}"
        )
    coordinator_config = out / COORDINATOR_CONFIG
    listen = _json_object(coordinator_config).get("listen")
    if coordinator_listen is not None and coordinator_listen != listen:
        raise Refused(
            f"{coordinator_config}: the coordinator listens on {listen}, not {coordinator_listen}: "
            "--coordinator-listen sets it up at the first adopt only"
        )
    try:
        registry = Registry.open(out / REGISTRY)
    except UnreadableRegistry as error:
        raise Refused(str(error)) from None
    members = registry.members()
    taken = next((m.name for m in members if m.agent_address == pin.agent_address and m.name != pin.name), None)
    if taken is not None:
        raise Refused(f"--agent-listen {pin.agent_address} is {taken}'s agent address in {out / REGISTRY}")
    config = agent_config_path(out, member.name)
    held_agent = _json_object(config) if config.exists() else None
    held_pin = next((m for m in members if m.name == member.name), None)
    differences = _differences(config, held_agent, agent) + _pin_differences(out / REGISTRY, held_pin, pin)
    if differences and not replace:
        raise Refused(
            f"{member.name} is adopted into {out} with other settings ({'; '.join(differences)}): give --replace to "
            "replace them"
        )
    wrote = []
    if held_agent != agent:
        write_json(config, agent)
        wrote.append(config)
    if held_pin != pin:
        registry.register(pin)
        wrote.append(out / REGISTRY)
    return Adopted(member, out, tuple(wrote))


def _differences(path: Path, held: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    if held is None:
        return []
    return [
        f"{path} has {key} {held.get(key)!r}, not {wanted.get(key)!r}"
        for key in sorted(set(held) | set(wanted))
        if held.get(key) != wanted.get(key)
    ]


def _pin_differences(path: Path, held: RegisteredMember | None, wanted: RegisteredMember) -> list[str]:
    if held is None:
        return []
    found = []
    if held.agent_address != wanted.agent_address:
        found.append(f"{path} has its agent at {held.agent_address}, not {wanted.agent_address}")
    if held.certificate_pem != wanted.certificate_pem:
        found.append(f"{path} pins another certificate than its server.crt")
    return found


def _json_object(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise Refused(f"{path}: cannot be read: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Refused(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict):
        raise Refused(f"{path}: not a JSON object")
    return document


def _set_up(out: Path, agent: dict[str, Any], pin: RegisteredMember, listen: str, cluster_certificate: bytes) -> None:
    """The first adopt: the coordinator's whole configuration and the member's, laid out beside out, then renamed
    to out (absent, or an empty directory, which the rename replaces)."""
    host, _, port = listen.rpartition(":")
    if int(port) == 65535:
        raise Refused(f"--coordinator-listen {listen}: the join listener takes the next port, and there is none")
    coordinator, operator = make_identity(COORDINATOR_NAME), make_identity(OPERATOR_NAME)
    config = coordinator_config(
        listen,
        cert=out / "coordinator.crt",
        key=out / "coordinator.key",
        registry=out / REGISTRY,
        journal=out / JOURNAL,
        # A fixed port, unlike the lab's: the join tokens issued name it, and they must outlive a restart.
        join_listen=f"{host}:{int(port) + 1}",
    )
    # Relative to the profile's own directory, as Endpoint.from_profile reads them: OUT can be copied elsewhere.
    profile = {
        "address": listen,
        "ca": "coordinator.crt",
        "server_name": COORDINATOR_NAME,
        "cert": "operator.crt",
        "key": "operator.key",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.adopt-"))
    try:
        write_atomically(staging / "coordinator.crt", coordinator.certificate_pem)
        write_atomically(staging / "coordinator.key", coordinator.key_pem, mode=_PRIVATE)
        write_atomically(staging / PINS, coordinator.certificate_pem)
        write_atomically(staging / CLUSTER_CERTIFICATE, cluster_certificate)
        write_atomically(staging / "operator.crt", operator.certificate_pem)
        write_atomically(staging / "operator.key", operator.key_pem, mode=_PRIVATE)
        write_json(staging / COORDINATOR_CONFIG, config)
        write_json(staging / PROFILE, profile)
        write_json(agent_config_path(staging, pin.name), agent)
        write_coordinator_registry(staging / REGISTRY, [pin], operator)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# --- what it says -----------------------------------------------------------------------------------------------


def commands(adopted: Adopted) -> dict[str, str]:
    """The commands that start the member's agent (on its node) and the coordinator, and that check the cluster."""
    out = adopted.config_dir
    # -P: without it the directory they are started from comes first on the import path, and a directory there named
    # like a package (OUT itself, as /etc/memberguard seen from /etc) would be imported instead of it.
    return {
        "agent": shlex.join([sys.executable, "-P", "-m", "coordinator.agent", str(adopted.agent_config)]),
        "coordinator": shlex.join([sys.executable, "-P", "-m", "coordinator.service", str(out / COORDINATOR_CONFIG)]),
        "check": f"MEMBERGUARD_PROFILE={shlex.quote(str(out / PROFILE))} memberguard check",
    }


def describe(adopted: Adopted) -> list[str]:
    member = adopted.member
    if adopted.wrote:
        lines = [f"adopted {member.name} (its daemon at {member.address}) into {adopted.config_dir}"]
        lines += [f"  wrote {path}" for path in adopted.wrote]
    else:
        lines = [f"{member.name} is adopted into {adopted.config_dir} already, with these settings: nothing written"]
    run = commands(adopted)
    return [
        *lines,
        f"start its agent (on {member.name}'s node): {run['agent']}",
        f"start the coordinator: {run['coordinator']}",
        f"check the cluster: {run['check']}",
    ]


def document(adopted: Adopted) -> dict[str, Any]:
    """What describe says, named as the JSON mapping would name a message of it (there is none: it never crosses the
    wire): lowerCamelCase, empty values left out."""
    member = adopted.member
    fields = {
        "member": member.name,
        "address": member.address,
        "stateDir": str(member.state_dir),
        "configDir": str(adopted.config_dir),
        "wrote": [str(path) for path in adopted.wrote],
        "commands": commands(adopted),
    }
    return {name: value for name, value in fields.items() if value}
