"""DeadLetterService handlers: decode, call the vault, encode. Errors are mapped in server/status.py."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import access, domain, logs, proto_mapping
from server.errors import Unimplemented
from server.vault import Vault


class DeadLetterServicer(pb_grpc.DeadLetterServiceServicer):
    def __init__(self, vault: Vault, max_payload_bytes: int) -> None:
        self._vault = vault
        self._max_payload_bytes = max_payload_bytes

    async def Store(self, request: pb.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.StoreResponse:
        logs.annotate(correlation_id=request.correlation_id)
        letter = proto_mapping.new_dead_letter(request, self._max_payload_bytes)
        result = await self._vault.store(access.actor(context, "Store"), letter)
        logs.annotate(dead_letter_id=result.id, deduplicated=result.deduplicated)
        return pb.StoreResponse(id=result.id, deduplicated=result.deduplicated)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.GetResponse:
        record_id = domain.parse_id(request.id)
        logs.annotate(dead_letter_id=str(record_id))
        return proto_mapping.get_response(await self._vault.get(access.actor(context, "Get"), record_id))

    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListResponse:
        filters = proto_mapping.list_filters(request)
        size = domain.page_size(request.page_size)
        page = await self._vault.list(access.actor(context, "List"), filters, request.page_token, size)
        logs.annotate(count=len(page.dead_letters))
        return proto_mapping.list_response(page)

    async def Reprocess(
        self, request: pb.ReprocessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReprocessResponse:
        raise Unimplemented("Reprocess is not implemented yet")

    async def Purge(self, request: pb.PurgeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.PurgeResponse:
        raise Unimplemented("Purge is not implemented yet")
