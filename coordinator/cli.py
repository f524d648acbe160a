"""The `memberguard` command line.

Every subcommand sets `handler` (args -> exit status) on its parser; `main` only parses and dispatches. The
commands here talk to the coordinator through the public `memberguard` client only: `check` (a fresh diff),
`token issue|list|revoke`, `remove` and `ops` (the guarded operations and their journal). `join` is the joining
node's side instead: it holds no operator certificate, only its token (coordinator.agent.join). `journal recover`
runs offline, beside a stopped coordinator whose journal is damaged (coordinator/journal_recovery.py). `adopt`
writes memberguard's configuration for a microcluster member from its state directory (coordinator/adopt.py), and
`version` asks nobody. `lab ...` comes from the lab (coordinator.lab.lab.register), the one import of the lab in the
product.

Output (`-o table|json|yaml`, `--json` the same as `-o json`): `table` is text for a person; `json` is the proto3 JSON
mapping as grpcurl prints it (MessageToJson's defaults: lowerCamelCase names, enums by name, 64-bit integers as
strings, default values left out), and `yaml` the same document in YAML. A call the coordinator failed prints, in
json or yaml, its rich status on stdout as well (`_error_document`); its error line stays on stderr.

Exit status (EXIT_STATUSES, also the parser's epilog): 0 success; 1 `check` found a discrepancy WARNING or worse,
or the operation shown did not succeed; 2 a usage error (bad arguments, a request the coordinator calls invalid, a
missing or unreadable file); 3 the coordinator cannot be reached, refuses the call (a token expired, refused or in
use included), or has no such token or operation; 4 the guard refused the change (DirtyMembership, OperationParked
or StaleFingerprint). `_ending` says which, by the error's type: the client decodes it by the ErrorInfo reason.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.metadata
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

# gRPC's C core writes its own lines to stderr (a failed TLS handshake, for one), which would break the one-line
# error contract; the error line check prints says what failed. The C core reads GRPC_VERBOSITY only when grpc is
# first imported, so this quiets the CLI's own process; a program that loaded grpc before importing this module
# (a test run, say) keeps its logging and its environment. GRPC_VERBOSITY set by the user still wins.
if "grpc" not in sys.modules:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc
import memberguard
import yaml
from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message

# Imported for the detail types they register too: an error's details are printed through the default pool.
from google.rpc import error_details_pb2, status_pb2
from memberguard.v1 import coordinator_pb2, membership_pb2, operation_pb2, repair_pb2

from coordinator import adopt as adoption
from coordinator.agent.join import CoordinatorNotVerified, request_join
from coordinator.core.tokens import MalformedToken
from coordinator.lab import lab as labs

if TYPE_CHECKING:
    from coordinator.journal_recovery import Recovered

EXIT_OK = 0
EXIT_DISCREPANCIES = 1
# The same status as EXIT_DISCREPANCIES: the call worked, but what it reports is not the state asked for.
EXIT_NOT_SUCCEEDED = 1
EXIT_USAGE = 2
EXIT_COORDINATOR = 3
EXIT_REFUSED = 4

EXIT_STATUSES = """\
exit status:
  0  success: check found nothing WARNING or worse; the operation shown succeeded
  1  check found a discrepancy WARNING or worse; or the operation shown (token issue, remove,
     ops ID) rolled back, is parked, or had not finished when the command returned
  2  usage error: bad arguments, a request the coordinator calls invalid, a missing or unreadable file
  3  the coordinator is unreachable or refuses the call (certificate, role, already exists, a token
     expired, refused or in use, too many failed attempts, an internal error), or has no such
     token or operation
  4  the guard refused the change: blocking discrepancies (DirtyMembership), a parked operation
     (OperationParked) or a stale --fingerprint (StaleFingerprint); the violations and the
     current fingerprint go to stderr
"""

_SEVERITIES = {
    "info": membership_pb2.SEVERITY_INFO,
    "warning": membership_pb2.SEVERITY_WARNING,
    "blocking": membership_pb2.SEVERITY_BLOCKING,
}
_ENDPOINT_FLAGS = ("address", "ca", "server_name", "cert", "key")
_FINISHED = (
    operation_pb2.OPERATION_STATE_SUCCEEDED,
    operation_pb2.OPERATION_STATE_ROLLED_BACK,
    operation_pb2.OPERATION_STATE_PARKED,
)

_OUTPUTS = ("table", "json", "yaml")


class _Parser(argparse.ArgumentParser):
    """Puts itself in the namespace as `parser` when it parses: the innermost command's parser wins (a subcommand's
    defaults are set after its parent's), and is the one to report that command's usage errors. Subparsers are of
    the class of their parent, so the lab's commands are too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(parser=self)


# A string: argparse._SubParsersAction is generic for type checkers only.
_Subparsers: TypeAlias = "argparse._SubParsersAction[_Parser]"


