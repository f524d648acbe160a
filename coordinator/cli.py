"""The `memberguard` command line.

Every subcommand sets `handler` (args -> exit status) on its parser; `main` only parses and dispatches.
`check` lives here and talks to the coordinator through the public `memberguard` client only; the other
subcommands come from the modules in `_COMMAND_MODULES`, each exposing `register(subparsers)`.

Exit status of `check`: 0 when no discrepancy is WARNING or worse, 1 when one is, 2 for a usage error (bad
arguments, a request the coordinator calls invalid, a missing or unreadable file), 3 when the coordinator
cannot be reached or refuses the call.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

# gRPC's C core writes its own lines to stderr (a failed TLS handshake, for one), which would break the one-line
# error contract; the error line check prints says what failed. The C core reads GRPC_VERBOSITY only when grpc is
# first imported, so this quiets the CLI's own process; a program that loaded grpc before importing this module
# (a test run, say) keeps its logging and its environment. GRPC_VERBOSITY set by the user still wins.
if "grpc" not in sys.modules:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import memberguard
from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor
from memberguard.v1 import membership_pb2

EXIT_OK = 0
EXIT_DISCREPANCIES = 1
EXIT_USAGE = 2
EXIT_COORDINATOR = 3

# Modules that add subcommands; one that is not there (yet) is skipped.
_COMMAND_MODULES = ("coordinator.lab",)

_SEVERITIES = {
    "info": membership_pb2.SEVERITY_INFO,
    "warning": membership_pb2.SEVERITY_WARNING,
    "blocking": membership_pb2.SEVERITY_BLOCKING,
}
_ENDPOINT_FLAGS = ("address", "ca", "server_name", "cert", "key")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits 2 on a usage error and 0 after --help; return that status instead of raising it.
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    status: int = args.handler(args)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memberguard",
        description="Check and guard cluster membership through the memberguard coordinator.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_check(subparsers)
    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    return parser


def _register_check(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = subparsers.add_parser(
        "check",
        help="compare every source on every node and print the discrepancies",
        description="Ask the coordinator for a fresh membership diff. Exit 0 if nothing is WARNING or worse, "
        "1 if something is, 2 on a usage error, 3 if the coordinator is unreachable or refuses.",
    )
    where = check.add_argument_group("coordinator", "either --lab, or all five of the other options")
    where.add_argument("--lab", metavar="DIR", help="a lab directory holding lab.json")
    where.add_argument("--address", metavar="HOST:PORT", help="the coordinator's address")
    where.add_argument("--ca", metavar="FILE", help="PEM certificate(s) to trust for the coordinator")
    where.add_argument("--server-name", metavar="NAME", help="the name in the coordinator's certificate")
    where.add_argument("--cert", metavar="FILE", help="your PEM certificate")
    where.add_argument("--key", metavar="FILE", help="your PEM private key")
    check.add_argument("--json", action="store_true", help="print the response in the protobuf JSON mapping")
    check.add_argument("--timeout", type=_seconds, default=10.0, metavar="S", help="call deadline (default 10)")
    check.add_argument("--agent-timeout", type=_seconds, metavar="S", help="per-agent deadline (at most 60)")
    check.add_argument(
        "--min-severity", choices=sorted(_SEVERITIES), help="leave out the discrepancies below this severity"
    )
    check.set_defaults(handler=_run_check, parser=check)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _run_check(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.parser
    given = [flag for flag in _ENDPOINT_FLAGS if getattr(args, flag) is not None]
    if args.lab is not None and given:
        return _usage(parser, "--lab cannot be combined with " + ", ".join(_option(f) for f in given))
    if args.lab is None and len(given) < len(_ENDPOINT_FLAGS):
        missing = [_option(f) for f in _ENDPOINT_FLAGS if f not in given]
        return _usage(
            parser,
            "give --lab DIR, or all of --address --ca --server-name --cert --key; missing: " + " ".join(missing),
        )
    try:
        if args.lab is not None:
            endpoint = memberguard.Endpoint.from_lab(args.lab)
        else:
            endpoint = memberguard.Endpoint.from_files(
                args.address, ca=args.ca, server_name=args.server_name, cert=args.cert, key=args.key
            )
    except OSError as exc:
        return _usage(parser, f"cannot read {exc.filename}: {exc.strerror}" if exc.filename else str(exc))
    except ValueError as exc:
        return _usage(parser, str(exc))

    try:
        with memberguard.Client(endpoint) as client:
            response = client.check_membership(
                agent_timeout=args.agent_timeout,
                minimum_severity=_SEVERITIES[args.min_severity] if args.min_severity else None,
                timeout=args.timeout,
            )
    except memberguard.InvalidArgument as exc:
        return _fail(EXIT_USAGE, f"invalid request: {exc}")
    except memberguard.MemberguardError as exc:
        return _fail(EXIT_COORDINATOR, f"coordinator {endpoint.address}: {exc}")

    if args.json:
        print(json_format.MessageToJson(response))
    else:
        print(render_diff(response.diff))
    blocks = any(d.severity != membership_pb2.SEVERITY_INFO for d in response.diff.discrepancies)
    return EXIT_DISCREPANCIES if blocks else EXIT_OK


def render_diff(diff: membership_pb2.MembershipDiff) -> str:
    """The diff as a table, one row per discrepancy with its remedies below it, then a summary line."""
    if not diff.discrepancies:
        return f"consistent\nfingerprint {diff.fingerprint}"
    header = ("SEVERITY", "KIND", "MEMBER", "SOURCE", "NODE", "SUMMARY")
    rows = [
        (
            _enum_name(membership_pb2.Severity.DESCRIPTOR, d.severity, "SEVERITY_"),
            _enum_name(membership_pb2.DiscrepancyKind.DESCRIPTOR, d.kind, "DISCREPANCY_KIND_"),
            _member_label(d.member) if d.HasField("member") else "-",
            _enum_name(membership_pb2.Source.DESCRIPTOR, d.source, "SOURCE_") if d.source else "-",
            d.node or "-",
            d.summary,
        )
        for d in diff.discrepancies
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        return "  ".join([*cells, _one_line(row[-1])]).rstrip()

    lines = [line(header)]
    for row, discrepancy in zip(rows, diff.discrepancies, strict=True):
        lines.append(line(row))
        for remedy in discrepancy.remedies:
            safety = _enum_name(membership_pb2.RemedySafety.DESCRIPTOR, remedy.safety, "REMEDY_SAFETY_")
            lines.append(f"    remedy ({safety}): {_one_line(remedy.action)}")
    counts = {name: sum(1 for d in diff.discrepancies if d.severity == value) for name, value in _SEVERITIES.items()}
    lines.append(
        f"fingerprint {diff.fingerprint}  {len(diff.discrepancies)} discrepancies: "
        f"{counts['blocking']} blocking, {counts['warning']} warning, {counts['info']} info"
    )
    return "\n".join(lines)


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


def _usage(parser: argparse.ArgumentParser, message: str) -> int:
    return _fail(EXIT_USAGE, message, prog=parser.prog)


def _fail(status: int, message: str, *, prog: str = "memberguard") -> int:
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
