"""Everything the sync and asyncio clients share; none of it touches the network.

The endpoint and its TLS material, the channel's credentials and options, building and checking requests
before they are sent, and turning a failed call into the most specific typed error (`error_from_rpc`, the only
place that reads a gRPC status). `Client` and `AsyncClient` differ only in how they wait for the channel.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

# googleapis-common-protos ships .pyi files but no py.typed marker, so mypy will not read them.
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from memberguard import errors
from memberguard.v1 import coordinator_pb2, membership_pb2, operation_pb2

StrPath = str | os.PathLike[str]

#: The most the coordinator lets an agent take (CheckMembershipRequest.agent_timeout): the one definition, which the
#: coordinator enforces and the client checks before sending.
MAX_AGENT_TIMEOUT = 60.0
#: WatchMembershipRequest.heartbeat_interval: its default and bounds (seconds), defined here once, as MAX_AGENT_TIMEOUT.
DEFAULT_HEARTBEAT_INTERVAL = 30.0
MIN_HEARTBEAT_INTERVAL = 1.0
MAX_HEARTBEAT_INTERVAL = 300.0

#: The environment variables that name an endpoint, each overriding its field of the profile (as etcdctl's ETCDCTL_*).
ENVIRONMENT = {
    "address": "MEMBERGUARD_ADDRESS",
    "ca": "MEMBERGUARD_CA",
    "server_name": "MEMBERGUARD_SERVER_NAME",
    "cert": "MEMBERGUARD_CERT",
    "key": "MEMBERGUARD_KEY",
}
#: Where the profile is read from when MEMBERGUARD_PROFILE does not say: $XDG_CONFIG_HOME/memberguard/profile.json.
PROFILE_VARIABLE = "MEMBERGUARD_PROFILE"
_PATH_FIELDS = ("ca", "cert", "key")

#: The ErrorInfo reason of an InvalidArgument raised by the client itself, before sending anything.
CLIENT_VALIDATION = "CLIENT_VALIDATION"


@dataclass(frozen=True)
class Endpoint:
    """Where the coordinator listens and how to reach it over mutual TLS.

    ca pins the coordinator's certificate (PEM; a bundle works too), server_name is the name that certificate
    carries (the address is usually an IP), cert and key are the caller's own identity (PEM).
    """

    address: str
    ca: bytes = field(repr=False)
    server_name: str
    cert: bytes = field(repr=False)
    # The key must never reach a log line, not even through a repr.
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        # grpc would only report a bad PEM as an UNAVAILABLE "failed to create security handshaker" on the first
        # call, so bad material is refused here, where the caller can still tell which piece is wrong.
        _check_tls_material(self.ca, self.cert, self.key)

    @classmethod
    def from_files(cls, address: str, *, ca: StrPath, server_name: str, cert: StrPath, key: StrPath) -> Endpoint:
        """Reads the PEM files; raises OSError when one is missing or unreadable, ValueError when one is not PEM."""
        return cls(
            address=address,
            ca=Path(ca).read_bytes(),
            server_name=server_name,
            cert=Path(cert).read_bytes(),
            key=Path(key).read_bytes(),
        )

    @classmethod
    def from_lab(cls, lab_dir: StrPath) -> Endpoint:
        """The coordinator and operator identity of a lab, from `lab_dir/lab.json`.

        Raises OSError when lab.json or a file it names cannot be read, ValueError when lab.json is malformed.
        Relative paths in lab.json are taken relative to lab_dir.
        """
        directory = Path(lab_dir)
        path = directory / "lab.json"
        try:
            lab = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from exc

        def item(section: str, name: str) -> str:
            part = lab.get(section) if isinstance(lab, dict) else None
            value = part.get(name) if isinstance(part, dict) else None
            if not isinstance(value, str) or not value:
                raise ValueError(f"{path}: {section}.{name} is missing or not a string")
            return value

        return cls.from_files(
            item("coordinator", "address"),
            ca=directory / item("coordinator", "ca"),
            server_name=item("coordinator", "server_name"),
            cert=directory / item("operator", "cert"),
            key=directory / item("operator", "key"),
        )

    @classmethod
    def from_profile(cls, environ: Mapping[str, str] | None = None, **given: str | None) -> Endpoint:
        """The endpoint that `given` (the caller's own settings, e.g. command-line flags), the environment and the
        profile name, each field from the first of them that has it.

        The profile is a JSON object with the five fields (`memberguard adopt` writes one): address, ca, server_name,
        cert and key, the last three paths relative to the profile's directory. It is MEMBERGUARD_PROFILE, else
        $XDG_CONFIG_HOME/memberguard/profile.json (~/.config when unset); a missing default profile is no error.
        Raises ValueError naming what is missing or malformed, OSError when a file cannot be read.
        """
        environ = os.environ if environ is None else environ
        profile, base = _read_profile(environ)
        fields: dict[str, str] = {}
        for name, variable in ENVIRONMENT.items():
            if given.get(name):
                fields[name] = str(given[name])
            elif environ.get(variable):
                fields[name] = environ[variable]
            elif name in profile:
                fields[name] = str(base / profile[name]) if name in _PATH_FIELDS else profile[name]
        missing = [name for name in ENVIRONMENT if name not in fields]
        if missing:
            where = f"{'' if profile else 'none at '}{profile_path(environ)}"
            raise ValueError(
                f"no {', '.join(missing)} for the coordinator: give them as flags, as "
                f"{', '.join(ENVIRONMENT[m] for m in missing)}, or in a profile ({where})"
            )
        return cls.from_files(
            fields["address"],
            ca=fields["ca"],
            server_name=fields["server_name"],
            cert=fields["cert"],
            key=fields["key"],
        )


def profile_path(environ: Mapping[str, str]) -> Path:
    """The profile `Endpoint.from_profile` reads: MEMBERGUARD_PROFILE, else the XDG default."""
    if environ.get(PROFILE_VARIABLE):
        return Path(environ[PROFILE_VARIABLE])
    config_home = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".config")
    return Path(config_home) / "memberguard" / "profile.json"


def _read_profile(environ: Mapping[str, str]) -> tuple[dict[str, str], Path]:
    path = profile_path(environ)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        if environ.get(PROFILE_VARIABLE):
            raise
        return {}, path.parent
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{path}: not a JSON object")
    unknown = sorted(set(document) - set(ENVIRONMENT))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
    bad = [name for name, value in document.items() if not isinstance(value, str) or not value]
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} must be non-empty strings")
    return document, path.parent


def _check_tls_material(ca: bytes, cert: bytes, key: bytes) -> None:
    """Raises ValueError unless ca and cert hold PEM certificates and key is the unencrypted PEM key of cert."""
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        raise ValueError("ca is not a PEM certificate (or bundle)") from None
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError:
        raise ValueError("cert is not a PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # TypeError: the key is encrypted, which grpc cannot use.
        raise ValueError("key is not an unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != private_key.public_key().public_bytes(*spki):
        raise ValueError("key is not the private key of cert")


class BaseClient:
    """The channel settings and requests both clients use; subclasses own the channel."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._closed = False

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._endpoint.address!r})"

    def _require_open(self) -> None:
        # grpc and grpc.aio fail differently on a closed channel (ValueError, UsageError); say it once, plainly.
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._endpoint.ca,
            private_key=self._endpoint.key,
            certificate_chain=self._endpoint.cert,
        )

    def _options(self) -> list[tuple[str, Any]]:
        if not self._endpoint.server_name:
            return []
        return [("grpc.ssl_target_name_override", self._endpoint.server_name)]


