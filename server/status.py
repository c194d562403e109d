"""The one place where errors become gRPC statuses, and where every call is logged with its outcome.

Domain errors map to their status code with their own (PHI-free) message. A status a handler set itself is
kept. Anything else is a bug: the caller gets INTERNAL with a reference, the log gets the type and stack.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
import grpc.aio

from server import errors, logs, metrics

log = logging.getLogger("deadletter.rpc")

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def status_code(error: errors.DeadLetterError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # generic only in the stubs
    """Wraps the unary handlers of the services it is given (by full name prefix)."""

    def __init__(self, service_prefixes: tuple[str, ...]) -> None:
        self._prefixes = service_prefixes
        # The registered handlers never change: wrap each once, not on every call. (Refusal handlers are made per
        # call and are not cached.)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.unary_unary is None or not method.startswith(self._prefixes):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            _mapped(method, cast(Behavior, handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.request_deserializer is not None:  # a registered handler, not a per-call refusal
            self._wrapped[method] = (handler, wrapped)
        return wrapped


def _mapped(method: str, behavior: Behavior) -> Behavior:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        logs.call_fields.set({"method": method})
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await behavior(request, context)
        except errors.DeadLetterError as error:
            code = status_code(error)
            await context.abort(code, error.message)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            code = context.code() or grpc.StatusCode.CANCELLED
            raise
        except Exception:
            preset = context.code()
            if preset not in (None, grpc.StatusCode.OK):
                # The handler chose a status before failing (the generated base servicer does this for
                # UNIMPLEMENTED): keep it rather than turning it into INTERNAL.
                code = preset
                await context.abort(code, context.details() or "")
            code = grpc.StatusCode.INTERNAL
            reference = str(uuid.uuid4())
            log.exception("unhandled error", extra={"reference": reference})
            await context.abort(code, f"internal error (reference {reference})")
        finally:
            elapsed = time.perf_counter() - started
            name = method.rpartition("/")[2]
            metrics.RPCS.labels(name, code.name).inc()
            metrics.RPC_SECONDS.labels(name).observe(elapsed)
            log.info("rpc", extra={"code": code.name, "duration_ms": round(elapsed * 1000, 2)})

    return call
