"""Who may call what: the interceptor that authenticates every DeadLetterService call and enforces the matrix.

The service role may call everything; admins may only read (Get, List); anyone else is refused. The health
and reflection services stay open. A refused call is audited and answered UNAUTHENTICATED (no valid token)
or PERMISSION_DENIED (valid token, wrong role). The caller reaches the handlers through auth.current_caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from deadletter.v1 import deadletter_pb2
from server.audit import Action, Actor, AuditEntry
from server.auth import Caller, Role, TokenVerifier, bearer_token, current_caller
from server.errors import DatabaseUnavailable, DeadLetterError, PermissionDenied, Unauthenticated
from server.store import Store

log = logging.getLogger("deadletter.access")

SERVICE_NAME: str = deadletter_pb2.DESCRIPTOR.services_by_name["DeadLetterService"].full_name
_PREFIX = f"/{SERVICE_NAME}/"

# The role matrix. A method of the service missing here is refused to everyone (fail closed).
POLICY: dict[str, frozenset[Role]] = {
    "Store": frozenset({Role.SERVICE}),
    "Get": frozenset({Role.SERVICE, Role.ADMIN}),
    "List": frozenset({Role.SERVICE, Role.ADMIN}),
    "Reprocess": frozenset({Role.SERVICE}),
    "Redrive": frozenset({Role.SERVICE}),
    "ClaimQueued": frozenset({Role.SERVICE}),
    "AcknowledgeQueued": frozenset({Role.SERVICE}),
    "Purge": frozenset({Role.SERVICE}),
}


def actor(context: grpc.aio.ServicerContext[Any, Any], method: str) -> Actor:
    """The current call's actor, from what the interceptor established and the transport's peer address."""
    caller = current_caller.get()
    return Actor(caller.subject, caller.role, context.peer() or "", _PREFIX + method)


class AccessInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    def __init__(self, verifier: TokenVerifier, store: Store) -> None:
        self._verifier = verifier
        self._store = store

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        if not method.startswith(_PREFIX):
            return await continuation(handler_call_details)
        metadata = {
            key: value for key, value in handler_call_details.invocation_metadata or () if isinstance(value, str)
        }
        try:
            caller = self._verifier.verify(bearer_token(metadata))
        except Unauthenticated as error:
            return self._refusal(method, Caller("", None), error)
        name = method.removeprefix(_PREFIX)
        if caller.role not in POLICY.get(name, frozenset()):
            role = caller.role.value if caller.role else "no role"
            return self._refusal(method, caller, PermissionDenied(f"{role} may not call {name}"))
        # grpc.aio runs the interceptors and the handler in one contextvars.Context, so this reaches the handler.
        current_caller.set(caller)
        return await continuation(handler_call_details)

    def _refusal(self, method: str, caller: Caller, error: DeadLetterError) -> grpc.RpcMethodHandler[Any, Any]:
        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            entry = AuditEntry(
                Actor(caller.subject, caller.role, context.peer() or "", method), Action.DENIED, error.code
            )
            try:
                await self._store.audit(entry)
            except DatabaseUnavailable:
                log.warning("could not audit a refused call: database unavailable", extra={"refused": error.code})
            raise error

        return grpc.unary_unary_rpc_method_handler(refuse)