class _Exit(Exception):
    """Ends a command: its status, one error line on stderr, and for a refusal the lines that say why; `output`, if
    any, goes to stdout first (a failed call's status, in json or yaml)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        prog: str = "memberguard",
        detail: Sequence[str] = (),
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.prog = prog
        self.detail = list(detail)
        self.output = output

    def report(self) -> int:
        if self.output:
            print(self.output, flush=True)
        _fail(self.status, self.message, prog=self.prog)
        for line in self.detail:
            print(line, file=sys.stderr)
        return self.status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # parse_args would report them through the top-level parser, whose usage says nothing of the command's
            # options; the command's own parser shows its usage.
            args.parser.error("unrecognized arguments: " + " ".join(unknown))
    except SystemExit as exc:
        # argparse exits 2 on a usage error and 0 after --help; return that status instead of raising it.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        status: int = args.handler(args)
    except _Exit as stop:
        return stop.report()
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memberguard",
        description="Check and guard cluster membership through the memberguard coordinator.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_check(subparsers)
    _register_token(subparsers)
    _register_remove(subparsers)
    _register_ops(subparsers)
    _register_abandon(subparsers)
    _register_repair(subparsers)
    _register_join(subparsers)
    _register_journal(subparsers)
    _register_adopt(subparsers)
    _register_version(subparsers)
    labs.register(subparsers)
    return parser


# --- output ----------------------------------------------------------------------------------------------------


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """-o, and --json as its alias; given both, argparse refuses, since which one was meant is a guess."""
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "-o",
        "--output",
        choices=_OUTPUTS,
        default="table",
        help="table (the default), or the result in the proto3 JSON mapping as json or yaml; in json or yaml a "
        "failed call prints its status on stdout too",
    )
    output.add_argument("--json", dest="output", action="store_const", const="json", help="the same as -o json")


def _show(args: argparse.Namespace, text: str, shown: Message | Mapping[str, Any]) -> None:
    """Prints text (the table), or shown in the JSON mapping: a message, or a dict already named as one would be."""
    print(text if args.output == "table" else _formatted(args.output, shown), flush=True)


def _formatted(output: str, shown: Message | Mapping[str, Any]) -> str:
    # MessageToDict is the object MessageToJson dumps, so a message and a dict come out alike.
    document = json_format.MessageToDict(shown) if isinstance(shown, Message) else shown
    text = json.dumps(document, indent=2)
    if output == "json":
        return text
    # The JSON read back is the same document in plain dicts, its order kept (MessageToDict writes an Any as an
    # OrderedDict, which safe_dump refuses).
    return yaml.safe_dump(json.loads(text), sort_keys=False, default_flow_style=False).rstrip("\n")


# --- the coordinator: options, endpoint, client ----------------------------------------------------------------


def _add_coordinator_options(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    """The options every command that calls the coordinator takes: where it is, the output and --timeout."""
    where = parser.add_argument_group(
        "coordinator",
        "either --lab, or the five others; each of those falls back to its MEMBERGUARD_* variable "
        "(MEMBERGUARD_ADDRESS, _CA, _SERVER_NAME, _CERT, _KEY), then to the profile: MEMBERGUARD_PROFILE, else "
        "~/.config/memberguard/profile.json",
    )
    where.add_argument("--lab", metavar="DIR", help="a lab directory holding lab.json")
    where.add_argument("--address", metavar="HOST:PORT", help="the coordinator's address")
    where.add_argument("--ca", metavar="FILE", help="PEM certificate(s) to trust for the coordinator")
    where.add_argument("--server-name", metavar="NAME", help="the name in the coordinator's certificate")
    where.add_argument("--cert", metavar="FILE", help="your PEM certificate")
    where.add_argument("--key", metavar="FILE", help="your PEM private key")
    _add_output_options(parser)
    parser.add_argument(
        "--timeout", type=_seconds, default=timeout, metavar="S", help=f"call deadline (default {timeout:g})"
    )


def _endpoint(args: argparse.Namespace) -> memberguard.Endpoint:
    parser: argparse.ArgumentParser = args.parser
    given = [flag for flag in _ENDPOINT_FLAGS if getattr(args, flag) is not None]
    if args.lab is not None and given:
        raise _usage(parser, "--lab cannot be combined with " + ", ".join(_option(f) for f in given))
    try:
        if args.lab is not None:
            return memberguard.Endpoint.from_lab(args.lab)
        # Each field from its flag, else its MEMBERGUARD_* variable, else the profile.
        return memberguard.Endpoint.from_profile(**{flag: getattr(args, flag) for flag in _ENDPOINT_FLAGS})
    except OSError as exc:
        raise _usage(parser, f"cannot read {exc.filename}: {exc.strerror}" if exc.filename else str(exc)) from None
    except ValueError as exc:
        raise _usage(parser, str(exc)) from None


@contextmanager
def _connected(args: argparse.Namespace) -> Iterator[memberguard.Client]:
    """A client for the coordinator the options name; a failed call inside ends the command with its status."""
    endpoint = _endpoint(args)
    try:
        with memberguard.Client(endpoint) as client:
            yield client
    except memberguard.MemberguardError as exc:
        raise _failure(args, exc, f"coordinator {endpoint.address}") from None


def _failure(args: argparse.Namespace, exc: memberguard.MemberguardError, where: str) -> _Exit:
    """How a failed call ends the command (_ending), and in json or yaml its status on stdout."""
    stop = _ending(exc, where)
    if args.output != "table":
        stop.output = _formatted(args.output, _error_document(exc))
    return stop


def _ending(exc: memberguard.MemberguardError, where: str) -> _Exit:
    """How a failed call ends the command, by the error's type: 2 an invalid request, 4 the guard said no, 3 anything
    else, each with a line that says what it means."""
    if isinstance(exc, memberguard.InvalidArgument):
        return _Exit(EXIT_USAGE, f"invalid request: {exc}")
    if isinstance(exc, memberguard.MembershipRefused):
        return _refusal(exc)
    if isinstance(exc, memberguard.TokenInUse):
        meaning = "the token is in use: a join in flight holds it; it can be revoked once that join ends"
    elif isinstance(exc, memberguard.TokenExpired):
        meaning = "the token has expired: issue a new one"
    elif isinstance(exc, memberguard.TokenRefused):
        meaning = "the token was refused"
    elif isinstance(exc, memberguard.TooManyAttempts):
        meaning = f"too many failed attempts from this address: retry in {math.ceil(exc.retry_after)} s"
    elif isinstance(exc, memberguard.Internal):
        meaning = f"the coordinator failed unexpectedly; its log has the details under error id {exc.error_id or '-'}"
    else:
        return _Exit(EXIT_COORDINATOR, f"{where}: {exc}")
    return _Exit(EXIT_COORDINATOR, f"{where}: {meaning} ({exc})")


def _refusal(exc: memberguard.MembershipRefused) -> _Exit:
    """The guard said no: why (the violations: a dirty diff and parked operations have them, a stale fingerprint none)
    and the fresh fingerprint."""
    detail: list[str] = []
    if exc.violations:
        detail += _table(("TYPE", "SUBJECT", "DESCRIPTION"), exc.violations)
    if isinstance(exc, memberguard.OperationParked):
        detail += [f"finish it first; see: memberguard ops {operation_id}" for operation_id in exc.operation_ids]
    if exc.discrepancies_left_out:
        detail.append(f"{exc.discrepancies_left_out} more discrepancies were left out of the refusal; check lists all")
    if exc.diff is not None:
        detail.append(f"fingerprint {exc.diff.fingerprint}")
    if isinstance(exc, memberguard.OperationParked):
        return _Exit(
            EXIT_REFUSED, f"the guard refused: a parked operation must be finished first ({exc})", detail=detail
        )
    return _Exit(EXIT_REFUSED, f"the guard refused: {exc}", detail=detail)


def _error_document(exc: memberguard.MemberguardError) -> dict[str, Any]:
    """The failed call's google.rpc.Status in the JSON mapping (each detail an Any: its "@type" and its fields), but
    with the code by name, as grpcurl prints an error; an empty message or no details are left out like any default."""
    status = exc.status or _own_status(exc)
    document: dict[str, Any] = {"code": exc.code.name}
    if exc.message:
        document["message"] = exc.message
    if status.details:
        document["details"] = [_detail(detail) for detail in status.details]
    return document


def _own_status(exc: memberguard.MemberguardError) -> status_pb2.Status:
    """For an error the client raised itself (a request it would not send): its reason and field violations, as the
    coordinator sends them."""
    status = status_pb2.Status(code=exc.code.value[0], message=exc.message)
    if exc.reason:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=exc.reason, metadata=exc.metadata))
    if isinstance(exc, memberguard.InvalidArgument) and exc.field_violations:
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=name, description=description)
            for name, description in exc.field_violations
        ]
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=violations))
    return status


def _detail(detail: any_pb2.Any) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(detail)
    except TypeError:
        # A type this CLI was built without (a newer coordinator's): its bytes, as the mapping writes a well-known
        # type's value, rather than no answer at all.
        return {"@type": detail.type_url, "value": base64.b64encode(detail.value).decode()}


# --- check -----------------------------------------------------------------------------------------------------


def _register_check(subparsers: _Subparsers) -> None:
    check = subparsers.add_parser(
        "check",
        help="compare every source on every node and print the discrepancies",
        description="Ask the coordinator for a fresh membership diff. Exit 0 if nothing is WARNING or worse, "
        "1 if something is, 2 on a usage error, 3 if the coordinator is unreachable or refuses.",
    )
    _add_coordinator_options(check, timeout=10.0)
    check.add_argument("--agent-timeout", type=_seconds, metavar="S", help="per-agent deadline (at most 60)")
    check.add_argument(
        "--min-severity", choices=sorted(_SEVERITIES), help="leave out the discrepancies below this severity"
    )
    watching = check.add_argument_group("watching", "with --watch, --timeout is ignored: the stream runs until Ctrl-C")
    watching.add_argument(
        "--watch",
        action="store_true",
        help="print the diff, then each change the coordinator's checks find, as it happens (one JSON object per "
        "line with -o json); on Ctrl-C, the resume token goes to stderr",
    )
    watching.add_argument("--resume", default="", metavar="TOKEN", help="resume a watch from its last resume token")
    watching.add_argument(
        "--heartbeat", type=_seconds, metavar="S", help="the quiet after which the coordinator says it is alive (1-300)"
    )
    check.set_defaults(handler=_run_check)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _run_check(args: argparse.Namespace) -> int:
    if args.watch:
        return _run_watch(args)
    with _connected(args) as client:
        response = client.check_membership(
            agent_timeout=args.agent_timeout,
            minimum_severity=_SEVERITIES[args.min_severity] if args.min_severity else None,
            timeout=args.timeout,
        )
    _show(args, render_diff(response.diff), response)
    blocks = any(d.severity != membership_pb2.SEVERITY_INFO for d in response.diff.discrepancies)
    return EXIT_DISCREPANCIES if blocks else EXIT_OK


def _run_watch(args: argparse.Namespace) -> int:
    if args.output == "yaml":
        raise _usage(args.parser, "--watch prints table or json")
    token = args.resume
    try:
        with (
            _connected(args) as client,
            client.watch_membership(resume_token=args.resume, heartbeat_interval=args.heartbeat) as watch,
        ):
            for response in watch:
                token = response.resume_token
                text = json.dumps(json_format.MessageToDict(response)) if args.output == "json" else _event(response)
                if text:
                    print(text, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if token:
            print(f"resume token {token}", file=sys.stderr)
    return EXIT_OK


def _event(response: coordinator_pb2.WatchMembershipResponse) -> str:
    """One watch response as lines, each stamped with when the coordinator sent it; a heartbeat prints nothing."""
    at = response.header.served_at.ToDatetime(UTC).strftime("%H:%M:%S")
    event = response.WhichOneof("event")
    if event == "snapshot":
        reason = _enum_name(coordinator_pb2.SnapshotReason.DESCRIPTOR, response.snapshot.reason, "SNAPSHOT_REASON_")
        return f"{at} snapshot ({reason})\n{render_diff(response.snapshot.diff)}"
    if event == "resumed":
        return f"{at} resumed: {response.resumed.changes_since} changes since"
    if event != "change":
        return ""
    change = response.change
    lines = []
    for moved in change.discrepancies:
        d = moved.discrepancy
        transition = _enum_name(
            coordinator_pb2.DiscrepancyTransition.DESCRIPTOR, moved.transition, "DISCREPANCY_TRANSITION_"
        )
        severity = _enum_name(membership_pb2.Severity.DESCRIPTOR, d.severity, "SEVERITY_")
        kind = _enum_name(membership_pb2.DiscrepancyKind.DESCRIPTOR, d.kind, "DISCREPANCY_KIND_")
        member = _member_label(d.member) if d.HasField("member") else "-"
        lines.append(f"{at} {transition} {severity} {kind} {member} {d.node or '-'}: {_one_line(d.summary)}")
    if change.fingerprint != change.previous_fingerprint:
        lines.append(f"{at} fingerprint {change.previous_fingerprint[:12]} -> {change.fingerprint[:12]}")
    return "\n".join(lines)


def render_diff(diff: membership_pb2.MembershipDiff) -> str:
    """The diff as a table, one row per discrepancy with its remedies below it, then a summary line."""
    if not diff.discrepancies:
        return f"consistent\nfingerprint {diff.fingerprint}"
    header, *rows = _table(
        ("SEVERITY", "KIND", "MEMBER", "SOURCE", "NODE", "SUMMARY"),
        [
            (
                _enum_name(membership_pb2.Severity.DESCRIPTOR, d.severity, "SEVERITY_"),
                _enum_name(membership_pb2.DiscrepancyKind.DESCRIPTOR, d.kind, "DISCREPANCY_KIND_"),
                _member_label(d.member) if d.HasField("member") else "-",
                _enum_name(membership_pb2.Source.DESCRIPTOR, d.source, "SOURCE_") if d.source else "-",
                d.node or "-",
                d.summary,
            )
            for d in diff.discrepancies
        ],
    )
    lines = [header]
    for row, discrepancy in zip(rows, diff.discrepancies, strict=True):
        lines.append(row)
        if discrepancy.explained_by_operation_id:
            lines.append(f"    explained by operation {discrepancy.explained_by_operation_id}, in flight")
        for remedy in discrepancy.remedies:
            safety = _enum_name(membership_pb2.RemedySafety.DESCRIPTOR, remedy.safety, "REMEDY_SAFETY_")
            lines.append(f"    remedy ({safety}): {_one_line(remedy.action)}")
            lines += [f"      - {_remedy_step(step)}" for step in remedy.steps]
    counts = {name: sum(1 for d in diff.discrepancies if d.severity == value) for name, value in _SEVERITIES.items()}
    lines.append(
        f"fingerprint {diff.fingerprint}  {len(diff.discrepancies)} discrepancies: "
        f"{counts['blocking']} blocking, {counts['warning']} warning, {counts['info']} info"
    )
    return "\n".join(lines)


_STEP_TEXT = {
    membership_pb2.REPAIR_STEP_KIND_WRITE_RECORD: "write {record} to {where}",
    membership_pb2.REPAIR_STEP_KIND_DELETE_RECORD: "delete {record} from {where}",
    membership_pb2.REPAIR_STEP_KIND_RESET_NODE: "reset {node}",
    membership_pb2.REPAIR_STEP_KIND_FORGET_MEMBER: "forget {record}'s pinned certificate and tokens",
    membership_pb2.REPAIR_STEP_KIND_RESTART_ENGINE: "restart {node}'s engine",
    membership_pb2.REPAIR_STEP_KIND_WAIT: "wait for {where}",
    membership_pb2.REPAIR_STEP_KIND_CONFIRM: "confirm {where}",
    membership_pb2.REPAIR_STEP_KIND_BY_HAND: "by hand: {entry}{where}",
}


def _remedy_step(step: membership_pb2.RepairStep) -> str:
    """A remedy's typed step in a few words, e.g. "write n3 to n2's truststore, from the members-table"; -o json has
    it in full."""
    record = step.record
    label = record.name or (f"node {record.node_id} at {record.address}" if record.node_id else record.address)
    known = _STEP_TEXT.get(step.kind)
    # A kind added after this client was built is shown by its number.
    text = f"{step.kind} {{where}}" if known is None else known
    text = text.format(
        record=label or record.entry or "-",
        entry=f"{record.entry} in " if record.entry else "",
        where=_where(step.node, step.source),
        node=step.node or "-",
    )
    if step.kind == membership_pb2.REPAIR_STEP_KIND_WRITE_RECORD and step.HasField("evidence"):
        text += f", from {_where(step.evidence.node, step.evidence.source)}"
    return text


def _where(node: str, source: membership_pb2.Source.ValueType) -> str:
    """n2's truststore, the members-table; a step about no single source names its node, or the cluster."""
    name = _enum_name(membership_pb2.Source.DESCRIPTOR, source, "SOURCE_") if source else ""
    if node:
        return f"{node}'s {name}" if name else node
    return f"the {name or 'cluster'}"


