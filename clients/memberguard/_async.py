"""The asyncio client: one persistent mTLS grpc.aio channel, typed errors.

Create it inside the event loop that will use it: a grpc.aio channel belongs to one loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memberguard._base import (
    BaseClient,
    Endpoint,
    call_timeout,
    check_membership_request,
    error_from_rpc,
    health_request,
    issue_token_request,
    remove_member_request,
    require_serving,
    wait_operation_request,
    watch_membership_request,
    watch_timeout,
)
from memberguard.v1 import coordinator_pb2, coordinator_pb2_grpc, operation_pb2, repair_pb2

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

_WatchCall = grpc.aio.UnaryStreamCall[coordinator_pb2.WatchMembershipRequest, coordinator_pb2.WatchMembershipResponse]


class AsyncMembershipWatch:
    """A WatchMembership stream: `async for` over it for its responses; close() ends it, as leaving an `async with`
    block does, and iteration then stops. See memberguard.MembershipWatch."""

    def __init__(self, call: _WatchCall) -> None:
        self._call = call
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> coordinator_pb2.WatchMembershipResponse:
        try:
            response = await self._call.read()
        except grpc.RpcError as exc:
            if self._closed:
                raise StopAsyncIteration from None
            raise error_from_rpc(exc) from exc
        except asyncio.CancelledError:
            # grpc.aio reads a call cancelled by close() as a cancellation; only the task's own must propagate.
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                raise StopAsyncIteration from None
            raise
        # The only other thing read() returns is grpc.aio.EOF: the coordinator ended the stream.
        if not isinstance(response, coordinator_pb2.WatchMembershipResponse):
            raise StopAsyncIteration
        return response

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancels the stream; closing twice is harmless."""
        self._closed = True
        self._call.cancel()


