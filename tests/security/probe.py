"""Small servicers that stand behind the interceptors in the auth and error tests: they report what
the interceptors let through (the principal, the fine carrier rule) and misbehave on request (a bug
that raises with personal data in its message, a call that never finishes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from relais.v1 import parcel_pb2, parcel_pb2_grpc, tracking_pb2, tracking_pb2_grpc

from engine.auth import can_access_merchant, can_post_for_carrier, current_principal

SECRET_EMAIL = "canary.secret@example.org"


class ProbeTracking(tracking_pb2_grpc.TrackingServiceServicer):
    async def RecordEvents(self, request: tracking_pb2.EventBatch, context: Any) -> tracking_pb2.BatchAck:
        ack = tracking_pb2.BatchAck(seq=request.seq)
        for index, event in enumerate(request.events):
            if can_post_for_carrier(event.carrier):
                ack.accepted += 1
            else:
                ack.rejected.add(
                    index=index,
                    code=tracking_pb2.REJECT_CODE_PERMISSION_DENIED,
                    field="carrier",
                    reason="the caller may not post events for this carrier",
                    event_id=event.event_id,
                )
        return ack

    async def StreamEvents(self, request_iterator: Any, context: Any) -> AsyncIterator[tracking_pb2.BatchAck]:
        async for batch in request_iterator:
            yield tracking_pb2.BatchAck(seq=batch.seq, accepted=len(batch.events))


class ProbeParcels(parcel_pb2_grpc.ParcelServiceServicer):
    """GetParcel answers with the caller's principal in ``merchant_id``; ``boom`` raises, ``hang`` waits."""

    def __init__(self) -> None:
        self.hanging = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def GetParcel(self, request: parcel_pb2.GetParcelRequest, context: Any) -> parcel_pb2.ParcelView:
        if request.parcel_id == "boom":
            raise ValueError(f"cannot reach {SECRET_EMAIL}")
        if request.parcel_id == "hang":
            self.hanging.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        owner = request.parcel_id.partition("/")[0]
        if request.parcel_id.count("/") and not can_access_merchant(owner):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such parcel")
        principal = current_principal()
        return parcel_pb2.ParcelView(parcel_id=request.parcel_id, merchant_id=str(principal or "open"))

    async def RegisterParcels(
        self, request: parcel_pb2.RegisterParcelsRequest, context: Any
    ) -> parcel_pb2.RegisterParcelsResponse:
        return parcel_pb2.RegisterParcelsResponse(registered=len(request.parcels))


def add_probes(server: grpc.aio.Server, parcels: ProbeParcels | None = None) -> None:
    tracking_pb2_grpc.add_TrackingServiceServicer_to_server(ProbeTracking(), server)
    parcel_pb2_grpc.add_ParcelServiceServicer_to_server(parcels or ProbeParcels(), server)