# --- token issue | list | revoke ---------------------------------------------------------------------------------


def _register_token(subparsers: _Subparsers) -> None:
    token = subparsers.add_parser(
        "token",
        help="issue, list and revoke join tokens",
        description="Join tokens: each lets one new member join under the name it was issued for.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    issue = _operation_parser(
        commands,
        "issue",
        help="issue a join token (under the guard) and print it alone on stdout",
        description="Issue a join token for NAME under the guard. The token alone goes to stdout (it is shown\n"
        "this once: the coordinator keeps only its digest), its expiry to stderr.",
        timeout=30.0,
    )
    issue.add_argument("name", metavar="NAME", help="the new member's name (a DNS name of its certificate)")
    issue.add_argument("--ttl", type=_seconds, metavar="S", help="how long it may be used (default 1 h, at most 7 d)")
    issue.add_argument("--request-id", metavar="ID", help="makes a retry safe (default: a fresh one)")
    issue.add_argument(
        "--microcluster",
        action="store_true",
        help="microcluster's own token, for a joiner that joins with `microctl init` (microcluster backend)",
    )
    issue.set_defaults(handler=_run_token_issue)
    listing = _operation_parser(
        commands, "list", help="list the usable tokens (never their secrets)", description="List the usable tokens."
    )
    listing.set_defaults(handler=_run_token_list)
    revoke = _operation_parser(
        commands, "revoke", help="make a name's token unusable", description="Make NAME's token unusable."
    )
    revoke.add_argument("name", metavar="NAME", help="the name the token was issued for")
    revoke.set_defaults(handler=_run_token_revoke)


