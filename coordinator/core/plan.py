"""Plans: a guarded operation, decided on a diff, becomes a list of idempotent steps, each for one node's agent
(or for the coordinator itself), with the commit point marked.

Pure: the plan is computed before anything runs and journaled whole (coordinator/journal.py); running it is the
runner's business. Every action is idempotent, so a step re-sent after a crash is harmless.

Removal (docs/design.md, "Operations"), on the local backend:
1. the member leaves the Raft configuration — the commit point: from here on the removal rolls forward;
2. its members-table row goes (after Raft: a row deleted first would de-trust a live Raft member, S6);
3. its record leaves every reachable node's truststore;
4. its own node, if reachable, is fenced (its Raft files cleared, so that it cannot come back as a zombie, S8);
5. the coordinator forgets its certificate and deletes its tokens;
6. the remainder, as deferred steps (core/operation.py): its record leaves the truststore of each node that did not
   answer, and its own node is fenced if it did not answer, each when that node answers again, after the removal
   has succeeded. The fence reaches the member's agent through the pin the plan carries, since the coordinator has
   forgotten it by then.
A member that is not in the Raft configuration (a ghost row, S2/S15) has no step 1; the row's deletion is then
the commit point.

Removal on the microcluster backend goes through microcluster (DELETE core/1.0/cluster/{name}, as `microctl cluster
remove` does): its leader takes the member out of the members table and the Raft configuration, the truststores
follow on its heartbeat, and it resets the member if the member's daemon answers. Memberguard writes nothing behind
microd's back, so the plan is that request — the commit point —, the same request with force (which finds nothing
to do, unless a crash inside microcluster left the member half-removed: its own consistency check would then refuse
the plain request), and the coordinator forgetting the member. A Raft member that no record names (a ghost) has no
name for microcluster to remove it by: its Raft entry is removed through dqlite, as on the dqlite backend.

Join (its stages in docs/design.md, "Operations"), the same on the local and dqlite backends:
1. reserve: the row is written PENDING, every reachable member's truststore learns the joiner (whoever leads must
   trust it), and the joiner's truststore learns every member (its engine must trust whoever it joins through);
2. engine join: the joiner's own agent puts its entry into the Raft configuration — the commit point (on the
   dqlite backend it starts its engine joining, and confirms the entry on the leader);
3. finish: every reachable member's trust is confirmed (on the local backend, applying a step is also when a node's
   cache catches up with the configuration), the row gets its role, and the coordinator registers the joiner's
   agent and consumes the token.
Before the commit point a join rolls back: the joiner is fenced first (a joiner left able to add itself again is
the zombie that becomes a ghost Raft member, microcluster #774), then each done step is undone, last first.

Join on the microcluster backend goes through microcluster, as `microctl tokens add` and `microctl init --token` do:
a member's daemon issues microcluster's token for the joiner (undone by revoking it), the joiner's own daemon joins
with it — the commit point: microcluster writes the row, the truststores and the Raft entry itself —, and the
coordinator registers the joiner's agent. Memberguard's own token (the one the joiner's agent presented) is consumed
then, as on the other backends.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from coordinator.core.model import Member, MembershipDiff, Role


@dataclass(frozen=True)
class EnsureTruststoreRecord:
    name: str
    address: str
    certificate_pem: str


@dataclass(frozen=True)
class RemoveTruststoreRecord:
    name: str


@dataclass(frozen=True)
class EnsureMemberRow:
    name: str
    address: str
    certificate_pem: str
    role: str


@dataclass(frozen=True)
class RemoveMemberRow:
    name: str


@dataclass(frozen=True)
class EnsureRaftEntry:
    node_id: int
    address: str
    role: Role


@dataclass(frozen=True)
class RemoveRaftEntry:
    """role is the member's role when the removal was decided (the quorum rule was checked against it): the engine
    re-reads the leader's configuration right before it removes, and refuses if the member's vote changed since.
    None (an undo) removes whatever role the entry has."""

    node_id: int
    address: str
    role: Role | None = None


@dataclass(frozen=True)
class RemoveThroughMicrocluster:
    """Asks the node's microcluster daemon to remove the member at address, by name. force skips microcluster's own
    consistency check and goes on past its failures to reach the member. node_id is the member's Raft entry, for
    recovery to tell from the sources whether the request took effect."""

    name: str
    address: str
    node_id: int
    force: bool = False


@dataclass(frozen=True)
class IssueMicroclusterToken:
    """Asks the node's microcluster daemon for a join token admitting name, valid for ttl seconds; the token goes to
    the caller, and none of it into the journal."""

    name: str
    ttl: float


@dataclass(frozen=True)
class RevokeMicroclusterToken:
    name: str


@dataclass(frozen=True)
class JoinThroughMicrocluster:
    """Has the joiner's own microcluster daemon join as name at address, with the token an IssueMicroclusterToken
    step of the same operation obtained. The token is not part of the action: the runner adds it to the request from
    memory, so the journal never holds it."""

    name: str
    address: str


@dataclass(frozen=True)
class FenceNode:
    # Where the node's agent is and the certificate it serves, for a fence deferred past the coordinator forgetting
    # the member; empty when the agent is reached as a registered member or a joiner.
    agent_address: str = ""
    certificate_pem: str = ""


@dataclass(frozen=True)
class ForgetMember:
    """The coordinator's own step: drop the member's pinned certificate from its registry, and its tokens."""

    name: str


@dataclass(frozen=True)
class RegisterMember:
    """The coordinator's own step: pin the joiner's certificate and agent in its registry, and consume its token."""

    name: str
    agent_address: str
    certificate_pem: str


Action = (
    EnsureTruststoreRecord
    | RemoveTruststoreRecord
    | EnsureMemberRow
    | RemoveMemberRow
    | EnsureRaftEntry
    | RemoveRaftEntry
    | RemoveThroughMicrocluster
    | IssueMicroclusterToken
    | RevokeMicroclusterToken
    | JoinThroughMicrocluster
    | FenceNode
    | ForgetMember
    | RegisterMember
)

COORDINATOR = ""  # the target of a step the coordinator applies itself


@dataclass(frozen=True)
class PlannedStep:
    name: str
    target: str  # the node whose agent applies it; COORDINATOR for the coordinator's own steps
    action: Action
    commit_point: bool = False
    deferred: bool = False  # applied after the operation succeeded, when its node answers again


@dataclass(frozen=True)
class Plan:
    steps: tuple[PlannedStep, ...]
    # What is left to do by hand once it ran (unreachable nodes' copies; how to use a token); "" if nothing.
    remainder: str


class CannotPlan(Exception):
    """The operation has no plan on this diff (e.g. no reachable node to apply the cluster-wide steps)."""


@dataclass(frozen=True)
class AgentPin:
    """Where a member's agent is and the certificate it serves, as the coordinator's registry has it."""

    address: str
    certificate_pem: str


def plan_microcluster_token(diff: MembershipDiff, name: str, *, ttl: float, reachable: Collection[str]) -> Plan:
    """The steps of issuing microcluster's own join token for name, for a joiner that joins with `microctl init`:
    the first reachable member's daemon issues it. That request is the commit point, undone by revoking the token: a
    token its caller never received is revoked, not left to admit whoever finds it. (The coordinator's own tokens
    take no step: it issues them itself.)"""
    if diff.backend != "microcluster":
        raise NotOnMicrocluster(
            f"microcluster's token needs the microcluster backend, and the agents report {diff.backend or 'none'}"
        )
    members = sorted(reachable)
    if not members:
        raise CannotPlan("no member's daemon answered to issue microcluster's join token")
    step = PlannedStep(
        f"microcluster issues {name}'s join token on {members[0]}",
        members[0],
        IssueMicroclusterToken(name, ttl),
        commit_point=True,
    )
    use = (
        f"microcluster's own join token for {name}, valid {ttl:g} s (`microctl tokens list` lists it): join with it"
        f" through microcluster on the joiner, e.g. `microctl init {name} ADDRESS --token TOKEN`"
    )
    return Plan((step,), use)


def plan_removal(
    diff: MembershipDiff,
    member: Member,
    *,
    reachable: Collection[str],
    agent: AgentPin | None = None,
    force: bool = False,
) -> Plan:
    """The steps that remove `member` (as the diff identifies it) from every source, those of the nodes that did not
    answer deferred until they do.

    `reachable` names the nodes whose agents answered; the cluster-wide steps (Raft configuration, members table)
    go to the first of them in name order that is not the member itself. The first step is the commit point, so a
    removal never rolls back: interrupted, it rolls forward. `agent` is the member's own agent, for a deferred fence.
    `force` is a forced removal's (the guard let it past the discrepancies its caller acknowledged).
    """
    others = sorted(node for node in reachable if node != member.name)
    if not others:
        raise CannotPlan(f"no reachable node other than {member.name or member.address} can apply the removal")
    via = others[0]
    # The role the removal is decided on: the re-read right before the Raft removal checks it still holds.
    decided_role = next(
        (m.role for m in diff.members if (m.node_id, m.address) == (member.node_id, member.address)), None
    )
    if diff.backend == "microcluster":
        if not member.name:
            return _ghost_removal(member, via, decided_role)
        return _removal_through_microcluster(member, via, reachable=reachable, force=force)
    in_raft = member.node_id != 0 and decided_role not in (None, Role.PENDING)
    in_table = bool(member.name) and any(m.name == member.name for m in diff.members)
    label = member.name or f"node {member.node_id} at {member.address}"
    steps: list[PlannedStep] = []
    if in_raft:
        steps.append(
            PlannedStep(
                f"remove {label} from the Raft configuration",
                via,
                RemoveRaftEntry(member.node_id, member.address, decided_role),
            )
        )
    if in_table:
        steps.append(PlannedStep(f"delete {member.name}'s members-table row", via, RemoveMemberRow(member.name)))
    if steps:
        steps[0] = PlannedStep(steps[0].name, steps[0].target, steps[0].action, commit_point=True)
    if member.name:
        for node in sorted(reachable):
            steps.append(
                PlannedStep(f"remove {member.name} from {node}'s truststore", node, RemoveTruststoreRecord(member.name))
            )
        if member.name in reachable:
            steps.append(PlannedStep(f"fence {member.name}", member.name, FenceNode()))
        steps.append(
            PlannedStep(f"forget {member.name}'s certificate and tokens", COORDINATOR, ForgetMember(member.name))
        )
    unreached = sorted(set(diff.nodes) - set(reachable) - {member.name})
    remainder = []
    # Deferred steps run after success, which needs a commit point before them; without one they are only reported.
    defer = bool(steps) and steps[0].commit_point
    if unreached and member.name:
        for node in unreached if defer else ():
            steps.append(
                PlannedStep(
                    f"remove {member.name} from {node}'s truststore when {node} answers",
                    node,
                    RemoveTruststoreRecord(member.name),
                    deferred=True,
                )
            )
        then = "until they answer" if defer else "(no answer)"
        remainder.append(f"the truststores of {', '.join(unreached)} still hold {label} {then}")
    if member.name and member.name not in reachable:
        if defer and agent is not None:
            fence = FenceNode(agent.address, agent.certificate_pem)
            steps.append(PlannedStep(f"fence {member.name} when it answers", member.name, fence, deferred=True))
            remainder.append(f"{label} did not answer: it is fenced when it does")
        else:
            remainder.append(f"{label} did not answer and was not fenced: reset it before it comes back")
    return Plan(tuple(steps), "; ".join(remainder))


def _ghost_removal(member: Member, via: str, role: Role | None) -> Plan:
    """A Raft member no record names (microcluster #774's ghost): microcluster removes members by the record that
    names them, so this is one of the writes it has no flow for, made through dqlite by a member's agent."""
    step = PlannedStep(
        f"remove node {member.node_id} at {member.address} from the Raft configuration",
        via,
        RemoveRaftEntry(member.node_id, member.address, role),
        commit_point=True,
    )
    return Plan((step,), "")


def _removal_through_microcluster(member: Member, via: str, *, reachable: Collection[str], force: bool) -> Plan:
    name = member.name
    steps = (
        PlannedStep(
            f"remove {name} through microcluster",
            via,
            RemoveThroughMicrocluster(name, member.address, member.node_id, force),
            commit_point=True,
        ),
        PlannedStep(
            f"finish what microcluster left of {name}, by force",
            via,
            RemoveThroughMicrocluster(name, member.address, member.node_id, force=True),
        ),
        PlannedStep(f"forget {name}'s certificate and tokens", COORDINATOR, ForgetMember(name)),
    )
    remainder = (
        ""
        if name in reachable
        else f"{name}'s agent did not answer: microcluster resets a removed member only when its daemon answers, so"
        " reset it before it comes back"
    )
    return Plan(steps, remainder)


@dataclass(frozen=True)
class Joiner:
    """A node asking to join: its name, address, certificate, agent, and the dqlite node ID its agent reported."""

    name: str
    address: str
    certificate_pem: str
    agent_address: str
    node_id: int


class NotOnMicrocluster(ValueError):
    """A request for what only the microcluster backend has, on a cluster whose agents report another backend."""


# How long microcluster's token for a joiner lives: it is used within the same operation, seconds after its issue.
MICROCLUSTER_JOIN_TOKEN_TTL = 300.0


def plan_join(
    diff: MembershipDiff,
    joiner: Joiner,
    *,
    reachable: Collection[str],
    certificates: Mapping[str, str],
    role: Role = Role.VOTER,
) -> Plan:
    """The steps that add `joiner` to every source; the engine-join step is the commit point.

    certificates maps each member's name to its certificate PEM (the diff carries only fingerprints): the joiner's
    truststore needs the certificates themselves."""
    members = sorted(node for node in reachable if node != joiner.name)
    if not members:
        raise CannotPlan("no reachable member can write the joiner's row")
    via = members[0]
    name, address, pem = joiner.name, joiner.address, joiner.certificate_pem
    if diff.backend == "microcluster":
        return _join_through_microcluster(joiner, via)
    known = {m.name: m for m in diff.members if m.name}
    missing = sorted(set(known) - set(certificates))
    if missing:
        raise CannotPlan(f"no certificate is known for {', '.join(missing)}: the joiner could not trust them")
    steps = [PlannedStep(f"reserve {name}'s row (PENDING)", via, EnsureMemberRow(name, address, pem, "PENDING"))]
    steps += [
        PlannedStep(f"trust {name} on {node}", node, EnsureTruststoreRecord(name, address, pem)) for node in members
    ]
    for peer in sorted(known):
        record = EnsureTruststoreRecord(peer, known[peer].address, certificates[peer])
        steps.append(PlannedStep(f"{name} trusts {peer}", name, record))
    steps.append(PlannedStep(f"{name} trusts itself", name, EnsureTruststoreRecord(name, address, pem)))
    steps.append(
        PlannedStep(
            f"{name} joins the Raft configuration as node {joiner.node_id}",
            name,
            EnsureRaftEntry(joiner.node_id, address, role),
            commit_point=True,
        )
    )
    steps += [
        PlannedStep(f"{node} still trusts {name}", node, EnsureTruststoreRecord(name, address, pem)) for node in members
    ]
    steps.append(PlannedStep(f"record {name}'s role", via, EnsureMemberRow(name, address, pem, role.text)))
    steps.append(PlannedStep(f"register {name}", COORDINATOR, RegisterMember(name, joiner.agent_address, pem)))
    unreached = sorted(set(diff.nodes) - set(reachable))
    remainder = f"the truststores of {', '.join(unreached)} (no answer) do not hold {name} yet" if unreached else ""
    return Plan(tuple(steps), remainder)


def _join_through_microcluster(joiner: Joiner, via: str) -> Plan:
    name = joiner.name
    steps = (
        PlannedStep(
            f"microcluster issues {name}'s join token on {via}",
            via,
            IssueMicroclusterToken(name, MICROCLUSTER_JOIN_TOKEN_TTL),
        ),
        PlannedStep(
            f"{name} joins through microcluster", name, JoinThroughMicrocluster(name, joiner.address), commit_point=True
        ),
        PlannedStep(
            f"register {name}", COORDINATOR, RegisterMember(name, joiner.agent_address, joiner.certificate_pem)
        ),
    )
    return Plan(steps, "")


def undo(action: Action) -> Action | None:
    """The action that reverses `action` during a rollback, or None when there is nothing to reverse."""
    match action:
        case EnsureMemberRow(name=name):
            return RemoveMemberRow(name)
        case EnsureTruststoreRecord(name=name):
            return RemoveTruststoreRecord(name)
        case EnsureRaftEntry(node_id=node_id, address=address):
            return RemoveRaftEntry(node_id, address)  # whatever role the engine gave it since
        case IssueMicroclusterToken(name=name):
            return RevokeMicroclusterToken(name)
        case _:
            return None