def call_timeout(timeout: float) -> float:
    """The call's deadline in seconds, checked: a zero, negative or infinite one is a caller's mistake."""
    if not _is_seconds(timeout) or timeout <= 0:
        raise invalid_arguments([("timeout", f"must be a positive number of seconds, not {timeout!r}")])
    return float(timeout)


def check_membership_request(
    *, agent_timeout: float | None, minimum_severity: int | None
) -> coordinator_pb2.CheckMembershipRequest:
    """Builds the request, checking both fields as the coordinator would so a bad one fails before any I/O."""
    request = coordinator_pb2.CheckMembershipRequest()
    violations: list[tuple[str, str]] = []
    if agent_timeout is not None:
        if not _is_seconds(agent_timeout) or not 0 < agent_timeout <= MAX_AGENT_TIMEOUT:
            violations.append(
                (
                    "agent_timeout",
                    f"must be positive and at most {MAX_AGENT_TIMEOUT:g} s, not {agent_timeout!r}",
                )
            )
        else:
            # Zero would mean "the coordinator's default", so a tiny positive value is kept at least 1 ns.
            request.agent_timeout.FromNanoseconds(max(1, round(agent_timeout * 1e9)))
    if minimum_severity is not None:
        if (
            isinstance(minimum_severity, bool)
            or not isinstance(minimum_severity, int)
            or minimum_severity not in membership_pb2.Severity.values()
        ):
            known = ", ".join(f"{v} ({n})" for n, v in membership_pb2.Severity.items())
            violations.append(("minimum_severity", f"must be one of {known}, not {minimum_severity!r}"))
        else:
            request.minimum_severity = membership_pb2.Severity.ValueType(minimum_severity)
    if violations:
        raise invalid_arguments(violations)
    return request