def _operation_parser(
    subparsers: _Subparsers, name: str, *, help: str, description: str, timeout: float = 10.0
) -> argparse.ArgumentParser:
    """A subcommand that calls the coordinator, with the exit statuses in its help."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_coordinator_options(parser, timeout=timeout)
    return parser


def _run_token_issue(args: argparse.Namespace) -> int:
    with _connected(args) as client:
        operation = client.issue_token(
            args.name, ttl=args.ttl, request_id=args.request_id, microcluster=args.microcluster, timeout=args.timeout
        )
        # Print before asking anything else: this answer is the only copy of the token.
        if args.output != "table" or operation.token:
            _show(args, operation.token, operation)
        if operation.token:
            # A token that is not the coordinator's (microcluster's, on that backend) says in its plan how to use it.
            print(operation.plan or _expiry_line(client, args.name, args.timeout), file=sys.stderr)
    if operation.state != operation_pb2.OPERATION_STATE_SUCCEEDED:
        raise _Exit(EXIT_NOT_SUCCEEDED, f"operation {operation.id} {_state(operation)}: {operation.error or '-'}")
    if not operation.token:
        # A retry with the --request-id of an earlier issue gets that operation back, and the secret is shown once.
        raise _Exit(
            EXIT_NOT_SUCCEEDED,
            f"operation {operation.id} issued the token for {args.name} to an earlier request with this request id; "
            f"its secret is not shown again: revoke it and issue a new one",
        )
    return EXIT_OK


def _expiry_line(client: memberguard.Client, name: str, timeout: float) -> str:
    try:
        tokens = client.list_tokens(timeout=timeout)
    except memberguard.MemberguardError as exc:
        return f"token for {name} issued; its expiry could not be read: {exc}"
    expiry = next((_when(t.expires_at) for t in tokens if t.name == name), "an unknown time (not listed)")
    return f"token for {name} expires at {expiry}"


def _run_token_list(args: argparse.Namespace) -> int:
    with _connected(args) as client:
        tokens = client.list_tokens(timeout=args.timeout)
    # The client hands back the tokens alone; json and yaml show them as the response message (without its header).
    _show(args, render_tokens(tokens), coordinator_pb2.ListTokensResponse(tokens=tokens))
    return EXIT_OK


def _run_token_revoke(args: argparse.Namespace) -> int:
    with _connected(args) as client:
        token = client.revoke_token(args.name, timeout=args.timeout)
    _show(args, f"revoked the token for {token.name} (it expired at {_when(token.expires_at)})", token)
    return EXIT_OK


def render_tokens(tokens: Sequence[operation_pb2.TokenInfo]) -> str:
    """The tokens as a table; a token's secret is never in a TokenInfo, so never here."""
    if not tokens:
        return "no tokens"
    rows = [
        (t.name, _when(t.expires_at), t.bound_certificate_fingerprint[:16] or "-", t.issued_by or "-") for t in tokens
    ]
    return "\n".join(_table(("NAME", "EXPIRES", "BOUND", "ISSUED BY"), rows))


