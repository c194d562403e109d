"""DeadLetterService handlers: decode, call the vault, encode. Errors are mapped in server/status.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import grpc.aio

from deadletter.v1 import deadletter_pb2 as pb
from deadletter.v1 import deadletter_pb2_grpc as pb_grpc
from server import access, domain, logs, proto_mapping
from server.audit import Action
from server.errors import InvalidArgument
from server.vault import Vault

DEFAULT_LEASE_SECONDS = 300
MAX_LEASE_SECONDS = 3600


class DeadLetterServicer(pb_grpc.DeadLetterServiceServicer):
    def __init__(
        self, vault: Vault, max_payload_bytes: int, retention_days: int = 90, purge_min_age_days: int = 1
    ) -> None:
        self._vault = vault
        self._max_payload_bytes = max_payload_bytes
        self._retention_days = retention_days
        self._purge_min_age_days = purge_min_age_days

    async def Store(self, request: pb.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.StoreResponse:
        letter = proto_mapping.new_dead_letter(request, self._max_payload_bytes)
        logs.annotate(correlation_id=letter.correlation_id)  # after validation: bounded, no NUL
        result = await self._vault.store(access.actor(context, "Store"), letter)
        logs.annotate(dead_letter_id=result.id, deduplicated=result.deduplicated)
        return pb.StoreResponse(id=result.id, deduplicated=result.deduplicated)

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.GetResponse:
        actor = access.actor(context, "Get")
        async with self._vault.audit_failures(actor, Action.VIEWED):
            record_id = domain.parse_id(request.id)
            logs.annotate(dead_letter_id=str(record_id))
            return proto_mapping.get_response(await self._vault.get(actor, record_id))

    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListResponse:
        actor = access.actor(context, "List")
        async with self._vault.audit_failures(actor, Action.LISTED):
            filters = proto_mapping.list_filters(request)
            page = await self._vault.list(actor, filters, request.page_token, domain.page_size(request.page_size))
        logs.annotate(count=len(page.dead_letters))
        return proto_mapping.list_response(page)

    async def Reprocess(
        self, request: pb.ReprocessRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReprocessResponse:
        actor = access.actor(context, "Reprocess")
        async with self._vault.audit_failures(actor, Action.REPROCESSED):
            record_id = domain.parse_id(request.id)
            logs.annotate(dead_letter_id=str(record_id), forced=request.force)
            return proto_mapping.reprocess_response(await self._vault.reprocess(actor, record_id, request.force))

    async def Redrive(
        self, request: pb.RedriveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RedriveResponse:
        result = await self._vault.redrive(access.actor(context, "Redrive"), proto_mapping.redrive_request(request))
        logs.annotate(sent=result.sent, skipped=result.skipped, dry_run=result.dry_run)
        return proto_mapping.redrive_response(result)

    async def ClaimQueued(
        self, request: pb.ClaimQueuedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClaimQueuedResponse:
        lease = request.lease_seconds or DEFAULT_LEASE_SECONDS
        if not 0 < lease <= MAX_LEASE_SECONDS:
            raise InvalidArgument("lease_seconds", f"must be from 1 to {MAX_LEASE_SECONDS}")
        webhook = await self._vault.claim(access.actor(context, "ClaimQueued"), lease)
        return proto_mapping.claim_response(webhook)

    async def AcknowledgeQueued(
        self, request: pb.AcknowledgeQueuedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AcknowledgeQueuedResponse:
        message_id = domain.parse_id(request.message_id, "message_id")
        await self._vault.acknowledge(access.actor(context, "AcknowledgeQueued"), message_id)
        return pb.AcknowledgeQueuedResponse()

    async def Purge(self, request: pb.PurgeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.PurgeResponse:
        now = datetime.now(UTC)
        cutoff = proto_mapping.purge_cutoff(request, now, self._retention_days, self._purge_min_age_days)
        count = await self._vault.purge(access.actor(context, "Purge"), cutoff, request.dry_run)
        logs.annotate(purged=count, dry_run=request.dry_run)
        response = pb.PurgeResponse(purged_count=count, dry_run=request.dry_run)
        response.cutoff.FromDatetime(cutoff)
        return response