def watch_membership_request(
    *, resume_token: str, heartbeat_interval: float | None
) -> coordinator_pb2.WatchMembershipRequest:
    """Builds the request, checking the interval as the coordinator would so a bad one fails before any I/O."""
    request = coordinator_pb2.WatchMembershipRequest(resume_token=resume_token)
    if heartbeat_interval is not None:
        if (
            not _is_seconds(heartbeat_interval)
            or not MIN_HEARTBEAT_INTERVAL <= heartbeat_interval <= MAX_HEARTBEAT_INTERVAL
        ):
            raise invalid_arguments(
                [
                    (
                        "heartbeat_interval",
                        f"must be between {MIN_HEARTBEAT_INTERVAL:g} s and {MAX_HEARTBEAT_INTERVAL:g} s, "
                        f"not {heartbeat_interval!r}",
                    )
                ]
            )
        request.heartbeat_interval.FromNanoseconds(round(heartbeat_interval * 1e9))
    return request


def watch_timeout(timeout: float | None) -> float | None:
    """A watch's deadline: None (the usual) lets it run until closed; otherwise as call_timeout checks it."""
    return None if timeout is None else call_timeout(timeout)


def issue_token_request(
    name: str, *, ttl: float | None, request_id: str | None, microcluster: bool = False
) -> coordinator_pb2.GuardedOperationRequest:
    operation = operation_pb2.IssueTokenOperation(name=name, microcluster=microcluster)
    if ttl is not None:
        operation.ttl.FromNanoseconds(int(ttl * 1e9))
    return coordinator_pb2.GuardedOperationRequest(request_id=request_id or uuid.uuid4().hex, issue_token=operation)


def remove_member_request(
    name: str,
    *,
    address: str,
    force: bool,
    acknowledged: Sequence[str],
    expected_fingerprint: str,
    request_id: str | None,
) -> coordinator_pb2.GuardedOperationRequest:
    """A removal; a request_id of None gets a fresh one (pass your own to retry safely)."""
    return coordinator_pb2.GuardedOperationRequest(
        request_id=request_id or uuid.uuid4().hex,
        expected_fingerprint=expected_fingerprint,
        acknowledged_discrepancy_ids=list(acknowledged),
        remove_member=operation_pb2.RemoveMemberOperation(name=name, address=address, force=force),
    )


def wait_operation_request(operation_id: str, wait: float | None) -> coordinator_pb2.WaitOperationRequest:
    request = coordinator_pb2.WaitOperationRequest(id=operation_id)
    if wait is not None:
        request.timeout.FromNanoseconds(int(wait * 1e9))
    return request


def health_request() -> health_pb2.HealthCheckRequest:
    # The empty service name asks about the server as a whole.
    return health_pb2.HealthCheckRequest(service="")


def require_serving(response: health_pb2.HealthCheckResponse) -> None:
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        state = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE, f"coordinator health is {state}", state)


def invalid_arguments(violations: Sequence[tuple[str, str]]) -> errors.InvalidArgument:
    message = "; ".join(f"{name} {description}" for name, description in violations)
    return errors.InvalidArgument(
        grpc.StatusCode.INVALID_ARGUMENT, message, CLIENT_VALIDATION, field_violations=violations
    )


#: The ErrorInfo domain of the coordinator's reasons.
DOMAIN = "memberguard.v1"