# --- remove ----------------------------------------------------------------------------------------------------


def _register_remove(subparsers: _Subparsers) -> None:
    remove = _operation_parser(
        subparsers,
        "remove",
        help="remove a member under the guard and print the operation",
        description="Remove a member under the guard and print the operation: its steps (✓ done, · not),\n"
        "the commit point, and what is left to do if anything is. A refusal prints the violations\n"
        "and the current fingerprint on stderr.",
        timeout=60.0,
    )
    remove.add_argument(
        "name", metavar="NAME", nargs="?", default="", help="the member; leave it out to remove by --member-address"
    )
    # Not --address: that one names the coordinator, as in every command here.
    remove.add_argument(
        "--member-address", default="", metavar="ADDR", help="the member's address (checked against NAME's records)"
    )
    remove.add_argument("--force", action="store_true", help="remove a dead or broken member")
    remove.add_argument(
        "--ack",
        action="extend",
        nargs="+",
        default=None,
        metavar="ID",
        help="acknowledge these discrepancies (their ids, from check --json)",
    )
    remove.add_argument("--fingerprint", default="", metavar="FP", help="only if the diff still has this fingerprint")
    remove.add_argument("--request-id", metavar="ID", help="makes a retry safe (default: a fresh one)")
    remove.set_defaults(handler=_run_remove)


def _run_remove(args: argparse.Namespace) -> int:
    with _connected(args) as client:
        operation = client.remove_member(
            args.name,
            address=args.member_address,
            force=args.force,
            acknowledged=args.ack or (),
            expected_fingerprint=args.fingerprint,
            request_id=args.request_id,
            timeout=args.timeout,
        )
    _show(args, render_operation(operation), operation)
    return _outcome(args, operation)


def _outcome(args: argparse.Namespace, operation: operation_pb2.Operation) -> int:
    """0 if the operation succeeded, 1 if not (yet); an unfinished one gets a line saying how to follow it."""
    if operation.state == operation_pb2.OPERATION_STATE_SUCCEEDED:
        return EXIT_OK
    if operation.state not in _FINISHED:
        print(
            f"{args.parser.prog}: operation {operation.id} is {_state(operation)}; "
            f"follow it with: memberguard ops {operation.id} --wait 60",
            file=sys.stderr,
        )
    return EXIT_NOT_SUCCEEDED


def render_operation(operation: operation_pb2.Operation) -> str:
    """The operation in full: what, who, the guard's verdict, each step, and why it stopped if it did."""
    audit = operation.audit
    fields = [
        ("operation", operation.id),
        ("kind", _kind(operation)),
        ("member", _member_label(operation.member) if operation.HasField("member") else "-"),
        ("state", _state(operation)),
        ("requested", f"by {audit.requested_by or '-'} at {_when(operation.created_at)}, request {audit.request_id}"),
        ("verdict", audit.verdict or "-"),
        ("fingerprint", audit.fingerprint or "-"),
    ]
    if audit.acknowledged_discrepancy_ids:
        fields.append(("acknowledged", " ".join(audit.acknowledged_discrepancy_ids)))
    if operation.error:
        fields.append(("error", operation.error))
    if operation.steps:
        fields.append(("steps", ""))
    lines = [f"{name:<12} {_one_line(value)}".rstrip() for name, value in fields]
    lines += [f"  {_step_line(step)}" for step in operation.steps]
    if operation.plan:
        lines.append(f"{'plan':<12} {_one_line(operation.plan)}")
    return "\n".join(lines)


def _step_line(step: operation_pb2.Step) -> str:
    mark = "✓" if step.state == operation_pb2.STEP_STATE_DONE else "·"
    undone = " (undone)" if step.state == operation_pb2.STEP_STATE_UNDONE else ""
    skipped = " (skipped)" if step.state == operation_pb2.STEP_STATE_SKIPPED else ""
    commit = "  [commit point]" if step.commit_point else ""
    deferred = "  [deferred]" if step.deferred else ""
    return f"{mark} {_one_line(step.name)}{undone}{skipped}{commit}{deferred}"


