"""Who may call what: mutual TLS by pinned certificates, and one interceptor that authorizes every RPC.

Two layers, because grpcio cannot ask for a client certificate without verifying it against roots:
- the TLS handshake verifies the peer against a bundle of pinned certificates, re-read on every new
  connection (`grpc.dynamic_ssl_server_credentials`), so a certificate removed from its trust cannot connect;
- `AuthInterceptor` looks the peer's fingerprint up in the live trust on every call and checks the method
  against the peer's principal, so a removed certificate is refused on connections already open too.

The interceptor also answers every handler's failures from the one error table (coordinator/status.py, `answering`):
no handler's exception text reaches a caller.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from coordinator.errors import FieldViolation, InvalidRequest, PermissionDenied, Unauthenticated
from coordinator.pki import Identity, fingerprint
from coordinator.status import answering, answering_stream


class Principal(enum.Enum):
    OPERATOR = "operator"
    MEMBER = "member"
    COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Peer:
    principal: Principal
    name: str
    fingerprint: str


class Trust(Protocol):
    """The live set of certificates a server accepts. Implementations re-read their files cheaply."""

    def peers(self) -> Mapping[str, Peer]:
        """Fingerprint → peer, as of now."""
        ...

    def bundle(self) -> bytes:
        """The PEM certificates the TLS handshake accepts, as of now."""
        ...


class UnionTrust:
    """Accepts what any of its trusts accepts."""

    def __init__(self, *trusts: Trust) -> None:
        self._trusts = trusts

    def peers(self) -> Mapping[str, Peer]:
        merged: dict[str, Peer] = {}
        for trust in reversed(self._trusts):  # the first trust's word on a fingerprint wins
            merged.update(trust.peers())
        return merged

    def bundle(self) -> bytes:
        return b"".join(trust.bundle() for trust in self._trusts)


# Methods every trusted peer may call: they reveal nothing about membership.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

Rules = Mapping[str, frozenset[Principal]]


def server_credentials(identity: Identity, trust: Trust) -> grpc.ServerCredentials:
    """TLS that requires a client certificate from trust's bundle, re-read at every handshake."""
    served: list[bytes] = []

    def configuration() -> Any:
        bundle = trust.bundle()
        served[:] = [bundle]
        return grpc.ssl_server_certificate_configuration(
            [(identity.key_pem, identity.certificate_pem)], root_certificates=bundle
        )

    initial = configuration()

    def fetch() -> Any:
        # None keeps the current configuration: only a changed bundle costs a rebuild.
        return configuration() if trust.bundle() != served[0] else None

    return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)


def peer_fingerprint(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    certificates = list(context.auth_context().get("x509_pem_cert", ()))
    if not certificates:
        return None
    return _fingerprint_of(bytes(certificates[0]))


_fingerprints: dict[bytes, str] = {}


def _fingerprint_of(pem: bytes) -> str:
    # Hashing a certificate costs more than the call it guards; peers are few, so remember them.
    found = _fingerprints.get(pem)
    if found is None:
        found = _fingerprints[pem] = fingerprint(pem)
    return found


def authorize(trust: Trust, rules: Rules, method: str, context: Any) -> Peer:
    """The peer calling `method`, or a typed refusal: unknown certificate, or a role not allowed to call it."""
    found = peer_fingerprint(context)
    peer = trust.peers().get(found) if found else None
    if peer is None:
        raise Unauthenticated("the client certificate is not trusted (any more)")
    if method in OPEN_METHODS:
        return peer
    allowed = rules.get(method, frozenset())
    if peer.principal not in allowed:
        raise PermissionDenied(f"a {peer.principal.value} certificate may not call {method}")
    return peer


class _Undecodable:
    """Stands in for a request whose bytes are not the message the method takes."""


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    # grpc.aio answers UNKNOWN, and logs a traceback, when a deserializer raises; catching it here lets the caller get
    # INVALID_ARGUMENT.
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Runs `authorize` before every handler, then refuses a unary request that does not decode; a refused
    call never reaches a handler."""

    def __init__(self, trust: Trust, rules: Rules) -> None:
        self._trust = trust
        self._rules = rules

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        trust, rules = self._trust, self._rules

        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                authorize(trust, rules, method, context)
                if request is _UNDECODABLE:
                    raise InvalidRequest([FieldViolation("", "the request does not decode as the method's message")])
                return await behaviour(request, context)

            return answering(guarded, method)

        def guard_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                authorize(trust, rules, method, context)
                if request is _UNDECODABLE:  # a server stream's one request (a bidirectional stream's is an iterator)
                    raise InvalidRequest([FieldViolation("", "the request does not decode as the method's message")])
                async for item in behaviour(request, context):
                    yield item

            return answering_stream(guarded, method)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                guard_stream(handler.unary_stream),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                guard_stream(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise RuntimeError(f"{method}: client-streaming handlers are not used by memberguard")