# The coordinator's reasons (its error table, coordinator/status.py) that have a type of their own here; a TOKEN_
# reason without one is a TokenRefused.
_ERROR_BY_REASON: dict[str, type[errors.MemberguardError]] = {
    "INVALID_REQUEST": errors.InvalidArgument,
    "UNTRUSTED_CERTIFICATE": errors.Unauthenticated,
    "ROLE_NOT_ALLOWED": errors.PermissionDenied,
    "JOINER_NOT_VERIFIED": errors.PermissionDenied,
    "NOT_FOUND": errors.NotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "MEMBERSHIP_INCONSISTENT": errors.DirtyMembership,
    "OPERATION_PARKED": errors.OperationParked,
    "NOT_ABANDONABLE": errors.NotAbandonable,
    "FINGERPRINT_STALE": errors.StaleFingerprint,
    "DEADLINE_PASSED": errors.DeadlineExceeded,
    "TOO_MANY_FAILED_ATTEMPTS": errors.TooManyAttempts,
    "INTERNAL": errors.Internal,
    "TOKEN_EXPIRED": errors.TokenExpired,
    "TOKEN_IN_USE": errors.TokenInUse,
}

# When the status carries no reason this client knows (another domain, an older or newer coordinator, a proxy).
_ERROR_BY_CODE: dict[grpc.StatusCode, type[errors.MemberguardError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.ABORTED: errors.Aborted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.INTERNAL: errors.Internal,
}


def error_type(code: grpc.StatusCode, reason: str, domain: str) -> type[errors.MemberguardError]:
    """The type a failed call raises: by the coordinator's ErrorInfo reason, else by the status code."""
    if domain == DOMAIN:
        known = _ERROR_BY_REASON.get(reason)
        if known is None and reason.startswith("TOKEN_"):
            known = errors.TokenRefused
        if known is not None:
            return known
    return _ERROR_BY_CODE.get(code, errors.MemberguardError)


def error_from_rpc(exc: grpc.RpcError) -> errors.MemberguardError:
    """The typed error for a failed call (sync or asyncio), with every rich detail the status carried.

    Callers `raise error_from_rpc(exc) from exc`. Each detail type is read once (AIP-193 sends each at most
    once); details of types this client does not know are ignored.
    """
    code = exc.code()
    message = exc.details() or ""
    error_info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    precondition = error_details_pb2.PreconditionFailure()
    retry = error_details_pb2.RetryInfo()
    diff: membership_pb2.MembershipDiff | None = None
    status = _rich_status(exc)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(error_info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            detail.Unpack(bad_request)
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            detail.Unpack(precondition)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            detail.Unpack(retry)
        elif detail.Is(membership_pb2.MembershipDiff.DESCRIPTOR):
            diff = membership_pb2.MembershipDiff()
            detail.Unpack(diff)

    error = _typed(code, message, error_info, bad_request, precondition, retry, diff)
    error.status = status
    return error


def _typed(
    code: grpc.StatusCode,
    message: str,
    error_info: error_details_pb2.ErrorInfo,
    bad_request: error_details_pb2.BadRequest,
    precondition: error_details_pb2.PreconditionFailure,
    retry: error_details_pb2.RetryInfo,
    diff: membership_pb2.MembershipDiff | None,
) -> errors.MemberguardError:
    kind = error_type(code, error_info.reason, error_info.domain)
    metadata = dict(error_info.metadata)
    if issubclass(kind, errors.InvalidArgument):
        return kind(
            code,
            message,
            error_info.reason,
            field_violations=[(v.field, v.description) for v in bad_request.field_violations],
            metadata=metadata,
            diff=diff,
        )
    if issubclass(kind, errors.MembershipRefused):
        return kind(
            code,
            message,
            error_info.reason,
            violations=[(v.type, v.subject, v.description) for v in precondition.violations],
            metadata=metadata,
            diff=diff,
        )
    if issubclass(kind, errors.TooManyAttempts):
        delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        return kind(code, message, error_info.reason, retry_after=delay, metadata=metadata, diff=diff)
    return kind(code, message, error_info.reason, metadata=metadata, diff=diff)


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status:
    # from_call uses only code(), details() and trailing_metadata(), which grpc's and grpc.aio's errors share.
    try:
        status = rpc_status.from_call(cast(grpc.Call, exc))
    except ValueError:
        # The rich status contradicts the plain one: trust the plain code and message, drop the details.
        status = None
    return status if isinstance(status, status_pb2.Status) else status_pb2.Status()


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