# --- ops -------------------------------------------------------------------------------------------------------


def _register_abandon(subparsers: _Subparsers) -> None:
    abandon = _operation_parser(
        subparsers,
        "abandon",
        help="end a parked operation, leaving what it did as it stands",
        description="Ends a parked operation (ABANDONED), journaled with who ended it and why. One that may be past\n"
        "its commit point needs --force and the blocking discrepancies about its member acknowledged.",
    )
    abandon.add_argument("id", metavar="ID", help="the parked operation")
    abandon.add_argument("--reason", required=True, help="why, for the journal")
    abandon.add_argument("--force", action="store_true", help="abandon it even past its commit point")
    abandon.add_argument(
        "--ack", action="append", default=[], metavar="ID", help="acknowledge a discrepancy about its member (repeat)"
    )
    abandon.set_defaults(handler=_run_abandon)


def _run_abandon(args: argparse.Namespace) -> int:
    with _connected(args) as client:
        operation = client.abandon_operation(
            args.id, args.reason, force=args.force, acknowledged_discrepancy_ids=args.ack, timeout=args.timeout
        )
    _show(args, render_operation(operation), operation)
    return EXIT_OK


def _register_repair(subparsers: _Subparsers) -> None:
    repair = _operation_parser(
        subparsers,
        "repair",
        help="show the plan that would clear the diff, or apply it",
        description="Asks the coordinator how it would clear the current diff: each action with the discrepancies it\n"
        "clears, whether it is safe or needs a human's confirmation and why, and its steps; then the discrepancies\n"
        "no action clears, and why. Nothing is changed unless --apply is given: then the safe actions and those\n"
        "confirmed with --confirm run as one journaled operation, and the membership is checked again after it.",
        timeout=120.0,
    )
    repair.add_argument("--apply", action="store_true", help="apply the plan, then check the membership again")
    repair.add_argument("--request-id", metavar="ID", help="with --apply: makes a retry safe (default: a fresh one)")
    repair.add_argument("--fingerprint", default="", metavar="FP", help="plan only if the diff is still this one")
    repair.add_argument(
        "--only", action="append", default=[], metavar="ID", help="plan for this discrepancy only (repeat)"
    )
    repair.add_argument(
        "--confirm", action="append", default=[], metavar="ACTION", help="an action to confirm, by id (repeat)"
    )
    repair.set_defaults(handler=_run_repair)


def _run_repair(args: argparse.Namespace) -> int:
    if args.apply:
        return _apply_repair(args)
    if args.request_id:
        raise _usage(args.parser, "--request-id goes with --apply")
    with _connected(args) as client:
        plan = client.plan_repair(
            expected_fingerprint=args.fingerprint,
            discrepancy_ids=args.only,
            confirmed_action_ids=args.confirm,
            timeout=args.timeout,
        )
    _show(args, render_repair_plan(plan), plan)
    return EXIT_OK if not plan.unplanned else EXIT_NOT_SUCCEEDED


def _apply_repair(args: argparse.Namespace) -> int:
    """Applies the plan, then checks again: what the repair left is the new diff, shown after the operation."""
    with _connected(args) as client:
        response = client.apply_repair(
            expected_fingerprint=args.fingerprint,
            discrepancy_ids=args.only,
            confirmed_action_ids=args.confirm,
            request_id=args.request_id,
            timeout=args.timeout,
        )
        after = client.check_membership(timeout=args.timeout).diff
    applied = response.operation if response.HasField("operation") else None
    parts = [render_repair_plan(response.plan)]
    parts.append(render_operation(applied) if applied is not None else "nothing was applied")
    parts.append(f"after the repair:\n{render_diff(after)}")
    shown: dict[str, Any] = {"plan": json_format.MessageToDict(response.plan)}
    if applied is not None:
        shown["operation"] = json_format.MessageToDict(applied)
    shown["diff"] = json_format.MessageToDict(after)
    _show(args, "\n\n".join(parts), shown)
    if applied is not None and applied.state != operation_pb2.OPERATION_STATE_SUCCEEDED:
        return _outcome(args, applied)
    return (
        EXIT_DISCREPANCIES if any(d.severity != membership_pb2.SEVERITY_INFO for d in after.discrepancies) else EXIT_OK
    )


def render_repair_plan(plan: repair_pb2.RepairPlan) -> str:
    """The plan as text: each action, its steps under it, then what is left unplanned."""
    lines: list[str] = []
    for action in plan.actions:
        safety = _enum_name(membership_pb2.RemedySafety.DESCRIPTOR, action.safety, "REMEDY_SAFETY_")
        lines.append(f"action {action.id}  {safety}  {_member_label(action.member)}: {_one_line(action.reason)}")
        lines.append(f"  clears {', '.join(action.clears)}")
        lines += [f"  - {_one_line(step.name)}" for step in action.steps]
        if action.remainder:
            lines.append(f"  leaves: {_one_line(action.remainder)}")
    for unplanned in plan.unplanned:
        lines.append(f"unplanned {unplanned.discrepancy_id}: {_one_line(unplanned.reason)}")
    if not lines:
        lines.append("nothing to repair")
    lines.append(f"fingerprint {plan.fingerprint}  {len(plan.actions)} actions, {len(plan.unplanned)} unplanned")
    return "\n".join(lines)


def _register_ops(subparsers: _Subparsers) -> None:
    ops = _operation_parser(
        subparsers,
        "ops",
        help="list the journal's operations, or show one",
        description="Without ID, the journal's operations, newest first. With ID, that operation in full,\n"
        "after waiting for it to finish if --wait is given.",
    )
    ops.add_argument("id", metavar="ID", nargs="?", help="the operation to show")
    ops.add_argument(
        "--wait", type=_seconds, metavar="S", help="with ID: wait up to S seconds (at most 600) for it to finish"
    )
    ops.add_argument(
        "--limit", type=int, default=50, metavar="N", help="without ID: the newest N operations (default 50)"
    )
    ops.set_defaults(handler=_run_ops)


