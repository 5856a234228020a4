"""The PreferenceService servicer: read, update (with a field mask) and erase recipients' preferences.

An update re-plans the recipient's pending notices and an erasure cancels them, through callables the
engine composition injects (``replan_recipient`` / ``cancel_recipient_notices``), so this module knows
nothing of parcels. Bad input is INVALID_ARGUMENT with a ``google.rpc.BadRequest`` detail naming every
bad field (the ``grpc-status-details-bin`` trailer); values are never echoed back or logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status
from redis.asyncio import Redis
from relais.v1 import preferences_pb2, preferences_pb2_grpc

from engine import auth
from engine.preferences import InvalidPreferencesError, PreferenceStore, check_recipient_id
from engine.state import ConflictError
from engine.validation import Problem

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

# ``(recipient_id) -> count`` of notices re-planned or cancelled; ``ConflictError`` when the
# recipient's parcels kept changing under it (the caller retries).
RecipientHook = Callable[[str], Awaitable[int]]


async def abort_invalid(context: Context, problems: Sequence[Problem]) -> NoReturn:
    """INVALID_ARGUMENT whose message and BadRequest detail name the fields (never their values)."""
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=p.field, description=p.reason) for p in problems
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message="; ".join(p.reason for p in problems), details=[detail]
        )
    )
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


class PreferenceServicer(preferences_pb2_grpc.PreferenceServiceServicer):
    def __init__(
        self,
        redis: Redis,
        shards: int,
        *,
        replan_recipient: RecipientHook,
        cancel_recipient_notices: RecipientHook,
    ) -> None:
        self._store = PreferenceStore(redis, shards)
        self._replan = replan_recipient
        self._cancel = cancel_recipient_notices

    async def UpdatePreferences(  # noqa: N802 - gRPC method name
        self, request: preferences_pb2.UpdatePreferencesRequest, context: Context
    ) -> preferences_pb2.RecipientPreferences:
        if not request.HasField("preferences"):
            await abort_invalid(context, [Problem("preferences", "preferences is required")])
        await _authorize(request.preferences.recipient_id, context)
        try:
            stored, changed = await self._store.update(request.preferences, request.update_mask)
            # Re-planned even when nothing changed: the preferences are stored before the re-plan, so
            # when a re-plan fails the caller's retry finds them unchanged, and skipping it then would
            # leave pending notices on the old quiet hours and muted kinds for good. Re-planning is
            # idempotent, and costs a constant number of round trips per recipient.
            replanned = await self._replan(stored.recipient_id)
        except InvalidPreferencesError as exc:
            await abort_invalid(context, exc.problems)
        except ConflictError:
            await _abort_changed(context)
        log.info(
            "preferences of %s %s, %d notices re-planned",
            stored.recipient_id,
            "updated" if changed else "unchanged",
            replanned,
        )
        return stored

    async def GetPreferences(  # noqa: N802 - gRPC method name
        self, request: preferences_pb2.GetPreferencesRequest, context: Context
    ) -> preferences_pb2.RecipientPreferences:
        await self._check_id(request.recipient_id, context)
        stored = await self._store.get(request.recipient_id)
        if stored is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "recipient_id: no preferences for this recipient")
            raise AssertionError("context.abort returned")  # pragma: no cover
        return stored

    async def EraseRecipient(  # noqa: N802 - gRPC method name
        self, request: preferences_pb2.EraseRecipientRequest, context: Context
    ) -> preferences_pb2.EraseRecipientResponse:
        await self._check_id(request.recipient_id, context)
        # Preferences first: without them the gateway sends nothing, even a notice already claimed.
        erased = await self._store.erase(request.recipient_id)
        try:
            cancelled = await self._cancel(request.recipient_id)
        except ConflictError:
            await _abort_changed(context)
        log.info("recipient %s erased, %d notices cancelled", request.recipient_id, cancelled)
        return preferences_pb2.EraseRecipientResponse(preferences_erased=erased, notices_cancelled=cancelled)

    async def _check_id(self, recipient_id: str, context: Context) -> None:
        problem = check_recipient_id(recipient_id)
        if problem is not None:
            await abort_invalid(context, [problem])
        await _authorize(recipient_id, context)


async def _abort_changed(context: Context) -> NoReturn:
    # Other updates of the recipient, or a burst of events on their parcels, kept landing in between:
    # whatever was stored or erased already, the same request again finishes the job.
    await context.abort(grpc.StatusCode.ABORTED, "changed concurrently; send the same request again")
    raise AssertionError("context.abort returned")  # pragma: no cover


async def _authorize(recipient_id: str, context: Context) -> None:
    """Merchants touch only their own recipients (``<merchant_id>/...``, see ``engine.auth``)."""
    if not auth.can_access_recipient(recipient_id):
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "recipient_id: outside the caller's recipients (<merchant_id>/...)",
        )


def add_preference_service(servicer: PreferenceServicer) -> Callable[[grpc.aio.Server], None]:
    """A ``register`` callable for ``engine.server.start_server``."""

    def add(server: grpc.aio.Server) -> None:
        preferences_pb2_grpc.add_PreferenceServiceServicer_to_server(servicer, server)

    return add