class AsyncClient(BaseClient):
    """Calls the coordinator from asyncio; use `async with` or await close().

    Every failed call raises a memberguard.errors.MemberguardError subclass.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        super().__init__(endpoint)
        self._channel = grpc.aio.secure_channel(endpoint.address, self._credentials(), options=self._options())
        # The generated _pb2_grpc module is untyped; the annotations below give its callables their types.
        coordinator = self._coordinator = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._check_membership: grpc.aio.UnaryUnaryMultiCallable[
            coordinator_pb2.CheckMembershipRequest, coordinator_pb2.CheckMembershipResponse
        ] = coordinator.CheckMembership
        self._guarded_operation: grpc.aio.UnaryUnaryMultiCallable[
            coordinator_pb2.GuardedOperationRequest, coordinator_pb2.GuardedOperationResponse
        ] = coordinator.GuardedOperation
        self._watch_membership: grpc.aio.UnaryStreamMultiCallable[
            coordinator_pb2.WatchMembershipRequest, coordinator_pb2.WatchMembershipResponse
        ] = coordinator.WatchMembership
        self._health_check: grpc.aio.UnaryUnaryMultiCallable[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = health_pb2_grpc.HealthStub(self._channel).Check

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Closing twice is harmless."""
        self._closed = True
        await self._channel.close(None)

    async def check_membership(
        self,
        *,
        agent_timeout: float | None = None,
        minimum_severity: int | None = None,
        timeout: float = 10.0,
    ) -> coordinator_pb2.CheckMembershipResponse:
        """A fresh diff of every source on every node, and its fingerprint; see Client.check_membership."""
        request = check_membership_request(agent_timeout=agent_timeout, minimum_severity=minimum_severity)
        return await self._call(self._check_membership, request, timeout)

    def watch_membership(
        self, *, resume_token: str = "", heartbeat_interval: float | None = None, timeout: float | None = None
    ) -> AsyncMembershipWatch:
        """Watches the membership; see Client.watch_membership. Not a coroutine: the stream starts on the first
        read."""
        self._require_open()
        request = watch_membership_request(resume_token=resume_token, heartbeat_interval=heartbeat_interval)
        return AsyncMembershipWatch(self._watch_membership(request, timeout=watch_timeout(timeout)))

    async def guarded_operation(
        self, request: coordinator_pb2.GuardedOperationRequest, timeout: float = 30.0
    ) -> coordinator_pb2.GuardedOperationResponse:
        """Sends the request as is; a refusal raises DirtyMembership or StaleFingerprint carrying the diff."""
        return await self._call(self._guarded_operation, request, timeout)

    async def issue_token(
        self,
        name: str,
        *,
        ttl: float | None = None,
        request_id: str | None = None,
        microcluster: bool = False,
        timeout: float = 30.0,
    ) -> operation_pb2.Operation:
        """Issues a join token for `name`; see Client.issue_token."""
        request = issue_token_request(name, ttl=ttl, request_id=request_id, microcluster=microcluster)
        return (await self.guarded_operation(request, timeout)).operation

    async def remove_member(
        self,
        name: str,
        *,
        address: str = "",
        force: bool = False,
        acknowledged: Sequence[str] = (),
        expected_fingerprint: str = "",
        request_id: str | None = None,
        timeout: float = 60.0,
    ) -> operation_pb2.Operation:
        """Removes a member under the guard; see Client.remove_member."""
        request = remove_member_request(
            name,
            address=address,
            force=force,
            acknowledged=acknowledged,
            expected_fingerprint=expected_fingerprint,
            request_id=request_id,
        )
        return (await self.guarded_operation(request, timeout)).operation

    async def get_operation(self, operation_id: str, timeout: float = 10.0) -> operation_pb2.Operation:
        request = coordinator_pb2.GetOperationRequest(id=operation_id)
        return (await self._call(self._coordinator.GetOperation, request, timeout)).operation

    async def wait_operation(
        self, operation_id: str, *, wait: float | None = None, timeout: float = 60.0
    ) -> operation_pb2.Operation:
        request = wait_operation_request(operation_id, wait)
        return (await self._call(self._coordinator.WaitOperation, request, timeout)).operation

    async def list_operations(
        self, *, page_size: int = 0, page_token: str = "", timeout: float = 10.0
    ) -> coordinator_pb2.ListOperationsResponse:
        request = coordinator_pb2.ListOperationsRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._coordinator.ListOperations, request, timeout)

    async def list_tokens(self, timeout: float = 10.0) -> list[operation_pb2.TokenInfo]:
        request = coordinator_pb2.ListTokensRequest()
        return list((await self._call(self._coordinator.ListTokens, request, timeout)).tokens)

    async def revoke_token(self, name: str, timeout: float = 10.0) -> operation_pb2.TokenInfo:
        request = coordinator_pb2.RevokeTokenRequest(name=name)
        return (await self._call(self._coordinator.RevokeToken, request, timeout)).token

    async def plan_repair(
        self,
        *,
        expected_fingerprint: str = "",
        discrepancy_ids: Sequence[str] = (),
        confirmed_action_ids: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> repair_pb2.RepairPlan:
        """The plan that would clear the current diff (nothing is changed): StaleFingerprint when the diff is no longer
        the one expected, OperationParked while an operation is parked, InvalidArgument for ids it does not hold."""
        request = coordinator_pb2.RepairRequest(
            expected_fingerprint=expected_fingerprint,
            discrepancy_ids=discrepancy_ids,
            confirmed_action_ids=confirmed_action_ids,
        )
        return (await self._call(self._coordinator.Repair, request, timeout)).plan

    async def apply_repair(
        self,
        *,
        expected_fingerprint: str = "",
        discrepancy_ids: Sequence[str] = (),
        confirmed_action_ids: Sequence[str] = (),
        request_id: str | None = None,
        timeout: float = 120.0,
    ) -> coordinator_pb2.RepairResponse:
        """Applies the plan under the membership lock: its SAFE actions and the confirmed ones, as one REPAIR
        operation. The response holds the plan it ran and the operation as it stands (none when there was nothing to
        do). Refused as plan_repair is, and nothing changes; a request_id of None gets a fresh one (pass your own to
        retry safely)."""
        request = coordinator_pb2.RepairRequest(
            expected_fingerprint=expected_fingerprint,
            discrepancy_ids=discrepancy_ids,
            confirmed_action_ids=confirmed_action_ids,
            apply=True,
            request_id=request_id or uuid.uuid4().hex,
        )
        return await self._call(self._coordinator.Repair, request, timeout)

    async def abandon_operation(
        self,
        operation_id: str,
        reason: str,
        *,
        force: bool = False,
        acknowledged_discrepancy_ids: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> operation_pb2.Operation:
        """Ends a parked operation (ABANDONED); NotAbandonable when it is not parked, or may be past its commit
        point without force and the acknowledgements."""
        request = coordinator_pb2.AbandonOperationRequest(
            operation_id=operation_id,
            reason=reason,
            force=force,
            acknowledged_discrepancy_ids=list(acknowledged_discrepancy_ids),
        )
        return (await self._call(self._coordinator.AbandonOperation, request, timeout)).operation

    async def ping(self, timeout: float = 5.0) -> None:
        """Asks the standard health service; raises Unavailable unless the coordinator is SERVING."""
        require_serving(await self._call(self._health_check, health_request(), timeout))

    async def _call(self, method: Callable[..., Awaitable[_Response]], request: _Request, timeout: float) -> _Response:
        self._require_open()
        seconds = call_timeout(timeout)
        try:
            return await method(request, timeout=seconds)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