def _run_ops(args: argparse.Namespace) -> int:
    if args.id is None:
        if args.wait is not None:
            raise _usage(args.parser, "--wait needs an operation ID")
        return _list_operations(args)
    with _connected(args) as client:
        if args.wait is None:
            operation = client.get_operation(args.id, timeout=args.timeout)
        else:
            # --timeout bounds the answer, not the wait: the call may take the wait and then that much longer.
            operation = client.wait_operation(args.id, wait=args.wait, timeout=args.wait + args.timeout)
    _show(args, render_operation(operation), operation)
    return _outcome(args, operation)


def _list_operations(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise _usage(args.parser, f"--limit must be at least 1, not {args.limit}")
    with _connected(args) as client:
        response = client.list_operations(page_size=args.limit, timeout=args.timeout)
    _show(args, render_operations(response.operations), response)
    if response.next_page_token and args.output == "table":
        print(f"{args.parser.prog}: older operations are not shown; raise --limit to see them", file=sys.stderr)
    return EXIT_OK


def render_operations(operations: Sequence[operation_pb2.Operation]) -> str:
    if not operations:
        return "no operations"
    rows = [
        (
            op.id,
            _kind(op),
            _member_label(op.member) if op.HasField("member") else "-",
            _state(op),
            op.audit.requested_by or "-",
            _when(op.created_at),
        )
        for op in operations
    ]
    return "\n".join(_table(("ID", "KIND", "MEMBER", "STATE", "REQUESTED BY", "CREATED"), rows))


# --- join ------------------------------------------------------------------------------------------------------


def _register_join(subparsers: _Subparsers) -> None:
    join = subparsers.add_parser(
        "join",
        help="join this node to a cluster with its token (run on the joining node) and print the operation",
        description="Join this node to the cluster its token was issued for, and print the operation as `ops ID`\n"
        "does. Run it on the joining node, its agent already running: the token pins the coordinator's\n"
        "certificate, which is written to --pins (the file the agent trusts coordinators from) before the\n"
        "coordinator is asked. A retry with the same token and name returns the first attempt's outcome.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    join.add_argument("--token", required=True, metavar="TOKEN", help="the join token; - reads it from stdin")
    join.add_argument("--name", required=True, metavar="NAME", help="this member's name (the token's)")
    join.add_argument("--address", required=True, metavar="HOST:PORT", help="this member's Raft address")
    join.add_argument("--cert", required=True, metavar="FILE", help="this member's PEM certificate (server.crt)")
    join.add_argument("--agent-address", required=True, metavar="HOST:PORT", help="where this node's agent answers")
    join.add_argument(
        "--pins", required=True, metavar="FILE", help="the agent's trusted coordinators file (coordinators.pem)"
    )
    _add_output_options(join)
    join.add_argument("--timeout", type=_seconds, default=60.0, metavar="S", help="call deadline (default 60)")
    join.set_defaults(handler=_run_join)


def _run_join(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    token = sys.stdin.readline().strip() if args.token == "-" else args.token
    try:
        certificate = Path(args.cert).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _usage(parser, f"cannot read {args.cert}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        operation = asyncio.run(
            request_join(
                token,
                name=args.name,
                address=args.address,
                certificate_pem=certificate,
                agent_address=args.agent_address,
                pins=Path(args.pins),
                timeout=args.timeout,
            )
        )
    except MalformedToken as exc:
        # Its message describes the token's form, never its text.
        raise _usage(parser, str(exc)) from None
    except CoordinatorNotVerified as exc:
        raise _Exit(EXIT_COORDINATOR, str(exc)) from None
    except grpc.aio.AioRpcError as exc:
        # The coordinator names the token's reason (TOKEN_REVOKED, ...) and never the token itself.
        raise _failure(args, memberguard.error_from_rpc(exc), "the join") from None
    except OSError as exc:
        raise _usage(parser, f"cannot write {args.pins}: {exc.strerror or exc}") from None
    _show(args, render_operation(operation), operation)
    return _outcome(args, operation)


# --- journal recover -------------------------------------------------------------------------------------------


def _register_journal(subparsers: _Subparsers) -> None:
    journal = subparsers.add_parser(
        "journal",
        help="recover the coordinator's journal (run where the coordinator runs, with it stopped)",
        description="The coordinator's journal, offline: the coordinator must be stopped (it holds the journal).",
    )
    commands = journal.add_subparsers(dest="journal_command", required=True, metavar="COMMAND")
    recover = commands.add_parser(
        "recover",
        help="start a new journal above every agent's epoch, keeping the damaged one aside",
        description="For a coordinator that refuses to start because its journal is missing, empty, corrupt or\n"
        "behind what the agents have seen: learn every agent's newest epoch (asked over mutual TLS with the\n"
        "coordinator's certificate; with --lab, read from the state directory of an agent that does not answer),\n"
        "move the journal's files aside (never deleting one) and start a new journal above all of them, which\n"
        "records the recovery: who, when, from what. Exit 0 recovered; 1 nothing to recover, or some agent's\n"
        "epoch is unknown; 2 a usage error; 3 the coordinator holds the journal.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = recover.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="FILE", type=Path, help="the coordinator's configuration (JSON)")
    where.add_argument("--lab", metavar="DIR", type=Path, help="a lab directory: its coordinator's configuration")
    recover.add_argument(
        "--ignore-unreachable",
        action="store_true",
        help="recover even if some agent's epoch is unknown (its steps are refused until it is above it)",
    )
    _add_output_options(recover)
    recover.set_defaults(handler=_run_journal_recover)


def _run_journal_recover(args: argparse.Namespace) -> int:
    # Imported here: only this command needs the journal itself, and every other command starts faster without it.
    from coordinator import journal, journal_recovery

    config = args.config or args.lab / "coordinator" / "coordinator.json"
    try:
        recovered = journal_recovery.recover_journal(config, lab=args.lab, ignore_unreachable=args.ignore_unreachable)
    except journal.JournalLocked as exc:
        raise _Exit(EXIT_COORDINATOR, f"{exc}: stop the coordinator first") from None
    except (journal.JournalHealthy, journal_recovery.EpochsUnknown) as exc:
        raise _Exit(EXIT_NOT_SUCCEEDED, str(exc)) from None
    except OSError as exc:
        raise _usage(args.parser, f"cannot read {exc.filename or config}: {exc.strerror or exc}") from None
    except (ValueError, KeyError) as exc:
        raise _usage(args.parser, f"{config} is not a coordinator configuration: {exc}") from None
    _show(args, "\n".join(journal_recovery.describe(recovered)), _recovery_document(recovered))
    return EXIT_OK


def _recovery_document(recovered: Recovered) -> dict[str, Any]:
    """The recovery, as the new journal records it, in a dict named as the JSON mapping would name a message of it
    (there is none: it never crosses the wire): int64s as strings, a timestamp in RFC 3339, empty values left out. An
    agent's unknown epoch is left out and a known one kept even if 0, as for an `optional int64`."""
    recovery = recovered.recovery
    recovered_at = timestamp_pb2.Timestamp()
    recovered_at.FromNanoseconds(round(recovery.recovered_at * 1e9))
    agents = [
        {"name": agent.name, **({} if agent.epoch is None else {"epoch": str(agent.epoch)}), "how": agent.how}
        for agent in recovery.agents
    ]
    document = {
        "journal": str(recovered.journal),
        "recoveredAt": recovered_at.ToJsonString(),
        "requestedBy": recovery.requested_by,
        "damage": recovery.damage,
        "movedTo": recovery.moved_to,
        "moved": list(recovery.moved),
        "agents": agents,
        "epoch": str(recovery.epoch),
    }
    return {name: value for name, value in document.items() if value}


# --- adopt -----------------------------------------------------------------------------------------------------


def _register_adopt(subparsers: _Subparsers) -> None:
    adopt = subparsers.add_parser(
        "adopt",
        help="attach memberguard to a member of a running microcluster cluster (run for each member)",
        description="Check that DIR is the state directory of an initialised microcluster member, then write its\n"
        "agent's configuration (OUT/agents/NAME/agent.json) and pin its server.crt in OUT/registry.json. The first\n"
        "adopt into an empty OUT also sets up the coordinator there (its identity and coordinator.json, the\n"
        "operator's identity and OUT/profile.json, the agents' OUT/coordinators.pem). Nothing is written unless\n"
        "every check passes. Adopting a member again with the same settings writes nothing; with other ones it\n"
        "is refused unless --replace. Exit 0 adopted (or already), 2 refused: the error names the path or member.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    adopt.add_argument(
        "--state-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="the member's microcluster state directory (e.g. /var/snap/microceph/common/state)",
    )
    adopt.add_argument(
        "--config-dir", required=True, type=Path, metavar="OUT", help="memberguard's configuration for the cluster"
    )
    adopt.add_argument(
        "--agent-listen",
        required=True,
        metavar="HOST:PORT",
        help="where this member's agent listens: the coordinator dials it there",
    )
    adopt.add_argument(
        "--coordinator-listen",
        metavar="HOST:PORT",
        help="the first adopt's: where the coordinator listens (default "
        f"{adoption.DEFAULT_COORDINATOR_LISTEN}); its join listener takes the next port",
    )
    adopt.add_argument(
        "--heartbeat",
        type=_seconds,
        metavar="S",
        help="the daemon's heartbeat interval, if it runs with another than microcluster's default",
    )
    adopt.add_argument("--replace", action="store_true", help="replace the settings of a member adopted before")
    _add_output_options(adopt)
    adopt.set_defaults(handler=_run_adopt)


def _run_adopt(args: argparse.Namespace) -> int:
    try:
        adopted = adoption.adopt(
            args.state_dir,
            args.config_dir,
            agent_listen=args.agent_listen,
            coordinator_listen=args.coordinator_listen,
            heartbeat=args.heartbeat,
            replace=args.replace,
        )
    except adoption.Refused as exc:
        raise _usage(args.parser, str(exc)) from None
    except OSError as exc:
        raise _usage(args.parser, f"cannot write {exc.filename or args.config_dir}: {exc.strerror or exc}") from None
    _show(args, "\n".join(adoption.describe(adopted)), adoption.document(adopted))
    return EXIT_OK


# --- version ---------------------------------------------------------------------------------------------------


def _register_version(subparsers: _Subparsers) -> None:
    version = subparsers.add_parser(
        "version",
        help="print this program's version and the API version it speaks",
        description="Print the memberguard package's version and the protobuf API (package) its client speaks.",
    )
    _add_output_options(version)
    version.set_defaults(handler=_run_version)


def _run_version(args: argparse.Namespace) -> int:
    package = importlib.metadata.version("memberguard")
    # The protos' package is the API version: memberguard.v1 until a breaking change makes a v2.
    api = coordinator_pb2.DESCRIPTOR.package
    # Not a proto message: a dict named as the JSON mapping names fields.
    _show(args, f"{'version':<12} {package}\n{'api':<12} {api}", {"version": package, "apiVersion": api})
    return EXIT_OK


# --- rendering pieces ------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The header and rows as lines of left-aligned columns two spaces apart. The last column is free text: not
    padded, and folded onto its line."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        return "  ".join([*cells, _one_line(row[-1])]).rstrip()

    return [line(row) for row in [header, *rows]]


def _kind(operation: operation_pb2.Operation) -> str:
    return _enum_name(operation_pb2.OperationKind.DESCRIPTOR, operation.kind, "OPERATION_KIND_")


def _state(operation: operation_pb2.Operation) -> str:
    return _enum_name(operation_pb2.OperationState.DESCRIPTOR, operation.state, "OPERATION_STATE_")


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _member_label(member: membership_pb2.Member) -> str:
    if member.name:
        return member.name
    if member.address:
        return member.address
    return f"id {member.node_id}" if member.node_id else "-"


def _enum_name(enum: EnumDescriptor, value: int, prefix: str) -> str:
    # A value added to the protos after this client was built has no name here; show its number.
    known = enum.values_by_number.get(value)
    if known is None:
        return str(value)
    return known.name.removeprefix(prefix).lower().replace("_", "-")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _option(flag: str) -> str:
    return "--" + flag.replace("_", "-")


def _usage(parser: argparse.ArgumentParser, message: str) -> _Exit:
    return _Exit(EXIT_USAGE, message, prog=parser.prog)


def _fail(status: int, message: str, *, prog: str = "memberguard") -> int:
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
