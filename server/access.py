"""Who may call what: the interceptor that authenticates every DeadLetterService call and enforces the matrix.

The service role may call everything; admins may only read (Get, List); anyone else is refused. The health
and reflection services stay open. A refused call is audited and answered UNAUTHENTICATED (no valid token)
or PERMISSION_DENIED (valid token, wrong role). The caller reaches the handlers through auth.current_caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from deadletter.v1 import deadletter_pb2
from server.audit import Action, Actor, AuditEntry
from server.auth import Caller, Role, TokenVerifier, bearer_token, current_caller
from server.errors import DeadLetterError, PermissionDenied, Unauthenticated
from server.store import Store

log = logging.getLogger("deadletter.access")

_REFUSAL_AUDIT_CONNECTIONS = 2

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
        # Refusals are audited, but a flood of them must not take the pool from real calls.
        self._refusal_audits = asyncio.Semaphore(_REFUSAL_AUDIT_CONNECTIONS)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        if not method.startswith(_PREFIX):
            return await continuation(handler_call_details)
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        try:
            if len(values) > 1:
                # Two credentials: a proxy might have checked the other one. Refuse rather than pick.
                raise Unauthenticated("send exactly one authorization metadata entry")
            caller = self._verifier.verify(bearer_token({"authorization": str(values[0]) if values else ""}))
        except Unauthenticated as error:
            return self._refusal(method, Caller("", None), error)
        except Exception:
            # Fail closed, and never let an exception's text (which could quote the token) reach the caller.
            log.exception("token verification failed unexpectedly")
            return self._refusal(method, Caller("", None), Unauthenticated("bearer token could not be verified"))
        name = method.removeprefix(_PREFIX)
        if caller.role not in POLICY.get(name, frozenset()):
            role = caller.role.value if caller.role else "no role"
            return self._refusal(method, caller, PermissionDenied(f"{role} may not call {name}"))
        # grpc.aio runs the interceptors and the handler in one contextvars.Context, so this reaches the handler.
        current_caller.set(caller)
        return await continuation(handler_call_details)

    def _refusal(self, method: str, caller: Caller, error: DeadLetterError) -> grpc.RpcMethodHandler[Any, Any]:
        # The method name comes from the client: record it only if it is one of ours.
        known = method if method.removeprefix(_PREFIX) in POLICY else _PREFIX + "<unknown>"

        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            who = Actor(caller.subject, caller.role, context.peer() or "", known)
            try:
                async with self._refusal_audits:
                    await self._store.audit(AuditEntry(who, Action.DENIED, error.code))
            except DeadLetterError as audit_error:
                log.warning("could not audit a refused call", extra={"refused": error.code, "error": audit_error.code})
            raise error

        return grpc.unary_unary_rpc_method_handler(refuse)
