"""AlertService: list and acknowledge alerts, read the daily counters.

Bad input gets INVALID_ARGUMENT naming the field; an unknown alert, or another merchant's, NOT_FOUND
(a merchant cannot probe other merchants' parcels); a merchant asking for another merchant's list
or counters PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import NoReturn

import grpc
from relais.v1 import alerts_pb2, alerts_pb2_grpc, types_pb2

from common.clock import Clock
from engine import auth
from engine.alert_rules import TEAM_OF, AlertKind
from engine.alert_store import STATES, AlertState, AlertStore, decode_page_token, encode_page_token
from engine.stats import StatsReader

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
MAX_ACKNOWLEDGED_BY = 128
MAX_STATS_DAYS = 92

Context = grpc.aio.ServicerContext[object, object]


class _InvalidFieldError(Exception):
    """Bad input: the field and what is wrong, for INVALID_ARGUMENT."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


async def _abort(context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def _merchant_scope(requested: str, context: Context) -> str:
    """The merchant a listing is confined to ("" = all, for operators)."""
    merchant_id = auth.merchant_scope(requested)
    if merchant_id is None:
        await _abort(context, grpc.StatusCode.PERMISSION_DENIED, "merchant_id: not your merchant")
    return merchant_id


def _kinds(request: alerts_pb2.ListAlertsRequest) -> list[AlertKind]:
    kinds = list(dict.fromkeys(request.kinds)) or list(TEAM_OF)
    for kind in kinds:
        if kind not in TEAM_OF:
            raise _InvalidFieldError("kinds", f"{kind} is not an alert kind")
    if request.team != alerts_pb2.TEAM_UNSPECIFIED:
        if request.team not in alerts_pb2.Team.values():
            raise _InvalidFieldError("team", f"{request.team} is not a team")
        kinds = [k for k in kinds if TEAM_OF[k] == request.team]
    return kinds


def _states(request: alerts_pb2.ListAlertsRequest) -> list[AlertState]:
    if request.state == alerts_pb2.ALERT_STATE_UNSPECIFIED:
        return list(STATES)
    if request.state not in STATES:
        raise _InvalidFieldError("state", f"{request.state} is not an alert state")
    return [request.state]


def _page_size(request: alerts_pb2.ListAlertsRequest) -> int:
    if request.page_size > MAX_PAGE_SIZE:
        raise _InvalidFieldError("page_size", f"at most {MAX_PAGE_SIZE}")
    return request.page_size or DEFAULT_PAGE_SIZE


def _cursor(request: alerts_pb2.ListAlertsRequest) -> str:
    if not request.page_token:
        return ""
    cursor = decode_page_token(request.page_token)
    if cursor is None:
        raise _InvalidFieldError("page_token", "not a next_page_token of ListAlerts")
    return cursor


def _date(value: types_pb2.LocalDate, field: str) -> date:
    try:
        return date(value.year, value.month, value.day)
    except ValueError:
        raise _InvalidFieldError(field, "not a valid calendar date") from None


def _date_range(request: alerts_pb2.GetStatsRequest) -> tuple[date, date]:
    if not request.HasField("from_date"):
        raise _InvalidFieldError("from_date", "required")
    first = _date(request.from_date, "from_date")
    last = _date(request.to_date, "to_date") if request.HasField("to_date") else first
    if last < first:
        raise _InvalidFieldError("to_date", "before from_date")
    if last - first > timedelta(days=MAX_STATS_DAYS):
        raise _InvalidFieldError("to_date", f"more than {MAX_STATS_DAYS} days after from_date")
    return first, last


class AlertServicer(alerts_pb2_grpc.AlertServiceServicer):
    def __init__(self, store: AlertStore, stats: StatsReader, clock: Clock) -> None:
        self._store = store
        self._stats = stats
        self._clock = clock

    async def ListAlerts(  # noqa: N802 - gRPC method name
        self, request: alerts_pb2.ListAlertsRequest, context: Context
    ) -> alerts_pb2.ListAlertsResponse:
        merchant_id = await _merchant_scope(request.merchant_id, context)
        try:
            kinds, states = _kinds(request), _states(request)
            size, cursor = _page_size(request), _cursor(request)
        except _InvalidFieldError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not kinds:  # a team filter that excludes every requested kind
            return alerts_pb2.ListAlertsResponse()
        alerts, next_cursor = await self._store.page(
            merchant_id, kinds=kinds, states=states, after=cursor, size=size
        )
        return alerts_pb2.ListAlertsResponse(
            alerts=alerts, next_page_token=encode_page_token(next_cursor) if next_cursor else ""
        )

    async def AcknowledgeAlert(  # noqa: N802 - gRPC method name
        self, request: alerts_pb2.AcknowledgeAlertRequest, context: Context
    ) -> alerts_pb2.AcknowledgeAlertResponse:
        if not request.alert_id:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "alert_id: required")
        if not request.acknowledged_by:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "acknowledged_by: required")
        if len(request.acknowledged_by) > MAX_ACKNOWLEDGED_BY:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"acknowledged_by: at most {MAX_ACKNOWLEDGED_BY} characters",
            )
        alert = await self._store.get(request.alert_id)
        if alert is None or not auth.can_access_merchant(alert.merchant_id):
            await _abort(context, grpc.StatusCode.NOT_FOUND, "alert_id: no such alert")
        acked = await self._store.acknowledge(request.alert_id, request.acknowledged_by, self._clock.now_ms())
        if acked is None:  # its parcel expired between the two reads
            await _abort(context, grpc.StatusCode.NOT_FOUND, "alert_id: no such alert")
        return alerts_pb2.AcknowledgeAlertResponse(alert=acked)

    async def GetStats(  # noqa: N802 - gRPC method name
        self, request: alerts_pb2.GetStatsRequest, context: Context
    ) -> alerts_pb2.GetStatsResponse:
        merchant_id = await _merchant_scope(request.merchant_id, context)
        try:
            first, last = _date_range(request)
        except _InvalidFieldError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return alerts_pb2.GetStatsResponse(days=await self._stats.daily(merchant_id, first, last))


def add_alert_service(servicer: AlertServicer) -> Callable[[grpc.aio.Server], None]:
    """A ``register`` callable for ``engine.server.start_server``."""

    def add(server: grpc.aio.Server) -> None:
        alerts_pb2_grpc.add_AlertServiceServicer_to_server(servicer, server)

    return add
